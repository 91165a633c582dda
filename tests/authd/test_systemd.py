"""systemd: the units verify, socket activation works, sd_notify messages arrive."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from authd import systemd
from tests.authd_process import REPO
from tests.interop.wire import Wire

UNITS = REPO / "deploy" / "systemd"


@pytest.mark.requires("systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    authd_bin = Path(sys.executable).parent / "authd"
    for unit in UNITS.glob("authd*"):
        text = unit.read_text().replace("/opt/authd/.venv/bin/authd", str(authd_bin))
        (tmp_path / unit.name).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "authd.service" in " ".join(units)
    service = (UNITS / "authd.service").read_text()
    for setting in ("Type=notify", "ExecReload=", "ProtectSystem=strict", "NoNewPrivileges=yes", "User=authd"):
        assert setting in service
    for kind in ("client", "login", "master", "userdb"):
        assert f"FileDescriptorName={kind}" in (UNITS / f"authd-{kind}.socket").read_text()


def test_notify_speaks_the_datagram_protocol(tmp_path: Path) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert receiver.recv(100) == b"READY=1"
    assert not systemd.notify("READY=1", {})


LAUNCHER = """\
import os, sys
# What systemd does: sockets at fds 3.., LISTEN_PID is the service's own pid.
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "authd.cli", *sys.argv[1:]])
"""


def test_socket_activation_and_notify(tmp_path: Path) -> None:
    script = tmp_path / "s.lua"
    script.write_text('function auth_passdb_lookup(req) return 1, "password=pw" end\n')
    config = tmp_path / "authd.toml"
    config.write_text(
        '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n'
        "[lua]\nworkers = 1\n[reload]\nwatch_scripts = false\n"
    )
    listeners = []
    for name in ("client", "auth-userdb"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / name))
        sock.listen(16)
        listeners.append(sock)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)

    def place_fds() -> None:
        for index, sock in enumerate(listeners):
            os.dup2(sock.fileno(), 3 + index)

    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        LISTEN_FDS="2",
        LISTEN_FDNAMES="client:auth-userdb",
        NOTIFY_SOCKET=str(tmp_path / "notify"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "serve", "--config", str(config)],
        env=env,
        preexec_fn=place_fds,
        stderr=subprocess.PIPE,
        text=True,
        close_fds=False,
    )
    try:
        assert notify.recv(200) == b"READY=1\nSTATUS=serving"
        resp = base64.b64encode(b"\0alice\0pw").decode()
        with Wire.auth_client(tmp_path / "client") as w:
            w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp\tresp={resp}")
            assert w.read_line() == "OK\t1\tuser=alice"
        with Wire.auth_master(tmp_path / "auth-userdb") as w:  # typed by its Dovecot-style name
            w.send("VERSION\t1\t0", "REQUEST\t1\t2\t3\t" + "00" * 16)
            assert w.read_until_eof() == []  # REQUEST is not allowed on a userdb socket
        # `systemctl reload` (ExecReload: SIGHUP): the reload is announced and its end too,
        # and the activated sockets (which the config does not list) keep serving.
        script.write_text('function auth_passdb_lookup(req) return 1, "password=new" end\n')
        proc.send_signal(signal.SIGHUP)
        reloading = notify.recv(200).decode()
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading", reloading), reloading
        assert notify.recv(200) == b"READY=1\nSTATUS=serving"
        resp = base64.b64encode(b"\0alice\0new").decode()
        with Wire.auth_client(tmp_path / "client") as w:
            w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp\tresp={resp}")
            assert w.read_line() == "OK\t1\tuser=alice"
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(200) == b"STOPPING=1"
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the sockets belong to systemd: authd must not remove them
    assert (tmp_path / "client").exists()

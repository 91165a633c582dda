"""Bad input over real sockets: Dovecot's reaction for each, and the daemon keeps serving."""

from __future__ import annotations

import base64
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire, WireClosed

PLAIN_ALICE = base64.b64encode(b"\0alice\0alicepass").decode()


def assert_still_serving(authd: AuthdProcess) -> None:
    with Wire.auth_client(authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t1")
        w.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={PLAIN_ALICE}")
        assert w.read_line() == "OK\t1\tuser=alice\t"
    assert authd.alive


@pytest.mark.parametrize(
    "lines",
    [
        b"this is not a protocol line\n",
        b"VERSION\t1\t2\nCPID\t7\n\x00\x01\x02garbage\n",
        b"VERSION\t1\t2\nCPID\t7\n" + b"A" * 20 * 1024 + b"\n",
        b"VERSION\t1\t2\nAUTH\t1\tPLAIN\tservice=smtp\n",
        b"VERSION\t1\t2\nCPID\t7\nAUTH\t1\tFOO-BAR\tservice=smtp\n",
        b"VERSION\t1\t2\nCPID\t7\nAUTH\t1\tPLAIN\tservice=smtp\tresp=\tx\n",
    ],
    ids=["garbage", "binary", "20KiB-line", "auth-before-cpid", "unknown-mech", "field-after-resp"],
)
def test_client_socket_disconnects(reference_authd: AuthdProcess, lines: bytes) -> None:
    with Wire.auth_client(reference_authd.socket("auth-client")) as w:
        w.send_raw(lines)
        assert w.read_until_eof() == []
    events = [e for e in reference_authd.log_events() if e.get("event") == "client.protocol_error"]
    assert events, reference_authd.log_text()
    assert_still_serving(reference_authd)


def test_invalid_base64_keeps_connection(reference_authd: AuthdProcess) -> None:
    with Wire.auth_client(reference_authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t8", "AUTH\t1\tPLAIN\tservice=smtp\tresp=!!!")
        assert w.read_line() == "FAIL\t1\tcode=invalid_base64\treason=Invalid base64 data in initial response"
        w.send(f"AUTH\t2\tPLAIN\tservice=smtp\tresp={PLAIN_ALICE}")
        assert w.read_line() == "OK\t2\tuser=alice\t"


@pytest.mark.parametrize(
    ("socket_name", "lines"),
    [
        ("auth-master", b"VERSION\t1\t0\nCPID\t123\n"),
        ("auth-userdb", b"VERSION\t1\t0\nREQUEST\t1\t2\t3\t" + b"00" * 16 + b"\n"),
        ("auth-userdb", b"VERSION\t1\t0\nCACHE-FLUSH\t1\n"),
        ("auth-userdb", b"VERSION\t1\t0\nUSER\t1\t" + b"a" * 2048 + b"\tservice=x\n"),
        ("auth-master", b"VERSION\t1\t0\nREQUEST\t1\t2\t3\tnothex\n"),
        ("auth-master", b"VERSION\t2\t0\n"),
    ],
    ids=[
        "cpid-on-master",
        "request-on-userdb",
        "flush-on-userdb",
        "2KiB-line",
        "bad-cookie-hex",
        "version-2",
    ],
)
def test_master_socket_disconnects(reference_authd: AuthdProcess, socket_name: str, lines: bytes) -> None:
    with Wire.auth_master(reference_authd.socket(socket_name)) as w:
        w.send_raw(lines)
        assert w.read_until_eof() == []
    with Wire.auth_master(reference_authd.socket("auth-userdb")) as w:
        w.send("VERSION\t1\t0", "USER\t1\talice\tservice=x")
        assert w.read_line().startswith("USER\t1\talice\t")


def test_duplicate_cpid_on_login_socket(reference_authd: AuthdProcess) -> None:
    first = Wire.auth_client(reference_authd.socket("auth-login"))
    try:
        first.send("VERSION\t1\t2", "CPID\t5151")
        first.send(f"AUTH\t1\tPLAIN\tservice=imap\tresp={PLAIN_ALICE}")
        assert first.read_line() == "OK\t1\tuser=alice\t"
        with Wire.auth_client(reference_authd.socket("auth-login")) as second:
            second.send("VERSION\t1\t2", "CPID\t5151")
            assert second.read_until_eof() == []
        # a plain client socket ignores CPIDs
        with Wire.auth_client(reference_authd.socket("auth-client")) as other:
            other.send("VERSION\t1\t2", "CPID\t5151")
            other.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={PLAIN_ALICE}")
            assert other.read_line() == "OK\t1\tuser=alice\t"
    finally:
        first.close()
    # once the server has seen the first connection go, the pid may be used again
    # (it notices the disconnect asynchronously: until then a new one is refused)
    deadline = time.monotonic() + 5
    while True:
        with Wire.auth_client(reference_authd.socket("auth-login")) as again:
            again.send("VERSION\t1\t2", "CPID\t5151")
            again.send(f"AUTH\t1\tPLAIN\tservice=imap\tresp={PLAIN_ALICE}")
            try:
                assert again.read_line() == "OK\t1\tuser=alice\t"
                break
            except WireClosed:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


def test_many_broken_clients_do_not_hurt(reference_authd: AuthdProcess) -> None:
    for _ in range(50):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(reference_authd.socket("auth-client")))
        sock.sendall(os.urandom(512))
        sock.close()
    assert_still_serving(reference_authd)


def test_a_client_that_never_reads_cannot_make_authd_buffer_without_bound(reference_authd: AuthdProcess) -> None:
    # Each AUTH gets an immediate FAIL (invalid base64). authd stops reading a client once 50 KiB of its
    # replies wait unsent (Dovecot's OUTBUF_THROTTLE_SIZE), so the client's writes stall
    # after little more than the sockets' buffers; without that they would go on for as
    # long as authd can parse requests.
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(reference_authd.socket("auth-client")))
    sock.setblocking(False)
    line = b"AUTH\t%d\tPLAIN\tservice=imap\tresp=!!!!\n"  # bad base64: an immediate FAIL
    written, request_id = 0, 1
    batch = b"VERSION\t1\t2\nCPID\t4242\n"
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline and written < 32_000_000:
            batch += b"".join(line % i for i in range(request_id, request_id + 1000))
            request_id += 1000
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                break  # authd stopped reading
            try:
                sent = sock.send(batch)
            except BlockingIOError:
                continue
            written += sent
            batch = batch[sent:]
        assert written < 8_000_000, f"authd read {written} bytes from a client that reads nothing"
        assert_still_serving(reference_authd)
    finally:
        sock.close()
    assert_still_serving(reference_authd)


SCRIPT_ERRORS = {
    "syntax.lua": ("function auth_passdb_lookup(req)\n  return 1, 'password=x'\n", "lua_load"),
    "toplevel.lua": ('error("cannot start")\n', "lua_pcall"),
    "init.lua": ("function script_init() return 1 end\n", "Script init failed"),
}


@pytest.mark.parametrize("name", sorted(SCRIPT_ERRORS))
def test_broken_script_stops_startup_with_dovecot_message(tmp_path: Path, name: str) -> None:
    source, marker = SCRIPT_ERRORS[name]
    (tmp_path / name).write_text(source)
    (tmp_path / "authd.toml").write_text(
        f'[[listener]]\ntype = "client"\npath = "sock"\n[[passdb]]\ndriver = "lua"\nfile = "{name}"\n'
    )
    for command in ("check", "serve"):
        done = subprocess.run(
            [sys.executable, "-m", "authd.cli", command, "--config", str(tmp_path / "authd.toml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done
        assert done.stderr.startswith(f"authd: passdb-lua: initialization failed: {marker}"), done.stderr
        assert "Traceback" not in done.stderr

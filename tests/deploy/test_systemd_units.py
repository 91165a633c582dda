"""deploy/systemd/ under a real systemd: PID 1 of a rootful podman container (runc, CAP_SYS_ADMIN).

The Debian 12 root filesystem (systemd, python3, a venv with authd's dependencies) is built once with mmdebstrap.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.authd_process import REPO

# Why podman and not systemd-nspawn (both boot systemd 252 here, see the module's README section in
# deploy/systemd/README.md): podman keeps the built root filesystem as an image, every boot starts
# from it unchanged, `podman exec` runs commands inside without finding the leader PID, and
# `podman rm` by container ID cleans up completely. runc, not crun: crun refuses hybrid cgroups.
CACHE = (REPO / ".cache").resolve() / "systemd-units"
RUNROOT = Path("/run/authd-tests-podman")
IMAGE = "localhost/authd-systemd-test"
SUITE = "bookworm"
# No procps: `systemctl reload` must work without /bin/kill, as on Debian's minbase.
DEBS = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
RECIPE = "1"  # bump to rebuild the cached image after changing the build below
UNITS = ("authd.service", "authd-client.socket", "authd-login.socket", "authd-master.socket", "authd-userdb.socket")
SOCKETS = UNITS[1:]
AUTHD = "/opt/authd/.venv/bin/authd"
WATCHDOG_SEC = 4

CONFIG = """\
# No [[listener]]: under socket activation the sockets come from the .socket units.
[auth]
mechanisms = ["plain", "login"]
failure_delay = 0

[[passdb]]
driver = "lua"
file = "/etc/authd/{script}"

[[userdb]]
driver = "lua"
file = "/etc/authd/{script}"

[lua]
workers = 1

[reload]
watch_scripts = false
"""

SCRIPT = """\
local users = {{ {user} = "{{PLAIN}}{password}" }}
function auth_passdb_lookup(req)
  if users[req.user] == nil then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user" end
  return dovecot.auth.PASSDB_RESULT_OK, {{ password = users[req.user] }}
end
function auth_userdb_lookup(req)
  if users[req.user] == nil then return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user" end
  return dovecot.auth.USERDB_RESULT_OK, {{ uid = "5000", gid = "5000" }}
end
"""

# Runs inside the container (Debian's python3): one Dovecot auth-client handshake after the other
# until /run/probe-stop exists; prints one JSON object: the latencies and the errors.
PROBE = r"""
import json, os, socket, time
latencies, errors = [], []
while not os.path.exists("/run/probe-stop") and len(latencies) + len(errors) < 2000:
    start = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect("/run/authd/auth-client")
        sock.sendall(b"VERSION\t1\t2\nCPID\t1\n")
        data = b""
        while b"\nDONE\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("EOF before DONE")
            data += chunk
        latencies.append(time.monotonic() - start)
    except OSError as exc:
        errors.append(repr(exc))
    finally:
        sock.close()
    time.sleep(0.02)
print(json.dumps({"latencies": latencies, "errors": errors}))
"""


def _podman_env() -> dict[str, str]:
    """A private podman configuration and store (containers.md): runc, cgroupfs, explicit rlimits."""
    CACHE.mkdir(parents=True, exist_ok=True)
    RUNROOT.mkdir(parents=True, exist_ok=True)
    nofile = min(int(subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout), 65536)
    (CACHE / "containers.conf").write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{RUNROOT}/tmp"\n'
    )
    (CACHE / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{CACHE}/storage"\nrunroot = "{RUNROOT}/run"\n'
    )
    return dict(
        os.environ,
        CONTAINERS_CONF=str(CACHE / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(CACHE / "storage.conf"),
    )


def _podman(env: dict[str, str], *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *argv], env=env, capture_output=True, text=True, timeout=timeout)


def _mirrors() -> list[str]:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists() and re.search(rf"(?m)^Suites:.*\b{SUITE}\b", sources.read_text()):
        return [str(sources)]  # the host's own mirrors (Debian 12 host)
    return [
        f"deb http://deb.debian.org/debian {SUITE} main",
        f"deb http://deb.debian.org/debian {SUITE}-updates main",
        f"deb http://deb.debian.org/debian-security {SUITE}-security main",
    ]


def _requirements() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [*pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"]]


def _build_image(env: dict[str, str]) -> str:
    """The cached image (tagged by what goes into it), built with mmdebstrap and `podman import`."""
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building it right now
        return _build_image_locked(env)


def _build_image_locked(env: dict[str, str]) -> str:
    requirements = _requirements()
    key = hashlib.sha256(json.dumps([RECIPE, SUITE, DEBS, requirements]).encode()).hexdigest()[:12]
    image = f"{IMAGE}:{key}"
    if _podman(env, "image", "exists", image).returncode == 0:
        return image
    tree = CACHE / f"rootfs-{key}"
    pip = " ".join(shlex.quote(req) for req in requirements)
    hooks = [
        # The host's CAs (a TLS-intercepting proxy's among them) for pip inside the chroot.
        'for crt in /usr/local/share/ca-certificates/*.crt; do [ -f "$crt" ] && '
        'cp "$crt" "$1/usr/local/share/ca-certificates/"; done; chroot "$1" update-ca-certificates >/dev/null',
        'chroot "$1" useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin authd',
        'chroot "$1" python3 -m venv /opt/authd/.venv && '
        f'chroot "$1" env -u PIP_FIND_LINKS /opt/authd/.venv/bin/pip install -q --no-cache-dir {pip}',
    ]
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    command = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        "--mode=root",
        "--components=main",
        f"--include={','.join(DEBS)}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        '--aptopt=Acquire::Languages "none"',
        *([f"--keyring={keyring}"] if keyring.exists() else []),
        *(f"--customize-hook={hook}" for hook in hooks),
        SUITE,
        str(tree),
        *_mirrors(),
    ]
    if not (tree / ".complete").exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(tree)], check=True)
        built = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert built.returncode == 0, built.stderr[-3000:]
        (tree / ".complete").touch()
    with subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run(
            ["podman", "import", "--change", 'CMD ["/lib/systemd/systemd"]', "-", image],
            env=env,
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert tar.returncode == 0 and imported.returncode == 0, imported.stderr
    subprocess.run(["rm", "-rf", "--one-file-system", str(tree)], check=True)
    # Older builds of the image (other keys) are not needed any more.
    tags = _podman(env, "images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE).stdout.split()
    for old in tags:
        if old != image:
            _podman(env, "rmi", "-f", old)
    return image


@dataclass(frozen=True)
class Machine:
    """A booted container: commands run inside it with `podman exec`."""

    cid: str
    env: dict[str, str]

    def run(
        self, *argv: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", "exec", "-i", self.cid, *argv],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", f"cat > {shlex.quote(path)}", input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def authenticate(self, user: str, password: str) -> subprocess.CompletedProcess[str]:
        return self.run(AUTHD, "test", "-a", "/run/authd/auth-client", user, password, check=False, timeout=60)

    def inode(self, path: str) -> str:
        return self.run("stat", "-c", "%i", path).stdout.strip()

    def cursor(self) -> str:
        out = self.run("journalctl", "-n", "0", "--show-cursor", "--quiet").stdout
        return out.strip().removeprefix("-- cursor: ")

    def journal(self, cursor: str, *args: str) -> str:
        return self.run("journalctl", "--no-pager", f"--after-cursor={cursor}", *args).stdout

    def wait_for(self, what: str, predicate: object, timeout: float = 30) -> None:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "rootful podman needs root"
    for program, package in (("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(program) is None and shutil.which(program, path="/usr/sbin:/sbin") is None:
            return f"{program} is not installed (Debian's {package}; scripts/bootstrap installs it as root)"
    return None


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    env = _podman_env()
    started = time.monotonic()
    image = _build_image(env)
    built = time.monotonic() - started
    # What `pip install` needs from the work tree, plus the units; pip builds in this copy.
    src = tmp_path_factory.mktemp("authd-src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for package in ("authd", "protocol", "config", "lua_api", "deploy/systemd"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = _podman(
        env,
        "run",
        "-d",
        "--systemd=always",
        "--network=none",
        "--cap-add=SYS_ADMIN",  # without it systemd silently skips the mount-namespace sandboxing
        "--cap-add=SYS_PTRACE",  # for `nsenter -t MAINPID` into authd's namespaces (the sandbox check)
        f"--volume={src}:/opt/authd/src",
        image,
        "/lib/systemd/systemd",
    )
    assert run.returncode == 0, run.stderr
    box = Machine(run.stdout.strip(), env)
    try:
        box.wait_for(
            "systemd to boot",
            lambda: box.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded"),
        )
        booted = time.monotonic() - started - built
        box.run(
            "/opt/authd/.venv/bin/pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "/opt/authd/src",
            timeout=300,
        )
        box.run("sh", "-c", "cp /opt/authd/src/deploy/systemd/authd* /etc/systemd/system/")
        # A short watchdog interval, so that the hung-daemon check takes seconds, not a minute.
        box.run("mkdir", "-p", "/etc/systemd/system/authd.service.d")
        box.write("/etc/systemd/system/authd.service.d/test.conf", f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n")
        box.run("mkdir", "-p", "/etc/authd")
        box.write("/etc/authd/auth.lua", SCRIPT.format(user="alice", password="alicepass"))
        box.write("/etc/authd/authd.toml", CONFIG.format(script="auth.lua"))
        box.run("systemctl", "daemon-reload")
        print(f"image {built:.1f} s, boot {booted:.1f} s, install {time.monotonic() - started - built - booted:.1f} s")
        yield box
    finally:
        stopped = _podman(env, "stop", "--time=20", box.cid, timeout=60)
        _podman(env, "rm", "--force", box.cid, timeout=60)
        assert stopped.returncode == 0, stopped.stderr


def _probe(box: Machine) -> subprocess.Popen[str]:
    box.run("rm", "-f", "/run/probe-stop")
    return subprocess.Popen(
        ["podman", "exec", box.cid, "python3", "-c", PROBE],
        env=box.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _probe_result(box: Machine, probe: subprocess.Popen[str]) -> dict[str, list[object]]:
    box.run("touch", "/run/probe-stop")
    out, err = probe.communicate(timeout=60)
    assert probe.returncode == 0, err
    result: dict[str, list[object]] = json.loads(out)
    return result


def _socket_state(box: Machine) -> list[tuple[str, str, str]]:
    """Per socket unit: its state, when it started listening, and the socket file's inode."""
    states = []
    for unit in SOCKETS:
        props = box.show(unit, "ActiveState", "ActiveEnterTimestampMonotonic")
        path = "/run/authd/auth-" + unit.removeprefix("authd-").removesuffix(".socket")
        states.append((props["ActiveState"], props["ActiveEnterTimestampMonotonic"], box.inode(path)))
    return states


def test_start_notify_ready(machine: Machine) -> None:
    # The image has no procps (so no /bin/kill) and the config no [[listener]].
    assert machine.run("test", "-e", "/bin/kill", check=False).returncode == 1
    started = time.monotonic()
    machine.run("systemctl", "start", "authd.service")
    print(f"systemctl start authd: {time.monotonic() - started:.2f} s")
    props = machine.show("authd.service", "Type", "ActiveState", "SubState", "StatusText", "Result", "NRestarts")
    assert props == {
        "Type": "notify",
        "ActiveState": "active",
        "SubState": "running",
        "StatusText": "serving",
        "Result": "success",
        "NRestarts": "0",
    }
    assert [state for state, _, _ in _socket_state(machine)] == ["active"] * 4
    done = machine.authenticate("alice", "alicepass")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("passdb: alice auth succeeded\n")


def test_reload_applies_changed_config(machine: Machine) -> None:
    pid = machine.show("authd.service", "MainPID")["MainPID"]
    machine.write("/etc/authd/carol.lua", SCRIPT.format(user="carol", password="carolpass"))
    machine.write("/etc/authd/authd.toml", CONFIG.format(script="carol.lua"))
    cursor = machine.cursor()
    machine.run("systemctl", "reload", "authd.service")
    machine.wait_for("reload.done", lambda: '"reload.done"' in machine.journal(cursor, "-u", "authd.service"))
    assert machine.show("authd.service", "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    assert machine.authenticate("carol", "carolpass").returncode == 0
    assert machine.authenticate("alice", "alicepass").returncode == 77
    assert "203/EXEC" not in machine.journal(cursor)


def test_restart_keeps_sockets_and_queued_connections(machine: Machine) -> None:
    sockets = _socket_state(machine)
    pid = machine.show("authd.service", "MainPID")["MainPID"]
    cursor = machine.cursor()
    probe = _probe(machine)
    time.sleep(1.0)
    started = time.monotonic()
    machine.run("systemctl", "restart", "authd.service")
    print(f"systemctl restart authd: {time.monotonic() - started:.2f} s")
    time.sleep(0.5)
    result = _probe_result(machine, probe)
    assert result["errors"] == []
    latencies = [float(str(x)) for x in result["latencies"]]
    # Some handshakes were made while no authd ran: they waited in the kept socket's backlog.
    assert len(latencies) > 10 and max(latencies) > 0.3, latencies
    assert machine.show("authd.service", "MainPID")["MainPID"] != pid
    assert _socket_state(machine) == sockets
    assert "Closed authd-" not in machine.journal(cursor)


def test_watchdog_restarts_hung_daemon_keeping_sockets(machine: Machine) -> None:
    sockets = _socket_state(machine)
    props = machine.show("authd.service", "MainPID", "NRestarts", "WatchdogUSec")
    assert props["MainPID"] != "0"
    assert props["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    # The pings arrive: still the same process after more than one interval.
    time.sleep(WATCHDOG_SEC + 1)
    assert machine.show("authd.service", "MainPID")["MainPID"] == props["MainPID"]
    cursor = machine.cursor()
    probe = _probe(machine)
    time.sleep(0.5)
    hung = time.monotonic()
    machine.run("sh", "-c", f"kill -STOP {props['MainPID']}")  # no procps: the shell's kill

    def restarted() -> bool:
        now = machine.show("authd.service", "NRestarts", "SubState", "MainPID")
        return now["NRestarts"] == str(int(props["NRestarts"]) + 1) and now["SubState"] == "running"

    machine.wait_for("the watchdog restart", restarted, timeout=60)
    print(f"hung until serving again: {time.monotonic() - hung:.2f} s")
    result = _probe_result(machine, probe)
    assert result["errors"] == []
    assert max(float(str(x)) for x in result["latencies"]) > WATCHDOG_SEC - 1
    journal = machine.journal(cursor)
    assert f"authd.service: Watchdog timeout (limit {WATCHDOG_SEC}s)!" in journal
    assert "authd.service: Failed with result 'watchdog'." in journal
    assert "Closed authd-" not in journal
    assert _socket_state(machine) == sockets
    assert machine.authenticate("carol", "carolpass").returncode == 0


def test_socket_activation(machine: Machine) -> None:
    machine.run("systemctl", "stop", *UNITS)
    machine.run("systemctl", "start", *SOCKETS)
    assert machine.show("authd.service", "ActiveState")["ActiveState"] == "inactive"
    assert [state for state, _, _ in _socket_state(machine)] == ["active"] * 4
    started = time.monotonic()
    done = machine.authenticate("carol", "carolpass")
    print(f"first connection answered after {time.monotonic() - started:.2f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    props = machine.show("authd.service", "ActiveState", "SubState", "TriggeredBy")
    assert props["ActiveState"] == "active" and props["SubState"] == "running"
    assert sorted(props["TriggeredBy"].split()) == sorted(SOCKETS)


def test_journal_has_structured_fields(machine: Machine) -> None:
    lines = machine.run("journalctl", "-u", "authd.service", "-o", "json", "--no-pager").stdout.splitlines()
    entries = [json.loads(line) for line in lines]
    events = []
    for entry in entries:
        message = entry.get("MESSAGE")
        if entry.get("_SYSTEMD_UNIT") == "authd.service" and isinstance(message, str) and message.startswith("{"):
            events.append(json.loads(message))
    names = {event.get("event") for event in events}
    assert {"listener.ready", "reload.started", "reload.done", "server.stopped", "auth.request"} <= names, names
    assert all({"event", "level", "timestamp"} <= event.keys() for event in events), events[:3]
    request = next(event for event in events if event.get("event") == "auth.request")
    assert {k: request[k] for k in ("command", "result", "mech", "user")} == {
        "command": "AUTH",
        "result": "ok",
        "mech": "PLAIN",
        "user": "alice",
    }
    assert {event["where"] for event in events if event["event"] == "listener.ready"} == {
        f"/run/authd/auth-{kind}" for kind in ("client", "login", "master", "userdb")
    }
    text = "\n".join(lines)
    assert "alicepass" not in text and "carolpass" not in text


def test_sandboxing_applied(machine: Machine) -> None:
    pid = machine.show("authd.service", "MainPID")["MainPID"]
    assert pid != "0"
    status = machine.run("cat", f"/proc/{pid}/status").stdout
    assert re.search(r"(?m)^NoNewPrivs:\s+1$", status) and re.search(r"(?m)^CapEff:\s+0+$", status), status
    assert re.search(r"(?m)^Uid:\s+(\d+)", status).group(1) == machine.run("id", "-u", "authd").stdout.strip()  # type: ignore[union-attr]
    uid = machine.run("id", "-u", "authd").stdout.strip()
    gid = machine.run("id", "-g", "authd").stdout.strip()
    as_authd = ("nsenter", "-t", pid, "-m", "-S", uid, "-G", gid)
    # In the container's own mount namespace root may write /usr/local and /var/lib; in authd's
    # not (ProtectSystem=strict), not even as root; its /tmp is its own (PrivateTmp=).
    machine.run("sh", "-c", "touch /usr/local/probe /var/lib/probe && rm /usr/local/probe /var/lib/probe")
    for path in ("/usr/local/probe", "/var/lib/probe", "/opt/authd/probe"):
        denied = machine.run("nsenter", "-t", pid, "-m", "touch", path, check=False)
        assert denied.returncode == 1 and "Read-only file system" in denied.stderr, (path, denied.stderr)
    # ConfigurationDirectory=authd stays root's: authd's own user cannot write its config.
    denied = machine.run(*as_authd, "touch", "/etc/authd/probe", check=False)
    assert denied.returncode == 1 and "Permission denied" in denied.stderr, denied.stderr
    machine.run(*as_authd, "touch", "/run/authd/probe", "/tmp/probe")  # RuntimeDirectory=, its private /tmp
    machine.run("rm", "/run/authd/probe")
    assert machine.run("test", "-e", "/tmp/probe", check=False).returncode == 1
    score = machine.run("systemd-analyze", "security", "authd.service", check=False).stdout
    found = re.search(r"Overall exposure level for authd.service: (\d+\.\d+) (\w+)", score)
    assert found, score
    print(f"systemd-analyze security authd: {found.group(1)} {found.group(2)}")
    assert float(found.group(1)) < 2.0
    readme = (REPO / "deploy" / "systemd" / "README.md").read_text()
    assert f"`systemd-analyze security authd`: {found.group(1)} {found.group(2)}" in readme


def test_stop_whole_set_closes_sockets(machine: Machine) -> None:
    # `systemctl stop authd` alone leaves the sockets listening (socket activation restarts it).
    machine.run("systemctl", "stop", "authd.service")
    assert [state for state, _, _ in _socket_state(machine)] == ["active"] * 4
    machine.run("systemctl", "stop", *UNITS)
    assert machine.show("authd.service", "ActiveState")["ActiveState"] == "inactive"
    for unit in SOCKETS:
        assert machine.show(unit, "ActiveState")["ActiveState"] == "inactive"
    refused = machine.authenticate("carol", "carolpass")
    assert refused.returncode != 0 and "Connection refused" in refused.stdout + refused.stderr

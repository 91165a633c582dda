"""A misbehaving client costs its own connection only, on every kind of listener.

Each listener kind (client, login, master, userdb and TCP sockets from the config, the
metrics endpoint, systemd-activated and Dovecot-inherited sockets) meets a reset, a half
close, garbage, an oversized request and a client that never reads; after each, the daemon
still serves a good login and its log holds no traceback. Also: every listening socket
takes the system's maximum backlog, and socket types authd does not serve are refused.
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, REPO, AuthdProcess, accepts

SCRIPT = """
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw"
end
function auth_userdb_lookup(req)
  return dovecot.auth.USERDB_RESULT_OK, "uid=1000 home=/home/" .. req.user
end
"""

BASE_CONFIG = (
    '[auth]\nfailure_delay = 0\npenalty = false\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n'
    '[[userdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 2\n[reload]\nwatch_scripts = false\n'
)

Target = Path | tuple[str, int]


@dataclass(frozen=True)
class Kind:
    """How to speak to one listener kind: a partial request, a good request, a reply flood."""

    protocol: str  # "client", "master" or "http"
    #: Does the server speak first (its greeting)?
    greets: bool

    @property
    def partial(self) -> bytes:
        return {"client": b"VERSION\t1\t2\nCPID\t", "master": b"VERSION\t1\t0\nUSER\t1\ta", "http": b"GET /metr"}[
            self.protocol
        ]

    def complete(self, cpid: int) -> bytes:
        if self.protocol == "client":
            return f"VERSION\t1\t2\nCPID\t{cpid}\nAUTH\t1\tPLAIN\tservice=smtp\tresp={PLAIN}\n".encode()
        if self.protocol == "master":
            return b"VERSION\t1\t0\nUSER\t1\talice\tservice=lmtp\n"
        return b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"

    def flood(self, cpid: int) -> Iterator[bytes]:
        """Requests whose replies pile up when nobody reads them."""
        if self.protocol == "client":
            yield f"VERSION\t1\t2\nCPID\t{cpid}\n".encode()
            for start in range(1, 10**7, 1000):
                yield b"".join(b"CONT\t%d\tAA==\n" % i for i in range(start, start + 1000))
        elif self.protocol == "master":
            yield b"VERSION\t1\t0\n"
            for start in range(1, 10**7, 1000):
                yield b"".join(b"USER\t%d\ta b\tservice=lmtp\n" % i for i in range(start, start + 1000))
        else:
            yield self.complete(cpid)


CLIENT = Kind("client", greets=True)
MASTER = Kind("master", greets=True)
HTTP = Kind("http", greets=False)
PLAIN = base64.b64encode(b"\0alice\0pw").decode()


def connect(target: Target, timeout: float = 5.0) -> socket.socket:
    if isinstance(target, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(target) if isinstance(target, Path) else target)
    return sock


def read_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes; fails if it never does."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the server did not close the connection; got {data[:200]!r}"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def wait_readable(sock: socket.socket, timeout: float = 5.0) -> None:
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, "the server sent nothing"


def close_with_reset(sock: socket.socket) -> None:
    """SO_LINGER 0: a TCP peer gets an RST; a unix one (with our unread bytes) ECONNRESET."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
        sock.sendall(data)


# --- the faults: each takes the listener and a check that the daemon still serves ------


def reset(target: Target, kind: Kind, check: Callable[[], None]) -> None:
    sock = connect(target)
    sock.sendall(kind.partial)
    if kind.greets:
        wait_readable(sock)  # the greeting sits unread in our buffer
    else:
        time.sleep(0.1)  # the server waits for the rest of the request
    close_with_reset(sock)


def half_close(target: Target, kind: Kind, check: Callable[[], None]) -> None:
    sock = connect(target)
    try:
        sock.sendall(kind.complete(9001))
        sock.shutdown(socket.SHUT_WR)
        data = read_until_eof(sock)
    finally:
        sock.close()
    if kind.protocol == "http":
        assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data[:200]


def garbage(target: Target, kind: Kind, check: Callable[[], None]) -> None:
    sock = connect(target)
    try:
        send_ignoring_close(sock, bytes(range(256)) * 8 + b"\n\t\t\n\xff\xfe\x00\r\n\r\n")
        read_until_eof(sock)
    finally:
        sock.close()


def oversized(target: Target, kind: Kind, check: Callable[[], None]) -> None:
    sock = connect(target)
    try:
        prefix = b"GET /" if kind.protocol == "http" else b"AUTH\t1\tPLAIN\tresp="
        send_ignoring_close(sock, prefix + b"A" * (4 * 1024 * 1024))
        read_until_eof(sock)
    finally:
        sock.close()


def never_reads(target: Target, kind: Kind, check: Callable[[], None]) -> None:
    sock = connect(target)
    sock.setblocking(False)
    try:
        sent, blocked = 0, False
        for chunk in kind.flood(9002):
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                blocked = True  # the server stopped reading us: its replies fill the buffers
                break
            if sent > 64 * 1024 * 1024:
                break
        assert blocked or kind.protocol == "http", f"authd read {sent} bytes without throttling"
        time.sleep(0.3)
        check()  # everyone else is still served while this client is stuck
    finally:
        close_with_reset(sock)


FAULTS = {f.__name__: f for f in (reset, half_close, garbage, oversized, never_reads)}


# --- the daemons --------------------------------------------------------------------------


def good_login(path: Path) -> None:
    sock = connect(path)
    try:
        sock.sendall(CLIENT.complete(4242))
        data = b""
        while b"\nOK\t1\t" not in data and b"\nFAIL\t" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert b"\nOK\t1\tuser=alice" in data, data
    finally:
        sock.close()


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-5000:]
    assert '"exception"' not in text, text[-5000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ConfiguredDaemon:
    proc: AuthdProcess
    tcp_port: int

    def targets(self) -> dict[str, tuple[Target, Kind]]:
        metrics = self.proc.wait_for_log(lambda e: e.get("event") == "metrics.ready")["port"]
        return {
            "client": (self.proc.socket("auth-client"), CLIENT),
            "login": (self.proc.socket("auth-login"), CLIENT),
            "master": (self.proc.socket("auth-master"), MASTER),
            "userdb": (self.proc.socket("auth-userdb"), MASTER),
            "tcp": (("127.0.0.1", self.tcp_port), CLIENT),
            "metrics": (("127.0.0.1", int(metrics)), HTTP),
        }


@pytest.fixture(scope="module")
def configured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfiguredDaemon]:
    """Two processes (the worker serves every other shared connection), every listener kind."""
    port = free_port()
    config = (
        BASE_CONFIG
        + '[server]\nprocesses = 2\n[metrics]\naddress = "127.0.0.1"\nport = 0\n'
        + LISTENERS
        + f'\n[[listener]]\ntype = "client"\naddress = "127.0.0.1"\nport = {port}\n'
    )
    proc = AuthdProcess(tmp_path_factory.mktemp("faults"), config, {"s.lua": SCRIPT})
    proc.start(wait_for=("auth-client", "auth-login", "auth-master", "auth-userdb"))
    proc.wait_for_log(lambda e: e.get("event") == "workers.ready", timeout=60)
    try:
        yield ConfiguredDaemon(proc, port)
    finally:
        proc.stop()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("listener", ["client", "login", "master", "userdb", "tcp", "metrics"])
def test_configured_listener_survives(configured: ConfiguredDaemon, listener: str, fault: str) -> None:
    proc = configured.proc
    target, kind = configured.targets()[listener]

    def check() -> None:
        good_login(proc.socket("auth-client"))

    for _ in range(2):  # twice: shared connections go to the main process and the worker in turn
        FAULTS[fault](target, kind, check)
    time.sleep(0.2)
    assert proc.alive, proc.log_text()[-5000:]
    for _ in range(2):
        check()
    if listener == "metrics":
        half_close(target, kind, check)  # a good scrape too
    assert_no_traceback(proc.log_text())


SYSTEMD_LAUNCHER = """\
import os, sys
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "authd.cli", *sys.argv[1:]])
"""


def unix_listener(path: Path, backlog: int = 16) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


class InheritingDaemon:
    """authd started with listening sockets placed at fds `first`.. (systemd: 3, Dovecot: 7)."""

    def __init__(
        self,
        workdir: Path,
        names: list[str],
        *,
        dovecot: bool,
        sockets: list[socket.socket] | None = None,
    ) -> None:
        self.workdir = workdir
        (workdir / "s.lua").write_text(SCRIPT)
        config = workdir / "authd.toml"
        config.write_text(BASE_CONFIG)
        self.sockets = sockets or [unix_listener(workdir / name.replace("/", "-")) for name in names]
        self.log_path = workdir / "authd.log"
        first = 7 if dovecot else 3
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if dovecot:
            self._dead_read, dead_write = os.pipe()
            env["SOCKET_COUNT"] = str(len(names))
            for index, name in enumerate(names):
                env[f"SOCKET{index}_SETTINGS"] = name
            args = [sys.executable, "-m", "authd.cli", "serve", "--dovecot-service", "--config", str(config)]
        else:
            dead_write = -1
            env["LISTEN_FDS"] = str(len(names))
            env["LISTEN_FDNAMES"] = ":".join(names)
            args = [sys.executable, "-c", SYSTEMD_LAUNCHER, "serve", "--json-logs", "--config", str(config)]

        def place_fds() -> None:
            if dead_write >= 0:
                os.dup2(dead_write, 6)
            for index, sock in enumerate(self.sockets):
                os.dup2(sock.fileno(), first + index)

        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                args, env=env, preexec_fn=place_fds, stdout=log, stderr=log, close_fds=False, cwd=workdir
            )
        if dead_write >= 0:
            os.close(dead_write)

    def path(self, name: str) -> Path:
        return self.workdir / name.replace("/", "-")

    def wait_serving(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, self.log_text()
            if "listener.ready" in self.log_text() and accepts(self.path(name)):
                return
            time.sleep(0.05)
        raise AssertionError(f"authd did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if hasattr(self, "_dead_read"):
            os.close(self._dead_read)
        for sock in self.sockets:
            sock.close()
        return self.popen.returncode


INHERITED = {
    "systemd": ["client", "login", "master", "auth-userdb"],
    "dovecot": ["auth-client", "login/login", "auth-master", "auth-userdb"],
}


@pytest.fixture(scope="module", params=sorted(INHERITED))
def inheriting(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InheritingDaemon]:
    names = INHERITED[request.param]
    daemon = InheritingDaemon(tmp_path_factory.mktemp(request.param), names, dovecot=request.param == "dovecot")
    try:
        daemon.wait_serving(names[0])
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("index", range(4))
def test_inherited_listener_survives(inheriting: InheritingDaemon, index: int, fault: str) -> None:
    names = [s.getsockname() for s in inheriting.sockets]
    target = Path(names[index])
    kind = CLIENT if index < 2 else MASTER

    def check() -> None:
        good_login(Path(names[0]))

    FAULTS[fault](target, kind, check)
    time.sleep(0.2)
    assert inheriting.popen.poll() is None, inheriting.log_text()[-5000:]
    check()
    assert_no_traceback(inheriting.log_text())


# --- item: the backlog ----------------------------------------------------------------------


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


SIMULTANEOUS = 500


def connect_at_once(target: Target, count: int) -> tuple[list[socket.socket], int]:
    """`count` non-blocking connects in a row: the sockets, and how many the kernel refused."""
    family = socket.AF_UNIX if isinstance(target, Path) else socket.AF_INET
    address = str(target) if isinstance(target, Path) else target
    sockets, refused = [], 0
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code in (0, 115):  # connected or EINPROGRESS (TCP)
            sockets.append(sock)
        else:
            refused += 1  # EAGAIN: the listen queue is full
            sock.close()
    return sockets, refused


def established(sockets: list[socket.socket], timeout: float = 0.5) -> int:
    """How many TCP connects completed (the kernel's accept queue took them) within `timeout`."""
    pending = set(sockets)
    done = 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], list(pending), [], max(deadline - time.monotonic(), 0))
        for sock in writable:
            pending.discard(sock)
            done += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return done


@pytest.mark.skipif(somaxconn() < SIMULTANEOUS, reason="net.core.somaxconn is below 500")
@pytest.mark.parametrize("listener", ["client", "login", "master", "userdb", "tcp", "metrics"])
def test_simultaneous_connects_are_all_accepted(configured: ConfiguredDaemon, listener: str) -> None:
    """An auth restart makes every login and LMTP process reconnect at once: the listen
    queue takes them all, however slowly authd gets round to accepting."""
    proc = configured.proc
    target, kind = configured.targets()[listener]
    os.kill(proc.pid, signal.SIGSTOP)  # accepts nothing while the clients connect
    try:
        sockets, refused = connect_at_once(target, SIMULTANEOUS)
        queued = len(sockets) if isinstance(target, Path) else established(sockets)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    try:
        assert (refused, queued) == (0, SIMULTANEOUS)
        if kind.greets:  # and each is served once authd runs again
            for sock in sockets[:: SIMULTANEOUS // 10]:
                sock.setblocking(True)
                sock.settimeout(20)
                line = b""
                while not line.endswith(b"\n"):
                    chunk = sock.recv(1)
                    assert chunk, line
                    line += chunk
                assert line.startswith(b"VERSION\t1\t"), line
    finally:
        for sock in sockets:
            sock.close()
    good_login(proc.socket("auth-client"))
    assert_no_traceback(proc.log_text())


@pytest.mark.parametrize("inherited", sorted(INHERITED))
def test_inherited_sockets_get_the_maximum_backlog(tmp_path: Path, inherited: str) -> None:
    names = INHERITED[inherited]
    daemon = InheritingDaemon(tmp_path, names, dovecot=inherited == "dovecot")
    try:
        daemon.wait_serving(names[0])
        target = Path(daemon.sockets[0].getsockname())
        os.kill(daemon.popen.pid, signal.SIGSTOP)
        try:
            sockets, refused = connect_at_once(target, SIMULTANEOUS)  # they were listening with 16
        finally:
            os.kill(daemon.popen.pid, signal.SIGCONT)
        for sock in sockets:
            sock.close()
        assert refused == 0
    finally:
        daemon.stop()


# --- item: socket types authd does not serve ----------------------------------------------


@pytest.mark.parametrize("name", ["auth-token", "tokenlogin", "token-login", "token"])
def test_systemd_token_socket_is_refused_at_start(tmp_path: Path, name: str) -> None:
    daemon = InheritingDaemon(tmp_path, ["client", name], dovecot=False)
    try:
        code = daemon.popen.wait(30)
    finally:
        daemon.stop()
    assert code == 1
    assert f"authd: systemd socket {name!r} (fd 4): authd does not serve DOVECOT-TOKEN" in daemon.log_text()
    assert_no_traceback(daemon.log_text())


def test_systemd_socket_that_is_not_listening_is_refused(tmp_path: Path) -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # where a stream listener belongs
    dgram.bind(str(tmp_path / "client"))
    daemon = InheritingDaemon(tmp_path, ["client"], dovecot=False, sockets=[dgram])
    try:
        code = daemon.popen.wait(30)
    finally:
        daemon.stop()
    assert code == 1
    assert "authd: systemd socket 'client' (fd 3): not a listening stream socket" in daemon.log_text()


def test_dovecot_token_socket_is_refused_with_a_warning(tmp_path: Path) -> None:
    """Dovecot's master hands `token-login/tokenlogin` to every auth service by default,
    so authd starts, says at start that it does not serve it, and closes each connection to
    it at once (imap-urlauth-login sees a refusal, not a server that never answers)."""
    daemon = InheritingDaemon(tmp_path, ["auth-client", "token-login/tokenlogin"], dovecot=True)
    try:
        daemon.wait_serving("auth-client")
        warning = [line for line in daemon.log_text().splitlines() if "listener.refused" in line]
        assert len(warning) == 1, daemon.log_text()
        assert warning[0].endswith(
            f"listener.refused: DOVECOT-TOKEN (imap-urlauth) is not implemented: each connection is closed"
            f" type=token where={tmp_path / 'token-login-tokenlogin'}"
        ), warning
        sock = connect(daemon.path("token-login/tokenlogin"))
        try:
            assert read_until_eof(sock, timeout=5) == b""  # closed at once, not greeted
        finally:
            sock.close()
        good_login(daemon.path("auth-client"))
        assert_no_traceback(daemon.log_text())
    finally:
        assert daemon.stop() == 0

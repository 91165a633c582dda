"""The flood scenario: one connection pipelines 100 000 AUTHs while their HTTP backend hangs.

Meanwhile fresh connections log in one after another (their backend answers at once); the
server's RSS is sampled throughout and for 10 s after the flood's connection closed.
"""

from __future__ import annotations

import base64
import socket
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.backend import Backend
from bench.loadgen import PASSWORD, USER
from bench.procs import rss_bytes
from bench.servers import Authd, Dovecot, Server, Setup, prepare_script

SCRIPT = Path(__file__).resolve().parent / "scripts" / "http_passdb.lua"
MB = 1_000_000
FLOOD_LINES = 100_000
#: How long the flood runs, and how long RSS is watched after its connection closed.
FLOOD_SECONDS = 10.0
AFTER_CLOSE_SECONDS = 10.0
#: A fresh login starts this long after the flood did, then again as soon as the last one ended.
FIRST_LOGIN_AFTER = 1.0
LOGIN_TIMEOUT = 5.0
#: The issue's bounds: RSS well under 256 MB, every fresh login answered within 1 s.
RSS_BOUND_MB = 256
LOGIN_BOUND_MS = 1000.0
#: The backend the flood's checks go to answers after an hour: never, for this scenario.
HANG_SECONDS = 3600.0


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


@dataclass
class FloodRun:
    """One server under the flood."""

    server: str
    lines_taken: int
    base_rss_mb: float
    peak_rss_mb: float
    rss_after_close_mb: float
    #: Milliseconds from a fresh connection's AUTH to its reply, for every login during the flood.
    login_ms: list[float] = field(default_factory=list)
    #: Fresh logins that were not answered OK within LOGIN_TIMEOUT.
    login_failures: int = 0
    login_after_close_ms: float | None = None
    #: The server closed the flood's connection before the end.
    flood_dropped: bool = False

    @property
    def login_p50_ms(self) -> float:
        return statistics.median(self.login_ms) if self.login_ms else float("nan")

    @property
    def login_max_ms(self) -> float:
        return max(self.login_ms) if self.login_ms else float("nan")

    def bounds_held(self) -> bool:
        return (
            self.peak_rss_mb < RSS_BOUND_MB
            and not self.login_failures
            and bool(self.login_ms)
            and self.login_max_ms < LOGIN_BOUND_MS
        )


@dataclass
class FloodResult:
    runs: list[FloodRun]


class _Flood:
    """A non-blocking auth-client connection that writes as many pipelined AUTHs as it is let."""

    def __init__(self, path: str) -> None:
        resp = _plain("flood", "x")
        self.data = b"VERSION\t1\t2\nCPID\t4711\n" + b"".join(
            b"AUTH\t%d\tPLAIN\tservice=smtp\tno-penalty\tresp=%s\n" % (n, resp) for n in range(1, FLOOD_LINES + 1)
        )
        self.sent = 0
        #: The server closed the connection (Dovecot's auth process may run out of memory).
        self.dropped = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)

    def push(self) -> None:
        """Write what the socket takes now; read and drop whatever came back."""
        if self.dropped:
            return
        try:
            while self.sent < len(self.data):
                self.sent += self.sock.send(self.data[self.sent : self.sent + 65536])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.dropped = True
            return
        try:
            while chunk := self.sock.recv(65536):
                del chunk
            self.dropped = True  # EOF
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.dropped = True

    @property
    def lines_taken(self) -> int:
        return max(0, self.data.count(b"\n", 0, self.sent) - 2)

    def close(self) -> None:
        self.sock.close()


def login(path: str) -> float | None:
    """One fresh connection's PLAIN login: milliseconds from AUTH to OK, None if not OK in time."""
    deadline = time.monotonic() + LOGIN_TIMEOUT
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(LOGIN_TIMEOUT)
            sock.connect(path)
            data = b""
            while b"DONE\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
            start = time.monotonic()
            sock.sendall(
                b"VERSION\t1\t2\nCPID\t4712\nAUTH\t1\tPLAIN\tservice=smtp\tno-penalty\tresp=%s\n"
                % _plain(USER, PASSWORD)
            )
            reply = b""
            while b"\n" not in reply:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
            return (time.monotonic() - start) * 1000 if reply.startswith(b"OK\t1\t") else None
    except OSError:
        return None


def _flood(server: Server) -> FloodRun:
    path = str(server.socket("auth-client"))
    meter = server.meter
    login(path)  # the pools and the fast backend's connection are primed
    meter.start()
    run = FloodRun(server.name, 0, meter.peak_rss / MB, 0.0, 0.0)
    flood = _Flood(path)
    started = time.monotonic()
    next_login = started + FIRST_LOGIN_AFTER
    while time.monotonic() - started < FLOOD_SECONDS:
        flood.push()
        meter.sample()
        if time.monotonic() >= next_login:
            took = login(path)
            if took is None:
                run.login_failures += 1
            else:
                run.login_ms.append(took)
            next_login = time.monotonic()
        time.sleep(0.05)
    flood.push()
    run.lines_taken = flood.lines_taken
    run.flood_dropped = flood.dropped
    flood.close()
    closed = time.monotonic()
    while time.monotonic() - closed < AFTER_CLOSE_SECONDS:
        meter.sample()
        time.sleep(0.2)
    run.rss_after_close_mb = rss_bytes(meter.members()) / MB
    run.peak_rss_mb = meter.peak_rss / MB
    run.login_after_close_ms = login(path)
    return run


def run_flood(dovecot: bool, workdir: Path, progress: Callable[[str], None]) -> FloodResult:
    """authd with its default settings ([limits] included), then Dovecot on the same script."""
    workdir.mkdir()
    workdir.chmod(0o755)
    runs = []
    with ExitStack() as stack:
        slow = stack.enter_context(Backend(HANG_SECONDS, 1))
        fast = stack.enter_context(Backend(0.0, 1))
        script = prepare_script(SCRIPT, workdir, fast.url)
        script.write_text(script.read_text().replace("@SLOW_URL@", slow.url))
        setup = Setup(script, blocking=True, authd_defaults=True)
        servers: list[type[Server]] = [Authd, *([Dovecot] if dovecot else [])]
        for kind in servers:
            with kind(workdir / kind.name, setup) as server:
                progress(f"[flood] {server.name}: one connection pipelines {FLOOD_LINES:,} AUTHs")
                run = _flood(server)
                progress(
                    f"[flood] {server.name}: {run.lines_taken:,} lines taken"
                    + (" (then it closed the connection)" if run.flood_dropped else "")
                    + f", peak RSS {run.peak_rss_mb:.0f} MB, "
                    f"{run.rss_after_close_mb:.0f} MB after close; fresh logins p50 {run.login_p50_ms:.1f} ms "
                    f"max {run.login_max_ms:.1f} ms, {run.login_failures} not answered in {LOGIN_TIMEOUT:.0f} s"
                )
                runs.append(run)
    return FloodResult(runs)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}".replace(",", " ")


def markdown(result: FloodResult) -> list[str]:
    """The flood table and its bounds, for the report."""
    lines = [
        f"**flood**: one connection pipelines {_num(FLOOD_LINES)} AUTHs whose backend hangs; fresh connections "
        f"log in one after another (own backend answers at once), from {FIRST_LOGIN_AFTER:.0f} s into the "
        f"{FLOOD_SECONDS:.0f} s flood; RSS watched until {AFTER_CLOSE_SECONDS:.0f} s after the flood's "
        "connection closed. authd with its default settings, Dovecot blocking=yes with 30 workers.",
        "",
        "| server | flood lines taken | server closed the flood | RSS before MB | peak RSS MB "
        "| RSS 10 s after close MB | fresh logins | not answered in 5 s | login p50 ms | login max ms "
        "| login after close ms | bounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result.runs:
        lines.append(
            f"| {run.server} | {_num(run.lines_taken)} | {'yes' if run.flood_dropped else 'no'} | "
            f"{_num(run.base_rss_mb)} | {_num(run.peak_rss_mb)} | "
            f"{_num(run.rss_after_close_mb)} | {len(run.login_ms) + run.login_failures} | {run.login_failures} | "
            f"{_num(run.login_p50_ms, 1)} | {_num(run.login_max_ms, 1)} | {_num(run.login_after_close_ms, 1)} | "
            f"{'held' if run.bounds_held() else '**not held**'} |"
        )
    lines += [
        "",
        f"Bounds (issue 13): peak RSS < {RSS_BOUND_MB} MB and every fresh login answered within "
        f"{LOGIN_BOUND_MS:.0f} ms.",
    ]
    return lines

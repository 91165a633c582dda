"""One connection floods authd with pipelined AUTHs while its HTTP backend hangs: bounds hold.

authd stops reading a connection at its [limits] requests_per_connection, refuses requests beyond
requests_total with an immediate temp_fail, stays within a memory bound, and still answers a
fresh connection's login at once.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import AuthdProcess
from tests.http_backend import Backend, HttpBackend
from tests.interop.wire import Wire

#: The flood user's backend call goes to a backend that hangs; the good user's to one that
#: answers at once.
SCRIPT = """\
local client = dovecot.http.client({max_attempts = 1, request_timeout = 600000})

function auth_passdb_lookup(req)
  local url = req.user == "good" and "@FAST@" or "@SLOW@"
  local request = client:request{url = url .. "/remote.php/dav/files/" .. req.user .. "/", method = "PROPFIND"}
  request:add_header("Authorization", "Basic " .. req.password)
  local status = request:submit():status()
  if status == 207 then return dovecot.auth.PASSDB_RESULT_OK, "nopassword=y" end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
end
"""

CONFIG = """\
[auth]
mechanisms = ["plain"]
failure_delay = 0
penalty = false
[limits]
requests_per_connection = %d
requests_total = %d
[lua]
call_timeout = 600
[metrics]
address = "127.0.0.1"
port = 0
[[passdb]]
driver = "lua"
file = "flood.lua"
blocking = false
[[listener]]
type = "client"
path = "auth-client"
"""

FLOOD_LINES = 100_000
#: authd with one Lua script idles near 60-90 MB; 100 000 requests in memory took 1.8 GB.
RSS_BOUND_MB = 160


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def scrape(proc: AuthdProcess) -> dict[str, float]:
    port = proc.wait_for_log(lambda e: e.get("event") == "metrics.ready")["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class Flood:
    """An auth-client connection that writes LINES pipelined AUTHs from a thread until closed."""

    def __init__(self, path: Path, lines: int, first_id: int = 1) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        resp = plain("flood", basic("flood", "x"))
        head = b"VERSION\t1\t2\nCPID\t%d\n" % (first_id + 1000)
        self.data = head + b"".join(
            b"AUTH\t%d\tPLAIN\tservice=imap\tresp=%s\n" % (n, resp.encode()) for n in range(first_id, first_id + lines)
        )
        self.sent_all = False
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        try:
            self.sock.sendall(self.data)
            self.sent_all = True
        except OSError:
            pass

    def start(self) -> Flood:
        self.thread.start()
        return self

    def read_available(self, seconds: float) -> bytes:
        """What authd answered within SECONDS (greeting included)."""
        self.sock.settimeout(0.1)
        data = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)


@pytest.fixture
def backends() -> Iterator[tuple[HttpBackend, HttpBackend]]:
    with (
        HttpBackend(Backend(delay=600)) as slow,
        HttpBackend(Backend(users={"good": "goodpass"})) as fast,
    ):
        yield slow, fast


def start_authd(tmp_path: Path, backends: tuple[HttpBackend, HttpBackend], per_conn: int, total: int) -> AuthdProcess:
    slow, fast = backends
    script = SCRIPT.replace("@SLOW@", slow.url).replace("@FAST@", fast.url)
    proc = AuthdProcess(tmp_path, CONFIG % (per_conn, total), {"flood.lua": script})
    proc.start()
    return proc


def in_flight(proc: AuthdProcess) -> float:
    return scrape(proc).get("authd_requests_in_flight", -1.0)


def wait_in_flight(proc: AuthdProcess, predicate: object, timeout: float, rss_pid: int) -> float:
    """Poll the in-flight gauge until PREDICATE holds; fail at once if authd outgrows the bound."""
    deadline = time.monotonic() + timeout
    value = -1.0
    while time.monotonic() < deadline:
        assert rss_mb(rss_pid) < RSS_BOUND_MB, f"authd RSS {rss_mb(rss_pid):.0f} MB"
        value = in_flight(proc)
        if predicate(value):  # type: ignore[operator]
            return value
        time.sleep(0.1)
    raise AssertionError(f"in-flight requests stayed at {value}")


def good_login(proc: AuthdProcess) -> tuple[str, float]:
    with Wire.auth_client(proc.socket("auth-client")) as w:
        start = time.monotonic()
        w.send(
            "VERSION\t1\t2",
            "CPID\t77",
            f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('good', basic('good', 'goodpass'))}",
        )
        line = w.read_line()
        return line, time.monotonic() - start


def test_flood_is_held_at_the_connection_cap_and_a_fresh_login_is_served(
    tmp_path: Path, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    proc = start_authd(tmp_path, backends, per_conn=100, total=110)
    try:
        base = rss_mb(proc.pid)
        flood = Flood(proc.socket("auth-client"), FLOOD_LINES).start()
        # it fills its cap, and stays there: authd stops reading it
        wait_in_flight(proc, lambda v: v == 100, 20, proc.pid)
        peak = base
        for _ in range(20):
            time.sleep(0.1)
            peak = max(peak, rss_mb(proc.pid))
            assert peak < RSS_BOUND_MB, f"authd RSS {peak:.0f} MB"
        assert in_flight(proc) == 100
        assert not flood.sent_all
        # the total queue is near full (100 of 110): a fresh login is answered at once
        line, seconds = good_login(proc)
        assert line == "OK\t1\tuser=good"
        assert seconds < 1.0
        assert scrape(proc).get("authd_requests_refused_total") == 0.0
        peak = max(peak, rss_mb(proc.pid))
        assert peak < RSS_BOUND_MB
        # the flood's connection ends: its requests are gone, memory stays bounded
        flood.close()
        wait_in_flight(proc, lambda v: v == 0, 10, proc.pid)
        assert rss_mb(proc.pid) < RSS_BOUND_MB
        line, seconds = good_login(proc)
        assert line == "OK\t1\tuser=good"
    finally:
        proc.stop()


def test_beyond_the_total_limit_requests_get_temp_fail_at_once(
    tmp_path: Path, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    proc = start_authd(tmp_path, backends, per_conn=100, total=150)
    try:
        first = Flood(proc.socket("auth-client"), 100).start()
        wait_in_flight(proc, lambda v: v == 100, 20, proc.pid)
        second = Flood(proc.socket("auth-client"), 80, first_id=1001).start()
        got = second.read_available(2.0)
        fails = [line for line in got.split(b"\n") if line.startswith(b"FAIL")]
        # 50 more fit under requests_total; the other 30 are refused at once, in order
        assert fails == [b"FAIL\t%d\tcode=temp_fail" % n for n in range(1051, 1081)]
        assert in_flight(proc) == 150
        samples = scrape(proc)
        assert samples["authd_requests_refused_total"] == 30.0
        refusals = [e for e in proc.log_events() if e.get("event") == "auth.queue_full"]
        assert len(refusals) == 1  # logged once per interval, not per request
        assert refusals[0]["level"] == "warning"
        assert refusals[0]["limit"] == 150
        first.close()
        second.close()
        wait_in_flight(proc, lambda v: v == 0, 10, proc.pid)
    finally:
        proc.stop()

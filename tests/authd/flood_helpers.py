"""Helpers of the flood and metrics tests: SASL PLAIN, authd's RSS, its /metrics page, pipelining.

A Pipeline writes many request lines at once from a thread while the test reads what authd answers.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.authd_process import AuthdProcess
from tests.http_backend import HttpBackend

#: authd with one Lua script idles near 60-90 MB; 100 000 requests in memory took 1.8 GB.
RSS_BOUND_MB = 160


#: A flood script's start: propfind(user) is a PROPFIND request for USER, to the backend that
#: answers at once for the user "good", to the one that hangs for anyone else.
SCRIPT_PRELUDE = """\
local client = dovecot.http.client({max_attempts = 1, request_timeout = 600000})

local function propfind(user)
  local url = user == "good" and "@FAST@" or "@SLOW@"
  return client:request{url = url .. "/remote.php/dav/files/" .. user .. "/", method = "PROPFIND"}
end
"""

#: A flood config's [limits] (requests_per_connection and requests_total to fill in with %),
#: a Lua call that waits as long as the hanging backend, and /metrics on an ephemeral port.
LIMITS_CONFIG = """\
[limits]
requests_per_connection = %d
requests_total = %d
[lua]
call_timeout = 600
[metrics]
address = "127.0.0.1"
port = 0
"""


def flood_script(functions: str, slow: HttpBackend, fast: HttpBackend) -> str:
    """SCRIPT_PRELUDE and FUNCTIONS, with the backends' URLs filled in."""
    return (SCRIPT_PRELUDE + functions).replace("@SLOW@", slow.url).replace("@FAST@", fast.url)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def metrics_url(proc: AuthdProcess, path: str = "/metrics") -> str:
    port = proc.wait_for_log(lambda e: e.get("event") == "metrics.ready")["port"]
    return f"http://127.0.0.1:{port}{path}"


def metrics_page(proc: AuthdProcess) -> str:
    """The text of /metrics, in Prometheus's text format."""
    with urllib.request.urlopen(metrics_url(proc), timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def scrape(proc: AuthdProcess) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value}."""
    samples = {}
    for line in metrics_page(proc).splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def in_flight(proc: AuthdProcess) -> float:
    return scrape(proc).get("authd_requests_in_flight", -1.0)


def wait_in_flight(proc: AuthdProcess, predicate: Callable[[float], bool], timeout: float, rss_pid: int) -> float:
    """Poll the in-flight gauge until PREDICATE holds; fail at once if authd outgrows the bound."""
    deadline = time.monotonic() + timeout
    value = -1.0
    while time.monotonic() < deadline:
        assert rss_mb(rss_pid) < RSS_BOUND_MB, f"authd RSS {rss_mb(rss_pid):.0f} MB"
        value = in_flight(proc)
        if predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"in-flight requests stayed at {value}")


def held_at_cap(proc: AuthdProcess, flood: Pipeline, cap: int) -> float:
    """FLOOD fills its connection's cap of CAP requests and stays there (authd stops reading it)
    for two seconds within the RSS bound; returns the peak RSS in MB."""
    wait_in_flight(proc, lambda v: v == cap, 20, proc.pid)
    peak = rss_mb(proc.pid)
    for _ in range(20):
        time.sleep(0.1)
        peak = max(peak, rss_mb(proc.pid))
        assert peak < RSS_BOUND_MB, f"authd RSS {peak:.0f} MB"
    assert in_flight(proc) == cap
    assert not flood.sent_all
    return peak


def assert_queue_full_logged_once(proc: AuthdProcess, limit: int) -> None:
    """Refusals at requests_total are logged once per interval, not per request."""
    refusals = [e for e in proc.log_events() if e.get("event") == "auth.queue_full"]
    assert len(refusals) == 1
    assert refusals[0]["level"] == "warning"
    assert refusals[0]["limit"] == limit


class Pipeline:
    """A unix socket connection that writes DATA from a thread (started by `start`) until closed."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.data = data
        self.sent_all = False
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        try:
            self.sock.sendall(self.data)
            self.sent_all = True
        except OSError:
            pass

    def start(self) -> Pipeline:
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

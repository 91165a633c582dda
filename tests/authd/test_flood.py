"""One connection floods authd with pipelined AUTHs while its HTTP backend hangs: bounds hold.

authd stops reading a connection at its [limits] requests_per_connection, refuses requests beyond
requests_total with an immediate temp_fail, stays within a memory bound, and still answers a
fresh connection's login at once.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.authd.flood_helpers import (
    LIMITS_CONFIG,
    RSS_BOUND_MB,
    Pipeline,
    assert_queue_full_logged_once,
    basic,
    flood_script,
    held_at_cap,
    in_flight,
    plain,
    rss_mb,
    scrape,
    wait_in_flight,
)
from tests.authd_process import AuthdProcess
from tests.http_backend import HttpBackend
from tests.interop.wire import Wire

#: The flood user's backend call goes to a backend that hangs; the good user's to one that
#: answers at once.
SCRIPT = """
function auth_passdb_lookup(req)
  local request = propfind(req.user)
  request:add_header("Authorization", "Basic " .. req.password)
  local status = request:submit():status()
  if status == 207 then return dovecot.auth.PASSDB_RESULT_OK, "nopassword=y" end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
end
"""

CONFIG = (
    """\
[auth]
mechanisms = ["plain"]
failure_delay = 0
penalty = false
"""
    + LIMITS_CONFIG
    + """\
[[passdb]]
driver = "lua"
file = "flood.lua"
blocking = false
[[listener]]
type = "client"
path = "auth-client"
"""
)

FLOOD_LINES = 100_000


class Flood(Pipeline):
    """An auth-client connection that writes LINES pipelined AUTHs from a thread until closed."""

    def __init__(self, path: Path, lines: int, first_id: int = 1) -> None:
        resp = plain("flood", basic("flood", "x")).encode()
        head = b"VERSION\t1\t2\nCPID\t%d\n" % (first_id + 1000)
        lines_data = (
            b"AUTH\t%d\tPLAIN\tservice=imap\tresp=%s\n" % (n, resp) for n in range(first_id, first_id + lines)
        )
        super().__init__(path, head + b"".join(lines_data))


def start_authd(
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend], per_conn: int, total: int
) -> AuthdProcess:
    script = flood_script(SCRIPT, *slow_and_fast)
    proc = AuthdProcess(tmp_path, CONFIG % (per_conn, total), {"flood.lua": script})
    proc.start()
    return proc


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
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend]
) -> None:
    proc = start_authd(tmp_path, slow_and_fast, per_conn=100, total=110)
    try:
        flood = Flood(proc.socket("auth-client"), FLOOD_LINES).start()
        peak = held_at_cap(proc, flood, 100)
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
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend]
) -> None:
    proc = start_authd(tmp_path, slow_and_fast, per_conn=100, total=150)
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
        assert_queue_full_logged_once(proc, 150)
        first.close()
        second.close()
        wait_in_flight(proc, lambda v: v == 0, 10, proc.pid)
    finally:
        proc.stop()

"""USER/PASS/LIST floods on auth-userdb connections while the userdb's HTTP backend hangs: bounds hold.

authd stops reading an auth-master connection at its [limits] requests_per_connection, answers
Dovecot's bare FAIL (DONE fail for LIST) at once beyond requests_total, and throttles a LIST
whose reader does not read, so memory stays bounded and a fresh connection is still served.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.authd.flood_helpers import (
    LIMITS_CONFIG,
    RSS_BOUND_MB,
    Pipeline,
    assert_queue_full_logged_once,
    flood_script,
    held_at_cap,
    in_flight,
    rss_mb,
    scrape,
    wait_in_flight,
)
from tests.authd_process import AuthdProcess
from tests.http_backend import HttpBackend
from tests.interop.wire import Wire

#: The flood's userdb lookups go to a backend that hangs; the good user's to one that answers.
SCRIPT = """
function auth_userdb_lookup(req)
  propfind(req.user):submit()
  return dovecot.auth.USERDB_RESULT_OK, "uid=1000"
end

function auth_userdb_iterate()
  local users = {}
  local name = string.rep("x", 1000)
  for i = 1, @USERS@ do users[i] = name end
  return users
end
"""

CONFIG = (
    LIMITS_CONFIG
    + """\
[[userdb]]
driver = "lua"
file = "userdb.lua"
blocking = false
[[listener]]
type = "userdb"
path = "auth-userdb"
"""
)

FLOOD_LINES = 100_000
LIST_USERS = 50_000
LIST_NAME = b"x" * 1000
#: The listing's 50 000 names take about 50 MB in authd, whatever it does with them; with its
#: 50 MB of LIST lines queued at once (and the listing done) authd grew by about 100 MB.
LIST_GROWTH_MB = 75


class MasterFlood(Pipeline):
    """An auth-userdb connection that writes LINES pipelined USERs from a thread until closed."""

    def __init__(self, path: Path, lines: int, first_id: int = 1) -> None:
        users = (b"USER\t%d\tflood\tservice=lmtp\n" % n for n in range(first_id, first_id + lines))
        super().__init__(path, b"VERSION\t1\t0\n" + b"".join(users))


def start_authd(
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend], per_conn: int = 128, total: int = 4096
) -> AuthdProcess:
    script = flood_script(SCRIPT.replace("@USERS@", str(LIST_USERS)), *slow_and_fast)
    proc = AuthdProcess(tmp_path, CONFIG % (per_conn, total), {"userdb.lua": script})
    proc.start(wait_for=("auth-userdb",))
    return proc


def good_user(proc: AuthdProcess) -> tuple[str, float]:
    with Wire.auth_master(proc.socket("auth-userdb")) as w:
        start = time.monotonic()
        w.send("VERSION\t1\t0", "USER\t1\tgood\tservice=lmtp")
        line = w.read_line()
        return line, time.monotonic() - start


def test_user_flood_is_held_at_the_connection_cap_and_a_fresh_user_is_served(
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend]
) -> None:
    proc = start_authd(tmp_path, slow_and_fast, per_conn=100, total=110)
    try:
        flood = MasterFlood(proc.socket("auth-userdb"), FLOOD_LINES).start()
        peak = held_at_cap(proc, flood, 100)
        # 100 of 110 in flight: a fresh USER on a new connection is answered at once
        line, seconds = good_user(proc)
        assert line == "USER\t1\tgood\tuid=1000"
        assert seconds < 1.0
        assert scrape(proc).get("authd_requests_refused_total") == 0.0
        assert max(peak, rss_mb(proc.pid)) < RSS_BOUND_MB
        # the flood's connection ends: its lookups are dropped with it
        flood.close()
        wait_in_flight(proc, lambda v: v == 0, 10, proc.pid)
        line, _ = good_user(proc)
        assert line == "USER\t1\tgood\tuid=1000"
    finally:
        proc.stop()


def test_beyond_the_total_limit_user_pass_and_list_fail_at_once(
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend]
) -> None:
    proc = start_authd(tmp_path, slow_and_fast, per_conn=100, total=150)
    try:
        first = MasterFlood(proc.socket("auth-userdb"), 100).start()
        wait_in_flight(proc, lambda v: v == 100, 20, proc.pid)
        second = MasterFlood(proc.socket("auth-userdb"), 80, first_id=1001)
        second.data += b"PASS\t2001\tflood\tservice=lmtp\nLIST\t2002\n"
        got = second.start().read_available(2.0)
        replies = [line for line in got.split(b"\n") if line and not line.startswith((b"VERSION", b"SPID"))]
        # 50 more fit under requests_total; the rest get Dovecot's internal-failure replies at once, in order
        assert replies == [b"FAIL\t%d" % n for n in range(1051, 1081)] + [b"FAIL\t2001", b"DONE\t2002\tfail"]
        assert in_flight(proc) == 150
        assert scrape(proc)["authd_requests_refused_total"] == 32.0
        assert_queue_full_logged_once(proc, 150)
        first.close()
        second.close()
        wait_in_flight(proc, lambda v: v == 0, 10, proc.pid)
    finally:
        proc.stop()


def test_a_list_nobody_reads_is_throttled(tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend]) -> None:
    proc = start_authd(tmp_path, slow_and_fast)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(proc.socket("auth-userdb")))
        base = rss_mb(proc.pid)
        sock.sendall(b"VERSION\t1\t0\nLIST\t1\n")
        # 50 MB of LIST lines wait for a reader that does not read: authd holds the listing
        # at the outbox's throttle instead of queueing it all
        peak = base
        for _ in range(30):
            time.sleep(0.1)
            peak = max(peak, rss_mb(proc.pid))
        assert in_flight(proc) == 1
        assert peak - base < LIST_GROWTH_MB, f"authd RSS grew {peak - base:.0f} MB"
        data = bytearray()
        sock.settimeout(20)
        while not data.endswith(b"DONE\t1\t\n"):
            chunk = sock.recv(1 << 20)
            assert chunk, "authd closed the connection"
            data += chunk
        sock.close()
        lines = bytes(data).split(b"\n")
        assert lines[:2] == [b"VERSION\t1\t1", b"SPID\t%d" % proc.pid]
        assert lines[2:-2] == [b"LIST\t1\t" + LIST_NAME] * LIST_USERS
        assert lines[-2:] == [b"DONE\t1\t", b""]
        assert in_flight(proc) == 0
    finally:
        proc.stop()

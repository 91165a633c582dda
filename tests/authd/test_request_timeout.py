"""Dovecot's request timeout and the open-request bound, on a real authd's sockets.

A request not continued within [limits] request_timeout is dropped silently and logged in
Dovecot's words; a CONT after that gets "Authentication request timed out". An AUTH beyond
[limits] open_requests_per_connection gets FAIL code=temp_fail at once.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire

SCRIPT = """\
function auth_passdb_lookup(req)
  if req.user ~= "alice" then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no" end
  return dovecot.auth.PASSDB_RESULT_OK, "password=secret"
end

function auth_userdb_lookup(req)
  return dovecot.auth.USERDB_RESULT_OK, "uid=1000"
end
"""

CONFIG = """\
[auth]
failure_delay = 0
penalty = false
[limits]
request_timeout = 1
requests_per_connection = 2
open_requests_per_connection = 3
[[passdb]]
driver = "lua"
file = "s.lua"
[[userdb]]
driver = "lua"
file = "s.lua"
"""


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
def authd(tmp_path: Path) -> Iterator[AuthdProcess]:
    proc = AuthdProcess(tmp_path, CONFIG + LISTENERS, {"s.lua": SCRIPT})
    proc.start(wait_for=("auth-client", "auth-login", "auth-master"))
    yield proc
    proc.stop()


def timeouts(proc: AuthdProcess) -> list[dict[str, object]]:
    return [e for e in proc.log_events() if e.get("event") == "auth.timeout"]


def test_a_request_waiting_for_cont_times_out_silently(authd: AuthdProcess) -> None:
    with Wire.auth_client(authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t4242", "AUTH\t1\tPLAIN\tservice=smtp\trip=192.0.2.7")
        assert w.read_line() == "CONT\t1\t"
        event = authd.wait_for_log(lambda e: e.get("event") == "auth.timeout", timeout=5)
        assert event["level"] == "info"
        assert event["message"] == "Request timed out waiting for client to continue authentication (1 secs)"
        assert (event["mech"], event["service"], event["rip"]) == ("PLAIN", "smtp", "192.0.2.7")
        w.send(f"CONT\t1\t{plain('alice', 'secret')}")
        assert w.read_line() == "FAIL\t1\treason=Authentication request timed out"
        # the connection goes on serving
        w.send(f"AUTH\t2\tPLAIN\tservice=smtp\tresp={plain('alice', 'secret')}")
        assert w.read_line() == "OK\t2\tuser=alice"
    assert len(timeouts(authd)) == 1


def test_a_login_not_collected_by_request_times_out_as_an_error(authd: AuthdProcess) -> None:
    with Wire.auth_client(authd.socket("auth-login")) as w:
        cookie = w.greeting_value("COOKIE")
        w.send("VERSION\t1\t2", "CPID\t4242", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('alice', 'secret')}")
        assert w.read_line() == "OK\t1\tuser=alice"
        event = authd.wait_for_log(lambda e: e.get("event") == "auth.timeout", timeout=5)
        assert event["level"] == "error"
        assert event["message"] == "Request 4242.1 timed out after 1 secs, state=3"
        with Wire.auth_master(authd.socket("auth-master")) as m:
            m.send("VERSION\t1\t1", f"REQUEST\t7\t4242\t1\t{cookie}")
            assert m.read_line() == "FAIL\t7"


def test_beyond_the_open_requests_an_auth_gets_temp_fail_at_once(authd: AuthdProcess) -> None:
    with Wire.auth_client(authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t4242", *(f"AUTH\t{n}\tPLAIN\tservice=smtp" for n in range(1, 6)))
        assert [w.read_line() for _ in range(5)] == [
            "CONT\t1\t",
            "CONT\t2\t",
            "CONT\t3\t",
            "FAIL\t4\tcode=temp_fail",
            "FAIL\t5\tcode=temp_fail",
        ]
        # the open ones go on; once one is done, there is room again
        w.send(f"CONT\t2\t{plain('alice', 'secret')}")
        assert w.read_line() == "OK\t2\tuser=alice"
        w.send("AUTH\t6\tPLAIN\tservice=smtp")
        assert w.read_line() == "CONT\t6\t"
    full = [e for e in authd.log_events() if e.get("event") == "auth.connection_full"]
    assert len(full) == 1  # once per interval
    assert full[0]["level"] == "warning"
    assert full[0]["limit"] == 3
    assert full[0]["message"] == (
        "3 requests open on one connection: new ones get temp_fail ([limits] open_requests_per_connection)"
    )

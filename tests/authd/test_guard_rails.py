"""Scripts cannot take a real authd down: os.exit, runaway loops, memory, odd errors.

Each bad request ends as `FAIL ... code=temp_fail` with a log line that says why,
other requests keep flowing during and after it, and the process stays up. Scripts
that are broken at start-up make authd refuse to start with a clear message.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire

SCRIPT = """\
function auth_passdb_lookup(req)
  if req.user == "exit" then os.exit(1) end
  if req.user == "loop" then while true do end end
  if req.user == "grow" then local t = {} for i = 1, 1e9 do t[i] = {i} end end
  if req.user == "errobj" then error(setmetatable({}, {__tostring = error})) end
  if req.user == "stuck" then os.execute("sleep 4") end
  if req.user == "dns" then
    local addresses, err = dovecot.dns_client:lookup("localhost")
    if not addresses then error(err) end
    return dovecot.auth.PASSDB_RESULT_OK, "password=" .. addresses[1]
  end
  return dovecot.auth.PASSDB_RESULT_OK, "password=" .. req.user .. "pass"
end
"""


def config(blocking: bool = True) -> str:
    return (
        f"""
[auth]
mechanisms = ["plain"]
failure_delay = 0
penalty = false

[[passdb]]
driver = "lua"
file = "guarded.lua"
blocking = {"true" if blocking else "false"}

[lua]
workers = 2
call_timeout = 1.0
max_memory = 20000000
"""
        + LISTENERS
    )


@pytest.fixture(scope="module")
def authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    proc = AuthdProcess(tmp_path_factory.mktemp("guard"), config(), {"guarded.lua": SCRIPT})
    proc.start()
    yield proc
    proc.stop()


def auth(authd: AuthdProcess, user: str, password: str | None = None) -> str:
    password = f"{user}pass" if password is None else password
    resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with Wire.auth_client(authd.socket("auth-client"), timeout=10) as w:
        w.send("VERSION\t1\t2", "CPID\t77", f"AUTH\t1\tPLAIN\tservice=imap\tresp={resp}")
        return w.read_line()


def timed_auth(authd: AuthdProcess, user: str) -> tuple[str, float]:
    started = time.monotonic()
    reply = auth(authd, user)
    return reply, time.monotonic() - started


def in_background(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    return thread, out


def events(authd: AuthdProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in authd.log_events() if e.get("event") == name]


def assert_alive(authd: AuthdProcess) -> None:
    assert authd.alive
    assert auth(authd, "alice") == "OK\t1\tuser=alice"


@pytest.mark.parametrize(
    ("user", "event"),
    [("exit", "lua.error"), ("loop", "lua.timeout"), ("grow", "lua.memory"), ("errobj", "lua.error")],
)
def test_bad_script_calls_fail_the_request(authd: AuthdProcess, user: str, event: str) -> None:
    reply, took = timed_auth(authd, user)
    assert reply == f"FAIL\t1\tuser={user}\tcode=temp_fail"
    assert took < 3
    authd.wait_for_log(lambda e: e.get("event") == event and (e.get("user") == user or event != "lua.error"))
    assert_alive(authd)


def test_log_lines_say_why(authd: AuthdProcess) -> None:
    auth(authd, "loop")
    timeout = authd.wait_for_log(lambda e: e.get("event") == "lua.timeout")
    assert timeout["entry"] == "auth_passdb_lookup" and timeout["script"].endswith("guarded.lua")
    assert timeout["waiting_for"] == "Lua code" and "guarded.lua:3" in timeout["where"]
    error = authd.wait_for_log(lambda e: e.get("event") == "lua.error" and e.get("user") == "loop")
    assert "timed out after 1 s in Lua code ([lua] call_timeout)" in error["message"]
    auth(authd, "exit")
    error = authd.wait_for_log(lambda e: e.get("event") == "lua.error" and e.get("user") == "exit")
    assert "os.exit() is not allowed" in error["message"]
    auth(authd, "errobj")
    error = authd.wait_for_log(lambda e: e.get("event") == "lua.error" and e.get("user") == "errobj")
    assert "(error object is a table value)" in error["message"]


def test_requests_flow_during_a_runaway_call(authd: AuthdProcess) -> None:
    thread, out = in_background(timed_auth, authd, "loop")
    time.sleep(0.2)
    for _ in range(3):  # the other state answers at once
        reply, took = timed_auth(authd, "alice")
        assert reply == "OK\t1\tuser=alice" and took < 0.5
    thread.join(10)
    [(reply, took)] = out
    assert reply == "FAIL\t1\tuser=loop\tcode=temp_fail" and 0.9 < took < 3


def test_memory_failure_rebuilds_the_state(authd: AuthdProcess) -> None:
    rebuilt = len(events(authd, "lua.state_rebuilt"))
    assert auth(authd, "grow") == "FAIL\t1\tuser=grow\tcode=temp_fail"
    memory = authd.wait_for_log(lambda e: e.get("event") == "lua.memory")
    assert memory["max_memory"] == 20_000_000 and memory["state"] == "rebuilt"
    deadline = time.monotonic() + 10
    while len(events(authd, "lua.state_rebuilt")) == rebuilt and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events(authd, "lua.state_rebuilt")[-1]["reason"] == "memory"
    # both states serve again: two slow calls side by side take one timeout, not two
    threads = [in_background(timed_auth, authd, "loop") for _ in range(2)]
    for thread, _ in threads:
        thread.join(10)
    assert all(out[0][0].endswith("code=temp_fail") and out[0][1] < 1.8 for _, out in threads)
    assert_alive(authd)


def test_stuck_state_is_replaced(authd: AuthdProcess) -> None:
    thread, out = in_background(timed_auth, authd, "stuck")
    time.sleep(0.2)
    reply, took = timed_auth(authd, "alice")
    assert reply == "OK\t1\tuser=alice" and took < 0.5
    thread.join(10)
    [(reply, took)] = out
    assert reply == "FAIL\t1\tuser=stuck\tcode=temp_fail" and 1.5 < took < 3.5  # call_timeout + grace
    timeout = authd.wait_for_log(lambda e: e.get("event") == "lua.timeout" and e.get("state") == "replaced")
    assert timeout["waiting_for"] == "a blocking call"
    authd.wait_for_log(lambda e: e.get("event") == "lua.state_rebuilt" and e.get("reason") == "stuck")
    for _ in range(3):
        assert_alive(authd)


def test_dns_client_is_there(authd: AuthdProcess) -> None:
    assert auth(authd, "dns", "127.0.0.1") == "OK\t1\tuser=dns"


def test_event_loop_script_blocks_others_only_until_the_timeout(tmp_path: Path) -> None:
    with AuthdProcess(tmp_path, config(blocking=False), {"guarded.lua": SCRIPT}) as authd:
        thread, out = in_background(timed_auth, authd, "loop")
        time.sleep(0.2)
        reply, took = timed_auth(authd, "alice")
        assert reply == "OK\t1\tuser=alice" and took < 2  # waited for the loop's 1 s at most
        thread.join(10)
        assert out[0][0] == "FAIL\t1\tuser=loop\tcode=temp_fail"
        assert_alive(authd)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("function script_init() error('backend down') end", "script_init, 0, 1) failed: "),
        ("function script_init() error('backend down') end", "backend down"),
        ("while true do end", "timed out after 1 s in Lua code ([lua] call_timeout)"),
        ("function script_init() while true do end end", "timed out after 1 s in Lua code"),
        (
            "function script_init() error(setmetatable({}, {__tostring = error})) end",
            "(error object is a table value)",
        ),
        ("big = {} for i = 1, 1e9 do big[i] = {i} end", "not enough memory ([lua] max_memory = 20000000 bytes"),
        ("os.exit(1)", "os.exit() is not allowed"),
    ],
)
def test_broken_start_up_refuses_to_start(tmp_path: Path, source: str, message: str) -> None:
    proc = AuthdProcess(tmp_path, config(), {"guarded.lua": source})
    with pytest.raises(RuntimeError) as caught:
        proc.start()
    assert "authd exited with" in str(caught.value) and "initialization failed" in str(caught.value)
    assert message in str(caught.value)

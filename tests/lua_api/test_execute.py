"""os.execute as in Dovecot's auth processes: its child's stdout is /dev/null, its stderr is logged.

The command gets the configured environment only, returns what Lua's own os.execute returns, and
is killed with what it started once authd has given up on the call.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

import lua_api.runtime
from lua_api.pool import thread_executor
from lua_api.results import PassdbResult
from lua_api.runtime import LuaState, StateOptions
from lua_api.script import Script
from tests.authd_process import LISTENERS, REPO, AuthdProcess
from tests.interop.wire import Wire
from tests.lua_api.conftest import RecordingHost, request

# In a child interpreter (one lupa Lua flavour per process): every value os.execute
# returns for each command, then a command that prints.
CHILD = r"""
import json, sys
from lua_api.runtime import LuaState, StateOptions

class Host:
    def log(self, level, message, context): pass
    def password_verify(self, context, crypted, plain): return 0, None

RESULTS = b'''
local function all(...)
  local shown = {tostring(select("#", ...))}
  for i = 1, select("#", ...) do shown[#shown + 1] = tostring((select(i, ...))) end
  return table.concat(shown, ",")
end
return table.concat({all(os.execute("exit 3")), all(os.execute("true")), all(os.execute("kill -9 $$")),
  all(os.execute()), all(os.execute(42))}, " | ")
'''
state = LuaState(Host(), StateOptions(version=sys.argv[1]))
ours = state.lua.execute(RESULTS)
said = state.lua.execute(b'return tostring(os.execute("echo secret on stdout; echo to stderr >&2"))')
print(json.dumps([ours.decode(), said.decode()]))
"""


# Lua 5.1 and LuaJIT return system()'s status; 5.3 and 5.4 what Debian's liblua (built
# for POSIX, as Dovecot uses it) returns: how the command ended and its exit code or signal.
# (lupa's own 5.3 and 5.4 are not built for POSIX: they say "exit" with the raw status.)
RESULTS = {
    "5.4": "3,nil,exit,3 | 3,true,exit,0 | 3,nil,signal,9 | 1,true | 3,nil,exit,127",
    "5.3": "3,nil,exit,3 | 3,true,exit,0 | 3,nil,signal,9 | 1,true | 3,nil,exit,127",
    "5.1": "1,768 | 1,0 | 1,9 | 1,1 | 1,32512",
    "luajit": "1,768 | 1,0 | 1,9 | 1,1 | 1,32512",
}


@pytest.mark.parametrize("version", RESULTS)
def test_results_are_lua_s_own_and_stdout_goes_nowhere(version: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, version], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    )
    assert "secret" not in done.stdout and "to stderr" not in done.stderr  # nothing on the process's own fds
    ours, said = json.loads(done.stdout.splitlines()[-1])  # after the log lines of its stderr
    assert ours == RESULTS[version]
    assert said == ("true" if version in ("5.4", "5.3") else "0")


def test_stderr_is_logged_line_by_line_and_the_environment_is_the_configured_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUTHD_TEST_OUTER", "not for scripts")
    state = LuaState(RecordingHost(), StateOptions(environment={"AUTHD_SECRET": "s3"}), name="s.lua")
    with structlog.testing.capture_logs() as logs:
        seen = state.lua.execute(
            b'return os.execute(\'test -z "$AUTHD_TEST_OUTER" && test "$AUTHD_SECRET" = s3\')',
        )
        state.lua.execute(b'os.execute("echo one >&2; echo >&2; echo two >&2; echo out")')
    assert seen == (True, b"exit", 0)
    assert [(e["log_level"], e["event"], e["script"], e["line"]) for e in logs] == [
        ("error", "lua.execute_stderr", "s.lua", "one"),
        ("error", "lua.execute_stderr", "s.lua", "two"),
    ]


def gone(pid: int) -> bool:
    """Whether a process has ended (a zombie nobody reaps counts as ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


async def test_a_stuck_command_and_what_it_started_are_killed_after_the_call_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lua_api.runtime, "STUCK_GRACE", 0.3)
    pid_file = tmp_path / "pid"
    path = tmp_path / "stuck.lua"
    path.write_text(
        "function auth_passdb_lookup(req)\n"
        f'  os.execute("sleep 30 & echo $! > {pid_file}; wait")\n'
        "  return dovecot.auth.PASSDB_RESULT_OK, 'password=pw'\n"
        "end\n"
    )
    script = Script(path, LuaState(RecordingHost(), StateOptions(call_timeout=0.3), name=str(path)))
    await script.load(lua_api.runtime.run_in_loop)
    started = time.monotonic()
    result: Any = await script.passdb_lookup(request(), thread_executor(trio.CapacityLimiter(1)))
    # the guard rail holds: the call ends at its timeout and grace, the state is given up
    assert result.code == PassdbResult.INTERNAL_FAILURE and time.monotonic() - started < 1.5
    assert "timed out after 0.3 s in a blocking call" in result.error
    pid = int(pid_file.read_text())
    with trio.fail_after(5):  # not 30 s later
        while not gone(pid):
            await trio.sleep(0.05)


DAEMON_SCRIPT = """
function auth_passdb_lookup(req)
  os.execute("echo secret-out; echo child-err >&2")
  return dovecot.auth.PASSDB_RESULT_OK, "password=right"
end
"""


def test_a_real_authd_logs_the_stderr_and_drops_the_stdout(tmp_path: Path) -> None:
    config = '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 1\n' + LISTENERS
    with AuthdProcess(tmp_path, config, {"s.lua": DAEMON_SCRIPT}) as authd:
        resp = base64.b64encode(b"\0alice\0right").decode()
        with Wire.auth_client(authd.socket("auth-client"), timeout=20) as wire:
            wire.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp\tresp={resp}")
            assert wire.read_line() == "OK\t1\tuser=alice"
        authd.wait_for_log(lambda e: e.get("event") == "lua.execute_stderr")
    raw = authd.log_path.read_bytes()
    assert b"secret-out" not in raw
    events = [json.loads(line) for line in raw.splitlines()]  # only JSON events on authd's stdout
    child = [(e["level"], e["script"], e["line"]) for e in events if e["event"] == "lua.execute_stderr"]
    assert child == [("error", str(tmp_path / "s.lua"), "child-err")]

"""Guard rails against real Lua states: call_timeout, max_memory, panics, os.exit.

Whatever a script does, its call ends (as an internal failure when it misbehaves),
the process lives on, and a state that may be damaged is replaced. Things that
would abort or deadlock the process if a guard regressed run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

import lua_api.pool
import lua_api.runtime
from lua_api.pool import ScriptPool, thread_executor
from lua_api.results import PassdbResult
from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError
from tests.lua_api.conftest import RecordingHost, request

REPO = Path(__file__).resolve().parents[2]
MEMORY = 8_000_000

SCRIPT = """\
function script_init()
  dovecot.i_info("init")
  return 0
end

function auth_passdb_lookup(req)
  local body = bodies[req.user]
  if body then body(req) end
  return dovecot.auth.PASSDB_RESULT_OK, "password=secret"
end

local function grow_table() local t = {} for i = 1, 1e9 do t[i] = {i} end end
local function spin(seconds) local t = now() while now() - t < seconds do end end

bodies = {
  loop = function() while true do end end,
  pcall_loop = function() while true do pcall(function() while true do end end) end end,
  nested = function()
    while true do
      pcall(function() while true do pcall(function() while true do end end) end end)
    end
  end,
  xpcall_loop = function()
    while true do xpcall(function() while true do end end, function(e) return e end) end
  end,
  wrap_loop = function() coroutine.wrap(function() while true do end end)() end,
  coroutines = function()
    while true do coroutine.resume(coroutine.create(function() while true do end end)) end
  end,
  close_loop = function()
    local guard <close> = setmetatable({}, {__close = function() while true do end end})
    error("first")
  end,
  sethook = function() debug.sethook() end,
  grow_table = grow_table,
  grow_string = function() local s = "x" while true do s = s .. s end end,
  wrapped_memory = function()
    local ok, err = pcall(grow_table)
    error("backend: " .. tostring(err))
  end,
  slow = function() spin(0.2) end,
  busy = function() spin(0.3) end,
  stuck = function() os.execute("sleep 2") end,
  exit = function() os.exit(1) end,
  bad_error = function() error(setmetatable({}, {__tostring = error})) end,
  python_error = function(req) return req_item_attribute(req) end,
}
"""


@pytest.fixture
def script_path() -> Iterator[Path]:
    # Short enough that tracebacks show it whole (Lua cuts sources at 60 characters).
    with tempfile.TemporaryDirectory(prefix="g") as name:
        path = Path(name) / "guarded.lua"
        path.write_text(SCRIPT)
        yield path


async def load(
    path: Path, host: RecordingHost | None = None, *, call_timeout: float = 0.3, max_memory: int = MEMORY
) -> Script:
    state = LuaState(
        host or RecordingHost(),
        StateOptions(call_timeout=call_timeout, max_memory=max_memory),
        name=str(path),
    )
    state.lua.globals()[b"now"] = time.monotonic  # os.clock() is CPU time, and slow in sandboxes
    script = Script(path, state)
    await script.load(run_in_loop)
    return script


async def lookup(script: Script, user: str, run: Any = run_in_loop) -> Any:
    return await script.passdb_lookup(request(user.encode()), run)


# --- call_timeout ---------------------------------------------------------------------


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lua_api.runtime, "STUCK_GRACE", 0.3)


@pytest.mark.usefixtures("short_grace")
@pytest.mark.parametrize(
    "user", ["loop", "pcall_loop", "nested", "xpcall_loop", "wrap_loop", "coroutines", "close_loop"]
)
async def test_runaway_lua_times_out(script_path: Path, user: str) -> None:
    script = await load(script_path)
    started = time.monotonic()
    # In a worker thread: if the hook failed, authd would give the thread up (and the
    # test would fail) instead of hanging here.
    run = thread_executor(trio.CapacityLimiter(1))
    with structlog.testing.capture_logs() as logs:
        result = await lookup(script, user, run)
    assert time.monotonic() - started < 1.0
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error.startswith(
        "lua_pcall(auth_passdb_lookup, 1, 2) failed: "
        "timed out after 0.3 s in Lua code ([lua] call_timeout)\nstack traceback:\n\t"
        f"{script_path}:"
    )
    [event] = [e for e in logs if e["event"] == "lua.timeout"]
    assert event["script"] == str(script_path) and event["entry"] == "auth_passdb_lookup"
    assert event["state"] == "kept" and event["where"].startswith(f"{script_path}:")
    # The hook unwound the call cleanly: the same state keeps serving.
    assert script.state.broken is None
    assert (await lookup(script, "alice")).code == PassdbResult.OK


async def test_time_is_per_call(script_path: Path) -> None:
    script = await load(script_path)
    for _ in range(3):  # 0.2 s each, under the 0.3 s limit every time
        assert (await lookup(script, "slow")).code == PassdbResult.OK


async def test_script_cannot_replace_the_hook(script_path: Path) -> None:
    script = await load(script_path)
    result = await lookup(script, "sethook")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert "debug.sethook() is not available: authd uses the debug hook to enforce [lua] call_timeout" in (result.error)
    unguarded = await load(script_path, call_timeout=0)
    assert (await lookup(unguarded, "sethook")).code == PassdbResult.OK


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("while true do end", "lua_pcall({path}) failed: timed out after 0.3 s in Lua code"),
        (
            "function script_init() while true do end end",
            "lua_pcall(script_init, 0, 1) failed: timed out after 0.3 s in Lua code",
        ),
    ],
)
async def test_load_times_out(tmp_path: Path, source: str, message: str) -> None:
    path = tmp_path / "init.lua"
    path.write_text(source)
    with pytest.raises(ScriptLoadError) as caught:
        await load(path)
    assert str(caught.value).startswith(message.format(path=path) + " ([lua] call_timeout)")


class SleepForever:
    """An I/O extension whose I/O never ends: `wait()` in Lua."""

    kind = b"sleep"

    def install(self, state: LuaState) -> None:
        state.lua.execute(
            b"local yield_io = ... function wait() return yield_io('sleep', {}) end", state.api[b"yield_io"]
        )

    async def perform(self, payload: Any) -> Any:
        await trio.sleep_forever()

    def perform_blocking(self, payload: Any) -> Any:
        raise AssertionError("the call can yield")


async def test_waiting_for_io_counts(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "io.lua"
    path.write_text(
        "function auth_passdb_lookup(req)\n"
        "  if req.user == 'wait' then wait() end\n"
        "  return dovecot.auth.PASSDB_RESULT_OK, 'password=x'\n"
        "end\n"
    )
    state = LuaState(RecordingHost(), StateOptions(extensions=(SleepForever(),)), name=str(path))
    script = Script(path, state)
    await script.load(run_in_loop)
    started = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        result = await lookup(script, "wait")
    assert trio.current_time() - started == pytest.approx(30.0)  # the default call_timeout
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error == (
        "lua_pcall(auth_passdb_lookup, 1, 2) failed: timed out after 30 s in sleep I/O ([lua] call_timeout)"
    )
    assert [e["waiting_for"] for e in logs if e["event"] == "lua.timeout"] == ["sleep I/O"]
    # The suspended call was dropped; the state serves on.
    assert state.broken is None and (await lookup(script, "alice")).code == PassdbResult.OK


@pytest.mark.usefixtures("short_grace")
async def test_stuck_in_c_abandons_the_state(script_path: Path) -> None:
    host = RecordingHost()
    run = thread_executor(trio.CapacityLimiter(4))
    pool = ScriptPool(script_path, host, StateOptions(call_timeout=0.3, max_memory=MEMORY), size=2, run=run)
    await pool.start()
    states = {id(script.state) for script in pool.scripts}

    async def call(user: str) -> tuple[Any, float]:
        started = time.monotonic()
        result = await pool.call(lambda script: lookup(script, user, pool.run))
        return result, time.monotonic() - started

    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            stuck: list[Any] = []

            async def stuck_call() -> None:
                stuck.append(await call("stuck"))

            nursery.start_soon(stuck_call)
            await trio.sleep(0.1)
            for _ in range(5):  # the other state serves meanwhile
                result, took = await call("alice")
                assert result.code == PassdbResult.OK and took < 0.2
        [(result, took)] = stuck
        assert result.code == PassdbResult.INTERNAL_FAILURE and 0.5 < took < 1.5
        assert result.error == (
            "lua_pcall(auth_passdb_lookup, 1, 2) failed: timed out after 0.3 s in a blocking call "
            "([lua] call_timeout); the Lua state is abandoned and replaced"
        )
        with trio.fail_after(5):
            while len([e for e in logs if e["event"] == "lua.state_rebuilt"]) < 1:
                await trio.sleep(0.05)
    [event] = [e for e in logs if e["event"] == "lua.timeout"]
    assert event["state"] == "replaced" and event["waiting_for"] == "a blocking call"
    assert [s.state.broken for s in pool.scripts] == [None, None]
    assert len(states & {id(s.state) for s in pool.scripts}) == 1  # one fresh state
    assert [line[1] for line in host.lines].count("init") == 3  # the new state ran script_init
    for _ in range(3):
        assert (await call("alice"))[0].code == PassdbResult.OK
    assert await pool.close() == []


@pytest.mark.usefixtures("short_grace")
async def test_outside_cancellation_waits_for_the_slice(script_path: Path) -> None:
    # Cancelling a request must not abandon a thread that is running Lua.
    script = await load(script_path)
    run = thread_executor(trio.CapacityLimiter(1))
    started = time.monotonic()
    with trio.move_on_after(0.05):
        result = await lookup(script, "slow", run)
    assert result.code == PassdbResult.OK and time.monotonic() - started > 0.2  # the slice ran to its end
    assert script.state.broken is None
    assert (await lookup(script, "alice", run)).code == PassdbResult.OK


@pytest.mark.usefixtures("short_grace")
async def test_waiting_for_a_thread_counts(script_path: Path) -> None:
    script = await load(script_path)
    limiter = trio.CapacityLimiter(1)
    await limiter.acquire()  # every worker thread is busy
    with structlog.testing.capture_logs() as logs:
        result = await lookup(script, "alice", thread_executor(limiter))
    assert "timed out after 0.3 s in a worker thread" in result.error
    assert [e["state"] for e in logs if e["event"] == "lua.timeout"] == ["kept"]
    limiter.release()
    assert script.state.broken is None
    assert (await lookup(script, "alice", thread_executor(limiter))).code == PassdbResult.OK


# --- max_memory ------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["grow_table", "grow_string", "wrapped_memory"])
async def test_out_of_memory(script_path: Path, user: str) -> None:
    script = await load(script_path)
    with structlog.testing.capture_logs() as logs:
        result = await lookup(script, user)
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert "not enough memory" in result.error
    assert result.error.endswith(f"([lua] max_memory = {MEMORY} bytes; the Lua state is rebuilt)")
    [event] = [e for e in logs if e["event"] == "lua.memory"]
    assert event["max_memory"] == MEMORY and event["entry"] == "auth_passdb_lookup"
    assert script.state.broken == "memory"
    # A broken state refuses further calls instead of running in a bad state.
    assert (await lookup(script, "alice")).code == PassdbResult.INTERNAL_FAILURE


async def test_pool_rebuilds_a_state_that_ran_out_of_memory(script_path: Path) -> None:
    host = RecordingHost()
    pool = ScriptPool(script_path, host, StateOptions(call_timeout=5, max_memory=MEMORY), size=1)
    await pool.start()
    with structlog.testing.capture_logs() as logs:
        result = await pool.call(lambda script: lookup(script, "grow_table"))
        assert result.code == PassdbResult.INTERNAL_FAILURE
        assert (pool.states, pool.has_password_verify) == (0, False)  # decided at start
        # The only state is being replaced: the next call waits for the fresh one.
        assert (await pool.call(lambda script: lookup(script, "alice"))).code == PassdbResult.OK
    assert [e["reason"] for e in logs if e["event"] == "lua.state_rebuilt"] == ["memory"]
    assert [line[1] for line in host.lines].count("init") == 2


async def test_rebuild_retries_until_the_script_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lua_api.pool, "REBUILD_DELAY", 0.05)
    down = tmp_path / "backend-down"
    path = tmp_path / "flaky.lua"
    path.write_text(
        "function script_init()\n"
        f"  local flag = io.open('{down}')\n"
        "  if flag then flag:close() error('backend down') end\n"
        "  return 0\n"
        "end\n"
        "function auth_passdb_lookup(req)\n"
        "  if req.user == 'grow' then local t = {} for i = 1, 1e9 do t[i] = {i} end end\n"
        "  return dovecot.auth.PASSDB_RESULT_OK, 'password=x'\n"
        "end\n"
    )
    pool = ScriptPool(path, RecordingHost(), StateOptions(max_memory=MEMORY), size=1)
    await pool.start()
    down.touch()
    with structlog.testing.capture_logs() as logs:
        assert (await pool.call(lambda script: lookup(script, "grow"))).code == PassdbResult.INTERNAL_FAILURE
        with trio.fail_after(5):
            while len([e for e in logs if e["event"] == "lua.rebuild_failed"]) < 2:
                await trio.sleep(0.02)
        down.unlink()
        with trio.fail_after(5):  # the next try succeeds, and the call gets the fresh state
            assert (await pool.call(lambda script: lookup(script, "alice"))).code == PassdbResult.OK
    failed = [e for e in logs if e["event"] == "lua.rebuild_failed"]
    assert "script_init, 0, 1) failed: " in failed[0]["message"] and "backend down" in failed[0]["message"]
    assert [e["retry_in"] for e in failed[:2]] == [0.05, 0.1]
    assert await pool.close() == []


async def test_memory_limit_only_binds_script_code(script_path: Path) -> None:
    script = await load(script_path, max_memory=1_000_000)
    state = script.state
    # Python may build more than max_memory in the state between calls...
    big = state.lua.table_from([b"x" * 1000] * 5000)
    assert state.lua.get_memory_used() > 1_000_000
    del big
    # ...and callbacks into Python (logging, here) do not lift the limit for the script.
    path = script.path.with_name("noisy.lua")
    path.write_text(
        "function auth_passdb_lookup(req)\n"
        "  for i = 1, 100 do dovecot.i_debug('x') end\n"
        "  local t = {} for i = 1, 1e9 do t[i] = {i} end\n"
        "end\n"
    )
    noisy = await load(path, max_memory=1_000_000)
    assert noisy.state.broken is None
    assert "not enough memory" in (await lookup(noisy, "alice")).error


async def test_memory_during_load(tmp_path: Path) -> None:
    path = tmp_path / "big.lua"
    path.write_text("big = {} for i = 1, 1e9 do big[i] = {i} end")
    with pytest.raises(ScriptLoadError, match=r"failed: not enough memory \(\[lua\] max_memory"):
        await load(path)


async def test_machinery_failures_take_the_state_out(script_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for error, broken, event in [("not enough memory", "memory", "lua.memory"), ("boom", "broken", "lua.state_broken")]:
        script = await load(script_path)
        state = script.state

        def fail(*args: Any, exc: type[BaseException] = state.module.LuaError, text: str = error) -> Any:
            raise exc(text)

        monkeypatch.setattr(state, "begin", fail)
        with structlog.testing.capture_logs() as logs:
            result = await lookup(script, "alice")
        assert result.code == PassdbResult.INTERNAL_FAILURE and error in result.error
        assert state.broken == broken and [e["event"] for e in logs] == [event]


# --- errors and os.exit -------------------------------------------------------------------


async def test_os_exit_is_an_error(script_path: Path) -> None:
    script = await load(script_path)
    result = await lookup(script, "exit")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert "os.exit() is not allowed: authd keeps running" in result.error
    assert (await lookup(script, "alice")).code == PassdbResult.OK


async def test_error_object_whose_tostring_raises(script_path: Path, tmp_path: Path) -> None:
    script = await load(script_path)
    result = await lookup(script, "bad_error")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error.startswith(
        "lua_pcall(auth_passdb_lookup, 1, 2) failed: (error object is a table value)\nstack traceback:"
    )
    path = tmp_path / "init.lua"
    path.write_text("function script_init() error(setmetatable({}, {__tostring = error})) end")
    with pytest.raises(ScriptLoadError, match=r"^lua_pcall\(script_init, 0, 1\) failed: \(error object is a table"):
        await load(path)


async def test_python_exceptions_become_lua_errors(script_path: Path) -> None:
    script = await load(script_path)
    script.state.lua.globals()[b"req_item_attribute"] = script.state.lua.eval(
        b"function(req) return req.item.no_such_attribute end"
    )
    result = await lookup(script, "python_error")
    assert result.code == PassdbResult.INTERNAL_FAILURE and "no_such_attribute" in result.error
    assert (await lookup(script, "alice")).code == PassdbResult.OK


async def test_scripts_cannot_walk_into_python(script_path: Path) -> None:
    # req.item is a Python object: its attributes would lead to every module of the daemon
    script = await load(script_path)
    script.state.lua.globals()[b"req_item_attribute"] = script.state.lua.eval(
        b"function(req) return req.item.__class__.__init__.__globals__ end"
    )
    result = await lookup(script, "python_error")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert "a script cannot read or set attributes of authd's Python objects (.__class__)" in result.error


# --- what would abort or deadlock the process: in a subprocess ------------------------------

CHILD = """\
import sys
import trio
from pathlib import Path
from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script
from tests.lua_api.conftest import RecordingHost, request

async def main(source, version, max_memory, setup):
    path = Path(sys.argv[1])
    path.write_text(source)
    state = LuaState(RecordingHost(), StateOptions(version=version, max_memory=max_memory), name=str(path))
    setup(state)
    script = Script(path, state)
    await script.load(run_in_loop)
    for user in (b"first", b"second"):
        result = await script.passdb_lookup(request(user), run_in_loop)
        print("result:", user.decode(), result.code, (result.error or "").splitlines()[:1], flush=True)
        # Python touches the state between calls, as every request does.
        state.lua.table_from([b"y" * 100] * 20000)
        state.has_function(b"auth_passdb_lookup")
"""


def run_child(tmp_path: Path, body: str) -> list[str]:
    """Run CHILD with `body`; the result lines it printed. Fails if the child died or hung."""
    code = CHILD + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "child.lua")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return [line.removeprefix("result: ") for line in done.stdout.splitlines() if line.startswith("result: ")]


def test_missing_debug_library_under_strict_globals(tmp_path: Path) -> None:
    # lupa looks up debug.traceback unprotected before each call: with _G's strict
    # __index and no `debug`, that lookup would raise outside any pcall (a panic).
    lines = run_child(
        tmp_path,
        """
        SOURCE = '''
        dovecot.restrict_global_variables(true)
        function auth_passdb_lookup(req)
          debug = nil
          return dovecot.auth.PASSDB_RESULT_OK, "password=x"
        end
        '''
        trio.run(main, SOURCE, "5.4", 0, lambda state: None)
        """,
    )
    assert lines == ["first 1 []", "second 1 []"]


@pytest.mark.parametrize("version", ["5.4", "5.3"])
def test_gc_metamethod_errors(tmp_path: Path, version: str) -> None:
    # 5.3 raises __gc errors from whatever allocation runs the finalizer: one inside
    # lupa's own pushes from Python would be a panic. 5.4 turns them into warnings.
    lines = run_child(
        tmp_path,
        f"""
        SOURCE = '''
        function auth_passdb_lookup(req)
          for i = 1, 2000 do setmetatable({{}}, {{__gc = function() error("gc boom") end}}) end
          return dovecot.auth.PASSDB_RESULT_OK, "password=x"
        end
        '''
        trio.run(main, SOURCE, "{version}", 0, lambda state: None)
        """,
    )
    assert [line.split()[0] for line in lines] == ["first", "second"]  # both calls ended, no abort
    for line in lines:  # 5.3 fails the call whose allocation ran the finalizer, as in Dovecot
        assert line.split()[1] == "1" or (version == "5.3" and "error in __gc metamethod" in line)


def test_memory_limit_during_python_callbacks(tmp_path: Path) -> None:
    # A memory error while lupa pushes a Python callback's result would longjmp past
    # the GIL and freeze the process; the limit is lifted while Python runs.
    lines = run_child(
        tmp_path,
        """
        SOURCE = '''
        function auth_passdb_lookup(req)
          local keep = {}
          for i = 1, 1000 do keep[i] = big() end
          return dovecot.auth.PASSDB_RESULT_OK, "password=x"
        end
        '''
        def setup(state):
            state.lua.globals()[b"big"] = lambda: b"x" * 500_000 + b"y"
        trio.run(main, SOURCE, "5.4", 2_000_000, setup)
        """,
    )
    assert lines[0].startswith("first -1 ['lua_pcall(auth_passdb_lookup, 1, 2) failed: not enough memory")

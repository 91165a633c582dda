"""blocking = true scripts run in the event loop until they may block (AdaptiveExecutor).

Each test watches which thread ran a script's log lines: the event loop's (where trio
runs) or a worker thread, and what the executor decided.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from lua_api.pool import ScriptPool, adaptive_executor
from lua_api.runtime import AdaptiveExecutor, StateOptions
from lua_api.script import Script
from tests.lua_api.conftest import RecordingHost, request
from tests.lua_api.test_pool import Sleep as SleepOrYield

SCRIPT = """\
function auth_passdb_lookup(req)
  dovecot.i_info("before")
  if req.user == "execute" then
    os.execute("true")
  elseif req.user == "popen" then
    io.popen("echo hi"):read("a")
  elseif req.user == "verify" then
    req:password_verify("{PLAIN}x", "x")
  elseif req.user == "busy" then
    local x = 0
    for i = 1, 20000000 do x = x + i end
  elseif req.user == "wait" then
    wait(0.01)
  elseif req.user == "gsub" then
    string.gsub("x", "x", function() wait(0.01) end)  -- a C boundary: the wait cannot yield
  elseif req.user == "cjson" then
    require("cjson").encode({a = 1})
  elseif req.user == "socket" then
    require("socket").gettime()
  end
  dovecot.i_info("after")
  return dovecot.auth.PASSDB_RESULT_OK, "password=x"
end
"""

C_MODULES = Path("/usr/lib/x86_64-linux-gnu/lua/5.4")


class Sleep(SleepOrYield):
    """Sleep, and a blocking sleep where the call cannot yield."""

    def perform_blocking(self, payload: Any) -> Any:
        time.sleep(payload)


class ThreadHost(RecordingHost):
    """Records, for every log line, whether it came from the event loop's thread."""

    def __init__(self) -> None:
        super().__init__()
        self.loop_thread = threading.get_ident()
        self.where: list[tuple[str, bool]] = []
        self.collect = False
        #: Seconds every log line of the script waits without using the CPU.
        self.pause = 0.0

    def log(self, level: int, message: str, context: object | None) -> None:
        self.where.append((message, threading.get_ident() == self.loop_thread))
        if self.collect:
            gc.collect()
        if self.pause:
            time.sleep(self.pause)


async def start_pool(tmp_path: Path, source: str = SCRIPT) -> tuple[ScriptPool, ThreadHost, AdaptiveExecutor]:
    path = tmp_path / "adaptive.lua"
    path.write_text(source)
    host = ThreadHost()
    options = StateOptions(extensions=(Sleep(),))
    run = adaptive_executor(trio.CapacityLimiter(2), options, str(path))
    assert isinstance(run, AdaptiveExecutor)
    pool = ScriptPool(path, host, options, size=1, run=run)
    await pool.start()
    return pool, host, run


async def lookup(pool: ScriptPool, user: bytes) -> int:
    async def call(script: Script) -> int:
        return (await script.passdb_lookup(request(user), pool.run)).code

    return await pool.call(call)


async def test_calls_that_never_block_stay_in_the_event_loop(tmp_path: Path) -> None:
    pool, host, run = await start_pool(tmp_path)
    for user in (b"alice", b"wait", b"alice"):
        assert await lookup(pool, user) == 1
    # before and after the I/O wait alike: no thread hand-off at all
    assert host.where == [("before", True), ("after", True)] * 3
    assert run.inline
    await pool.close()


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        (b"execute", "the script called os.execute"),
        (b"popen", "the script called io.popen"),
        (b"verify", "the script called req:password_verify"),
        (b"busy", "3 slices took over 5 ms each in the event loop"),
        (b"gsub", "the script called sleep I/O where a call cannot move"),
    ],
)
async def test_what_may_block_moves_the_script_to_threads(tmp_path: Path, user: bytes, reason: str) -> None:
    pool, host, run = await start_pool(tmp_path)
    # a slow slice may be a hiccup: only the third moves the script
    tries = 3 if user == b"busy" else 1
    with structlog.testing.capture_logs() as logs:
        for _ in range(tries):
            assert await lookup(pool, user) == 1
        assert await lookup(pool, b"alice") == 1
    moved = [e for e in logs if e["event"] == "lua.threads"]
    assert len(moved) == 1 and moved[0]["message"].startswith(f"calls run in worker threads from now on: {reason}")
    assert not run.inline
    if user in (b"busy", b"gsub"):
        # a call that cannot move blocks the loop this once: the next calls go to threads
        assert host.where == [("before", True), ("after", True)] * tries + [("before", False), ("after", False)]
    else:
        # the call itself goes on in a worker thread from the blocking function on
        assert host.where == [("before", True), ("after", False), ("before", False), ("after", False)]
    await pool.close()


async def test_garbage_collection_is_not_the_scripts_doing(tmp_path: Path) -> None:
    pool, host, run = await start_pool(tmp_path)
    garbage = [[i] for i in range(300_000)]  # a full collection now takes a while
    host.collect = True  # every log line of the script triggers one, inside the slice
    for _ in range(4):
        assert await lookup(pool, b"alice") == 1
    assert run.inline and run.slow_slices == 0
    del garbage
    await pool.close()


async def test_waiting_for_the_cpu_or_the_gil_is_not_the_scripts_doing(tmp_path: Path) -> None:
    """A slice that takes long in wall time but not in CPU time (it waited for the GIL,
    held by a state loading in a thread, or for a core) does not count as slow."""
    pool, host, run = await start_pool(tmp_path)
    host.pause = 0.004  # two log lines per call: 8 ms in wall time, next to no CPU
    for _ in range(4):
        assert await lookup(pool, b"alice") == 1
    assert run.inline and run.slow_slices == 0
    assert all(in_loop for _, in_loop in host.where)
    await pool.close()


async def test_blocking_while_loading_means_threads_from_the_start(tmp_path: Path) -> None:
    source = 'os.execute("true")\n' + SCRIPT
    pool, host, run = await start_pool(tmp_path, source)
    assert not run.inline
    assert await lookup(pool, b"alice") == 1
    assert host.where == [("before", False), ("after", False)]
    await pool.close()


@pytest.mark.requires("lua-cjson")
async def test_computing_c_modules_stay_in_the_event_loop(tmp_path: Path) -> None:
    pool, host, run = await start_pool(tmp_path)
    assert await lookup(pool, b"cjson") == 1
    assert run.inline and host.where == [("before", True), ("after", True)]
    await pool.close()


@pytest.mark.requires("lua-socket")
async def test_luasocket_moves_the_call_to_a_thread(tmp_path: Path) -> None:
    pool, host, run = await start_pool(tmp_path)
    assert await lookup(pool, b"socket") == 1
    assert not run.inline and host.where == [("before", True), ("after", False)]
    await pool.close()


def test_lua_51_and_luajit_always_use_threads(tmp_path: Path) -> None:
    for version in ("5.1", "luajit"):
        run = adaptive_executor(trio.CapacityLimiter(1), StateOptions(version=version), "x.lua")
        assert not isinstance(run, AdaptiveExecutor)

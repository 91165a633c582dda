"""lua_api.pool: elastic pools of Lua states, interleaved calls, and what the pool reports.

Calls here wait on a fake I/O extension (`wait(seconds)` in Lua yields to trio.sleep),
so with trio's autojump clock the time a batch of calls takes shows how many ran at
once, exactly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from lua_api.pool import ScriptPool, thread_executor
from lua_api.results import PassdbResult
from lua_api.runtime import LuaState, StateOptions
from lua_api.script import Script
from tests.lua_api.conftest import RecordingHost, request

SCRIPT = """\
inflight, peak = 0, 0

function script_init()
  dovecot.i_info("init")
  return 0
end

function script_deinit()
  dovecot.i_info("deinit")
end

function auth_passdb_lookup(req)
  inflight = inflight + 1
  if inflight > peak then peak = inflight end
  wait(tonumber(req.session))
  inflight = inflight - 1
  return dovecot.auth.PASSDB_RESULT_OK, {password = "x", peak = peak}
end
"""


class Sleep:
    """An I/O extension: `wait(seconds)` yields to the event loop for that long."""

    kind = b"sleep"

    def __init__(self) -> None:
        self.waiting = 0
        #: The most calls that waited at once.
        self.most = 0
        #: How long `wait("init")` takes.
        self.init_delay = 0.0

    def install(self, state: LuaState) -> None:
        state.lua.execute(
            b"local yield_io = ... function wait(s) return yield_io('sleep', s) end", state.api[b"yield_io"]
        )

    async def perform(self, payload: Any) -> Any:
        self.waiting += 1
        self.most = max(self.most, self.waiting)
        try:
            await trio.sleep(self.init_delay if payload == b"init" else payload)
        finally:
            self.waiting -= 1

    def perform_blocking(self, payload: Any) -> Any:
        raise AssertionError("the call can yield")


@pytest.fixture
def script_path(tmp_path: Path) -> Path:
    path = tmp_path / "pool.lua"
    path.write_text(SCRIPT)
    return path


def new_pool(path: Path, host: RecordingHost, **kwargs: Any) -> ScriptPool:
    return ScriptPool(path, host, StateOptions(extensions=(Sleep(),), call_timeout=100), **kwargs)


async def lookup(pool: ScriptPool, seconds: float = 1) -> Any:
    async def call(script: Script) -> Any:
        return await script.passdb_lookup(request(session_id=str(seconds).encode()), pool.run)

    return await pool.call(call)


async def run_calls(pool: ScriptPool, count: int, seconds: float = 1) -> list[Any]:
    results: list[Any] = []

    async def one() -> None:
        results.append(await lookup(pool, seconds))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


def count(host: RecordingHost, line: str) -> int:
    return [entry[1] for entry in host.lines].count(line)


async def test_pool_grows_while_calls_wait(script_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    host = RecordingHost()
    pool = new_pool(script_path, host, size=1, max_size=4)
    await pool.start()
    started = trio.current_time()
    results = await run_calls(pool, 4)
    assert trio.current_time() - started == pytest.approx(1.0)  # all four waited at once
    assert [r.code for r in results] == [PassdbResult.OK] * 4
    assert {dict(r.fields)[b"peak"] for r in results} == {b"1"}  # one call per state
    assert (pool.states, pool.busy, count(host, "init")) == (4, 0, 4)
    assert await pool.close() == []
    assert count(host, "deinit") == 4  # the grown states too


async def test_growth_stops_at_max_size(script_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    host = RecordingHost()
    pool = new_pool(script_path, host, size=1, max_size=2)
    await pool.start()
    started = trio.current_time()
    await run_calls(pool, 5)
    assert trio.current_time() - started == pytest.approx(3.0)  # 2 + 2 + 1
    assert (pool.states, count(host, "init")) == (2, 2)


async def test_without_max_size_the_pool_keeps_its_size(
    script_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pool = new_pool(script_path, RecordingHost(), size=2)
    await pool.start()
    started = trio.current_time()
    await run_calls(pool, 4)
    assert trio.current_time() - started == pytest.approx(2.0)
    assert pool.states == 2


async def test_idle_states_above_size_are_retired(script_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    host = RecordingHost()
    pool = new_pool(script_path, host, size=1, max_size=3, idle_timeout=10)
    await pool.start()
    await run_calls(pool, 3)  # t = 1: three states, idle
    await trio.sleep(5)
    await run_calls(pool, 2)  # t = 7: two of them served again
    await trio.sleep(3.5)
    assert (pool.states, count(host, "deinit")) == (3, 0)
    await trio.sleep(1)  # t = 11.5: the state idle since t = 1 is retired
    assert (pool.states, count(host, "deinit")) == (2, 1)
    await trio.sleep(5)
    assert (pool.states, count(host, "deinit")) == (2, 1)
    await trio.sleep(1)  # t = 17.5: one of the other two; `size` states stay
    assert (pool.states, count(host, "deinit")) == (1, 2)
    await trio.sleep(100)
    assert pool.states == 1
    assert await pool.close() == []
    assert count(host, "deinit") == 3


async def test_a_state_that_fails_to_load_is_not_added(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    down = tmp_path / "backend-down"
    path = tmp_path / "flaky.lua"
    path.write_text(
        SCRIPT.replace(
            'dovecot.i_info("init")',
            f"dovecot.i_info('init') if io.open('{down}') then error('backend down') end",
        )
    )
    host = RecordingHost()
    pool = new_pool(path, host, size=1, max_size=3)
    await pool.start()
    down.touch()
    started = trio.current_time()
    with structlog.testing.capture_logs() as logs:
        results = await run_calls(pool, 2)
    # The second call waited for the first one's state.
    assert trio.current_time() - started == pytest.approx(2.0)
    assert [r.code for r in results] == [PassdbResult.OK] * 2
    [failed] = [e for e in logs if e["event"] == "lua.grow_failed"]
    assert failed["script"] == str(path) and "backend down" in failed["message"]
    assert pool.states == 1
    down.unlink()
    await trio.sleep(1)
    await run_calls(pool, 2)
    assert pool.states == 2


async def test_interleaved_calls_share_one_state(script_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    host = RecordingHost()
    pool = new_pool(script_path, host, size=1, calls_per_state=8)
    await pool.start()
    started = trio.current_time()
    results = await run_calls(pool, 8)
    assert trio.current_time() - started == pytest.approx(1.0)
    assert sorted(int(dict(r.fields)[b"peak"]) for r in results) == [8] * 8  # all in one state at once
    assert (pool.states, count(host, "init")) == (1, 1)
    started = trio.current_time()
    await run_calls(pool, 10)  # two more than fit: they wait for room
    assert trio.current_time() - started == pytest.approx(2.0)


async def test_one_call_per_state_by_default(script_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    pool = new_pool(script_path, RecordingHost(), size=1)
    await pool.start()
    started = trio.current_time()
    results = await run_calls(pool, 3)
    assert trio.current_time() - started == pytest.approx(3.0)
    assert {dict(r.fields)[b"peak"] for r in results} == {b"1"}


async def test_interleaved_slices_in_threads_take_turns(script_path: Path) -> None:
    # Calls interleave at their I/O; their slices, in worker threads, never overlap.
    host = RecordingHost()
    pool = ScriptPool(
        script_path,
        host,
        StateOptions(extensions=(Sleep(),)),
        size=1,
        calls_per_state=4,
        run=thread_executor(trio.CapacityLimiter(4)),
    )
    await pool.start()
    [script] = pool.scripts
    inside = [0]
    overlaps = []
    begin = script.state.begin

    def watched(*args: Any) -> Any:
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.05)  # long enough for the runner to start more threads
        try:
            return begin(*args)
        finally:
            inside[0] -= 1

    script.state.begin = watched  # type: ignore[method-assign,assignment]
    results = await run_calls(pool, 4, 0.2)
    assert sorted(int(dict(r.fields)[b"peak"]) for r in results) == [4, 4, 4, 4]
    assert overlaps == [1, 1, 1, 1]


async def test_pool_reports_size_busy_and_waits(script_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    pool = new_pool(script_path, RecordingHost(), size=1, max_size=2)
    await pool.start()
    waits: list[float] = []
    pool.on_wait = waits.append
    seen: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(lookup, pool)
        await trio.sleep(0.5)
        seen.append((pool.states, pool.busy))
        await trio.sleep(1)
        seen.append((pool.states, pool.busy))
    assert seen == [(2, 2), (2, 1)]
    # The first call found a free state; the second waited for the grown one (loading
    # takes no time on the mock clock); the third for the first state to free up.
    assert waits == [0.0, pytest.approx(1.0)]
    assert pool.busy == 0


async def test_cancelled_waiting_call_gives_back_nothing(
    script_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    pool = new_pool(script_path, RecordingHost(), size=1)
    await pool.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lookup, pool)
        await trio.sleep(0.1)
        with trio.move_on_after(0.5):
            await lookup(pool)
    assert (pool.busy, pool.states) == (0, 1)
    started = trio.current_time()
    await run_calls(pool, 2)
    assert trio.current_time() - started == pytest.approx(2.0)


async def test_states_waiting_on_io_hold_no_thread(script_path: Path) -> None:
    sleep = Sleep()
    pool = ScriptPool(
        script_path,
        RecordingHost(),
        StateOptions(extensions=(sleep,)),
        size=1,
        max_size=8,
        run=thread_executor(trio.CapacityLimiter(2)),
    )
    await pool.start()
    results = await run_calls(pool, 8, 0.3)
    assert [r.code for r in results] == [PassdbResult.OK] * 8
    assert (pool.states, sleep.most) == (8, 8)  # 8 calls waited at once on 2 threads


async def test_no_growth_for_calls_busy_in_lua(tmp_path: Path) -> None:
    # More states would not help calls that wait for Lua (or threads) to finish.
    path = tmp_path / "busy.lua"
    path.write_text(
        "function auth_passdb_lookup(req)\n"
        "  os.execute('sleep 0.1')\n"
        "  return dovecot.auth.PASSDB_RESULT_OK, 'password=x'\n"
        "end\n"
    )
    pool = ScriptPool(
        path, RecordingHost(), StateOptions(), size=1, max_size=4, run=thread_executor(trio.CapacityLimiter(4))
    )
    await pool.start()
    results = await run_calls(pool, 3)
    assert [r.code for r in results] == [PassdbResult.OK] * 3
    assert pool.states == 1


async def test_close_stops_a_state_still_loading(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # A state whose script_init has not finished is dropped without script_deinit.
    sleep = Sleep()
    path = tmp_path / "slow_init.lua"
    path.write_text(SCRIPT.replace('dovecot.i_info("init")', 'wait("init") dovecot.i_info("init")'))
    host = RecordingHost()
    pool = ScriptPool(path, host, StateOptions(extensions=(sleep,), call_timeout=100), size=1, max_size=2)
    await pool.start()
    sleep.init_delay = 5
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lookup, pool, 2)
        nursery.start_soon(lookup, pool, 2)  # waits: a second state starts loading (5 s)
        await trio.sleep(4.5)  # both calls done on the first state
        assert (pool.states, count(host, "init")) == (1, 1)
        with trio.fail_after(1):
            assert await pool.close() == []
    await trio.sleep(10)
    assert (count(host, "init"), count(host, "deinit")) == (1, 1)

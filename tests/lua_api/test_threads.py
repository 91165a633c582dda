"""lua_api.threads: reused worker threads under a CapacityLimiter."""

from __future__ import annotations

import math
import threading
import time

import pytest
import trio

from lua_api.threads import GAVE_UP, STILL_RUNNING, ThreadRunner, runner_for


async def test_results_and_exceptions_come_back() -> None:
    runner = ThreadRunner(trio.CapacityLimiter(2))
    main = threading.get_ident()
    assert await runner(lambda: threading.get_ident() != main) is True

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await runner(fail)
    results = []

    async def one(value: int) -> None:
        results.append(await runner(lambda: value * 2))

    async with trio.open_nursery() as nursery:
        for value in range(50):
            nursery.start_soon(one, value)
    assert sorted(results) == [value * 2 for value in range(50)]


async def test_a_blocked_worker_gets_company() -> None:
    runner = ThreadRunner(trio.CapacityLimiter(2))
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner, release.wait)
        await trio.sleep(0.01)
        with trio.fail_after(5):  # a second thread serves while the first one is stuck
            assert await runner(lambda: "second") == "second"
        assert not release.is_set()
        release.set()


async def test_jobs_wait_when_every_token_is_taken() -> None:
    runner = ThreadRunner(trio.CapacityLimiter(1))
    release = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner, release.wait)
        await trio.sleep(0.01)
        done = trio.Event()

        async def second() -> None:
            ran.append(await runner(lambda: "second"))
            done.set()

        nursery.start_soon(second)
        await trio.sleep(0.1)
        assert ran == []  # the only thread is stuck
        release.set()
        with trio.fail_after(5):
            await done.wait()
    assert ran == ["second"]


async def test_jobs_are_given_up_at_their_time() -> None:
    runner = ThreadRunner(trio.CapacityLimiter(1))
    release = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, release.wait, math.inf)
        await trio.sleep(0.01)
        # Not started (the only thread is stuck): given up on, and never run.
        assert await runner.run(lambda: ran.append("waiting"), trio.current_time() + 0.05) is GAVE_UP
        release.set()
    stuck = threading.Event()

    def blocked() -> str:  # started, then stuck: given up on; its thread goes on
        stuck.wait()
        ran.append("stuck")
        return "late"

    assert await runner.run(blocked, trio.current_time() + 0.05) is STILL_RUNNING
    stuck.set()
    assert await runner.run(lambda: "after", math.inf) == "after"
    assert ran == ["stuck"]


async def test_waiting_cannot_be_cancelled_from_outside() -> None:
    runner = ThreadRunner(trio.CapacityLimiter(1))
    done: list[str] = []

    def slow() -> None:
        time.sleep(0.1)
        done.append("ran")

    with trio.move_on_after(0.01) as scope:
        await runner.run(slow, math.inf)
        done.append("returned")
        await trio.sleep(0)  # the cancellation comes at the next checkpoint
        done.append("not reached")
    assert scope.cancelled_caught and done == ["ran", "returned"]


def test_one_runner_per_limiter() -> None:
    first, second = trio.CapacityLimiter(1), trio.CapacityLimiter(1)
    assert runner_for(first) is runner_for(first)
    assert runner_for(first) is not runner_for(second)

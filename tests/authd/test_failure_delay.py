"""The failure delay: FAILs wait, then leave in shuffled batches from a 500 ms timer."""

from __future__ import annotations

import functools

import trio
import trio.testing

from authd.failure_delay import FailureDelay


async def test_failures_wait_for_the_delay(autojump_clock: trio.testing.MockClock) -> None:
    delay = FailureDelay(2.0)
    sent: list[tuple[str, float]] = []

    def sender(name: str):  # type: ignore[no-untyped-def]
        async def send() -> None:
            sent.append((name, trio.current_time()))

        return send

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delay.serve)
        start = trio.current_time()
        delay.add(sender("a"))
        await trio.sleep(0.7)
        delay.add(sender("b"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    times = {name: when - start for name, when in sent}
    assert set(times) == {"a", "b"}
    # released by the first 500 ms tick after they are 2 s old
    assert 2.0 <= times["a"] <= 2.5
    assert 2.7 <= times["b"] - 0.0 <= 3.2


async def record(sent: list[int], index: int) -> None:
    sent.append(index)


async def test_batches_are_shuffled(autojump_clock: trio.testing.MockClock) -> None:
    orders = set()
    for _ in range(20):
        delay = FailureDelay(1.0)
        sent: list[int] = []
        for index in range(5):
            delay.add(functools.partial(record, sent, index))
        await trio.sleep(1.0)
        await delay.flush()
        orders.add(tuple(sent))
        assert sorted(sent) == [0, 1, 2, 3, 4]
    assert len(orders) > 1

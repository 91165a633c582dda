"""serve_in_arrival_order: trio runs ready tasks oldest first (authd.scheduling)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from authd.scheduling import serve_in_arrival_order


@pytest.fixture
def restore_trio() -> Iterator[None]:
    """trio's order as the daemon sees it, and back to the test run's afterwards.

    Importing Hypothesis (the property tests do) makes trio shuffle batches with a
    seeded generator instead; the daemon never imports it.
    """
    run = trio._core._run
    original, deterministic = run._r, run._ALLOW_DETERMINISTIC_SCHEDULING
    run._ALLOW_DETERMINISTIC_SCHEDULING = False  # type: ignore[misc]
    yield
    run._r, run._ALLOW_DETERMINISTIC_SCHEDULING = original, deterministic  # type: ignore[misc]


async def wake_order(count: int) -> list[int]:
    """Tasks woken in the order 0, 1, 2, ...: the order in which they run."""
    events = [trio.Event() for _ in range(count)]
    ran: list[int] = []

    async def waiter(index: int) -> None:
        await events[index].wait()
        ran.append(index)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(waiter, index)
        await trio.testing.wait_all_tasks_blocked()
        for event in events:
            event.set()
    return ran


def test_ready_tasks_run_in_the_order_they_became_ready(restore_trio: None) -> None:
    assert serve_in_arrival_order()  # this trio still has the hook
    for _ in range(20):
        assert trio.run(wake_order, 50) == list(range(50))


def test_without_it_trio_picks_either_order(restore_trio: None) -> None:
    orders = {tuple(trio.run(wake_order, 50)) for _ in range(40)}
    assert orders == {tuple(range(50)), tuple(reversed(range(50)))}

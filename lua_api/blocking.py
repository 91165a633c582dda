"""Wait for an extension's coroutine where Lua cannot yield (blocking scripts, tools).

One home for the three cases http, dns and dict share: a trio worker thread, the loop's own thread, no loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import trio

P = TypeVar("P")
T = TypeVar("T")


def wait_for(in_loop: Callable[[P], Awaitable[T]], alone: Callable[[P], Awaitable[T]], payload: P) -> T:
    """`in_loop(payload)` in the daemon's loop from a trio worker thread; `alone(payload)` elsewhere.

    On the loop's own thread (blocking = no) the loop has to stand still, as Dovecot's auth
    process does, so a private loop on a helper thread runs `alone`; without any trio loop
    (tools, tests) a private loop runs it right here.
    """
    if trio.lowlevel.in_trio_run():
        with ThreadPoolExecutor(max_workers=1) as helper:
            return helper.submit(trio.run, alone, payload).result()
    started = False

    async def in_daemon_loop() -> T:
        nonlocal started
        started = True
        return await in_loop(payload)

    try:
        return trio.from_thread.run(in_daemon_loop)
    except RuntimeError:
        if started:
            raise
    return trio.run(alone, payload)

"""Dovecot's failure delay: FAIL replies wait, then go out in shuffled batches.

Failures are queued and a 500 ms timer releases every entry that is at least
`failure_delay` old, in random order, so parallel guesses learn nothing from
reply order or timing (auth_request_handler_flush_failures).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

CHECK_INTERVAL = 0.5

Send = Callable[[], Awaitable[None]]


@dataclass
class _Pending:
    queued: float
    send: Send


class FailureDelay:
    """A queue of delayed replies; run `serve()` in the daemon's nursery."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._queue: deque[_Pending] = deque()
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, send: Send) -> None:
        self._queue.append(_Pending(trio.current_time(), send))
        self._wakeup.set()

    async def serve(self) -> None:
        while True:
            if not self._queue:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            await trio.sleep(CHECK_INTERVAL)
            await self.flush()

    async def flush(self, *, everything: bool = False) -> None:
        now = trio.current_time()
        due = []
        while self._queue and (everything or now - self._queue[0].queued >= self.delay):
            due.append(self._queue.popleft())
        random.shuffle(due)
        for pending in due:
            await pending.send()

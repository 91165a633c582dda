"""A warning that may happen often, logged at most once per interval with how often it happened since.

Used for refusals at [limits] and for Redis fallbacks, so a flood costs a log line per interval, not per event.
"""

from __future__ import annotations

import time
from typing import Any


class ThrottledWarning:
    """`hit()` counts; a line goes to `logger` on the first hit and then once per `interval` seconds."""

    def __init__(self, logger: Any, event: str, interval: float, count_field: str) -> None:
        self.logger = logger
        self.event = event
        self.interval = interval
        self.count_field = count_field
        self._unlogged = 0
        self._next_log: float | None = None

    def hit(self, **fields: Any) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if self._next_log is None or now >= self._next_log:
            self.logger.warning(self.event, **{self.count_field: self._unlogged}, **fields)
            self._unlogged = 0
            self._next_log = now + self.interval

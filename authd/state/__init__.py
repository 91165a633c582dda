"""Where authd's shared state lives: this process (memory) or a Redis/Valkey server (redis).

The backend answers penalty lookups, takes penalty updates and spreads cache flushes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry

from config.schema import StateSettings

#: Told of a flush another instance published: the users (none: everything).
FlushHandler = Callable[[tuple[bytes, ...]], None]


class StateBackend(Protocol):
    """Shared counters and flushes; every call is bounded by the backend's time budget."""

    #: False for memory: the penalty tracker's own table is the whole truth.
    shared: bool

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection and the flush subscription up until cancelled."""

    async def penalty_lookup(self, ident: str) -> int | None:
        """The address's decayed penalty, or None when local state must answer."""

    def penalty_update(self, ident: str, value: int, checksum: int) -> None:
        """Record an update (queued, never waits)."""

    async def publish_flush(self, users: tuple[bytes, ...]) -> bool:
        """Tell the other instances to flush these users (none: all); False if it could not."""


def open_backend(
    settings: StateSettings, on_flush: FlushHandler, origin: str, registry: CollectorRegistry | None = None
) -> StateBackend:
    """The backend [state] asks for; `origin` names this instance (its own flushes are ignored),
    `registry` gets its metrics."""
    if settings.backend == "redis":
        from authd.state.redis import RedisState

        return RedisState(settings, on_flush, origin, registry)
    from authd.state.memory import MemoryState

    return MemoryState()

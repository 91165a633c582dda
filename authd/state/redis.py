"""The Redis/Valkey state backend (coredis on trio through anyio): one server, Sentinel or Cluster.

A penalty decision is one server-side script, a flush one pub/sub message; past the budget local state answers.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import anyio
import coredis
import structlog
import trio
from coredis.retry import NoRetryPolicy
from prometheus_client import CollectorRegistry, Counter

from authd.log_throttle import ThrottledWarning
from authd.penalty import CHECKSUMS, EXPIRE_SECS, INIT_SECS, MAX_PENALTY, MAX_SECS
from authd.state import FlushHandler
from config.schema import StateSettings

log = structlog.get_logger("authd.state")

#: Seconds authd leaves a server that refused or dropped a connection before trying again.
RETRY_INTERVAL = 0.5
#: Seconds a new connection may take (beyond a decision's budget it is no longer waited for).
CONNECT_TIMEOUT = 1.0
#: Penalty updates waiting to be written; beyond it they are dropped (local state keeps them).
MAX_QUEUED = 10_000
#: What coredis raises besides trio.Cancelled while it is cancelled (its cleanup under trio).
SHUTDOWN_NOISE = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.WouldBlock)

# Redis runs these with its own clock (TIME), so every instance decays penalties alike.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

#: KEYS[1] the address's record; ARGV init_secs, max_secs, max_penalty. The decayed penalty.
LOOKUP = (
    "local rec = redis.call('HMGET', KEYS[1], 'p', 'lp')\n"
    "local p = tonumber(rec[1])\n"
    "if not p then return 0 end\n" + _NOW + "local lp = math.min(tonumber(rec[2]) or 0, now)\n"
    "local init, max, drop = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "while p > 0 and now - lp >= math.min(init * 2 ^ drop, max) do drop = drop - 1 p = p - 1 end\n"
    "return p\n"
)

#: KEYS[1]; ARGV value, checksum (0: none), expire_secs, checksums kept, max_penalty.
UPDATE = (
    _NOW + "local value = math.min(tonumber(ARGV[1]), tonumber(ARGV[5]))\n"
    "local checksum = ARGV[2]\n"
    "if checksum == '0' then\n"
    "  redis.call('HSET', KEYS[1], 'p', value, 'lp', tostring(now))\n"
    "else\n"
    "  local sums, found = {}, nil\n"
    "  local kept = redis.call('HGET', KEYS[1], 'c')\n"
    "  if kept then for s in string.gmatch(kept, '[^,]+') do table.insert(sums, s) end end\n"
    "  for i, s in ipairs(sums) do if s == checksum then found = i end end\n"
    "  if found then\n"
    "    table.remove(sums, found) table.insert(sums, 1, checksum)\n"
    "    redis.call('HSET', KEYS[1], 'p', value - 1, 'c', table.concat(sums, ','))\n"
    "  else\n"
    "    table.insert(sums, 1, checksum)\n"
    "    while #sums > tonumber(ARGV[4]) do table.remove(sums) end\n"
    "    redis.call('HSET', KEYS[1], 'p', value, 'lp', tostring(now), 'c', table.concat(sums, ','))\n"
    "  end\n"
    "end\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[3])\n"
    "return 1\n"
)


def _location(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host.strip("[]"), int(port)


def connect(settings: StateSettings) -> Any:
    """A coredis client for [state] (not yet entered): url or Cluster, or a Sentinel (whose
    primary_for() gives the client once the Sentinel is entered)."""
    kwargs: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "retry_policy": NoRetryPolicy(),
        "decode_responses": False,
    }
    if settings.username:
        kwargs["username"] = settings.username
    if settings.password:
        kwargs["password"] = settings.password
    if settings.tls or settings.url.startswith("rediss://"):
        context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
        kwargs["ssl_context"] = context
        if not settings.url:
            kwargs["ssl"] = True
    if settings.url:
        return coredis.Redis.from_url(settings.url, **kwargs)
    if settings.cluster:
        nodes = [coredis.connection.TCPLocation(*_location(node)) for node in settings.cluster]
        return coredis.RedisCluster(startup_nodes=nodes, **kwargs)
    return coredis.Sentinel([_location(node) for node in settings.sentinels], **kwargs)


class _Fallbacks:
    """Counts every time local state answered instead of Redis; logs at most once per interval."""

    def __init__(self, interval: float, counter: Counter) -> None:
        self.counter = counter
        self._warning = ThrottledWarning(log, "state.fallback", interval, "fallbacks")

    def note(self, op: str, reason: str) -> None:
        self.counter.labels(op).inc()
        self._warning.hit(op=op, reason=reason, message="Redis unavailable: local state answers")


class RedisState:
    shared = True

    def __init__(
        self, settings: StateSettings, on_flush: FlushHandler, origin: str, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.budget = settings.timeout
        self._on_flush = on_flush
        self._origin = origin
        self._penalty_prefix = f"{settings.key_prefix}penalty:"
        self._channel = f"{settings.key_prefix}flush"
        self._client: Any = None
        self._lookup: Any = None
        self._update: Any = None
        #: Until when (monotonic) the server counts as away after an error.
        self._away_until = 0.0
        self._away = False
        self._updates, self._queued = trio.open_memory_channel[tuple[str, int, int]](MAX_QUEUED)
        counter = Counter(
            "authd_state_fallbacks",
            "Decisions local state answered because Redis was unavailable or slow",
            ["op"],
            registry=registry,
        )
        self.fallbacks = _Fallbacks(settings.log_interval, counter)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve at once (local state answers until Redis does); a client that fails as a
        whole is set up again, and the shutdown never fails on the client's cleanup."""
        task_status.started()
        while True:
            try:
                await self._connect_and_serve()
            except Exception as exc:
                log.error("state.client_failed", message=f"{type(exc).__name__}: {exc}: starting it again")
            except BaseException as exc:
                if _only_cancellation(exc):  # coredis 6.9's pub/sub cleanup adds anyio errors to it
                    return
                raise
            finally:
                self._client = None
            await trio.sleep(RETRY_INTERVAL)

    async def _connect_and_serve(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            client = connect(self.settings)
            if isinstance(client, coredis.Sentinel):
                await stack.enter_async_context(client)
                client = client.primary_for(self.settings.master_name)
            await stack.enter_async_context(client)
            self._lookup = client.register_script(LOOKUP)
            self._update = client.register_script(UPDATE)
            self._client = client
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_updates)
                nursery.start_soon(self._subscribe)

    async def _call(self, op: str, command: Any) -> Any:
        """Run one command within the budget; None (fallback counted) if it did not answer."""
        if self._client is None or time.monotonic() < self._away_until:
            self.fallbacks.note(op, "unavailable")
            return None
        reason = "timeout"
        try:
            with trio.move_on_after(self.budget):
                result = await command()
                if self._away:
                    self._away = False
                    log.info("state.reconnected", message="Redis answers again")
                return result
        except Exception as exc:  # unavailable (or a client error): local state answers
            reason = f"{type(exc).__name__}: {exc}"
            self._away, self._away_until = True, time.monotonic() + RETRY_INTERVAL
        self.fallbacks.note(op, reason)
        return None

    async def penalty_lookup(self, ident: str) -> int | None:
        args = (INIT_SECS, MAX_SECS, MAX_PENALTY)
        result = await self._call(
            "penalty_lookup", lambda: self._lookup(keys=[self._penalty_prefix + ident], args=args)
        )
        return None if result is None else int(result)

    def penalty_update(self, ident: str, value: int, checksum: int) -> None:
        try:
            self._updates.send_nowait((ident, value, checksum))
        except trio.WouldBlock:
            self.fallbacks.note("penalty_update", "queue full")

    async def _write_updates(self) -> None:
        async for ident, value, checksum in self._queued:
            args = (value, checksum, EXPIRE_SECS, CHECKSUMS, MAX_PENALTY)
            command = partial(self._update, keys=[self._penalty_prefix + ident], args=args)
            await self._call("penalty_update", command)

    async def publish_flush(self, users: tuple[bytes, ...]) -> bool:
        message = json.dumps({"origin": self._origin, "users": [user.decode("latin-1") for user in users]})
        result = await self._call("cache_flush", lambda: self._client.publish(self._channel, message))
        return result is not None

    async def _subscribe(self) -> None:
        """Apply the other instances' flushes; after every (re)subscription flush everything,
        since flushes published while this instance was not listening are lost."""
        while True:
            try:
                async with self._client.pubsub(channels=[self._channel]) as pubsub:
                    async for message in pubsub:
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            log.info("state.subscribed", channel=self._channel)
                            self._on_flush(())
                        elif message["type"] == "message":
                            self._received(message["data"])
            except Exception as exc:
                log.warning("state.subscription_lost", message=f"{type(exc).__name__}: {exc}")
            await trio.sleep(RETRY_INTERVAL)

    def _received(self, data: bytes) -> None:
        try:
            message = json.loads(data)
            origin, users = message["origin"], tuple(user.encode("latin-1") for user in message["users"])
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("state.bad_flush", message="a flush message that is not authd's was ignored")
            return
        if origin != self._origin:
            self._on_flush(users)


def _only_cancellation(exc: BaseException) -> bool:
    """Is `exc` trio.Cancelled, possibly grouped with coredis's cleanup noise?"""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        return any(isinstance(e, trio.Cancelled) for e in leaves) and all(
            isinstance(e, (trio.Cancelled, *SHUTDOWN_NOISE)) for e in leaves
        )
    return isinstance(exc, trio.Cancelled)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc

"""Prometheus metrics and a small HTTP endpoint for them (/metrics, /healthz).

Each Server has its own registry, so several instances (tests) never share
counters. The endpoint is a few lines of trio: a scrape is one GET.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from authd.listeners import backlog
from protocol.mechanisms import MECHANISMS

log = structlog.get_logger("authd.metrics")

T = TypeVar("T", Counter, Gauge, Histogram)


class Children(Generic[T]):
    """A labelled metric's children, looked up by label values once each.

    prometheus_client's labels() validates the values and takes a lock on every
    call; the per-request counters ask for the same few children all the time.
    """

    def __init__(self, metric: T) -> None:
        self._metric: T = metric
        self._children: dict[tuple[str, ...], T] = {}

    def __call__(self, *values: str) -> T:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: What a label value outside its known ones is counted as: clients choose services and
#: mechanism names, and every distinct value would be one more time series kept forever.
OTHER = "other"
#: The services Dovecot's processes and its usual clients (Postfix, Exim, doveadm) send.
DOVECOT_SERVICES = frozenset(
    {"", "imap", "pop3", "smtp", "submission", "lmtp", "lda", "sieve", "managesieve", "doveadm", "imap-urlauth"}
)
#: Every result log_result counts: AUTH's (ok, refused, FAIL's code or failed) and USER's.
RESULTS = frozenset({"ok", "failed", "refused", "temp_fail", "authz_fail", "user_disabled", "pass_expired", "notfound"})
#: The auth-master commands that are counted.
COMMANDS = frozenset({"USER", "PASS", "LIST"})
#: How a Lua call fails (lua_api.runtime CallOutcome.failure_kind).
LUA_FAILURES = frozenset({"timeout", "memory", "broken", "error"})


def _known(value: str, known: frozenset[str]) -> str:
    return value if value in known else OTHER


class Metrics:
    """One server's metrics. Every label takes known values only (`services` adds to
    Dovecot's services), anything else counts as `other`."""

    def __init__(self, services: Iterable[str] = ()) -> None:
        self.services = DOVECOT_SERVICES | frozenset(services)
        self.mechanisms = frozenset(MECHANISMS)
        self.registry = CollectorRegistry()
        r = self.registry
        self.auth_requests = Counter(
            "authd_auth_requests", "Finished auth-client requests", ["mechanism", "service", "result"], registry=r
        )
        self.auth_duration = Histogram(
            "authd_auth_duration_seconds",
            "Time from AUTH to the reply (before the failure delay)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lookups = Counter("authd_userdb_requests", "auth-master requests", ["command", "result"], registry=r)
        self.db_duration = Histogram(
            "authd_db_duration_seconds",
            "Time one passdb/userdb took",
            ["db", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lua_errors = Counter("authd_lua_errors", "Script failures", ["script", "kind"], registry=r)
        self.http_requests = Counter(
            "authd_http_requests", "HTTP requests made by scripts", ["status_class"], registry=r
        )
        self.http_duration = Histogram(
            "authd_http_duration_seconds",
            "Duration of HTTP requests made by scripts",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.penalties = Counter("authd_penalties", "Failures that raised an address's penalty", registry=r)
        self.penalty_waits = Counter("authd_penalty_waits", "Requests that waited out a penalty", registry=r)
        self.requests_in_flight = Gauge(
            "authd_requests_in_flight", "Auth requests waiting for a passdb call, penalty or delay", registry=r
        )
        self.requests_refused = Counter(
            "authd_requests_refused", "Auth requests answered temp_fail at once: [limits] requests_total", registry=r
        )
        self.connections = Gauge("authd_connections", "Open connections", ["listener"], registry=r)
        self.reloads = Counter("authd_reloads", "Script and config reloads", ["result"], registry=r)
        self.pool_wait = Histogram(
            "authd_lua_state_wait_seconds",
            "Time a call waited for a free Lua state",
            ["script"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        #: Children of the metrics every request updates.
        self.auth_requests_for = Children(self.auth_requests)
        self.lookups_for = Children(self.lookups)
        self.db_duration_for = Children(self.db_duration)

    def count_auth(self, mechanism: str, service: str, result: str, duration: float) -> None:
        """One finished auth-client request."""
        self.auth_requests_for(
            _known(mechanism, self.mechanisms), _known(service, self.services), _known(result, RESULTS)
        ).inc()
        self.auth_duration.observe(duration)

    def count_lookup(self, command: str, result: str) -> None:
        """One finished auth-master request."""
        self.lookups_for(_known(command, COMMANDS), _known(result, RESULTS)).inc()

    def count_lua_failure(self, script: str, kind: str) -> None:
        """A failed Lua call of `script` (a configured path)."""
        self.lua_errors.labels(script, _known(kind, LUA_FAILURES)).inc()

    def watch_cache(self, stats: Callable[[], tuple[int, int, int, int]]) -> None:
        """Export the auth cache's (hits, misses, entries, bytes) when scraped."""
        self.registry.register(_CacheCollector(stats))

    def watch_pools(self, stats: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Export the Lua state pools' (script, states, busy states) when scraped."""
        self.registry.register(_PoolCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PoolCollector(Collector):
    def __init__(self, stats: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = GaugeMetricFamily("authd_lua_states", "Lua states loaded", labels=["script"])
        busy = GaugeMetricFamily("authd_lua_states_busy", "Lua states running a call", labels=["script"])
        totals: dict[str, list[int]] = {}
        for script, count, running in self.stats():
            total = totals.setdefault(script, [0, 0])
            total[0] += count
            total[1] += running
        for script, (count, running) in sorted(totals.items()):
            states.add_metric([script], count)
            busy.add_metric([script], running)
        yield states
        yield busy


class _CacheCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, int, int, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hits, misses, entries, size = self.stats()
        yield GaugeMetricFamily("authd_cache_hits", "Auth cache hits", value=hits)
        yield GaugeMetricFamily("authd_cache_misses", "Auth cache misses", value=misses)
        yield GaugeMetricFamily("authd_cache_entries", "Auth cache entries", value=entries)
        yield GaugeMetricFamily("authd_cache_bytes", "Auth cache size in bytes", value=size)


def merge_pages(pages: Iterable[bytes]) -> bytes:
    """One metrics page from several processes' pages: equal samples (name and labels) summed.

    Every metric authd exports is a count or a level that adds up over processes
    (requests, connections, states, cache entries, histogram buckets); `_created`
    timestamps do not, and are left out.
    """
    families: dict[str, Metric] = {}
    totals: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for page in pages:
        for family in text_string_to_metric_families(page.decode()):
            if family.name.endswith("_created"):
                continue  # the parser's own family for a counter's or histogram's timestamps
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                totals[family.name] = {}
            samples = totals[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in totals[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return generate_latest(_Families(list(families.values())))  # type: ignore[arg-type]


class _Families:
    """What generate_latest() needs of a registry: the metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def serve_metrics(
    render: Callable[[], Awaitable[bytes]],
    address: str,
    port: int,
    healthy: Callable[[], bool],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics and GET /healthz; anything else is a 404."""
    listeners = await trio.open_tcp_listeners(port, host=address, backlog=backlog())
    task_status.started(listeners[0].socket.getsockname()[1])
    log.info("metrics.ready", address=address, port=listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(functools.partial(_handle, render=render, healthy=healthy), listeners)


#: Seconds a scraper gets to send its request, and to take the answer.
REQUEST_TIMEOUT = 5.0
ANSWER_TIMEOUT = 10.0
#: The most of a request read; the rest of a longer one is ignored.
MAX_REQUEST = 8192


async def _handle(
    stream: trio.SocketStream, render: Callable[[], Awaitable[bytes]], healthy: Callable[[], bool]
) -> None:
    """One scrape; whatever its peer does (reset, garbage, never reading) ends this connection only."""
    try:
        async with stream:
            await _answer(stream, render, healthy)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the scraper went away (a reset, or it closed before reading the answer)
    except Exception:
        log.exception("metrics.internal_error")


async def _answer(
    stream: trio.SocketStream, render: Callable[[], Awaitable[bytes]], healthy: Callable[[], bool]
) -> None:
    request = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
            data = await stream.receive_some(4096)
            if not data:
                break
            request += data
    parts = request.split(b" ", 2)
    method, path = (parts[0], parts[1]) if len(parts) > 1 else (b"", b"")
    if method != b"GET":
        status, body, kind = b"405 Method Not Allowed", b"only GET\n", b"text/plain"
    elif path == b"/metrics":
        status, body, kind = b"200 OK", await render(), b"text/plain; version=0.0.4; charset=utf-8"
    elif path == b"/healthz":
        ok = healthy()
        status, body, kind = (
            (b"200 OK", b"ok\n", b"text/plain") if ok else (b"503 Service Unavailable", b"not ready\n", b"text/plain")
        )
    else:
        status, body, kind = b"404 Not Found", b"not found\n", b"text/plain"
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status,
        kind,
        len(body),
    )
    with trio.move_on_after(ANSWER_TIMEOUT):  # a scraper that never reads is dropped
        await stream.send_all(head + body)

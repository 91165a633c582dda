"""The load generator: several OS processes, each one selector loop over raw non-blocking sockets.

A Python event-loop framework would cost more CPU per request than the servers under test on a
2-core machine, so each worker process drives its share of the connections with `selectors`,
keeps `depth` requests in flight per connection (pipelined by request id), checks every reply,
and records latencies. The parent starts the workers, lets them connect and handshake, then
drives them through one run on the shared monotonic clock (LoadGenerator.begin):

    Start.at     first requests go out
    "warm"       each worker, once Start.warmup has passed and every connection had `depth` replies
    Window.t0    all warm: completions, latencies and the workers' own CPU count from here
    Window.t1    no new requests; what is in flight is drained (until Window.drain), not counted

Workloads: auth-client PLAIN (initial response) and LOGIN (username as initial response, then
the password as CONT), auth-master USER, and HTTP PROPFIND (one request per keep-alive
connection at a time) for measuring the benchmark's own HTTP backend.
"""

from __future__ import annotations

import base64
import contextlib
import multiprocessing
import os
import selectors
import socket
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

from bench.procs import as_child

Kind = Literal["plain", "login", "user", "http"]

USER = "bench"
PASSWORD = "benchpass"
_CTX = multiprocessing.get_context("fork")


@dataclass(frozen=True)
class Workload:
    kind: Kind
    #: A unix socket path, or "host:port" for http.
    target: str
    connections: int
    depth: int
    user: str = USER
    password: str = PASSWORD


@dataclass
class LoadResult:
    """What the workers saw in the measurement window (errors: the whole run)."""

    completed: int = 0
    window: float = 0.0
    latencies_us: array[int] = field(default_factory=lambda: array("q"))
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.completed += other.completed
        self.window = max(self.window, other.window)
        self.latencies_us.extend(other.latencies_us)
        self.errors += other.errors
        self.error_samples.extend(other.error_samples[: 5 - len(self.error_samples)])
        self.cpu_seconds += other.cpu_seconds

    @property
    def rate(self) -> float:
        return self.completed / self.window if self.window else 0.0

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


class _Protocol:
    """Request bytes and reply parsing for one workload; one instance per worker process."""

    def __init__(self, workload: Workload) -> None:
        self.kind = workload.kind
        user, password = workload.user.encode(), workload.password.encode()
        plain = base64.b64encode(b"\0" + user + b"\0" + password)
        if self.kind == "plain":
            self.template = b"AUTH\t%d\tPLAIN\tservice=smtp\tno-penalty\tresp=" + plain + b"\n"
        elif self.kind == "login":
            self.template = b"AUTH\t%d\tLOGIN\tservice=smtp\tno-penalty\tresp=" + base64.b64encode(user) + b"\n"
            self.cont = b"CONT\t%d\t" + base64.b64encode(password) + b"\n"
        elif self.kind == "user":
            self.template = b"USER\t%d\t" + user + b"\tservice=lmtp\n"
        else:
            host = workload.target.encode()
            self.http_request = (
                b"PROPFIND /remote.php/dav/files/" + user + b"/ HTTP/1.1\r\nHost: " + host + b"\r\n"
                b"Authorization: Basic " + base64.b64encode(user + b":" + password) + b"\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
        self.ok = b"USER\t" if self.kind == "user" else b"OK\t"

    def request(self, rid: int) -> bytes:
        return self.http_request if self.kind == "http" else self.template % rid

    def handshake(self, sock: socket.socket) -> None:
        """Send the client greeting and read the server's up to its last line."""
        if self.kind == "http":
            return
        if self.kind == "user":
            sock.sendall(b"VERSION\t1\t1\n")
            end = b"SPID\t"
        else:
            sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
            end = b"DONE\n"
        data = b""
        while end not in data or not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"server closed during the handshake: {data!r}")
            data += chunk

    def parse(self, conn: _Conn) -> tuple[list[int], list[bytes], bytes]:
        """Consume complete replies in conn.buffer: (finished ids, error lines, bytes to send)."""
        if self.kind == "http":
            return self._parse_http(conn)
        lines = conn.buffer.split(b"\n")
        conn.buffer = lines.pop()
        done: list[int] = []
        errors: list[bytes] = []
        out = b""
        ok = self.ok
        for line in lines:
            if line.startswith(ok):
                done.append(int(line.split(b"\t", 2)[1]))
            elif self.kind == "login" and line.startswith(b"CONT\t"):
                out += self.cont % int(line.split(b"\t", 2)[1])
            else:
                errors.append(line)
                with contextlib.suppress(IndexError, ValueError):
                    done.append(-int(line.split(b"\t", 2)[1]))
        return done, errors, out

    def _parse_http(self, conn: _Conn) -> tuple[list[int], list[bytes], bytes]:
        done: list[int] = []
        errors: list[bytes] = []
        waiting = iter(conn.pending)
        while True:
            end = conn.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = conn.buffer[:end]
            length = 0
            for header in head.split(b"\r\n")[1:]:
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(conn.buffer) < end + 4 + length:
                break
            conn.buffer = conn.buffer[end + 4 + length :]
            rid = next(waiting, 0)
            if head.startswith(b"HTTP/1.1 207 "):
                done.append(rid)
            else:
                errors.append(head.split(b"\r\n", 1)[0])
                done.append(-rid)
        return done, errors, b""


class _Conn:
    __slots__ = ("answered", "buffer", "closed", "next_id", "out", "pending", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        #: Replies so far, errors included (the warm-up waits for DEPTH of them).
        self.answered = 0
        self.pending: dict[int, int] = {}
        self.next_id = 1
        self.buffer = b""
        self.out = bytearray()
        self.writing = False


def _connect(workload: Workload, proto: _Protocol) -> socket.socket:
    if workload.kind == "http":
        host, _, port = workload.target.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(workload.target)
    proto.handshake(sock)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class Start:
    """Sent to every worker: when the first requests go out, and the shortest warm-up."""

    at: float
    warmup: float


@dataclass(frozen=True)
class Window:
    """Sent to every worker once all are warm: the measured window and the drain deadline."""

    t0: float
    t1: float
    drain: float
    #: Seconds from the first requests to t0.
    warmup: float


def _worker(workload: Workload, connections: int, channel: Connection) -> None:
    """One worker process: connect, report ready, run the load it is told, report results."""
    as_child()
    proto = _Protocol(workload)
    try:
        conns = [_Conn(_connect(workload, proto)) for _ in range(connections)]
    except OSError as exc:
        channel.send(("error", f"connect to {workload.target}: {exc}"))
        return
    channel.send(("ready", None))
    start: Start = channel.recv()
    channel.send(("done", _drive(proto, conns, workload.depth, start, channel)))


_NEVER = 1 << 62


def _drive(proto: _Protocol, conns: list[_Conn], depth: int, start: Start, channel: Connection) -> LoadResult:
    """The selector loop: keep DEPTH requests in flight on every connection until t1, then drain.

    The worker is warm once the warm-up time has passed and every connection had DEPTH replies
    (each request slot went round once, so queues inside the server reached their steady
    length); it says so and goes on until the parent sends the Window.
    """
    warm_ns = int((start.at + start.warmup) * 1e9)
    t0_ns = t1_ns = drain_ns = _NEVER
    warm = False
    result = LoadResult()
    latencies = result.latencies_us
    selector = selectors.DefaultSelector()
    monotonic_ns = time.monotonic_ns
    cpu_t0: float | None = None
    cpu_t1: float | None = None

    def error(conn: _Conn, what: bytes) -> None:
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(what.decode("latin-1")[:200])

    def send(conn: _Conn, count: int) -> None:
        now = monotonic_ns()
        for _ in range(count):
            rid = conn.next_id
            conn.next_id = rid + 1 if rid < 0x7FFFFFFF else 1
            conn.pending[rid] = now
            conn.out += proto.request(rid)
        flush(conn)

    def flush(conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            close(conn, str(exc).encode())
            return
        del conn.out[:sent]
        if bool(conn.out) != conn.writing:
            conn.writing = not conn.writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.writing else 0)
            selector.modify(conn.sock, events, conn)

    def close(conn: _Conn, why: bytes) -> None:
        for _ in conn.pending:
            error(conn, b"connection lost: " + why)
        conn.pending.clear()
        conn.closed = True
        selector.unregister(conn.sock)
        conn.sock.close()
        conns.remove(conn)

    selector.register(channel, selectors.EVENT_READ, None)
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    time.sleep(max(0.0, start.at - time.monotonic()))
    for conn in list(conns):
        send(conn, depth)

    sending = True
    while True:
        now = monotonic_ns()
        if not warm and now >= warm_ns and all(conn.answered >= depth for conn in conns):
            channel.send(("warm", None))
            warm = True
        if cpu_t0 is None and now >= t0_ns:
            cpu_t0 = time.process_time()
        if sending and now >= t1_ns:
            cpu_t1 = time.process_time()
            sending = False
        if t1_ns != _NEVER and (not conns or (not sending and (now >= drain_ns or not _pending(conns)))):
            break
        # until the window arrives, wake every 50 ms to check the warm-up condition
        next_event = t0_ns if cpu_t0 is None else t1_ns if sending else drain_ns
        boundary = now + 50_000_000 if t0_ns == _NEVER else next_event
        for key, events in selector.select(max(0.0, (min(boundary, drain_ns) - now) / 1e9)):
            if key.data is None:
                window: Window = channel.recv()
                t0_ns, t1_ns, drain_ns = int(window.t0 * 1e9), int(window.t1 * 1e9), int(window.drain * 1e9)
                result.window = window.t1 - window.t0
                selector.unregister(channel)
                continue
            conn = key.data
            if events & selectors.EVENT_WRITE:
                flush(conn)
            if conn.closed or not events & selectors.EVENT_READ:
                continue
            try:
                data = conn.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError as exc:
                close(conn, str(exc).encode())
                continue
            if not data:
                close(conn, b"EOF from server")
                continue
            now = monotonic_ns()
            conn.buffer += data
            done, errors, extra = proto.parse(conn)
            for line in errors:
                error(conn, line)
            counted = t0_ns <= now < t1_ns
            finished = 0
            for rid in done:
                sent_at = conn.pending.pop(abs(rid), None)
                if sent_at is None:
                    error(conn, b"reply for an unknown id %d" % abs(rid))
                    continue
                finished += 1
                if counted and rid > 0:
                    latencies.append((now - sent_at) // 1000)
                    result.completed += 1
            conn.answered += finished
            if extra:
                conn.out += extra
            if sending and finished:
                send(conn, finished)
            elif extra:
                flush(conn)
    for conn in conns:
        for _ in conn.pending:
            error(conn, b"no reply before the drain deadline")
        conn.sock.close()
    end = time.process_time()
    result.cpu_seconds = (cpu_t1 or end) - (cpu_t0 or end)
    return result


def _pending(conns: list[_Conn]) -> bool:
    return any(conn.pending for conn in conns)


class LoadGenerator:
    """PROCS worker processes sharing WORKLOAD's connections; connected on enter, stopped on exit."""

    def __init__(self, workload: Workload, procs: int) -> None:
        self.workload = workload
        procs = max(1, min(procs, workload.connections))
        shares = [workload.connections // procs + (i < workload.connections % procs) for i in range(procs)]
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        for share in shares:
            parent, child = _CTX.Pipe()
            process = _CTX.Process(target=_worker, args=(workload, share, child), daemon=True)
            self._workers.append((process, parent))

    def __enter__(self) -> LoadGenerator:
        try:
            for process, _ in self._workers:
                process.start()
            for _, channel in self._workers:
                status, detail = self._receive(channel, 30.0)
                if status != "ready":
                    raise RuntimeError(f"load generator: {detail}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _receive(channel: Connection, timeout: float) -> tuple[str, object]:
        if not channel.poll(timeout):
            raise RuntimeError(f"load generator worker silent for {timeout} s")
        message: tuple[str, object] = channel.recv()
        return message

    def begin(self, warmup: float, duration: float, drain: float, max_warmup: float) -> Window:
        """Start the load; return at t0, once every worker is warm (or after MAX_WARMUP seconds).

        DRAIN is how long after t1 in-flight requests may still be answered.
        """
        started = time.monotonic() + 0.05
        for _, channel in self._workers:
            channel.send(Start(started, warmup))
        deadline = started + max_warmup
        for _, channel in self._workers:
            if channel.poll(max(0.0, deadline - time.monotonic())):
                status, detail = channel.recv()
                assert status == "warm", detail
        t0 = time.monotonic() + 0.002
        window = Window(t0, t0 + duration, t0 + duration + drain, t0 - started)
        for _, channel in self._workers:
            channel.send(window)
        time.sleep(max(0.0, t0 - time.monotonic()))
        return window

    def collect(self, timeout: float) -> LoadResult:
        """Wait for every worker's result (a late "warm" is skipped) and merge them."""
        total = LoadResult()
        for _, channel in self._workers:
            status, detail = self._receive(channel, timeout)
            if status == "warm":
                status, detail = self._receive(channel, timeout)
            assert status == "done" and isinstance(detail, LoadResult), detail
            total.merge(detail)
        return total

    def stop(self) -> None:
        """End every worker by PID (SIGTERM, then SIGKILL) and reap it."""
        for process, channel in self._workers:
            if process.pid is not None and process.is_alive():
                process.terminate()
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)
            channel.close()


def idle_connections(path: str, count: int) -> list[socket.socket]:
    """COUNT auth-client connections to PATH that finished the handshake and then stay silent."""
    workload = Workload("plain", path, count, 0)
    proto = _Protocol(workload)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(_connect(workload, proto))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def run_load(workload: Workload, procs: int, warmup: float, duration: float, drain: float = 10.0) -> LoadResult:
    """Connect, warm up (at least WARMUP seconds), measure DURATION seconds, return the merged result."""
    with LoadGenerator(workload, procs) as generator:
        generator.begin(warmup, duration, drain, max_warmup=warmup + 60)
        return generator.collect(duration + drain + 30)

"""The local HTTP backend of the HTTP passdb scenarios: Nextcloud's WebDAV Basic-auth check.

`PROPFIND /remote.php/dav/files/<user>/` answers 207 when the Basic credentials are the
benchmark user's and 401 otherwise, after a fixed delay (the backend's own work, 20 ms by
default). Several processes, each an asyncio loop (uvloop's when installed: the backend shares
the machine with the servers, so its CPU is theirs to lose), share one listening socket, and a delayed
reply is a timer rather than a sleeping thread, so the backend sustains thousands of requests in
flight; the `backend-capacity` scenario measures how many it serves, to show it is not the limit.

With `split`, each response goes out as Python's http.server sends it: the head, then the
body, in two writes, and without TCP_NODELAY, so Nagle holds the body until the client ACKs
the head (the `http-split` scenario: a client that delays its ACKs pays ~40 ms a request).
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import socket

try:
    import uvloop  # the bench extra: about half the backend's CPU per request
except ImportError:
    uvloop = None

from bench.loadgen import PASSWORD, USER
from bench.procs import as_child

_CTX = multiprocessing.get_context("fork")
_CREDENTIALS = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
_MULTISTATUS = b"<?xml version='1.0'?><d:multistatus xmlns:d='DAV:'/>"


def _response(status: bytes, body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


_OK = _response(b"207 Multi-Status", _MULTISTATUS, b"application/xml; charset=utf-8")
_UNAUTHORIZED = _response(b"401 Unauthorized", b"unauthorized", b"text/plain")
_NOT_FOUND = _response(b"404 Not Found", b"not found", b"text/plain")


def _header(raw: bytes, lowered: bytes, name: bytes) -> bytes | None:
    """The value of header NAME (lower case) in a request head, or None."""
    at = lowered.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    return raw[at + len(name) + 3 :].split(b"\r\n", 1)[0].strip()


class _Handler(asyncio.Protocol):
    """HTTP/1.1 keep-alive, requests answered in order, each after DELAY seconds."""

    def __init__(self, delay: float, split: bool) -> None:
        self.delay = delay
        self.split = split
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.split:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        loop = asyncio.get_running_loop()
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            raw = self.buffer[:end]
            head = raw.lower()
            length = int(_header(raw, head, b"content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            if not raw.startswith(b"PROPFIND /remote.php/dav/files/"):
                reply = _NOT_FOUND
            elif _header(raw, head, b"authorization") == _CREDENTIALS:
                reply = _OK
            else:
                reply = _UNAUTHORIZED
            loop.call_later(self.delay, self._reply, reply)

    def _reply(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.split:
                head, _, body = reply.partition(b"\r\n\r\n")
                self.transport.write(head + b"\r\n\r\n")
                self.transport.write(body)
            else:
                self.transport.write(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _serve(sock: socket.socket, delay: float, split: bool) -> None:
    as_child()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Handler(delay, split), sock=sock)
        await server.serve_forever()

    if uvloop is None:
        asyncio.run(main())
    else:
        uvloop.run(main())


#: What the report says the backend ran on.
LOOP = "uvloop" if uvloop is not None else "asyncio"


class Backend:
    """PROCS processes serving 127.0.0.1:port; started on enter, stopped by PID on exit."""

    def __init__(self, delay: float, procs: int, *, split: bool = False) -> None:
        self.delay = delay
        self.split = split
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(4096)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._processes = [
            _CTX.Process(target=_serve, args=(self._sock, delay, split), daemon=True) for _ in range(procs)
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def __enter__(self) -> Backend:
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                process.terminate()
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)
        self._sock.close()

"""dovecot.http's connections: keep-alive reuse, servers that close or break them, TLS, tunnels.

Each test runs real Lua states against a scripted local server (one thread per connection)
and asserts what the server saw on each connection and exactly what the script got back.
"""

from __future__ import annotations

import base64
import contextlib
import re
import select
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from lua_api.http import HttpExtension
from lua_api.runtime import LuaState, StateOptions
from tests.lua_api.test_http import Host, call, result

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- a scripted server ----------------------------------------------------------------------


@dataclass
class Connection:
    """One accepted connection: the request heads it carried, in order."""

    sock: socket.socket
    buffer: bytes = b""
    heads: list[bytes] = field(default_factory=list)
    #: A request arrived while an earlier one on this connection was still unanswered.
    pipelined: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_request(self) -> bytes | None:
        """The next request's head (its body is read and dropped); None at EOF."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        head += b"\r\n"
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        size = int(length[1]) if length else 0
        while len(self.buffer) < size and self._fill():
            pass
        self.buffer = self.buffer[size:]
        self.heads.append(head)
        return head

    def waiting(self, seconds: float) -> bool:
        """Whether more arrives within `seconds` (or is here already)."""
        if self.buffer or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        return bool(select.select([self.sock], [], [], seconds)[0])

    def close(self) -> None:
        self.sock.close()
        self.closed.set()


Serve = Callable[[Connection, "Server"], None]


class Server:
    """127.0.0.1 on an ephemeral port; every accepted connection runs `serve` in a thread."""

    def __init__(self, serve: Serve, tls: ssl.SSLContext | None = None) -> None:
        self.serve = serve
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[Connection] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
        except (OSError, ssl.SSLError):
            sock.close()  # the client refused our certificate
            return
        conn = Connection(sock)
        self.connections.append(conn)
        try:
            self.serve(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(handler: Serve, tls: ssl.SSLContext | None = None) -> Server:
        servers.append(Server(handler, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def keep_alive(conn: Connection, server: Server) -> None:
    """Answer every request with 200 on the same connection."""
    while conn.read_request() is not None:
        conn.sock.sendall(OK)


def close_when_idle(conn: Connection, server: Server) -> None:
    """Answer one request as if keeping the connection, then close it while it is idle."""
    if conn.read_request() is not None:
        conn.sock.sendall(OK)


def connection_close(conn: Connection, server: Server) -> None:
    """Answer with "Connection: close" but leave closing to the client."""
    while conn.read_request() is not None:
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")


def slow(conn: Connection, server: Server) -> None:
    """Answer after 0.2 s, noting any request that arrives before that answer."""
    while conn.read_request() is not None:
        conn.pipelined |= conn.waiting(0.2)
        conn.sock.sendall(OK)


def garbage(conn: Connection, server: Server) -> None:
    if conn.read_request() is not None:
        conn.sock.sendall(b"garbage\r\n\r\n")
        conn.waiting(5)  # until the client gives up the connection


def hang_up(conn: Connection, server: Server) -> None:
    conn.read_request()


def reset(conn: Connection, server: Server) -> None:
    if conn.read_request() is not None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- Lua states -------------------------------------------------------------------------------


# One client per state, made at load time, as scripts do; run() fills `result`.
# HEADERS: {name, value, ...} to add; PAYLOAD: set_payload()'s argument, if any.
SCRIPT = """
local client = dovecot.http.client(CLIENT)
function run()
  local request = client:request{url = URL, method = PAYLOAD and "PUT" or "GET"}
  for i = 1, #HEADERS, 2 do request:add_header(HEADERS[i], HEADERS[i + 1]) end
  if PAYLOAD then request:set_payload(PAYLOAD) end
  local response = request:submit()
  result = {response:status(), response:reason(), response:payload()}
end
"""


def new_state(
    ext: HttpExtension, url: str, client: str = "{}", headers: tuple[str, ...] = (), payload: bytes | None = None
) -> LuaState:
    state = LuaState(Host(), StateOptions(extensions=(ext,)))
    globals_ = state.lua.globals()
    globals_[b"URL"] = url.encode()
    globals_[b"HEADERS"] = state.lua.table_from([header.encode() for header in headers])
    globals_[b"PAYLOAD"] = payload
    state.lua.execute(SCRIPT.replace("CLIENT", client).encode(), name="@test.lua")
    return state


async def run(state: LuaState) -> tuple[int, bytes, bytes]:
    await call(state)
    got = result(state)
    return got[1], got[2], got[3]


# --- keep-alive -------------------------------------------------------------------------------


async def test_requests_of_a_client_share_one_connection(ext: HttpExtension, serve: Any) -> None:
    server = serve(keep_alive)
    state = new_state(ext, server.url + "/a")
    for _ in range(3):
        assert await run(state) == (200, b"OK", b"ok")
    # Other clients too (Dovecot's clients share its global http-client context).
    assert await run(new_state(ext, server.url + "/b")) == (200, b"OK", b"ok")
    [conn] = server.connections
    assert [head.split(b"\r\n")[0] for head in conn.heads] == [b"GET /a HTTP/1.1"] * 3 + [b"GET /b HTTP/1.1"]


async def test_an_idle_connection_the_server_closed_is_not_used(ext: HttpExtension, serve: Any) -> None:
    server = serve(close_when_idle)
    state = new_state(ext, server.url + "/")
    assert await run(state) == (200, b"OK", b"ok")
    assert server.connections[0].closed.wait(5)
    await trio.sleep(0.05)  # the FIN reaches the client's socket
    assert await run(state) == (200, b"OK", b"ok")
    assert [len(conn.heads) for conn in server.connections] == [1, 1]


async def test_connection_close_ends_the_connection(ext: HttpExtension, serve: Any) -> None:
    server = serve(connection_close)
    state = new_state(ext, server.url + "/")
    for _ in range(2):
        assert await run(state) == (200, b"OK", b"ok")
    assert [len(conn.heads) for conn in server.connections] == [1, 1]


async def test_idle_connections_expire_after_max_idle_time(ext: HttpExtension, serve: Any) -> None:
    server = serve(keep_alive)
    state = new_state(ext, server.url + "/", "{max_idle_time_msecs = 100}")
    assert await run(state) == (200, b"OK", b"ok")
    assert await run(state) == (200, b"OK", b"ok")
    await trio.sleep(0.3)
    assert await run(state) == (200, b"OK", b"ok")
    assert [len(conn.heads) for conn in server.connections] == [2, 1]


async def test_idle_connections_no_request_takes_are_closed_too(ext: HttpExtension, serve: Any) -> None:
    first, second = serve(keep_alive), serve(keep_alive)
    states = [new_state(ext, first.url + "/", "{max_idle_time_msecs = 100}") for _ in range(2)]
    async with trio.open_nursery() as nursery:
        for state in states:
            nursery.start_soon(run, state)
    await trio.sleep(1.1)  # expired, and a second passed: the next request looks at all idle connections
    assert await run(new_state(ext, second.url + "/", "{max_idle_time_msecs = 100}")) == (200, b"OK", b"ok")
    assert [conn.closed.wait(5) for conn in first.connections] == [True, True]


async def test_requests_are_not_pipelined(ext: HttpExtension, serve: Any) -> None:
    server = serve(slow)
    states = [new_state(ext, server.url + "/") for _ in range(3)]
    for _ in range(2):  # the second round reuses the first round's connections
        async with trio.open_nursery() as nursery:
            for state in states:
                nursery.start_soon(run, state)
        assert [result(state)[1] for state in states] == [200, 200, 200]
    assert [(len(conn.heads), conn.pipelined) for conn in server.connections] == [(2, False)] * 3


# --- failures -----------------------------------------------------------------------------------

STATS = (
    r"\(Request queued 0\.\d{3} secs ago, 1 send attempts in 0\.\d{3} secs, 0\.\d{3} in http ioloop, "
    r"0\.000 in other ioloops, connected 0\.\d{3} secs ago\)"
)


@pytest.mark.parametrize(
    ("handler", "status", "reason"),
    [
        (garbage, 9007, re.escape("illegal status line: bytearray(b'garbage')")),
        (hang_up, 9005, r"Connection lost: read\(\(conn:127\.0\.0\.1:PORT,id=1\)\) failed: EOF " + STATS),
        (
            reset,
            9005,
            r"Connection lost: read\(\(conn:127\.0\.0\.1:PORT,id=1\)\) failed: Connection reset by peer " + STATS,
        ),
    ],
)
async def test_broken_responses(ext: HttpExtension, serve: Any, handler: Serve, status: int, reason: str) -> None:
    server = serve(handler)
    got_status, got_reason, payload = await run(new_state(ext, server.url + "/"))
    assert (got_status, payload) == (status, b"")
    assert re.fullmatch(reason.replace("PORT", str(server.port)), got_reason.decode()), got_reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (("Transfer-Encoding", "gzip"), "Only Transfer-Encoding: chunked is supported"),
        # authd before h11 was used directly: a Python exception that failed the whole call.
        (("Content-Length", "3"), "Too little data for declared Content-Length"),
    ],
)
async def test_a_request_h11_cannot_send_is_aborted(
    ext: HttpExtension, serve: Any, headers: tuple[str, ...], reason: str
) -> None:
    server = serve(keep_alive)
    status, got, _ = await run(new_state(ext, server.url + "/", headers=headers, payload=b"ab"))
    assert (status, got.decode()) == (9000, f"Cannot send this request: {reason}")
    # Nothing is left behind: the next request goes out as usual.
    assert await run(new_state(ext, server.url + "/")) == (200, b"OK", b"ok")


# --- TLS and tunnels ---------------------------------------------------------------------------


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A certificate for 127.0.0.1, and a client context that trusts it."""
    directory: Path = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return Tls(server, ssl.create_default_context(cafile=str(cert)))


async def test_https_keeps_its_connection(serve: Any, tls: Tls) -> None:
    server = serve(keep_alive, tls.server)
    ext = HttpExtension(ssl_context=tls.client)
    try:
        state = new_state(ext, server.url + "/")
        for _ in range(2):
            assert await run(state) == (200, b"OK", b"ok")
    finally:
        await ext.aclose()
    [conn] = server.connections
    assert len(conn.heads) == 2


async def test_an_untrusted_certificate_fails_the_connect(ext: HttpExtension, serve: Any, tls: Tls) -> None:
    server = serve(keep_alive, tls.server)
    status, reason, _ = await run(new_state(ext, server.url + "/"))
    name = f"127.0.0.1:{server.port}"
    assert (status, reason.decode()) == (
        9003,
        f"SSL handshaking with {name} failed: read(SSL (conn:{name},id=1)) failed: "
        "Received invalid SSL certificate: self-signed certificate (check ssl_client_ca_* settings?)",
    )


def tunnel_to(target: Server) -> Serve:
    """A proxy that answers CONNECT with 200 and then relays bytes to `target`."""

    def proxy(conn: Connection, server: Server) -> None:
        if conn.read_request() is None:
            return
        upstream = socket.create_connection(("127.0.0.1", target.port))
        conn.sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                sink.close()

        threading.Thread(target=pump, args=(upstream, conn.sock), daemon=True).start()
        pump(conn.sock, upstream)

    return proxy


def refuse(conn: Connection, server: Server) -> None:
    if conn.read_request() is not None:
        conn.sock.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")


async def test_https_through_a_proxy_is_tunnelled(serve: Any, tls: Tls) -> None:
    origin = serve(keep_alive, tls.server)
    proxy = serve(tunnel_to(origin))
    ext = HttpExtension(ssl_context=tls.client)
    try:
        state = new_state(ext, origin.url + "/x", f'{{proxy_url = "http://pu:pp@127.0.0.1:{proxy.port}"}}')
        for _ in range(2):
            assert await run(state) == (200, b"OK", b"ok")
    finally:
        await ext.aclose()
    [tunnel] = proxy.connections
    authority = f"127.0.0.1:{origin.port}".encode()
    credentials = base64.b64encode(b"pu:pp")
    assert tunnel.heads == [
        b"CONNECT %s HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\nProxy-Authorization: Basic %s\r\n"
        % (authority, authority, credentials)
    ]
    [conn] = origin.connections
    assert [head.split(b"\r\n")[0] for head in conn.heads] == [b"GET /x HTTP/1.1"] * 2


async def test_a_refused_tunnel_fails_the_connect(ext: HttpExtension, serve: Any) -> None:
    proxy = serve(refuse)
    state = new_state(ext, "https://127.0.0.1:1/", f'{{proxy_url = "http://127.0.0.1:{proxy.port}"}}')
    status, reason, _ = await run(state)
    assert (status, reason) == (
        9003,
        f"Tunnel connect(127.0.0.1:{proxy.port}) failed: 407 Proxy Authentication Required".encode(),
    )


async def test_a_slow_connect_fails_after_connect_timeout(ext: HttpExtension) -> None:
    # A listener that never accepts, with its backlog full: the SYN gets no answer.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        try:
            started = time.monotonic()
            status, reason, _ = await run(new_state(ext, f"http://127.0.0.1:{port}/", "{connect_timeout_msecs = 200}"))
        finally:
            for filler in fillers:
                filler.close()
    assert time.monotonic() - started < 2
    assert status == 9003
    assert re.fullmatch(
        rf"connect\(127\.0\.0\.1:{port}\) failed: Connection timed out in 0\.2\d\d secs", reason.decode()
    )


# --- responses in unusual shapes -----------------------------------------------------------------


def continue_first(conn: Connection, server: Server) -> None:
    while conn.read_request() is not None:
        conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)


def switching(conn: Connection, server: Server) -> None:
    if conn.read_request() is not None:
        conn.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nrest")
        conn.waiting(5)


def big_head(conn: Connection, server: Server) -> None:
    while conn.read_request() is not None:
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 60_000 + b"\r\nContent-Length: 2\r\n\r\nok")


def too_big_head(conn: Connection, server: Server) -> None:
    if conn.read_request() is not None:
        # Over the 100 KiB limit whatever sizes the reads have (they take at most 64 KiB).
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 300_000 + b"\r\nContent-Length: 2\r\n\r\nok")
        conn.waiting(5)


def refuse_payload(conn: Connection, server: Server) -> None:
    """Answer 413 after the head, without reading the payload, and close."""
    while b"\r\n\r\n" not in conn.buffer:
        conn.buffer += conn.sock.recv(65536)
    conn.sock.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize(
    ("handler", "headers", "expected"),
    [
        (continue_first, (), (200, b"OK", b"ok")),
        (switching, ("Connection", "upgrade", "Upgrade", "x"), (101, b"Switching Protocols", b"")),
        (switching, (), (9007, b"Received server _SWITCH_UPGRADE event without a pending proposal", b"")),
        (big_head, (), (200, b"OK", b"ok")),
        (too_big_head, (), (9007, b"Receive buffer too long", b"")),
    ],
)
async def test_response_shapes(
    ext: HttpExtension, serve: Any, handler: Serve, headers: tuple[str, ...], expected: tuple[int, bytes, bytes]
) -> None:
    server = serve(handler)
    assert await run(new_state(ext, server.url + "/", headers=headers)) == expected


async def test_an_answer_before_the_payload_was_taken_is_the_response(ext: HttpExtension, serve: Any) -> None:
    server = serve(refuse_payload)
    state = LuaState(Host(), StateOptions(extensions=(ext,)))
    state.lua.globals()[b"URL"] = (server.url + "/").encode()
    state.lua.execute(
        b"""
        function run()
          local request = dovecot.http.client{}:request{url = URL, method = "PUT"}
          request:set_payload(string.rep("x", 8 * 1024 * 1024))
          local response = request:submit()
          result = {response:status(), response:reason(), response:payload()}
        end
        """
    )
    assert await run(state) == (413, b"Payload Too Large", b"")

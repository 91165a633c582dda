"""A backend that writes each response's head and body in two send() calls costs no Nagle stall.

Python's http.server answers that way. Without TCP_QUICKACK after each request (as Dovecot's
o_stream uncork sets it) the body waits for authd's delayed ACK, about 40 ms per request.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from bench.backend import Backend
from bench.loadgen import PASSWORD, USER
from lua_api.http import HttpExtension
from lua_api.runtime import LuaState, StateOptions, drive, run_in_loop
from tests.lua_api.raw_http import accept_each, read_request
from tests.lua_api.test_http import Host

REQUESTS = 10


@dataclass
class SplitBackend:
    """Keep-alive HTTP/1.1; each response goes out as two segments, head then body."""

    port: int = 0
    #: For each request: how many recv() calls it took to arrive whole.
    reads: list[int] = field(default_factory=list)
    connections: int = 0

    def serve(self, listener: socket.socket) -> None:
        accept_each(listener, self.answer)

    def answer(self, conn: socket.socket) -> None:
        self.connections += 1
        buffer = b""
        with conn:
            while (request := read_request(conn, buffer)) is not None:
                buffer = request.rest
                self.reads.append(request.reads)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                conn.sendall(b"ok")


@pytest.fixture
def split_backend() -> Iterator[SplitBackend]:
    listener = socket.create_server(("127.0.0.1", 0))
    backend = SplitBackend(port=listener.getsockname()[1])
    thread = threading.Thread(target=backend.serve, args=(listener,), daemon=True)
    thread.start()
    yield backend
    listener.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_ten_requests_take_no_delayed_ack_each(
    ext: HttpExtension, split_backend: SplitBackend, method: str
) -> None:
    state = LuaState(Host(), StateOptions(extensions=(ext,)))
    payload = 'r:set_payload("user=alice&password=x")' if method == "POST" else ""
    state.lua.execute(
        f"""
        local client = dovecot.http.client{{}}
        function run()
          local r = client:request{{url = "http://127.0.0.1:{split_backend.port}/check", method = "{method}"}}
          {payload}
          local response = r:submit()
          result = response:status() .. " " .. response:payload()
        end
        """.encode()
    )
    outcome = await drive(state, b"run", b"none", run_in_loop)  # the connection, once
    assert outcome.ok, outcome.error
    started = time.monotonic()
    for _ in range(REQUESTS):
        outcome = await drive(state, b"run", b"none", run_in_loop)
        assert outcome.ok, outcome.error
        assert state.lua.globals()[b"result"] == b"200 ok"
    took = time.monotonic() - started
    assert took < 0.150, f"{REQUESTS} requests took {took * 1000:.0f} ms (Nagle and delayed ACK: ~440 ms)"
    assert split_backend.connections == 1
    assert split_backend.reads == [1] * (REQUESTS + 1)  # each request (head and body) in one write


async def test_the_benchmark_split_backend_shows_no_stall(ext: HttpExtension) -> None:
    """bench's http-split backend (asyncio, two writes, Nagle on), with its Nextcloud-style check."""
    credentials = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with Backend(0.0, 1, split=True) as backend:
        state = LuaState(Host(), StateOptions(extensions=(ext,)))
        state.lua.execute(
            f"""
            local client = dovecot.http.client{{}}
            function run()
              local r = client:request{{url = "{backend.url}/remote.php/dav/files/{USER}/", method = "PROPFIND"}}
              r:add_header("Authorization", "Basic {credentials}")
              result = r:submit():status()
            end
            """.encode()
        )
        outcome = await drive(state, b"run", b"none", run_in_loop)  # the connection, once
        assert outcome.ok and state.lua.globals()[b"result"] == 207, outcome.error
        started = time.monotonic()
        for _ in range(REQUESTS):
            outcome = await drive(state, b"run", b"none", run_in_loop)
            assert outcome.ok and state.lua.globals()[b"result"] == 207, outcome.error
        took = time.monotonic() - started
    assert took < 0.150, f"{REQUESTS} requests took {took * 1000:.0f} ms (Nagle and delayed ACK: ~440 ms)"

"""dovecot.http.client{debug = true} logs each request as Dovecot's http-client does, and a
response body cut short is logged once with its cause (the script gets what came, as in Dovecot).

A scripted local server (one thread per connection) answers each request from a list.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from lua_api.http import HttpExtension
from lua_api.runtime import LuaState, StateOptions, drive, run_in_loop
from tests.lua_api.raw_http import accept_each, read_request
from tests.lua_api.test_http import Host

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Scripted:
    """Answers the Nth request with answers[N] (then closes, if the answer says so)."""

    answers: list[tuple[bytes, bool]]
    port: int = 0
    heads: list[bytes] = field(default_factory=list)

    def serve(self, listener: socket.socket) -> None:
        accept_each(listener, self.answer)

    def answer(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while self.answers:
                if (request := read_request(conn, buffer)) is None:
                    return
                buffer = request.rest
                self.heads.append(request.head)
                reply, close = self.answers.pop(0)
                conn.sendall(reply)
                if close:
                    return


@pytest.fixture
def server() -> Iterator[Scripted]:
    listener = socket.create_server(("127.0.0.1", 0))
    scripted = Scripted([], port=listener.getsockname()[1])
    threading.Thread(target=scripted.serve, args=(listener,), daemon=True).start()
    yield scripted
    listener.close()


async def run(
    ext: HttpExtension, request: str, client: str = "{debug = true}"
) -> tuple[Any, list[MutableMapping[str, Any]]]:
    state = LuaState(Host(), StateOptions(extensions=(ext,)), name="/etc/authd/auth.lua")
    state.lua.execute(
        f"""
        local client = dovecot.http.client{client}
        function run()
          local response = {request}:submit()
          result = {{status = response:status(), payload = response:payload()}}
        end
        """.encode()
    )
    with structlog.testing.capture_logs() as logs:
        outcome = await drive(state, b"run", b"none", run_in_loop)
    assert outcome.ok, outcome.error
    return state.to_python(state.lua.globals()[b"result"]), logs


def lines(logs: list[MutableMapping[str, Any]]) -> list[str]:
    """The debug lines with their request numbers and timings made comparable."""
    out = []
    for entry in logs:
        if entry["event"] == "lua.http_debug":
            assert entry["log_level"] == "debug" and entry["script"] == "/etc/authd/auth.lua"
            text = re.sub(r"\[Req\d+: ", "[Req#: ", entry["message"])
            out.append(re.sub(r"took \d+ ms \+ \d+ ms", "took # ms + # ms", text))
    return out


async def test_debug_logs_each_request_without_credentials(ext: HttpExtension, server: Scripted) -> None:
    server.answers = [(OK, False)]
    base = f"http://127.0.0.1:{server.port}"
    request = (
        f'client:request{{url = "http://alice:s3cret@127.0.0.1:{server.port}/check?password=s3cret", method = "POST"}}'
    )
    result, logs = await run(
        ext,
        f'(function() local r = {request}; r:add_header("X-Api-Key", "k3y"); r:set_payload("pw=s3cret"); '
        "return r end)()",
    )
    assert result == {b"status": 200, b"payload": b"ok"}
    label = f"[Req#: POST {base}/check]"
    assert lines(logs) == [
        f"http-client: request {label}: Submitted",
        f"http-client: request {label}: Sent header",
        f"http-client: request {label}: Finished sending payload",
        f"http-client: conn 127.0.0.1:{server.port} [1]: Got 200 response for request {label}: OK "
        "(took # ms + # ms in queue)",
        f"http-client: request {label}: Finished",
    ]
    assert b"Authorization: Basic" in server.heads[0]  # it was sent, never logged
    assert not any(secret in repr(logs) for secret in ("s3cret", "k3y", "YWxpY2U6czNjcmV0"))


async def test_debug_logs_retries_and_the_error(ext: HttpExtension, server: Scripted) -> None:
    server.answers = [(b"", True), (b"", True)]
    result, logs = await run(
        ext, f'client:request{{url = "http://127.0.0.1:{server.port}/x"}}', "{debug = true, max_attempts = 2}"
    )
    assert result[b"status"] == 9005
    label = f"[Req#: GET http://127.0.0.1:{server.port}/x]"
    found = lines(logs)
    assert found[:4] == [
        f"http-client: request {label}: Submitted",
        f"http-client: request {label}: Sent header",
        f"http-client: request {label}: Retrying (attempts=2)",
        f"http-client: request {label}: Sent header",
    ]
    assert re.fullmatch(
        re.escape(f"http-client: request {label}: Error: 9005 Connection lost: read(") + r".*EOF .*", found[4]
    ), found[4]
    assert len(found) == 5


async def test_no_debug_lines_without_the_option(ext: HttpExtension, server: Scripted) -> None:
    server.answers = [(OK, False)]
    result, logs = await run(ext, f'client:request{{url = "http://127.0.0.1:{server.port}/"}}', "{}")
    assert result == {b"status": 200, b"payload": b"ok"}
    assert logs == []


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "Response payload read error: Disconnected while reading message payload at offset 5 (wanted 10): "
            "Connection closed",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nshort\r\n",
            "Response payload read error: Unexpected end of payload",
        ),
    ],
)
async def test_a_body_cut_short_is_logged_once(
    ext: HttpExtension, server: Scripted, reply: bytes, message: str
) -> None:
    server.answers = [(reply, True)]
    result, logs = await run(ext, f'client:request{{url = "http://127.0.0.1:{server.port}/user?pw=x"}}', "{}")
    # Dovecot 2.3's Lua binding: the status as received, the body as far as it came, one error logged
    assert result == {b"status": 200, b"payload": b"short"}
    assert logs == [
        {
            "event": "lua.http_payload_error",
            "log_level": "error",
            "script": "/etc/authd/auth.lua",
            "url": f"http://127.0.0.1:{server.port}/user",
            "status": 200,
            "received": 5,
            "message": message,
        }
    ]

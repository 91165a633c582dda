"""dovecot.http against a real local HTTP server, driven through real Lua states.

Expected texts and wire details were checked against Dovecot 2.3.19.1 (Debian 12,
auth worker, Lua 5.4) with the same requests; see lua_api/http.py for the sources.
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio

from lua_api.http import HttpExtension, UrlError, parse_http_url
from lua_api.request import LuaRequest
from lua_api.request_vars import RequestVars
from lua_api.runtime import CallOutcome, LuaState, StateOptions, drive, run_in_loop

# --- a recording HTTP/1.1 server ---------------------------------------------------------


@dataclass
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class Backend:
    url: str
    port: int
    requests: list[Received] = field(default_factory=list)
    connections: int = 0


BINARY = bytes(range(256)) + b"\0tail"
RELATIVE = b"Relative HTTP URL not allowed"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.backend.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def dispatch(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        received = Received(self.command, self.path, list(self.headers.items()), body)
        with self.server.lock:
            self.server.backend.requests.append(received)
        # Dovecot 2.3 sends redirected requests with an absolute-form target.
        path, _, query = self.path.removeprefix(self.server.backend.url).partition("?")
        if path == "/close":
            self.close_connection = True  # no response at all
        elif path == "/slow":
            time.sleep(float(query))
            self.reply(200, "OK", b"slow")
        elif path.startswith("/dav/"):
            expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
            if self.command == "PROPFIND" and received.header("Authorization") == expected:
                self.reply(207, "Multi-Status", b"<d:multistatus/>")
            else:
                self.reply(401, "Unauthorized", b"")
        elif path == "/redirect":
            self.reply(302, "Found", b"", [("Location", f"{self.server.backend.url}/ok")])
        elif path == "/redirect-relative":
            self.reply(302, "Found", b"", [("Location", "/ok")])
        elif path == "/headers":
            self.reply(404, "Not  Here ", b"", [("X-Dup", "first"), ("x-dup", "second")])
        elif path == "/binary":
            self.reply(200, "OK", BINARY)
        elif path == "/408":
            self.reply(408, "Request Timeout", b"")
        else:
            self.reply(200, "OK", b"ok")

    do_GET = do_POST = do_PUT = do_PROPFIND = dispatch

    def reply(self, status: int, reason: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    block_on_close = False
    lock = threading.Lock()
    backend: Backend


@pytest.fixture
def backend() -> Iterator[Backend]:
    server = _Server(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    server.backend = Backend(f"http://127.0.0.1:{port}", port)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.backend
    server.shutdown()
    server.server_close()


# --- Lua states ---------------------------------------------------------------------------


class Host:
    def log(self, level: int, message: str, context: object | None) -> None:
        pass

    def password_verify(self, context: object, crypted: bytes, plain: bytes) -> tuple[int, str | None]:
        return 0, None


def new_state(extension: HttpExtension, backend: Backend, code: str) -> LuaState:
    state = LuaState(Host(), StateOptions(extensions=(extension,)))
    state.lua.globals()[b"BASE"] = backend.url.encode()
    state.lua.execute(code.encode(), name="@test.lua")
    return state


async def call(state: LuaState, name: str = "run") -> CallOutcome:
    """Run a global function as authd does (yielding for I/O, event-loop thread)."""
    outcome = await drive(state, name.encode(), b"none", run_in_loop)
    assert outcome.ok, outcome.error
    return outcome


def result(state: LuaState) -> Any:
    return state.to_python(state.lua.globals()[b"result"])


async def submit(ext: HttpExtension, backend: Backend, request: str, client: str = "{}") -> dict[bytes, Any]:
    """status/reason/payload/headers of one request; REQUEST holds the fields of request()'s table."""
    state = new_state(
        ext,
        backend,
        f"""
        function run()
          local response = dovecot.http.client({client}):request({{{request}}}):submit()
          result = {{status = response:status(), reason = response:reason(), payload = response:payload(),
                    dup = response:header("x-dup"), absent = response:header("absent"),
                    status_type = math.type(response:status())}}
        end
        """,
    )
    await call(state)
    response: dict[bytes, Any] = result(state)
    return response


def lua_error(ext: HttpExtension, backend: Backend, body: str) -> str:
    """The error message BODY raises (run with pcall, no I/O)."""
    state = new_state(ext, backend, f"function run()\n  {body}\nend")
    ok, message = state.lua.eval(b"pcall(run)")
    assert not ok
    text: str = message.decode()
    return text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the docker-mailserver Nextcloud script ---------------------------------------------

# The shape of docker-mailserver's auth-lua example: a client created at load time with the
# (ignored) `timeout` key, PROPFIND with Basic authentication built in Lua, status 207 or 401.
NEXTCLOUD = """
local function b64(data)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((data:gsub(".", function(c)
    local bits, byte = "", c:byte()
    for i = 8, 1, -1 do bits = bits .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and "1" or "0") end
    return bits
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(bits)
    if #bits < 6 then return "" end
    local n = 0
    for i = 1, 6 do n = n + (bits:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(n + 1, n + 1)
  end) .. ({"", "==", "="})[#data % 3 + 1])
end

local http_client = dovecot.http.client{timeout = 1000; max_attempts = 1; debug = false}

function auth_passdb_lookup(req)
  local request = http_client:request{url = BASE .. "/dav/files/" .. req.user .. "/", method = "PROPFIND"}
  request:add_header("Authorization", "Basic " .. b64(req.user .. ":" .. req.password))
  local response = request:submit()
  local status = response:status()
  if status == 207 then
    return dovecot.auth.PASSDB_RESULT_OK, "nopassword=y"
  elseif status == 401 then
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
    "Authentication failed: " .. status .. " - " .. response:reason()
end
"""


@pytest.mark.parametrize(("password", "code", "data"), [("s3cret", 1, b"nopassword=y"), ("wrong", 0, b"")])
async def test_nextcloud_propfind(ext: HttpExtension, backend: Backend, password: str, code: int, data: bytes) -> None:
    state = new_state(ext, backend, NEXTCLOUD)

    def request() -> tuple[Any, ...]:
        item = LuaRequest(RequestVars(user=b"alice", mech_password=password.encode()))
        return (state.api[b"new_request"](item, False, False, False, False),)

    outcome = await drive(state, b"auth_passdb_lookup", b"lookup", run_in_loop, request)
    assert outcome.ok, outcome.error
    assert outcome.values[1] == code
    assert outcome.values[4] == data
    [received] = backend.requests
    assert (received.method, received.path) == ("PROPFIND", "/dav/files/alice/")
    expected = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
    assert received.header("Authorization") == expected


# --- what goes over the wire ---------------------------------------------------------------


async def test_default_headers_of_a_get(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/ok"')
    assert (response[b"status"], response[b"reason"], response[b"payload"]) == (200, b"OK", b"ok")
    [received] = backend.requests
    assert [name for name, _ in received.headers] == ["Host", "Date", "Connection"]
    assert received.header("Host") == f"127.0.0.1:{backend.port}"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", received.header("Date") or "")
    assert received.header("Connection") == "Keep-Alive"


async def test_headers_and_payload_of_a_post(ext: HttpExtension, backend: Backend) -> None:
    state = new_state(
        ext,
        backend,
        """
        function run()
          local request = dovecot.http.client{user_agent = "authd-test/1"}:request{
            url = BASE .. "/a%20b/./c/../d?q=%41", method = "POST"}
          request:add_header("X-One", "1")
          request:add_header("x-one", "2")          -- replaces the value, keeps the name
          request:add_header("X-Gone", "x")
          request:remove_header("x-gone")
          request:add_header("Date", "soon")
          request:remove_header("Date")             -- and Dovecot then sends no Date at all
          request:add_header("X-Number", 5)
          request:set_payload("ab\\0cd")             -- 2.3 copies up to the first NUL
          result = request:submit():status()
        end
        """,
    )
    await call(state)
    assert result(state) == 200
    [received] = backend.requests
    assert (received.method, received.path, received.body) == ("POST", "/a%20b/d?q=%41", b"ab")
    assert received.headers == [
        ("Host", f"127.0.0.1:{backend.port}"),
        ("User-Agent", "authd-test/1"),
        ("Expect", "100-continue"),
        ("Content-Length", "2"),
        ("Connection", "Keep-Alive"),
        ("X-One", "2"),
        ("X-Number", "5"),
    ]


async def test_empty_payload_has_a_length_but_no_expect(ext: HttpExtension, backend: Backend) -> None:
    state = new_state(
        ext,
        backend,
        """
        function run()
          local request = dovecot.http.client{}:request{url = BASE .. "/ok", method = "PUT"}
          request:set_payload("")
          request:submit()
        end
        """,
    )
    await call(state)
    [received] = backend.requests
    assert received.header("Content-Length") == "0"
    assert received.header("Expect") is None


async def test_userinfo_in_url_becomes_basic_authentication(ext: HttpExtension, backend: Backend) -> None:
    url = f"http://alice:s%3Acret@127.0.0.1:{backend.port}/ok"
    response = await submit(ext, backend, f'url = "{url}"')
    assert response[b"status"] == 200
    [received] = backend.requests
    assert received.path == "/ok"
    assert received.header("Host") == f"127.0.0.1:{backend.port}"
    assert received.header("Authorization") == "Basic " + base64.b64encode(b"alice:s:cret").decode()


async def test_user_without_password_sends_no_authorization(ext: HttpExtension, backend: Backend) -> None:
    await submit(ext, backend, f'url = "http://alice@127.0.0.1:{backend.port}/ok"')
    assert backend.requests[0].header("Authorization") is None


async def test_through_a_proxy(ext: HttpExtension, backend: Backend) -> None:
    proxy = f"http://pu:pp@127.0.0.1:{backend.port}"  # the backend answers absolute-form targets too
    response = await submit(ext, backend, 'url = BASE .. "/ok"', f'{{proxy_url = "{proxy}"}}')
    assert response[b"status"] == 200
    [received] = backend.requests
    assert received.path == f"{backend.url}/ok"
    assert [name for name, _ in received.headers] == ["Host", "Date", "Proxy-Authorization"]
    assert received.header("Proxy-Authorization") == "Basic " + base64.b64encode(b"pu:pp").decode()


# --- responses ---------------------------------------------------------------------------


async def test_response_accessors(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/headers"')
    assert response[b"status"] == 404
    assert response[b"status_type"] == b"integer"
    assert response[b"reason"] == b"Not  Here "  # exactly as sent
    assert response[b"dup"] == b"first"  # first match, case-insensitive
    assert response[b"absent"] == b""
    assert response[b"payload"] == b""


async def test_binary_payload(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/binary"')
    assert response[b"payload"] == BINARY


async def test_objects_are_plain_tables_with_raw_methods(ext: HttpExtension, backend: Backend) -> None:
    state = new_state(
        ext,
        backend,
        """
        local function keys(t)
          local found = {}
          for key in pairs(t) do found[#found + 1] = key end
          table.sort(found)
          return table.concat(found, ",")
        end
        function run()
          local client = dovecot.http.client{}
          local request = client:request{url = BASE .. "/ok"}
          local response = request:submit()
          result = {keys(client), keys(request), keys(response), keys(dovecot),
                    getmetatable(client) == nil and getmetatable(request) == nil
                    and getmetatable(response) == nil}
        end
        """,
    )
    await call(state)
    assert result(state) == {
        1: b"item,request",
        2: b"add_header,item,remove_header,set_payload,submit",
        3: b"header,item,payload,reason,status",
        4: b"auth,http",
        5: True,
    }


# --- failures become statuses --------------------------------------------------------------


async def test_connect_refused_is_9003(ext: HttpExtension, backend: Backend) -> None:
    port = closed_port()
    response = await submit(ext, backend, f'url = "http://127.0.0.1:{port}/"')
    assert response[b"status"] == 9003
    assert response[b"reason"] == f"connect(127.0.0.1:{port}) failed: Connection refused".encode()


async def test_connect_attempts_are_counted_in_the_reason(ext: HttpExtension, backend: Backend) -> None:
    port = closed_port()
    response = await submit(ext, backend, f'url = "http://127.0.0.1:{port}/"', "{max_connect_attempts = 3}")
    assert response[b"status"] == 9003
    reason = response[b"reason"].decode()
    # Backoff of 100 ms, then 200 ms between the attempts, as Dovecot does.
    refused = rf"connect\(127.0.0.1:{port}\) failed: Connection refused"
    match = re.fullmatch(rf"{refused} \(3 attempts in 0\.(\d+) secs\)", reason)
    assert match and 300 <= int(match[1]) < 900, reason


async def test_host_lookup_failure_is_9002(ext: HttpExtension, backend: Backend) -> None:
    with pytest.raises(socket.gaierror) as lookup:
        socket.getaddrinfo("nonexistent.invalid", None, type=socket.SOCK_STREAM)
    response = await submit(ext, backend, 'url = "http://nonexistent.invalid/"')
    assert response[b"status"] == 9002
    expected = f"Failed to lookup host nonexistent.invalid: {lookup.value.strerror}"
    assert response[b"reason"] == expected.encode()


async def test_request_timeout_is_9008(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/slow?1"', "{request_timeout_msecs = 200}")
    assert response[b"status"] == 9008
    assert re.fullmatch(
        r"Request timed out \(Request queued 0\.2\d\d secs ago, 1 send attempts in 0\.2\d\d secs, "
        r"0\.2\d\d in http ioloop, 0\.000 in other ioloops, connected 0\.2\d\d secs ago\)",
        response[b"reason"].decode(),
    ), response[b"reason"]


async def test_absolute_timeout_is_9008(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/slow?1"', "{request_absolute_timeout_msecs = 200}")
    assert response[b"status"] == 9008
    assert response[b"reason"].startswith(b"Absolute request timeout expired (Request queued 0.2")
    assert response[b"reason"].endswith(b" in other ioloops)")


async def test_connection_lost_is_retried_up_to_max_attempts(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/close"', "{max_attempts = 2}")
    assert response[b"status"] == 9005
    assert re.fullmatch(
        r"Connection lost: read\(\(conn:127\.0\.0\.1:\d+,id=\d+\)\) failed: EOF "
        r"\(Request queued \d\.\d{3} secs ago, 1 times retried, 2 send attempts in .*\)",
        response[b"reason"].decode(),
    ), response[b"reason"]
    assert len(backend.requests) == 2


async def test_408_is_retried_and_the_reason_says_so(ext: HttpExtension, backend: Backend) -> None:
    response = await submit(ext, backend, 'url = BASE .. "/408"', "{max_attempts = 2}")
    assert response[b"status"] == 408
    assert re.fullmatch(rb"Request Timeout \(1 retries in 0\.\d{3} secs\)", response[b"reason"])
    assert len(backend.requests) == 2


async def test_timeout_option_of_the_examples_is_ignored(ext: HttpExtension, backend: Backend) -> None:
    # 2.3 has no `timeout` option: the request still waits beyond 100 ms.
    response = await submit(ext, backend, 'url = BASE .. "/slow?0.3"', "{timeout = 100}")
    assert (response[b"status"], response[b"payload"]) == (200, b"slow")


# --- redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "client", "status", "reason"),
    [
        ("/redirect", "{}", 9004, b"Redirect refused"),
        ("/redirect", "{max_redirects = 1}", 200, b"OK"),
        ("/redirect-relative", "{max_redirects = 1}", 9004, b"Invalid redirect location: " + RELATIVE),
        ("/redirect", "{no_auto_redirect = true}", 302, b"Found"),
    ],
)
async def test_redirects(
    ext: HttpExtension, backend: Backend, path: str, client: str, status: int, reason: bytes
) -> None:
    response = await submit(ext, backend, f'url = BASE .. "{path}"', client)
    assert (response[b"status"], response[b"reason"]) == (status, reason)


async def test_followed_redirect_keeps_headers_and_uses_an_absolute_target(
    ext: HttpExtension, backend: Backend
) -> None:
    state = new_state(
        ext,
        backend,
        """
        function run()
          local request = dovecot.http.client{max_redirects = 1}:request{
            url = "http://u:p@127.0.0.1:" .. PORT .. "/redirect"}
          request:add_header("X-Keep", "1")
          result = request:submit():payload()
        end
        """.replace("PORT", str(backend.port)),
    )
    await call(state)
    assert result(state) == b"ok"
    first, second = backend.requests
    assert (first.path, second.path) == ("/redirect", f"{backend.url}/ok")
    for received in (first, second):
        assert received.header("Authorization") == "Basic " + base64.b64encode(b"u:p").decode()
        assert received.header("X-Keep") == "1"


# --- errors raised in Lua -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("{user_agent = 1}", "Invalid HTTP client setting: user_agent: string expected"),
        ('{max_attempts = "3"}', "Invalid HTTP client setting: max_attempts: non-negative number expected"),
        ("{max_attempts = -1}", "Invalid HTTP client setting: max_attempts: non-negative number expected"),
        ("{max_attempts = 1.5}", "Invalid HTTP client setting: max_attempts: non-negative number expected"),
        ("{max_attempts = 2^33}", "Invalid HTTP client setting: max_attempts: non-negative number expected"),
        ("{debug = 1}", "Invalid HTTP client setting: debug: boolean expected"),
        ('{proxy_url = "foo"}', "Invalid HTTP client setting: proxy_url is invalid: " + RELATIVE.decode()),
        ("{event_parent = 1}", "Bad argument #-1, expected struct event got number"),
    ],
)
async def test_client_option_errors(ext: HttpExtension, backend: Backend, options: str, message: str) -> None:
    assert lua_error(ext, backend, f"dovecot.http.client({options})") == message


async def test_valid_and_unknown_options_are_accepted(ext: HttpExtension, backend: Backend) -> None:
    options = "max_attempts = 3.0, timeout = 2000, proxy_url = 1"  # proxy_url: non-strings are ignored
    state = new_state(ext, backend, f"function run() dovecot.http.client{{{options}}} end")
    assert state.lua.eval(b"pcall(run)") is True


CLIENT = "dovecot.http.client{}"
REQUEST = "dovecot.http.client{}:request{url = BASE}"
AT = "test.lua:2: "


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("dovecot.http.client()", "expected 1 arguments, got 0"),
        ('dovecot.http.client("x")', AT + "bad argument #1 to 'client' (table expected, got string)"),
        (CLIENT + ":request{}", "cannot create request: url not specified"),
        (CLIENT + ":request({url = {}})", AT + "bad argument #-2 to 'request' (string expected, got table)"),
        (CLIENT + ':request("x")', AT + "bad argument #1 to 'request' (table expected, got string)"),
        (
            f'local c = {CLIENT}; c.request(c, "x")',
            AT + "bad argument #2 to 'request' (table expected, got string)",
        ),
        (
            f'local c = {CLIENT}; c.request("x", {{}})',
            "Bad argument #1, expected struct http_client got string",
        ),
        (CLIENT + ":request({url = 5})", "Failed to parse url 5: Relative HTTP URL not allowed"),
        (CLIENT + ':request{url = "ftp://x/"}', "Failed to parse url ftp://x/: Not an HTTP URL"),
        (
            REQUEST + ':add_header("X", nil)',
            AT + "bad argument #2 to 'add_header' (string expected, got nil)",
        ),
        (REQUEST + ':add_header("X")', "expected 3 arguments, got 2"),
        (REQUEST + ":set_payload(nil)", AT + "bad argument #1 to 'set_payload' (string expected, got nil)"),
        (REQUEST + ":submit(1)", "expected 1 arguments, got 2"),
        # Where Dovecot aborts the process, authd raises at the script's line.
        (
            REQUEST + ':add_header("X", "a\\r\\nb")',
            AT + "authd: cannot send a control character in HTTP header X",
        ),
        (
            f'local r = {REQUEST}; r:set_payload("a"); r:set_payload("b")',
            AT + "authd: the payload of this request was already set (Dovecot would crash here)",
        ),
        (
            CLIENT + ':request{url = "http://a%3Ab:c@h/"}',
            AT + "authd: a user name with ':' cannot be sent in Basic authentication (Dovecot would crash on submit)",
        ),
    ],
)
async def test_lua_errors(ext: HttpExtension, backend: Backend, body: str, message: str) -> None:
    assert lua_error(ext, backend, body) == message


async def test_response_argument_errors(ext: HttpExtension, backend: Backend) -> None:
    state = new_state(
        ext,
        backend,
        """
        function run()
          local response = dovecot.http.client{}:request{url = BASE .. "/ok"}:submit()
          result = {select(2, pcall(response.header, response)),
                    select(2, pcall(response.status, response, 1))}
        end
        """,
    )
    await call(state)
    assert result(state) == {1: b"expected 2 arguments, got 1", 2: b"expected 1 arguments, got 2"}


# --- concurrency and the blocking paths -----------------------------------------------------

RUN_SLOW = """
function run()
  result = dovecot.http.client{}:request{url = BASE .. "/slow?0.5"}:submit():status()
end
"""


async def test_submit_yields_instead_of_blocking_the_loop(ext: HttpExtension, backend: Backend) -> None:
    states = [new_state(ext, backend, RUN_SLOW) for _ in range(2)]
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for state in states:
            nursery.start_soon(call, state)
    assert time.monotonic() - started < 0.9  # both waited at the same time
    assert [result(state) for state in states] == [200, 200]


async def test_connections_are_kept_alive_and_shared_between_states(ext: HttpExtension, backend: Backend) -> None:
    code = RUN_SLOW.replace("{}", "{max_attempts = 1}").replace("slow?0.5", "ok")
    for state in (new_state(ext, backend, code), new_state(ext, backend, code)):
        await call(state)
        assert result(state) == 200
    assert len(backend.requests) == 2
    assert backend.connections == 1


async def test_blocking_submit_from_a_trio_worker_thread_uses_the_shared_pool(
    ext: HttpExtension, backend: Backend
) -> None:
    state = new_state(ext, backend, RUN_SLOW.replace("slow?0.5", "ok"))
    # A direct call (no driver coroutine): the prelude's yield_io has to block this thread.
    await trio.to_thread.run_sync(lambda: state.lua.globals()[b"run"]())
    await trio.to_thread.run_sync(lambda: state.lua.globals()[b"run"]())
    assert result(state) == 200
    assert backend.connections == 1


async def test_blocking_submit_on_the_loop_thread_stalls_the_loop(ext: HttpExtension, backend: Backend) -> None:
    # blocking = no and no yield possible: like Dovecot's auth process, everything waits.
    state = new_state(ext, backend, RUN_SLOW)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.01)
        before = ticks
        state.lua.globals()[b"run"]()
        assert ticks == before
        nursery.cancel_scope.cancel()
    assert result(state) == 200


def test_blocking_submit_without_trio(backend: Backend) -> None:
    extension = HttpExtension()
    state = new_state(extension, backend, RUN_SLOW.replace("slow?0.5", "ok"))
    state.lua.globals()[b"run"]()
    assert result(state) == 200
    assert backend.requests[0].path == "/ok"


# --- URL parsing (texts checked against Dovecot's http_url_parse) ---------------------------


@pytest.mark.parametrize(
    ("url", "target", "authority"),
    [
        (b"http://h:8080/a/b/../c/./d?x=1&y=%41", b"/a/c/d?x=1&y=%41", b"h:8080"),
        (b"http://h", b"/", b"h"),
        (b"http://h?q", b"/?q", b"h"),
        (b"http://h/a%2fb%7E%41/", b"/a/b~A/", b"h"),
        (b"http://h//x//", b"//x//", b"h"),
        (b"http://h/a/..", b"/", b"h"),
        (b"http://h/%C3%A9?%C3%A9", b"/%c3%a9?%C3%A9", b"h"),
        (b"HTTP://LocalHost.:80/", b"/", b"LocalHost:80"),
        (b"//h/x", b"/x", b"h"),
        (b"http://[::1]:80/", b"/", b"[::1]:80"),
    ],
)
def test_url_targets(url: bytes, target: bytes, authority: bytes) -> None:
    parsed = parse_http_url(url, allow_userinfo=True)
    assert (parsed.target, parsed.authority) == (target, authority)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (b"http://127.0.0.1:0/x", "Invalid port number"),
        (b"http://h:1x/", "Invalid host port"),
        (b"http://a_b/", "Invalid host identifier"),
        (b"http://a-/", "Invalid domain label in hostname"),
        (b"http:/x", "Absolute HTTP URL requires `//' after `http:'"),
        (b"http:///x", "HTTP URL does not allow empty host identifier"),
        (b"http://[::1/", "Expecting ']' at end of IP-literal"),
        (b"http://[vx.y]/", "Future IP host address 'vx.y' not supported"),
        (b"http://[zz]/", "Invalid IPv6 host address 'zz'"),
        (b"http://h/a b", "Path component contains invalid character"),
        (b"http://h/a%4g", "Expecting hex digit after '%4', but found 'g'"),
        (b"http://h/a%4", "Unexpected URI boundary after '%'"),
        (b"http://h/a%00", "Percent encoding is not allowed to encode NUL character"),
        (b"http://h/a?b c", "Query component contains invalid character"),
        (b"http://h/a#frag", "URL fragment not allowed for HTTP URL in this context"),
        (b"http://u%4:x@h/", "Expecting hex digit after '%4', but found ':'"),
        (b"http://%2D/", "(null)"),
        (b"1http://h/", "Relative HTTP URL not allowed"),
        (b"mailto:x", "Not an HTTP URL"),
    ],
)
def test_url_errors(url: bytes, message: str) -> None:
    with pytest.raises(UrlError) as error:
        parse_http_url(url, allow_userinfo=True)
    assert str(error.value) == message

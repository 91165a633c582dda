"""A real local HTTP server for tests: Nextcloud-style WebDAV auth and JSON/header APIs.

Runs in a thread on 127.0.0.1 with an ephemeral port, records every request, and
answers from small user tables, so Lua scripts under test make real HTTP calls.

`users` (name -> password) serves the Nextcloud PROPFIND check and the generic JSON
POST; `accounts` (name -> Account) serves the APIs the compat scripts talk to:

* `POST /api/verify`, `GET /api/user/NAME`: a JSON verify API and its userdb lookup;
  the account's state picks the status (200, 401, 403, 404, 410, 300, 501, 500).
* `POST /api/mailu/passdb/NAME`, `POST /api/mailu/userdb/NAME`, `GET /api/mailu/users`:
  Mailu-style JSON field tables and the user list.
* `GET /auth/email`: nginx mail-auth style, request headers `Auth-User`/`Auth-Pass`, answer
  in the `Auth-Status`, `Auth-Server`, `Auth-Port`, `Auth-User` headers.
* `GET /api/dovecot/status`, `POST /api/dovecot/NAME`, `GET /api/dovecot/NAME`: the userli
  adapter API (Bearer `token`), `{"message": ..., "body": ...}` answers.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Account.state values and what the verify-style APIs answer for them.
STATES = ("active", "disabled", "expired", "broken", "next", "scheme")


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Account:
    """A user of the JSON/header APIs: password, state and the data the APIs return."""

    password: str
    state: str = "active"
    #: userdb data (`/api/verify`, `/api/user/`, `/api/mailu/userdb/`, userli bodies).
    userdb: dict[str, Any] = field(default_factory=dict)
    #: Mailu-style passdb field table; default {"password": "{PLAIN}<password>"}.
    passdb: dict[str, Any] | None = None
    #: nginx-style proxy answer: (Auth-Server, Auth-Port, Auth-User).
    proxy: tuple[str, int, str] | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown account state {self.state!r}")


@dataclass
class Backend:
    """Users and behaviour of the fake backend; `seen` lists the requests it got."""

    users: dict[str, str] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    #: Bearer token the userli routes require.
    token: str = ""
    delay: float = 0.0
    broken: bool = False
    seen: list[Seen] = field(default_factory=list)

    def check_basic(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return self.users.get(user) == password


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, data: Any) -> Reply:
    return Reply(status, json.dumps(data).encode(), "application/json")


#: HTTP status of the verify-style APIs for each non-active account state.
_STATE_STATUS = {"disabled": 403, "expired": 410, "broken": 500, "next": 300, "scheme": 501}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    backend: Backend

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.backend.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
        return body

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self._send(Reply(status, body, content_type))

    def _send(self, reply: Reply) -> None:
        if self.backend.delay:
            time.sleep(self.backend.delay)
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _route(self, body: bytes) -> Reply | None:
        """The compat API routes; None for paths they do not own."""
        path = urllib.parse.unquote(self.path)
        for method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return handler(self, body, *match.groups())
        return None

    def do_PROPFIND(self) -> None:
        self._record()
        user = self.path.removeprefix("/remote.php/dav/files/").rstrip("/")
        account = self.backend.accounts.get(user)
        if self.backend.broken:
            self._reply(500, b"broken")
        elif account is not None and account.state == "broken":
            self._reply(503, b"maintenance")
        elif self.backend.check_basic(self.headers.get("Authorization")):
            self._reply(207, b"<d:multistatus xmlns:d='DAV:'/>", "application/xml")
        else:
            self._reply(401, b"unauthorized")

    def do_POST(self) -> None:
        body = self._record()
        reply = self._route(body)
        if reply is not None:
            self._send(reply)
            return
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            self._reply(400, b"bad json")
            return
        user = request.get("user", "")
        ok = self.backend.users.get(user) == request.get("password")
        answer = {"ok": ok, "user": user, "quota": "1G"} if user in self.backend.users else {"ok": False}
        self._reply(200 if user in self.backend.users else 404, json.dumps(answer).encode(), "application/json")

    def do_GET(self) -> None:
        self._record()
        reply = self._route(b"")
        if reply is not None:
            self._send(reply)
        elif self.path == "/health":
            self._reply(200, b"ok")
        elif self.path.startswith("/users"):
            self._reply(200, json.dumps(sorted(self.backend.users)).encode(), "application/json")
        else:
            self._reply(404, b"not found")

    # --- compat API routes -------------------------------------------------------------

    def _verify(self, body: bytes, *_: str) -> Reply:
        request = json.loads(body or b"{}")
        account = self.backend.accounts.get(request.get("username", ""))
        if account is None:
            return _json(404, {"error": "no such user"})
        if account.state in _STATE_STATUS:
            return _json(_STATE_STATUS[account.state], {"error": account.state})
        if request.get("password") != account.password:
            return _json(401, {"error": "wrong password"})
        return _json(200, account.userdb)

    def _user(self, body: bytes, name: str) -> Reply:
        account = self.backend.accounts.get(name)
        if account is None:
            return _json(404, {"error": "no such user"})
        if account.state == "broken":
            return _json(500, {"error": "database unavailable"})
        return _json(200, account.userdb)

    def _mailu_passdb(self, body: bytes, name: str) -> Reply:
        account = self.backend.accounts.get(name)
        if account is None:
            return _json(404, {})
        if account.state == "broken":
            return Reply(502, b"bad gateway")
        return _json(200, account.passdb or {"password": "{PLAIN}" + account.password})

    def _mailu_userdb(self, body: bytes, name: str) -> Reply:
        account = self.backend.accounts.get(name)
        if account is None:
            return _json(404, {})
        if account.state == "broken":
            return Reply(502, b"bad gateway")
        return _json(200, account.userdb)

    def _mailu_users(self, *_: str) -> Reply:
        return _json(200, sorted(self.backend.accounts))

    def _nginx(self, *_: str) -> Reply:
        account = self.backend.accounts.get(self.headers.get("Auth-User", ""))
        if account is not None and account.state == "broken":
            return Reply(502, b"bad gateway")
        if account is None or account.proxy is None or self.headers.get("Auth-Pass") != account.password:
            return Reply(200, headers=(("Auth-Status", "Invalid credentials"), ("Auth-Wait", "3")))
        host, port, destuser = account.proxy
        headers = (("Auth-Status", "OK"), ("Auth-Server", host), ("Auth-Port", str(port)))
        return Reply(200, headers=(*headers, ("Auth-User", destuser)))

    def _bearer_ok(self) -> bool:
        return bool(self.backend.token) and self.headers.get("Authorization") == f"Bearer {self.backend.token}"

    def _userli_status(self, *_: str) -> Reply:
        if not self._bearer_ok():
            return _json(401, {"message": "unauthorized"})
        return _json(200, {"message": "success"})

    def _userli_verify(self, body: bytes, name: str) -> Reply:
        if not self._bearer_ok():
            return _json(401, {"message": "unauthorized"})
        account = self.backend.accounts.get(name)
        if account is None:
            return _json(404, {"message": "user not found"})
        if account.state in _STATE_STATUS:
            return _json(_STATE_STATUS[account.state], {"message": account.state})
        if json.loads(body or b"{}").get("password") != account.password:
            return _json(401, {"message": "authentication failed"})
        return _json(200, {"message": "success", "body": account.userdb})

    def _userli_lookup(self, body: bytes, name: str) -> Reply:
        if not self._bearer_ok():
            return _json(401, {"message": "unauthorized"})
        account = self.backend.accounts.get(name)
        if account is None:
            return _json(404, {"message": "user not found"})
        if account.state == "broken":
            return _json(500, {"message": "internal error"})
        return _json(200, {"message": "success", "body": account.userdb})


_ROUTES: tuple[tuple[str, str, Callable[..., Reply]], ...] = (
    ("POST", r"/api/verify", _Handler._verify),
    ("GET", r"/api/user/([^/]+)", _Handler._user),
    ("POST", r"/api/mailu/passdb/([^/]+)", _Handler._mailu_passdb),
    ("POST", r"/api/mailu/userdb/([^/]+)", _Handler._mailu_userdb),
    ("GET", r"/api/mailu/users", _Handler._mailu_users),
    ("GET", r"/auth/email", _Handler._nginx),
    ("GET", r"/api/dovecot/status", _Handler._userli_status),
    ("POST", r"/api/dovecot/([^/]+)", _Handler._userli_verify),
    ("GET", r"/api/dovecot/([^/]+)", _Handler._userli_lookup),
)


class HttpBackend:
    """Start with `with HttpBackend(Backend(users={...})) as server:`; `server.url` is the base."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        handler = type("Handler", (_Handler,), {"backend": backend})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HttpBackend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

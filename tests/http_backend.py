"""A real local HTTP server for tests: Nextcloud-style WebDAV auth and JSON APIs.

Runs in a thread on 127.0.0.1 with an ephemeral port, records every request, and
answers from a small user table, so Lua scripts under test make real HTTP calls.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Backend:
    """Users and behaviour of the fake backend; `seen` lists the requests it got."""

    users: dict[str, str] = field(default_factory=dict)
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
        if self.backend.delay:
            time.sleep(self.backend.delay)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PROPFIND(self) -> None:
        self._record()
        if self.backend.broken:
            self._reply(500, b"broken")
        elif self.backend.check_basic(self.headers.get("Authorization")):
            self._reply(207, b"<d:multistatus xmlns:d='DAV:'/>", "application/xml")
        else:
            self._reply(401, b"unauthorized")

    def do_POST(self) -> None:
        body = self._record()
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            self._reply(400, b"bad json")
            return
        user = request.get("user", "")
        ok = self.backend.users.get(user) == request.get("password")
        answer = {"ok": ok, "user": user, "quota": "1G"} if user in self.backend.users else {"ok": False}
        self._reply(
            200 if user in self.backend.users else 404, json.dumps(answer).encode(), "application/json"
        )

    def do_GET(self) -> None:
        self._record()
        if self.path == "/health":
            self._reply(200, b"ok")
        elif self.path.startswith("/users"):
            self._reply(200, json.dumps(sorted(self.backend.users)).encode(), "application/json")
        else:
            self._reply(404, b"not found")


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

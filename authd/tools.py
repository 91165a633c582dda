"""Small blocking clients for the CLI: `authd test`, `authd lookup`, `authd list`.

They speak the same protocols as doveadm (auth-client for test, auth-master for
lookups) so admins can check any Dovecot-protocol auth server, authd or Dovecot.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import socket
from dataclasses import dataclass

from protocol.escape import split_tabescaped, tab_escape


class ToolError(Exception):
    """The server could not be reached or answered something unexpected."""


@dataclass
class AuthReply:
    ok: bool
    fields: list[tuple[str, str | None]]
    line: bytes


def _connect(where: str, timeout: float) -> socket.socket:
    if ":" in where and not where.startswith("/") and not os.path.exists(where):
        host, _, port = where.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(where)
    return sock


class _Lines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ToolError(f"connection closed by server (received so far: {self.buffer!r})")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def authenticate(
    where: str,
    user: str,
    password: str,
    *,
    mechanism: str = "PLAIN",
    params: list[tuple[str, str]] | None = None,
    timeout: float = 30.0,
) -> AuthReply:
    """Authenticate once with PLAIN or LOGIN and return the server's final reply."""
    try:
        sock = _connect(where, timeout)
    except OSError as exc:
        raise ToolError(f"{where}: {exc.strerror or exc}") from None
    try:
        lines = _Lines(sock)
        sock.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
        mechs = []
        while True:
            line = lines.read()
            if line.startswith(b"MECH\t"):
                mechs.append(line.split(b"\t")[1].upper())
            if line.startswith(b"SPID\t") and not mechs:
                raise ToolError("this is an auth-master socket, not an auth-client socket")
            if line == b"DONE":
                break
        if mechanism.upper().encode() not in mechs:
            raise ToolError(f"the server does not offer {mechanism.upper()} (offers: {b' '.join(mechs).decode()})")
        fields = [b"service=" + tab_escape(b"authd-test")]
        for key, value in params or []:
            if key == "service":
                fields[0] = b"service=" + tab_escape(value.encode())
            else:
                fields.append(tab_escape(f"{key}={value}".encode()))
        request = b"AUTH\t1\t" + mechanism.upper().encode() + b"\t" + b"\t".join(fields)
        if mechanism.upper() == "PLAIN":
            initial = b"\0" + user.encode() + b"\0" + password.encode()
            sock.sendall(request + b"\tresp=" + base64.b64encode(initial) + b"\n")
            answers: list[bytes] = []
        else:
            sock.sendall(request + b"\n")
            answers = [user.encode(), password.encode()]
        while True:
            line = lines.read()
            parts = split_tabescaped(line)
            if parts[0] == b"CONT":
                if not answers:
                    raise ToolError(f"unexpected challenge: {line!r}")
                sock.sendall(b"CONT\t1\t" + base64.b64encode(answers.pop(0)) + b"\n")
                continue
            if parts[0] in (b"OK", b"FAIL"):
                out = []
                for part in parts[2:]:
                    name, sep, raw = part.partition(b"=")
                    out.append((name.decode("utf-8", "replace"), raw.decode("utf-8", "replace") if sep else None))
                return AuthReply(parts[0] == b"OK", out, line)
            raise ToolError(f"unexpected reply: {line!r}")
    except OSError as exc:
        raise ToolError(f"{where}: {exc.strerror or exc}") from None
    finally:
        sock.close()


def server_pid(where: str, *, timeout: float = 10.0) -> int:
    """The pid a running authd greets with (SPID), on any of its sockets."""
    try:
        sock = _connect(where, timeout)
        try:
            lines = _Lines(sock)
            sock.sendall(b"VERSION\t1\t2\n")
            while True:
                parts = lines.read().split(b"\t")
                if parts[0] == b"SPID" and len(parts) > 1 and parts[1].isdigit():
                    return int(parts[1])
        finally:
            sock.close()
    except OSError as exc:
        raise ToolError(f"{where}: {exc.strerror or exc}") from None


def _master(where: str, timeout: float) -> tuple[socket.socket, _Lines]:
    sock = _connect(where, timeout)
    lines = _Lines(sock)
    sock.sendall(b"VERSION\t1\t0\n")
    while True:
        line = lines.read()
        if line.startswith(b"MECH\t") or line.startswith(b"COOKIE\t"):
            raise ToolError("this is an auth-client socket, not an auth-master/userdb socket")
        if line.startswith(b"SPID\t"):
            return sock, lines


@dataclass
class UserReply:
    found: bool
    user: str
    fields: list[tuple[str, str | None]]
    failed: bool = False


def _decode_fields(parts: list[bytes]) -> list[tuple[str, str | None]]:
    out = []
    for part in parts:
        if not part:
            continue
        key, sep, value = part.partition(b"=")
        out.append((key.decode("utf-8", "replace"), value.decode("utf-8", "replace") if sep else None))
    return out


def user_lookup(where: str, user: str, *, service: str = "authd-lookup", timeout: float = 30.0) -> UserReply:
    """USER: a userdb lookup on an auth-master or auth-userdb socket, like `doveadm user`."""
    try:
        sock, lines = _master(where, timeout)
        try:
            sock.sendall(
                b"USER\t1\t" + tab_escape(user.encode()) + b"\tservice=" + tab_escape(service.encode()) + b"\n"
            )
            parts = split_tabescaped(lines.read())
        finally:
            sock.close()
    except OSError as exc:
        raise ToolError(f"{where}: {exc.strerror or exc}") from None
    if parts[0] == b"USER":
        return UserReply(True, parts[2].decode("utf-8", "replace"), _decode_fields(parts[3:]))
    if parts[0] == b"NOTFOUND":
        return UserReply(False, user, [])
    if parts[0] == b"FAIL":
        return UserReply(False, user, _decode_fields(parts[2:]), failed=True)
    raise ToolError(f"unexpected reply: {parts!r}")


def cache_flush(where: str, users: list[str], *, timeout: float = 30.0) -> int:
    """CACHE-FLUSH on an auth-master socket, like `doveadm auth cache flush`: entries removed."""
    try:
        sock, lines = _master(where, timeout)
        try:
            sock.sendall(b"\t".join([b"CACHE-FLUSH", b"1", *(tab_escape(u.encode()) for u in users)]) + b"\n")
            try:
                parts = split_tabescaped(lines.read())
            except ToolError:
                raise ToolError("the server hung up: cache flush needs the auth-master socket") from None
        finally:
            sock.close()
    except OSError as exc:
        raise ToolError(f"{where}: {exc.strerror or exc}") from None
    if parts[0] == b"OK" and len(parts) > 2 and parts[2].isdigit():
        return int(parts[2])
    raise ToolError(f"unexpected reply: {parts!r}")


def list_users(where: str, mask: str = "*", *, timeout: float = 30.0) -> list[str]:
    """LIST: every user the userdbs can iterate, like `doveadm user '*'` (filtered by MASK)."""
    try:
        sock, lines = _master(where, timeout)
        try:
            sock.sendall(b"LIST\t1\tuser=" + tab_escape(mask.encode()) + b"\tservice=authd-list\n")
            users = []
            while True:
                parts = split_tabescaped(lines.read())
                if parts[0] == b"LIST" and len(parts) > 2 and parts[2]:
                    users.append(parts[2].decode("utf-8", "replace"))
                elif parts[0] == b"DONE":
                    if parts[2:3] == [b"fail"]:
                        raise ToolError("user listing failed (see the server's log)")
                    break
        finally:
            sock.close()
    except OSError as exc:
        raise ToolError(f"{where}: {exc.strerror or exc}") from None
    return [name for name in users if fnmatch.fnmatchcase(name, mask)]

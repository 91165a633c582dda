"""Helpers for the 2.4 fixtures: run authd on a fixture script, speak the wire protocols."""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path

from protocol.escape import split_tabescaped, tab_escape

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def config(script: str, *, settings: dict[str, str] | None = None, userdb: bool = True) -> str:
    """An authd.toml serving `script` as a 2.4 passdb (and userdb), no failure delay."""
    table = ", ".join(f'{key} = "{value}"' for key, value in (settings or {}).items())
    db = f'driver = "lua"\nfile = "{script}"\ndialect = "2.4"\nsettings = {{ {table} }}\n'
    text = '[auth]\nmechanisms = ["plain"]\nfailure_delay = 0\n\n[[passdb]]\n' + db
    if userdb:
        text += "\n[[userdb]]\n" + db
    return text + "\n[lua]\nworkers = 2\n"


def _lines(sock: socket.socket) -> list[bytes]:
    buffer = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return buffer.split(b"\n")
        buffer += data


def _exchange(path: Path, request: bytes, last: tuple[bytes, ...]) -> list[bytes]:
    """Send `request`, read lines until one starts with one of `last`; returns the lines after the greeting."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        sock.sendall(request)
        buffer, lines = b"", list[bytes]()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed after {lines!r}")
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                lines.append(line)
                if line.startswith(last):
                    return lines


def auth(path: Path, user: str, password: str, **fields: str) -> bytes:
    """AUTH PLAIN on an auth-client socket; the OK/FAIL line exactly as sent."""
    extra = b"".join(b"\t" + tab_escape(f"{k}={v}".encode()) for k, v in {"service": "imap", **fields}.items())
    resp = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    request = b"VERSION\t1\t2\nCPID\t%d\nAUTH\t1\tPLAIN%s\tresp=%s\n" % (os.getpid(), extra, resp)
    return _exchange(path, request, (b"OK\t1", b"FAIL\t1"))[-1]


def user(path: Path, name: str) -> bytes:
    """USER on an auth-userdb socket; the USER/NOTFOUND/FAIL line exactly as sent."""
    request = b"VERSION\t1\t0\nUSER\t1\t" + tab_escape(name.encode()) + b"\tservice=imap\n"
    return _exchange(path, request, (b"USER\t1", b"NOTFOUND\t1", b"FAIL\t1"))[-1]


def listing(path: Path) -> list[bytes]:
    """LIST on an auth-userdb socket: the LIST lines' user names and the DONE line."""
    request = b"VERSION\t1\t0\nLIST\t1\tservice=imap\n"
    lines = _exchange(path, request, (b"DONE\t1",))
    return [split_tabescaped(line)[2] for line in lines if line.startswith(b"LIST\t1\t")] + [lines[-1]]


def fields(line: bytes) -> tuple[bytes, set[bytes]]:
    """A reply line as (its first three parts, the set of its fields): Lua tables have no order."""
    parts = line.split(b"\t")
    return b"\t".join(parts[:3]), set(parts[3:])

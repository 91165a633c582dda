"""The Python halves of the `dovecot` table's functions (prelude.lua holds the Lua halves).

Lua cannot read the clock in microseconds, parse IP addresses like getaddrinfo()
or log through authd, so the prelude calls these. Each one takes and returns plain
Lua-compatible values (bytes, ints, tuples for several results).
"""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lua_api.var_expand import VarExpandError
from lua_api.var_expand24 import ExpandContext24, expand24

if TYPE_CHECKING:
    from lua_api.runtime import LuaState


@dataclass(frozen=True)
class EventLog:
    """The `context` of a log line written through a Lua event object.

    Such a line already carries the event's log prefix (e.g. `lua(user,ip): `), so
    the host must not add `db-lua: ` to it. `request` is the daemon's context of the
    request whose `req:event()` the event descends from, None for `dovecot.event()`.
    """

    request: object | None = None
    name: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    #: set_forced_debug() (2.4) on the event or a parent: debug lines are shown.
    forced_debug: bool = False


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_VALUES = {c: i for i, c in enumerate(_BASE64_ALPHABET)}
_BASE64_BLANKS = frozenset(b" \t\r\n")


def base64_decode(data: bytes) -> bytes:
    """t_base64_decode(0, ...): decode up to the first byte that is neither base64 nor blank.

    Dovecot writes each byte as soon as its bits are complete and keeps what it has
    when it meets '=' or garbage, so "QQ" gives "A" and "QUJD!x" gives "ABC".
    """
    out = bytearray()
    bits = 0
    count = 0
    for byte in data:
        value = _BASE64_VALUES.get(byte)
        if value is None:
            if byte in _BASE64_BLANKS:
                continue
            break
        if count == 0:
            bits = value
        elif count == 1:
            out.append(((bits << 2) | (value >> 4)) & 0xFF)
            bits = value
        elif count == 2:
            out.append(((bits << 4) & 0xFF) | (value >> 2))
            bits = value
        else:
            out.append(((bits << 6) & 0xC0) | value)
        count = (count + 1) % 4
    return bytes(out)


def net_ip_family(text: bytes) -> int:
    """net_addr2ip(): 4 or 6 for an address getaddrinfo(AI_NUMERICHOST) accepts, else 0."""
    text = text.split(b"\0", 1)[0]
    if b":" in text and text.startswith(b"[") and text.endswith(b"]"):
        text = text[1:-1]
    try:
        family = socket.getaddrinfo(text.decode("ascii"), None, flags=socket.AI_NUMERICHOST)[0][0]
    except (OSError, UnicodeError, ValueError):
        return 0
    return 6 if family == socket.AF_INET6 else 4


def host_functions(state: LuaState) -> dict[bytes, Any]:
    """The entries this module adds to the prelude's `host` table for `state`."""

    def event_log(level: int, text: bytes, item: Any, name: bytes | None, fields: Any, debug: bool) -> None:
        context = item.context if item is not None else None
        event_fields = {_text(k): (v if isinstance(v, int) else _text(v)) for k, v in state.to_python(fields).items()}
        event = EventLog(context, _text(name) if name is not None else None, event_fields, debug)
        state.host.log(level, _text(text), event)

    def request_log_prefix(item: Any) -> bytes:
        prefix: bytes = item.log_prefix()
        return prefix

    def gettimeofday() -> tuple[int, int]:
        now = time.time_ns() // 1000
        return now // 1_000_000, now % 1_000_000

    def var_expand(template: bytes) -> tuple[bool, bytes]:
        """dovecot.var_expand(): 2.4 templates with providers only (no variables)."""
        environment = {k.encode(): v.encode() for k, v in state.options.environment.items()}
        try:
            return True, expand24(template, {}, ExpandContext24(env=environment))
        except VarExpandError as exc:
            return False, exc.message

    functions: dict[bytes, Callable[..., Any] | bytes] = {
        b"dialect": state.options.dialect.encode(),
        b"event_log": event_log,
        b"request_log_prefix": request_log_prefix,
        b"gettimeofday": gettimeofday,
        b"nanoseconds": time.time_ns,
        b"microseconds": lambda: time.time_ns() // 1000,
        b"net_ip_family": net_ip_family,
        b"base64_encode": base64.b64encode,
        b"base64_decode": base64_decode,
        b"dovecot_var_expand": var_expand,
    }
    return functions


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")

"""auth_username_format without the general var_expand machinery, for the usual formats.

Every request runs the user name through auth_username_format ("%Lu" by default).
The general expansion builds the request's whole variable table for that; the
formats people use ("%Lu", "%u", "%n", "%Ln@%d", ...) only need the user name. For
those, `compile_username_format` returns a function that gives byte for byte what
lua_api.var_expand.expand_username_format gives; anything else keeps using it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Literal text (no NUL: C would cut the format there) and %u %n %d with at most one L/U.
_SIMPLE = re.compile(rb"(?:[^%\x00]|%[LU]?[und])*")
_PART = re.compile(rb"%([LU]?)([und])|[^%]+")

Formatter = Callable[[bytes], bytes]


def _cstr(value: bytes) -> bytes:
    """What C sees of a variable's value: everything before the first NUL."""
    return value.split(b"\x00", 1)[0]


def _variables(user: bytes) -> dict[bytes, bytes]:
    """%u, %n and %d as Dovecot 2.3's table derives them from the user name (%d is "" without @)."""
    username, _, domain = user.partition(b"@")
    return {b"u": _cstr(user), b"n": _cstr(username), b"d": _cstr(domain)}


def _unchanged(value: bytes) -> bytes:
    return value


def _modifier(flag: bytes) -> Callable[[bytes], bytes]:
    if flag == b"L":
        return bytes.lower
    if flag == b"U":
        return bytes.upper
    return _unchanged


def compile_username_format(fmt: bytes) -> Formatter | None:
    """A direct formatter for `fmt`, or None when it needs the general expansion."""
    if _SIMPLE.fullmatch(fmt) is None:
        return None
    if fmt == b"%Lu":
        return lambda user: _cstr(user).lower()  # the default: worth its own line
    parts: list[tuple[bytes, Callable[[bytes], bytes]] | bytes] = []
    for match in _PART.finditer(fmt):
        name = match.group(2)
        parts.append(match.group(0) if name is None else (name, _modifier(match.group(1))))

    def format_username(user: bytes) -> bytes:
        values = _variables(user)
        return b"".join(part if isinstance(part, bytes) else part[1](values[part[0]]) for part in parts)

    return format_username

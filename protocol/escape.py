"""Dovecot's TAB-escaping and its strict base64, byte for byte.

Values on the wire may not contain TAB, LF, CR or the escape byte 0x01 itself, so
Dovecot escapes them as 0x01 followed by '1', 't', 'r', 'n' (and NUL as '0' in the
length-aware variant). Base64 must be decoded exactly as Dovecot's decoder does:
padding required, nothing after it, whitespace ignored.
"""

from __future__ import annotations

import base64
import binascii
import re

_ESCAPES = {0x00: b"\x010", 0x01: b"\x011", 0x09: b"\x01t", 0x0D: b"\x01r", 0x0A: b"\x01n"}
_UNESCAPES = {ord("0"): b"\x00", ord("1"): b"\x01", ord("t"): b"\t", ord("r"): b"\r", ord("n"): b"\n"}
_NEEDS_ESCAPE = re.compile(rb"[\x00\x01\t\r\n]")
_BASE64_BLANKS = b" \t\r\n"
_BASE64_SHAPE = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def tab_escape(value: bytes) -> bytes:
    """Escape a value for a TAB-separated line (str_append_tabescaped_n)."""
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()[0]], value)


def tab_unescape(value: bytes) -> bytes:
    """Undo `tab_escape`; 0x01 + other byte X gives X, a trailing lone 0x01 is dropped."""
    if b"\x01" not in value:
        return value
    out = bytearray()
    i = 0
    size = len(value)
    while i < size:
        j = value.find(b"\x01", i)
        if j < 0:
            out += value[i:]
            break
        out += value[i:j]
        if j + 1 < size:
            code = value[j + 1]
            out += _UNESCAPES.get(code, bytes((code,)))
        i = j + 2
    return bytes(out)


def split_tabescaped(line: bytes) -> list[bytes]:
    """Split a line on TAB, then unescape each field (t_strsplit_tabescaped)."""
    fields = line.split(b"\t")
    if b"\x01" not in line:
        return fields  # nothing escaped (nearly every line): skip the per-field check
    return [tab_unescape(field) for field in fields]


def join_tabescaped(fields: list[bytes]) -> bytes:
    """Escape each field and join them with TAB."""
    return b"\t".join(tab_escape(field) for field in fields)


def b64decode_strict(data: bytes) -> bytes:
    """Decode base64 as Dovecot's base64_decode() does; raise ValueError on anything it rejects.

    Blanks (space, TAB, CR, LF) are ignored anywhere, even inside the padding; the
    padding must complete the last quantum exactly ("YQ==", "YWE="), and nothing but
    blanks may follow it. Python's strict mode alone would also take "YWJj=".
    """
    compact = data.translate(None, _BASE64_BLANKS)
    if _BASE64_SHAPE.fullmatch(compact) is None:
        raise ValueError("invalid base64")
    return binascii.a2b_base64(compact)


def b64encode(data: bytes) -> bytes:
    """Standard base64 with padding, as Dovecot emits it."""
    return base64.b64encode(data)

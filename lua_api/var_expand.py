"""Dovecot 2.3's ``%`` variable expansion (src/lib/var-expand.c and var-expand-if.c).

Scripts call ``req:var_expand(tpl)`` and expect Dovecot's exact output, including its
quirks (unknown variables expand to ``UNSUPPORTED_VARIABLE_<name>`` without failing,
``format=hexuc`` still prints lower case, …), so this is a faithful re-implementation
of the C state machine, not a cleaner grammar. Dovecot works on NUL-terminated
strings in the "C" locale; templates and values are cut at the first NUL to match.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from lua_api.posix_regex import POSIX_REGEX
from lua_api.request_vars import RequestVars, VarEntry, var_table_23

__all__ = ["ExpandContext", "VarExpandError", "expand", "expand_username_format"]


class VarExpandError(Exception):
    """Dovecot's var_expand failed hard (returned -1); *message* is its error text.

    Dovecot's text is a C string that may quote template bytes, so ``message`` keeps the
    bytes (str arguments are UTF-8 encoded); when Dovecot leaves the error unset its
    printf renders it as ``(null)``.
    """

    def __init__(self, message: bytes | str) -> None:
        raw = message.encode() if isinstance(message, str) else message
        super().__init__(raw.decode("utf-8", "backslashreplace"))
        self.message = raw


def _no_field(_name: bytes) -> bytes | None:
    return None


@dataclass(frozen=True, slots=True)
class ExpandContext:
    """What an expansion may consult besides the variable table.

    hostname/pid/uid/gid default to this process, as Dovecot's built-ins describe the auth
    process; env defaults to empty since Dovecot's auth process keeps only import_environment.
    """

    env: Mapping[bytes, bytes] = field(default_factory=dict)
    """Environment for ``%{env:NAME}``."""
    passdb_field: Callable[[bytes], bytes | None] = _no_field
    """Extra field set by the passdb so far, for ``%{passdb:NAME}``."""
    userdb_field: Callable[[bytes], bytes | None] = _no_field
    """Userdb reply field, for ``%{userdb:NAME}``."""
    hostname: bytes = field(default_factory=lambda: socket.gethostname().encode())
    pid: int = field(default_factory=os.getpid)
    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)


def expand(template: bytes, table: Sequence[VarEntry], context: ExpandContext) -> bytes:
    """Expand *template* like Dovecot's ``var_expand_with_funcs`` with the auth functions.

    Raises VarExpandError only where Dovecot returns -1; unknown variables are not errors.
    """
    expansion = _Expansion(table, context)
    output, ret = expansion.expand(_cstr(template))
    if ret < 0:
        raise VarExpandError(expansion.error if expansion.error is not None else b"(null)")
    return output


def expand_username_format(fmt: bytes, username: bytes, v: RequestVars, context: ExpandContext) -> bytes:
    """Apply ``auth_username_format`` (e.g. ``%Lu``) to *username*, as auth_request_fix_username does.

    Dovecot expands with the request's table where the user is *username*, and uses the
    output even when the expansion fails (it only records an error nobody reads).
    """
    table = var_table_23(dataclasses.replace(v, user=username))
    output, _ = _Expansion(table, context).expand(_cstr(fmt))
    return output


def _cstr(value: bytes) -> bytes:
    """What C sees of *value*: everything before the first NUL."""
    return value.split(b"\0", 1)[0]


def _int32(value: int) -> int:
    """Wrap like a C int (Dovecot's width arithmetic overflows silently)."""
    return (value + 0x8000_0000) % 0x1_0000_0000 - 0x8000_0000


def _parse_uint(text: bytes, limit: int) -> int | None:
    """Dovecot's strict ``str_to_uint*``: digits only, no sign, at most *limit*."""
    if not text or not text.isdigit():
        return None
    number = int(text)
    return number if number <= limit else None


def _parse_intmax(text: bytes) -> int | None:
    """Dovecot's ``str_to_intmax``: optional '-', digits, within int64."""
    negative = text.startswith(b"-")
    magnitude = _parse_uint(text[1:] if negative else text, 2**64 - 1)
    if magnitude is None:
        return None
    number = -magnitude if negative else magnitude
    return number if -(2**63) <= number < 2**63 else None


# --- hash methods (src/lib/hash-method.c) ------------------------------------------------


def _md4(data: bytes) -> bytes:
    """MD4 (RFC 1320); OpenSSL 3 no longer offers it to hashlib."""

    def rotl(x: int, n: int) -> int:
        x &= 0xFFFFFFFF
        return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF

    message = data + b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", len(data) * 8)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    for start in range(0, len(message), 64):
        x = struct.unpack("<16I", message[start : start + 64])
        aa, bb, cc, dd = a, b, c, d
        for i in range(16):
            k, s = i, (3, 7, 11, 19)[i % 4]
            f = (b & c) | (~b & d)
            a, b, c, d = d, rotl(a + f + x[k], s), b, c
        for i in range(16):
            k, s = (i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]
            g = (b & c) | (b & d) | (c & d)
            a, b, c, d = d, rotl(a + g + x[k] + 0x5A827999, s), b, c
        for i in range(16):
            k, s = (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15)[i], (3, 9, 11, 15)[i % 4]
            h = b ^ c ^ d
            a, b, c, d = d, rotl(a + h + x[k] + 0x6ED9EBA1, s), b, c
        a, b, c, d = ((new + old) & 0xFFFFFFFF for new, old in ((a, aa), (b, bb), (c, cc), (d, dd)))
    return struct.pack("<4I", a, b, c, d)


def _hashlib_digest(name: str) -> Callable[[bytes], bytes]:
    return lambda data: hashlib.new(name, data).digest()


def _size_digest(data: bytes) -> bytes:
    """Dovecot's pseudo-hash "size": the input length as a 64-bit big-endian number."""
    return struct.pack(">Q", len(data))


# name -> (digest function, digest size); "size" counts bytes instead of hashing
_HASH_METHODS: dict[bytes, tuple[Callable[[bytes], bytes], int]] = {
    b"md4": (_md4, 16),
    b"md5": (_hashlib_digest("md5"), 16),
    b"sha1": (_hashlib_digest("sha1"), 20),
    b"sha256": (_hashlib_digest("sha256"), 32),
    b"sha384": (_hashlib_digest("sha384"), 48),
    b"sha512": (_hashlib_digest("sha512"), 64),
    b"sha3-256": (_hashlib_digest("sha3_256"), 32),
    b"sha3-512": (_hashlib_digest("sha3_512"), 64),
    b"size": (_size_digest, 8),
}
# pkcs5 derives HMAC_MAX_CONTEXT_SIZE (= sizeof(struct sha512_ctx) on 64-bit) bytes
_PKCS5_KEY_LENGTH = 336


def _truncate_rshift_bits(data: bytes, bits: int) -> bytes:
    """Keep the first *bits* bits, right-aligned (Dovecot's buffer_truncate_rshift_bits).

    Callers cap *bits* at the digest size, so *data* always holds that many.
    """
    kept = data[: (bits + 7) // 8]
    spare = (8 - bits % 8) % 8
    return (int.from_bytes(kept, "big") >> spare).to_bytes(len(kept), "big")


# --- %{if;…} comparisons (src/lib/var-expand-if.c, src/lib/wildcard-match.c) ----------


def _wildcard_match(data: bytes, mask: bytes) -> bool:
    """Dovecot's wildcard_match: '*' any run, '?' one byte, matched from the end."""
    if not data:
        return mask.lstrip(b"*") == b""
    m, d = len(mask) - 1, len(data) - 1
    star_mask: int | None = None  # mask position left of the last '*' seen
    star_data = 0  # data position where that '*' started matching
    while d >= 0:
        if m < 0:
            if star_mask is None:
                return False
            star_data -= 1
            d, m = star_data, star_mask
            if d < 0:
                star_mask = None
        char = mask[m]
        if char == ord("*"):
            while m >= 0 and mask[m] == ord("*"):
                m -= 1
            star_mask, star_data = m, d
            if m < 0:
                return True
        elif char == ord("?") or char == data[d]:
            m -= 1
            d -= 1
        elif star_mask is not None:
            star_data -= 1
            d, m = star_data, star_mask
            if d < 0:
                star_mask = None
        else:
            return False
    while m >= 0 and mask[m] == ord("*"):
        m -= 1
    return m < 0


_NUMERIC_OPS: dict[bytes, Callable[[int, int], bool]] = {
    b"==": lambda a, b: a == b,
    b"<": lambda a, b: a < b,
    b"<=": lambda a, b: a <= b,
    b">": lambda a, b: a > b,
    b">=": lambda a, b: a >= b,
    b"!=": lambda a, b: a != b,
}
_STRING_OPS: dict[bytes, Callable[[bytes, bytes], bool]] = {
    b"eq": lambda a, b: a == b,
    b"lt": lambda a, b: a < b,
    b"le": lambda a, b: a <= b,
    b"gt": lambda a, b: a > b,
    b"ge": lambda a, b: a >= b,
    b"ne": lambda a, b: a != b,
    b"*": _wildcard_match,
    b"!*": lambda a, b: not _wildcard_match(a, b),
}
_REGEX_OPS = {b"~": False, b"!~": True}  # operator -> negate


# --- per-variable modifiers ----------------------------------------------------------


@dataclass(slots=True)
class _FieldFormat:
    """The ``%[-][0]W[.[0][-]W]`` part of one variable; H and N consume it."""

    offset: int = 0
    width: int = 0
    zero_padding: bool = False


def _escape(value: bytes, _fmt: _FieldFormat) -> bytes:
    return value.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"'", b"\\'")


def _to_hex(value: bytes, _fmt: _FieldFormat) -> bytes:
    number = _parse_uint(value, 2**64 - 1)
    return b"%x" % (number or 0)


def _pad_hash(number: int, fmt: _FieldFormat) -> bytes:
    """Hex of the hash, zero-padded to the offset (which H/N reuse as a length)."""
    text = b"%x" % number
    if len(text) < fmt.offset:
        text = b"0" * (fmt.offset - len(text)) + text
    fmt.offset = 0
    return text


def _str_hash(value: bytes, fmt: _FieldFormat) -> bytes:
    """``H``: Dovecot's str_hash (PJW-style), modulo the width."""
    number = 0
    for byte in value:
        number = ((number << 4) + byte) & 0xFFFFFFFF
        high = number & 0xF000_0000
        if high:
            number ^= high >> 24
            number ^= high
    if fmt.width != 0:
        number %= fmt.width & 0xFFFFFFFF
        fmt.width = 0
    return _pad_hash(number, fmt)


def _md5_hash(value: bytes, fmt: _FieldFormat) -> bytes:
    """``N``: first 64 bits of MD5, modulo the width, printed as 32 bits."""
    number = int.from_bytes(hashlib.md5(value).digest()[:8], "big")
    if fmt.width != 0:
        number %= fmt.width & 0xFFFF_FFFF_FFFF_FFFF
        fmt.width = 0
    return _pad_hash(number & 0xFFFFFFFF, fmt)


_MAX_MODIFIERS = 10
_MODIFIERS: dict[int, Callable[[bytes, _FieldFormat], bytes]] = {
    ord("L"): lambda value, _fmt: value.lower(),
    ord("U"): lambda value, _fmt: value.upper(),
    ord("E"): _escape,
    ord("X"): _to_hex,
    ord("R"): lambda value, _fmt: value[::-1],
    ord("H"): _str_hash,
    ord("N"): _md5_hash,
    ord("M"): lambda value, _fmt: hashlib.md5(value).hexdigest().encode(),
    ord("D"): lambda value, _fmt: value.replace(b".", b",dc="),
    ord("T"): lambda value, _fmt: value.rstrip(),
}


def _apply_format(value: bytes, fmt: _FieldFormat) -> bytes:
    if fmt.offset < 0:
        if len(value) > -fmt.offset:
            value = value[len(value) + fmt.offset :]
    else:
        value = value[fmt.offset :]
    if fmt.width == 0:
        return value
    if fmt.zero_padding:
        return b"0" * max(fmt.width - len(value), 0) + value
    width = _int32(len(value) + fmt.width) if fmt.width < 0 else fmt.width
    return value if width < 0 else value[:width]


# --- the expansion state machine -----------------------------------------------------

_PERCENT, _LBRACE, _RBRACE, _BACKSLASH = b"%{}\\"


class _Expansion:
    """One top-level expansion; *error* mirrors Dovecot's shared ``error_r``.

    Dovecot threads one error pointer through all nested expansions, resetting it at
    each (nested) start and overwriting it in some places only; the final message
    depends on that order, so it is reproduced step by step.
    """

    def __init__(self, table: Sequence[VarEntry], context: ExpandContext) -> None:
        self.context = context
        self.error: bytes | None = None
        self._short_values: dict[int, bytes] = {}
        self._long_values: dict[bytes, bytes] = {}
        for entry in table:
            value = _cstr(entry.value) if entry.value is not None else b""
            if entry.short is not None and len(entry.short.encode()) == 1:
                self._short_values.setdefault(entry.short.encode()[0], value)
            if entry.long is not None:
                self._long_values.setdefault(entry.long.encode(), value)

    def expand(self, template: bytes) -> tuple[bytes, int]:
        """var_expand_with_funcs: (output, 1 ok / 0 unknown variable / -1 error)."""
        self.error = None
        out = bytearray()
        final_ret = 1
        end = len(template)
        pos = 0
        while pos < end:
            if template[pos] != _PERCENT:
                out.append(template[pos])
                pos += 1
                continue
            pos += 1
            fmt, pos = self._parse_format(template, pos)
            modifiers: list[Callable[[bytes, _FieldFormat], bytes]] = []
            while len(modifiers) < _MAX_MODIFIERS and pos < end and template[pos] in _MODIFIERS:
                modifiers.append(_MODIFIERS[template[pos]])
                pos += 1
            if pos >= end:
                break
            if template[pos] == _LBRACE and template.find(b"}", pos) >= 0:
                close = self._matching_brace(template, pos)
                value, ret = self._long_variable(template[pos + 1 : close])
                pos = close
            else:
                value, ret = self._short_variable(template[pos])
            final_ret = min(final_ret, ret)
            if ret <= 0:
                out += value
            else:
                for modifier in modifiers:
                    value = modifier(value, fmt)
                out += _apply_format(value, fmt)
            pos += 1
        return bytes(out), final_ret

    @staticmethod
    def _parse_format(template: bytes, pos: int) -> tuple[_FieldFormat, int]:
        fmt = _FieldFormat()
        end = len(template)
        sign = 1

        def digits(pos: int) -> tuple[int, int]:
            number = 0
            while pos < end and template[pos] in b"0123456789":
                number = _int32(number * 10 + template[pos] - ord("0"))
                pos += 1
            return number, pos

        if pos < end and template[pos] == ord("-"):
            sign = -1
            pos += 1
        if pos < end and template[pos] == ord("0"):
            fmt.zero_padding = True
            pos += 1
        fmt.width, pos = digits(pos)
        if pos < end and template[pos] == ord("."):
            # the number before '.' is the offset; zero padding belongs to the width
            fmt.offset = _int32(sign * fmt.width)
            sign = 1
            pos += 1
            fmt.zero_padding = pos < end and template[pos] == ord("0")
            if fmt.zero_padding:
                pos += 1
            if pos < end and template[pos] == ord("-"):
                sign = -1
                pos += 1
            width, pos = digits(pos)
            fmt.width = _int32(sign * width)
        return fmt, pos

    @staticmethod
    def _matching_brace(template: bytes, pos: int) -> int:
        """Index of the '}' closing the '{' at *pos* (backslash skips a byte), else len(template).

        Dovecot reads past the string's end in the unclosed case; stopping is the sane reading.
        """
        depth = 1
        escape = False
        end = pos
        while True:
            end += 1
            if end >= len(template) or depth <= 0:
                break
            char = template[end]
            if not escape and char == _BACKSLASH:
                escape = True
                continue
            if escape:
                escape = False
                continue
            if char == _LBRACE:
                depth += 1
            elif char == _RBRACE:
                depth -= 1
        return end - 1 if depth == 0 else end

    def _short_variable(self, key: int) -> tuple[bytes, int]:
        value = self._short_values.get(key)
        if value is not None:
            return value, 1
        if key == _PERCENT:
            return b"%", 1
        if self.error is None:
            self.error = b"Unknown variable '%" + bytes([key]) + b"'"
        return b"UNSUPPORTED_VARIABLE_" + bytes([key]), 0

    def _long_variable(self, key: bytes) -> tuple[bytes, int]:
        """var_expand_long: table first, then built-ins, then ``name:data`` functions."""
        value = self._long_values.get(key)
        if value is not None:
            return value, 1
        builtin = {
            b"pid": b"%d" % self.context.pid,
            b"uid": b"%d" % self.context.uid,
            b"gid": b"%d" % self.context.gid,
            b"hostname": _cstr(self.context.hostname),
        }.get(key)
        if builtin is not None:
            return builtin, 1
        name, _, data = key.partition(b":")
        result, ret = self._extension(name, data)
        return (result if result is not None else b""), ret

    def _extension(self, name: bytes, data: bytes) -> tuple[bytes | None, int]:
        """Hash/pkcs5/if extensions (matched case-insensitively up to ';'), else functions."""
        base = name.split(b";", 1)[0].lower()
        if base in _HASH_METHODS or base == b"pkcs5":
            return self._hash(name, data)
        if base == b"if":
            return self._if(name, data)
        value, ret = self._function(name, data)
        if ret == 0:
            self.error = b"Unknown variable '%" + name + b"'"
        return value, ret

    def _function(self, name: bytes, data: bytes) -> tuple[bytes, int]:
        if name == b"env":
            return _cstr(self.context.env.get(data, b"")), 1
        lookups = {b"passdb": self.context.passdb_field, b"userdb": self.context.userdb_field}
        lookup = lookups.get(name)
        if lookup is not None:
            field_name, _, default = data.partition(b":")
            value = lookup(field_name)
            return _cstr(value if value is not None else default), 1
        if self.error is None:
            self.error = b"Unknown variable '%" + name + b"'"
        return b"UNSUPPORTED_VARIABLE_" + name, 0

    def _hash(self, name: bytes, data: bytes) -> tuple[bytes | None, int]:
        """``%{algo[;rounds=N,truncate=BITS,salt=TPL,format=F]:variable}`` (var_expand_hash)."""
        algo, _, arg_text = name.partition(b";")
        args = arg_text.split(b",") if b";" in name else []
        pkcs5 = algo == b"pkcs5"
        method = _HASH_METHODS.get(b"sha256" if pkcs5 else algo)
        if method is None:  # matched only case-insensitively: Dovecot yields "" then
            return None, 0
        digest, digest_size = method
        value, ret = self._long_variable(data)
        if ret < 1:
            return None, ret
        rounds = 2048 if pkcs5 else 1
        truncate_bits = 0
        encoding = b"hex"
        salt = data if pkcs5 else b""  # pkcs5's default salt is the variable's *name*
        for arg in args:
            key, eq, arg_value = arg.partition(b"=")
            if not eq:
                continue
            if key == b"rounds":
                parsed = _parse_uint(arg_value, 0xFFFFFFFF)
                if parsed is None:
                    return self._fail(b"Cannot parse hash arguments:'%s' is not number for rounds" % arg_value)
                if parsed < 1:
                    return self._fail(b"Cannot parse hash arguments:rounds must be at least 1")
                rounds = parsed
            elif key == b"truncate":
                parsed = _parse_uint(arg_value, 0xFFFFFFFF)
                if parsed is None:
                    return self._fail(b"Cannot parse hash arguments:'%s' is not number for truncbits" % arg_value)
                truncate_bits = min(parsed, digest_size * 8)
            elif key == b"salt":
                salt, salt_ret = self.expand(arg_value)
                if salt_ret < 0:
                    return None, -1
                break  # Dovecot stops reading arguments after the salt
            elif key == b"format":
                if arg_value not in (b"hex", b"hexuc", b"base64"):
                    return self._fail(b"Cannot parse hash arguments:'%s' is not supported format" % arg_value)
                encoding = arg_value
        if pkcs5:
            result = hashlib.pbkdf2_hmac("sha256", value, salt, rounds, _PKCS5_KEY_LENGTH)
        else:
            result = value
            for _ in range(rounds):
                result = digest(salt + result)
        if truncate_bits > 0:
            result = _truncate_rshift_bits(result, truncate_bits)
        if encoding == b"base64":
            return base64.b64encode(result), 1
        return result.hex().encode(), 1  # "hexuc" too: Dovecot prints lower case for both

    def _if(self, name: bytes, data: bytes) -> tuple[bytes | None, int]:
        """``%{if;lhs;op;rhs;then[;else]}`` (var_expand_if)."""
        text = name + b":" + data
        start = text.find(b";")
        if start < 0:
            return self._fail(b"if: missing parameter(s)")
        params = self._split_if_params(text[start + 1 :])
        if len(params) == 4:
            params.append(b"")
        elif len(params) != 5:
            return self._fail(b"if: requires four or five parameters, got %d" % len(params))
        expanded = []
        for param in params:
            value, ret = self.expand(param)
            if ret <= 0:
                return None, ret
            expanded.append(value)
        lhs, op, rhs, then, otherwise = expanded
        outcome = self._compare(lhs, op, rhs)
        if outcome is None:
            return None, -1
        return (then if outcome else otherwise), 1

    @staticmethod
    def _split_if_params(text: bytes) -> list[bytes]:
        """Split on ';' outside ``%{…}``, stopping at a top-level ':'; '\\' takes the next byte."""
        params: list[bytes] = []
        current = bytearray()
        depth = 0
        escape = maybe_variable = False
        for char in text:
            if char == _BACKSLASH:
                escape = True
                continue
            if escape:
                current.append(char)
                escape = False
                continue
            if char == _PERCENT:
                maybe_variable = True
            elif maybe_variable and char == _LBRACE:
                depth += 1
                maybe_variable = False
            elif depth > 0 and char == _RBRACE:
                depth -= 1
            elif depth == 0 and char == ord(";"):
                params.append(bytes(current))
                current = bytearray()
                continue
            elif depth == 0 and char == ord(":"):
                break
            current.append(char)
        if current:
            params.append(bytes(current))
        return params

    def _compare(self, lhs: bytes, op: bytes, rhs: bytes) -> bool | None:
        """The comparison's truth, or None after recording Dovecot's error."""
        numeric = _NUMERIC_OPS.get(op)
        if numeric is not None:
            left, right = _parse_intmax(lhs), _parse_intmax(rhs)
            if left is None:
                self.error = b"if: %s (lhs) is not a number" % lhs
                return None
            if right is None:
                self.error = b"if: %s (rhs) is not a number" % rhs
                return None
            return numeric(left, right)
        string_op = _STRING_OPS.get(op)
        if string_op is not None:
            return string_op(lhs, rhs)
        negate = _REGEX_OPS.get(op)
        if negate is None:
            self.error = b"if: Unsupported comparator '%s'" % op
            return None
        matched = POSIX_REGEX.search(rhs, lhs)
        if isinstance(matched, bytes):
            self.error = b"if: regex failed: " + matched
            return None
        return (matched is not None) != negate

    def _fail(self, message: bytes) -> tuple[None, int]:
        self.error = message
        return None, -1

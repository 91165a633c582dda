"""Turning what an entry point returned into a result, by Dovecot's rules.

Dovecot 2.3.19 (db-lua.c) is lenient in odd ways and crashes in others; we keep
the leniency byte for byte and turn each crash into a clean internal failure with
a log line saying why. The Lua side (prelude.lua) has already described the
returned values in plain data; this module applies the dialect's rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class PassdbResult(enum.IntEnum):
    INTERNAL_FAILURE = -1
    SCHEME_NOT_AVAILABLE = -2
    USER_UNKNOWN = -3
    USER_DISABLED = -4
    PASS_EXPIRED = -5
    NEXT = -6
    PASSWORD_MISMATCH = 0
    OK = 1


class UserdbResult(enum.IntEnum):
    INTERNAL_FAILURE = -1
    USER_UNKNOWN = -2
    OK = 1


class EntryKind(enum.Enum):
    PASSDB_LOOKUP = "auth_passdb_lookup"
    PASSWORD_VERIFY = "auth_password_verify"
    USERDB_LOOKUP = "auth_userdb_lookup"


@dataclass(frozen=True, slots=True)
class LookupResult:
    """A normalised answer from a passdb/userdb entry point.

    `fields` are exported key/value pairs in the order Dovecot would set them;
    for passdb lookups the `password` field is taken out into `password`, as the
    script wrote it (perhaps with a {SCHEME} prefix). `password_in_table` tells
    which form it came in: only the table form honours the passdb's default
    scheme, the string form means PLAIN. `error` is the text Dovecot would log
    for an internal failure.
    """

    code: int
    fields: tuple[tuple[bytes, bytes], ...] = ()
    password: bytes | None = None
    password_in_table: bool = False
    error: str | None = None
    warnings: tuple[str, ...] = ()
    #: For a failed call: timeout, memory, broken or error (CallOutcome.failure_kind).
    failure_kind: str | None = None

    @property
    def internal_failure(self) -> bool:
        return self.code == PassdbResult.INTERNAL_FAILURE


def _unsigned(value: Any) -> bytes:
    """dec2str(lua_tointeger(v)): an unsigned 64-bit rendering (-5 -> 18446744073709551611)."""
    return b"%d" % (int(value) & 0xFFFFFFFFFFFFFFFF)


def _crash(fn: str, why: str) -> LookupResult:
    return LookupResult(
        PassdbResult.INTERNAL_FAILURE,
        error=f"db-lua: {fn} returned {why}; Dovecot 2.3 would crash on this, failing the request",
    )


def _bad_key(key: bytes) -> str | None:
    if key == b"":
        return "an empty field name"
    if b"\t" in key or b"\n" in key:
        return "a field name with TAB or LF"
    return None


def _take_password(
    fields: list[tuple[bytes, bytes]], kind: EntryKind
) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """Lookups capture `password` separately; everywhere else it is a plain field."""
    if kind is not EntryKind.PASSDB_LOOKUP:
        return fields, None
    password: bytes | None = None
    kept = []
    for key, value in fields:
        if key == b"password":
            password = value
        else:
            kept.append((key, value))
    return kept, password


def lookup_result_23(kind: EntryKind, description: tuple[Any, ...]) -> LookupResult:
    """Apply Dovecot 2.3.19's rules to a described (code, data) return."""
    is_number, code, code_type, data_type, data, crash, warnings = [*description, *[None] * 7][:7]
    fn = kind.value if kind is EntryKind.PASSWORD_VERIFY else f"{kind.value}(req)"
    failure = UserdbResult.INTERNAL_FAILURE if kind is EntryKind.USERDB_LOOKUP else PassdbResult.INTERNAL_FAILURE
    if not is_number:
        return LookupResult(
            failure, error=f"db-lua: {fn} invalid return value (expected number got {_name(code_type)})"
        )
    if data_type not in (b"string", b"number", b"table"):
        return LookupResult(
            failure,
            error=f"db-lua: {fn} invalid return value (expected string or table, got {_name(data_type)})",
        )
    ok = 1
    if data_type == b"table":
        if code != ok:
            return LookupResult(code, error="userdb failed" if kind is EntryKind.USERDB_LOOKUP else "passb failed")
        if crash is not None:
            return _crash(fn, _name(crash))
        flat = data or []
        fields = [(flat[i], _field_value(flat[i + 1])) for i in range(0, len(flat), 2)]
        for key, _ in fields:
            if (why := _bad_key(key)) is not None:
                return _crash(fn, why)
        kept, password = _take_password(fields, kind)
        notes = tuple(w.decode("utf-8", "replace") for w in (warnings or []))
        return LookupResult(code, tuple(kept), password, password_in_table=True, warnings=notes)
    text: bytes = data if isinstance(data, bytes) else b""
    if code not in (ok, PassdbResult.NEXT) or (kind is EntryKind.USERDB_LOOKUP and code != ok):
        return LookupResult(code, error=text.decode("utf-8", "replace"))
    fields = [_split_token(token) for token in text.split(b" ") if token]
    for key, _ in fields:
        if (why := _bad_key(key)) is not None:
            return _crash(fn, why)
    kept, password = _take_password(fields, kind)
    return LookupResult(code, tuple(kept), password)


def _field_value(value: Any) -> bytes:
    """A value as prelude.lua described it: bytes, an integer, or False for an unsupported type."""
    if isinstance(value, bytes):
        return value
    if value is False:
        return b""  # 2.3.19 still sets the field, to ""
    return _unsigned(value)


def lookup_result_24(kind: EntryKind, description: tuple[Any, ...]) -> LookupResult:
    """Apply Dovecot 2.4.1+'s rules: OK takes a table or nil, other codes a string or nil.

    db-lua.c auth_lua_call_lookup / auth_lua_call_password_verify /
    auth_lua_export_table; bad field names and values are skipped with a warning.
    """
    is_number, code, code_type, data_type, data, crash = [*description, *[None] * 6][:6]
    fn = kind.value if kind is EntryKind.PASSWORD_VERIFY else f"{kind.value}(req)"
    userdb = kind is EntryKind.USERDB_LOOKUP
    failure = UserdbResult.INTERNAL_FAILURE if userdb else PassdbResult.INTERNAL_FAILURE
    if not is_number:
        return LookupResult(
            failure, error=f"db-lua: {fn} invalid return value (expected number got {_name(code_type)})"
        )
    if code != 1:
        if data_type not in (b"string", b"number", b"nil"):
            return LookupResult(
                failure,
                error=f"db-lua: {fn} invalid error return value (expected nil or string, got {_name(data_type)})",
            )
        if data_type == b"nil":
            return LookupResult(code, error="userdb failed" if userdb else "passdb failed")
        text: bytes = data if isinstance(data, bytes) else b""
        return LookupResult(code, error=text.decode("utf-8", "replace"))
    if data_type not in (b"table", b"nil"):
        return LookupResult(
            failure, error=f"db-lua: {fn} invalid return value (expected nil or table, got {_name(data_type)})"
        )
    if crash is not None:
        return _crash(fn, _name(crash))
    flat = data or []
    fields: list[tuple[bytes, bytes]] = []
    warnings: list[str] = []
    for i in range(0, len(flat), 2):
        key, value = flat[i], flat[i + 1]
        shown = key.decode("utf-8", "replace")
        if key == b"":
            warnings.append("Field key cannot be empty - ignoring")
        elif any(c in key for c in b"\t\n\r"):
            warnings.append("Field key cannot contain <CR>, <LF> or <TAB> - ignoring")
        elif value is False:
            warnings.append(f"'{shown}' has invalid value type no value - ignoring")
        else:
            fields.append((key, _field_value(value)))
    kept, password = _take_password(fields, kind)
    return LookupResult(code, tuple(kept), password, password_in_table=True, warnings=tuple(warnings))


def _split_token(token: bytes) -> tuple[bytes, bytes]:
    key, _, value = token.partition(b"=")
    return key, value


def _name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class IterateResult:
    """User names from auth_userdb_iterate(); `failed` ends the listing with DONE fail."""

    users: tuple[bytes, ...]
    error: str | None = None
    failed: bool = False


def iterate_result(description: tuple[Any, ...]) -> IterateResult:
    """auth_userdb_iterate(): a table whose values are strings (or numbers)."""
    users, problem = [*description, None, None][:2]
    if users is None:
        if problem == b"not a table":
            return IterateResult((), "db-lua: Cannot iterate, return value is not table", failed=True)
        return IterateResult((), "db-lua: Value is not string", failed=True)
    return IterateResult(tuple(users))


def init_result_23(description: tuple[Any, ...]) -> str | None:
    """script_init() must return the integer 0; returns Dovecot's error text or None."""
    math_type, value = [*description, None, None][:2]
    if math_type != b"integer":
        return "script_init() returned non-number"
    if value != 0:
        return "Script init failed"
    return None

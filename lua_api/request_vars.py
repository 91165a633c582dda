"""An auth request's variables as Dovecot 2.3 exposes them to %-templates and Lua scripts.

Dovecot builds one table (``auth_request_get_var_expand_table`` in
src/auth/auth-request-var-expand.c) that serves both ``var_expand`` templates and
the ``req.<field>`` lookups of Lua scripts; this module rebuilds that table, in
Dovecot's order and with Dovecot's derivation rules, from plain request data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class Secured(enum.Enum):
    """How the client connection is protected (Dovecot's ``auth_request_secured``)."""

    NONE = enum.auto()
    SECURED = enum.auto()
    TLS = enum.auto()


@dataclass(frozen=True, slots=True)
class RequestVars:
    """The raw request data the variable table is derived from.

    Text fields are bytes exactly as received (they need not be UTF-8); None means
    "not set", which matters because several variables are nil (not "") when unset.
    IP addresses are the text form Dovecot prints (``net_ip2addr``).
    """

    user: bytes | None = None
    original_user: bytes | None = None
    """Username as first given, before username_format and passdb renames."""
    login_user: bytes | None = None
    """The master-user login target the client asked for (``requested_login_user``)."""
    master_user: bytes | None = None
    service: bytes | None = None
    mechanism: bytes | None = None
    mech_password: bytes | None = None
    """Cleartext password the mechanism received (PLAIN/LOGIN), else None."""
    local_ip: bytes | None = None
    remote_ip: bytes | None = None
    local_port: int = 0
    remote_port: int = 0
    real_local_ip: bytes | None = None
    real_remote_ip: bytes | None = None
    real_local_port: int = 0
    real_remote_port: int = 0
    local_name: bytes | None = None
    session_id: bytes | None = None
    session_pid: int | None = None
    client_pid: int = 0
    client_id: bytes | None = None
    secured: Secured = Secured.NONE
    valid_client_cert: bool = False
    db_id: int | None = None
    """Id of the passdb (or, during a userdb lookup, userdb) being run; None outside one."""


class VarEntry(NamedTuple):
    """One row of a var_expand table: ``%<short>`` / ``%{<long>}`` → value (None reads as "")."""

    short: str | None
    long: str | None
    value: bytes | None


_SECURED_TEXT = {Secured.NONE: b"", Secured.SECURED: b"secured", Secured.TLS: b"TLS"}


def _before_at(name: bytes) -> bytes:
    return name.split(b"@", 1)[0]


def _after_at(name: bytes) -> bytes | None:
    _, at, rest = name.partition(b"@")
    return rest if at else None


def _num(value: int) -> bytes:
    return str(value).encode()


def var_table_23(v: RequestVars) -> tuple[VarEntry, ...]:
    """Return Dovecot 2.3's 47-entry auth variable table for *v*, in Dovecot's order.

    The order matters: lookups take the first entry whose key matches, and Lua field
    access walks the same table.
    """
    user = v.user if v.user is not None else b""
    domain = _after_at(user)
    domain_first = _before_at(domain) if domain is not None else None
    domain_last = user.rpartition(b"@")[2] if b"@" in user else None
    orig_user = v.original_user if v.original_user is not None else user
    auth_user = v.master_user if v.master_user is not None else orig_user
    login_user = v.login_user
    mech = v.mechanism if v.mechanism is not None else b""
    local_port = _num(v.local_port)
    remote_port = _num(v.remote_port)
    real_local_port = _num(v.real_local_port)
    real_remote_port = _num(v.real_remote_port)
    orig_username = _before_at(orig_user)
    orig_domain = _after_at(orig_user)
    return (
        VarEntry("u", "user", user),
        VarEntry("n", "username", _before_at(user)),
        VarEntry("d", "domain", domain),
        VarEntry("s", "service", v.service),
        VarEntry("h", "home", None),
        VarEntry("l", "lip", v.local_ip),
        VarEntry("r", "rip", v.remote_ip),
        VarEntry("p", "pid", _num(v.client_pid)),
        VarEntry("w", "password", v.mech_password),
        VarEntry("!", None, _num(v.db_id) if v.db_id is not None else b""),
        VarEntry("m", "mech", mech),
        VarEntry("c", "secured", _SECURED_TEXT[v.secured]),
        VarEntry("a", "lport", local_port),
        VarEntry("b", "rport", remote_port),
        VarEntry("k", "cert", b"valid" if v.valid_client_cert else b""),
        VarEntry(None, "login_user", login_user),
        VarEntry(None, "login_username", _before_at(login_user) if login_user is not None else None),
        VarEntry(None, "login_domain", _after_at(login_user) if login_user is not None else None),
        VarEntry(None, "session", v.session_id),
        VarEntry(None, "real_lip", v.real_local_ip),
        VarEntry(None, "real_rip", v.real_remote_ip),
        VarEntry(None, "real_lport", real_local_port),
        VarEntry(None, "real_rport", real_remote_port),
        VarEntry(None, "domain_first", domain_first),
        VarEntry(None, "domain_last", domain_last),
        VarEntry(None, "master_user", v.master_user),
        VarEntry(None, "session_pid", _num(v.session_pid) if v.session_pid is not None else None),
        VarEntry(None, "orig_user", orig_user),
        VarEntry(None, "orig_username", orig_username),
        VarEntry(None, "orig_domain", orig_domain),
        VarEntry(None, "auth_user", auth_user),
        VarEntry(None, "auth_username", _before_at(auth_user)),
        VarEntry(None, "auth_domain", _after_at(auth_user)),
        VarEntry(None, "local_name", v.local_name),
        VarEntry(None, "client_id", v.client_id),
        VarEntry(None, "local_ip", v.local_ip),
        VarEntry(None, "remote_ip", v.remote_ip),
        VarEntry(None, "local_port", local_port),
        VarEntry(None, "remote_port", remote_port),
        VarEntry(None, "real_local_ip", v.real_local_ip),
        VarEntry(None, "real_remote_ip", v.real_remote_ip),
        VarEntry(None, "real_local_port", real_local_port),
        VarEntry(None, "real_remote_port", real_remote_port),
        VarEntry(None, "mechanism", mech),
        VarEntry(None, "original_user", orig_user),
        VarEntry(None, "original_username", orig_username),
        VarEntry(None, "original_domain", orig_domain),
    )


def _user(v: RequestVars) -> bytes:
    return v.user if v.user is not None else b""


def _orig_user(v: RequestVars) -> bytes:
    return v.original_user if v.original_user is not None else _user(v)


def _auth_user(v: RequestVars) -> bytes:
    return v.master_user if v.master_user is not None else _orig_user(v)


def _domain_first(v: RequestVars) -> bytes | None:
    domain = _after_at(_user(v))
    return _before_at(domain) if domain is not None else None


def _domain_last(v: RequestVars) -> bytes | None:
    user = _user(v)
    return user.rpartition(b"@")[2] if b"@" in user else None


def _login_part(v: RequestVars, part: Callable[[bytes], bytes | None]) -> bytes | None:
    return part(v.login_user) if v.login_user is not None else None


Getter = Callable[[RequestVars], bytes | None]

#: One getter per ``req.<name>`` of a 2.3 Lua request: what lua_fields_23 would give for
#: that name, computed alone (scripts read a few variables; building all 47 costs more).
LUA_FIELDS_23: dict[bytes, Getter] = {
    b"user": _user,
    b"username": lambda v: _before_at(_user(v)),
    b"domain": lambda v: _after_at(_user(v)),
    b"service": lambda v: v.service,
    b"home": lambda v: None,
    b"lip": lambda v: v.local_ip,
    b"rip": lambda v: v.remote_ip,
    b"pid": lambda v: _num(v.client_pid),
    b"password": lambda v: v.mech_password,
    b"mech": lambda v: v.mechanism if v.mechanism is not None else b"",
    b"secured": lambda v: _SECURED_TEXT[v.secured],
    b"lport": lambda v: _num(v.local_port),
    b"rport": lambda v: _num(v.remote_port),
    b"cert": lambda v: b"valid" if v.valid_client_cert else b"",
    b"login_user": lambda v: v.login_user,
    b"login_username": lambda v: _login_part(v, _before_at),
    b"login_domain": lambda v: _login_part(v, _after_at),
    b"session": lambda v: v.session_id,
    b"real_lip": lambda v: v.real_local_ip,
    b"real_rip": lambda v: v.real_remote_ip,
    b"real_lport": lambda v: _num(v.real_local_port),
    b"real_rport": lambda v: _num(v.real_remote_port),
    b"domain_first": _domain_first,
    b"domain_last": _domain_last,
    b"master_user": lambda v: v.master_user,
    b"session_pid": lambda v: _num(v.session_pid) if v.session_pid is not None else None,
    b"orig_user": _orig_user,
    b"orig_username": lambda v: _before_at(_orig_user(v)),
    b"orig_domain": lambda v: _after_at(_orig_user(v)),
    b"auth_user": _auth_user,
    b"auth_username": lambda v: _before_at(_auth_user(v)),
    b"auth_domain": lambda v: _after_at(_auth_user(v)),
    b"local_name": lambda v: v.local_name,
    b"client_id": lambda v: v.client_id,
    b"local_ip": lambda v: v.local_ip,
    b"remote_ip": lambda v: v.remote_ip,
    b"local_port": lambda v: _num(v.local_port),
    b"remote_port": lambda v: _num(v.remote_port),
    b"real_local_ip": lambda v: v.real_local_ip,
    b"real_remote_ip": lambda v: v.real_remote_ip,
    b"real_local_port": lambda v: _num(v.real_local_port),
    b"real_remote_port": lambda v: _num(v.real_remote_port),
    b"mechanism": lambda v: v.mechanism if v.mechanism is not None else b"",
    b"original_user": _orig_user,
    b"original_username": lambda v: _before_at(_orig_user(v)),
    b"original_domain": lambda v: _after_at(_orig_user(v)),
}


def lua_fields_23(v: RequestVars) -> dict[bytes, bytes | None]:
    """Map every ``req.<name>`` variable of a 2.3 Lua request to its value (None = nil).

    Dovecot's ``__index`` walks var_table_23 and answers with the first entry whose long
    key equals the name, so entries without a long key (``%!``) are not readable;
    LUA_FIELDS_23 holds that walk's answers, one getter per name.
    """
    return {name: get(v) for name, get in LUA_FIELDS_23.items()}


#: One getter per name of Dovecot 2.4's auth variables (auth_request_var_expand_static_tab,
#: 2.4.2+), in its order. The same table answers `req.<name>` in Lua and `%{name}` in 2.4
#: templates. The 2.3 names (`username`, `service`, `rip`, ...) are gone; `session_pid` is
#: "" when unset.
VARS_24: dict[bytes, Getter] = {
    b"user": _user,
    b"protocol": lambda v: v.service,
    b"home": lambda v: None,
    b"local_ip": lambda v: v.local_ip,
    b"remote_ip": lambda v: v.remote_ip,
    b"client_pid": lambda v: _num(v.client_pid),
    b"password": lambda v: v.mech_password,
    b"id": lambda v: _num(v.db_id) if v.db_id is not None else b"",
    b"mechanism": lambda v: v.mechanism,
    b"secured": lambda v: _SECURED_TEXT[v.secured],
    b"local_port": lambda v: _num(v.local_port),
    b"remote_port": lambda v: _num(v.remote_port),
    b"cert": lambda v: b"valid" if v.valid_client_cert else b"",
    b"login_user": lambda v: v.login_user,
    b"session": lambda v: v.session_id,
    b"real_local_ip": lambda v: v.real_local_ip,
    b"real_remote_ip": lambda v: v.real_remote_ip,
    b"real_local_port": lambda v: _num(v.real_local_port),
    b"real_remote_port": lambda v: _num(v.real_remote_port),
    b"domain_first": _domain_first,
    b"domain_last": _domain_last,
    b"master_user": lambda v: v.master_user,
    b"session_pid": lambda v: _num(v.session_pid) if v.session_pid is not None else b"",
    b"original_user": _orig_user,
    b"auth_user": _auth_user,
    b"local_name": lambda v: v.local_name,
    b"client_id": lambda v: v.client_id,
    b"ssl_ja3_hash": lambda v: None,
    b"ssl_client_cert_fp": lambda v: None,
    b"ssl_client_cert_pubkey_fp": lambda v: None,
    b"owner_user": _user,
}


def var_table_24(v: RequestVars) -> dict[bytes, bytes | None]:
    """Dovecot 2.4's auth variables for *v*, in its order (see VARS_24)."""
    return {name: get(v) for name, get in VARS_24.items()}

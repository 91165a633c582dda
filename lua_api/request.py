"""The Lua request object: what `req` is inside an entry point.

Dovecot passes a fresh table per call whose metatable serves the request's
variables (from the var-expand table), its methods and the passdb/userdb field
views. `LuaRequest` is the Python side of that table's `item`: it carries the
request's data and answers the methods that need Python (var_expand, logging and
password checks go through the daemon's `context`).

The table itself is cheap: the prelude asks `lua_var()` for a variable, and
`field()` for a passdb/userdb field, only when the script reads one, so a call
pays for what its script looks at, not for Dovecot's whole variable table.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Callable
from typing import Protocol, TypeVar

from lua_api.request_vars import LUA_FIELDS_23, VARS_24, RequestVars, var_table_23, var_table_24
from lua_api.var_expand import ExpandContext, VarExpandError, expand
from lua_api.var_expand24 import ExpandContext24, expand24

ContextT = TypeVar("ContextT", bound=ExpandContext)

#: How template errors end where Dovecot's template parser calls i_fatal().
_FATAL = " (a fatal error in Dovecot: the auth process exits)"

#: str_sanitize_append()'s limit for the user name in log prefixes (MAX_LOG_USERNAME_LEN).
_MAX_LOG_USERNAME = 64

#: The request's boolean raw fields, in the order `flags` gives them.
FLAG_NAMES = (
    "skip_password_check",
    "passdbs_seen_user_unknown",
    "passdbs_seen_internal_failure",
    "userdbs_seen_internal_failure",
)

_NO_FLAGS = (False, False, False, False)


class Fields(Protocol):
    """A passdb/userdb field source: the value (b"" for a bare key), or None when unset."""

    def get(self, key: bytes, /) -> bytes | None: ...


_NO_FIELDS: dict[bytes, bytes] = {}


class LuaRequest:
    """One auth request as a Lua entry point sees it.

    `vars` may be given as a function that builds them: they are then built the first
    time something needs them (a script reading `req.user`, a log prefix, var_expand).
    """

    __slots__ = (
        "_vars",
        "context",
        "db_name",
        "dialect",
        "expand_context",
        "flags",
        "passdb_fields",
        "userdb_fields",
        "userdb_lookup",
    )

    def __init__(
        self,
        vars: RequestVars | Callable[[], RequestVars],
        context: object = None,
        passdb_fields: Fields = _NO_FIELDS,
        userdb_fields: Fields = _NO_FIELDS,
        flags: tuple[bool, bool, bool, bool] = _NO_FLAGS,
        *,
        userdb_lookup: bool = False,
        expand_context: ExpandContext | None = None,
        db_name: str = "lua",
    ) -> None:
        self._vars = vars
        self.context = context
        self.passdb_fields = passdb_fields
        self.userdb_fields = userdb_fields
        #: The raw boolean fields of FLAG_NAMES, in that order.
        self.flags = flags
        self.userdb_lookup = userdb_lookup
        #: hostname, pid, environment for var_expand; None: this process's (built when needed).
        self.expand_context = expand_context
        #: The passdb/userdb name in log prefixes: its `name` setting, else the driver's.
        self.db_name = db_name
        #: The dialect of the state the request table lives in (set when a call starts).
        self.dialect = "2.3"

    @property
    def vars(self) -> RequestVars:
        variables = self._vars
        if not isinstance(variables, RequestVars):
            variables = self._vars = variables()
        return variables

    def lua_var(self, name: bytes) -> bytes | None:
        """`req.<name>` for a variable name of the request's dialect (see prelude.lua)."""
        getters = VARS_24 if self.dialect == "2.4" else LUA_FIELDS_23
        return getters[name](self.vars)

    def field(self, userdb: bool, name: bytes) -> bytes | None:
        """`req.passdb.<name>` or `req.userdb.<name>`."""
        return (self.userdb_fields if userdb else self.passdb_fields).get(name)

    def var_expand(self, template: bytes) -> bytes:
        if self.dialect == "2.4":
            return self._var_expand_24(template)
        return expand(template, var_table_23(self.vars), self._context(ExpandContext))

    def _var_expand_24(self, template: bytes) -> bytes:
        return expand24(template, var_table_24(self.vars), self._context(ExpandContext24))

    def log_prefix(self) -> bytes:
        """auth_request_get_log_prefix_db: `lua(user,rip,master,<session>): `."""
        v = self.vars
        out = bytearray(self.db_name.encode() + b"(")
        out += _sanitize(v.user, _MAX_LOG_USERNAME) if v.user is not None else b"?"
        if v.remote_ip:
            out += b"," + v.remote_ip
        if v.login_user is not None:
            out += b",master"
        if v.session_id is not None:
            out += b",<" + v.session_id + b">"
        return bytes(out) + b"): "

    def _context(self, kind: type[ContextT]) -> ContextT:
        """The daemon's expand context with this request's passdb and userdb fields."""
        ctx = self.expand_context or ExpandContext()
        return kind(
            env=ctx.env,
            passdb_field=lambda name: self.passdb_fields.get(name),
            userdb_field=lambda name: self.userdb_fields.get(name),
            hostname=ctx.hostname,
            pid=ctx.pid,
            uid=ctx.uid,
            gid=ctx.gid,
        )

    def response_from_template(self, template: bytes) -> list[tuple[bytes, bytes | None]]:
        """req:response_from_template() (2.3): `k=v k2` with each value %-expanded.

        The template is parsed like a passdb/userdb `args` template; where that parser
        calls i_fatal() (an empty key, a uid/gid that is no number or known name) the
        auth process exits in Dovecot, here the call raises an error saying so.
        """
        result: list[tuple[bytes, bytes | None]] = []
        for token in template.split(b" "):
            if not token:
                continue
            key, sep, value = token.partition(b"=")
            if not key:
                kind = "userdb" if self.userdb_lookup else "passdb"
                raise VarExpandError(
                    f"Invalid {kind} template {template.decode('utf-8', 'replace')} - key must not be empty" + _FATAL
                )
            if self.userdb_lookup and key.lower() in (b"uid", b"gid"):
                value = _numeric_id(key.lower(), value)
            elif not sep:
                result.append((key, None))
                continue
            try:
                result.append((key, self.var_expand(value)))
            except VarExpandError as exc:
                raise VarExpandError(b"var_expand(" + value + b") failed: " + exc.message) from None
        return result


def _numeric_id(kind: bytes, value: bytes) -> bytes:
    """userdb_parse_uid/gid for a userdb template: a number or a system user/group name."""
    if value.isdigit() and int(value) < 2**32 - 1:
        return b"%d" % int(value)
    try:
        if kind == b"uid":
            return b"%d" % pwd.getpwnam(value.decode()).pw_uid
        return b"%d" % grp.getgrnam(value.decode()).gr_gid
    except (KeyError, UnicodeDecodeError, ValueError):
        shown = value.decode("utf-8", "replace")
        raise VarExpandError(f"lua userdb: Invalid {kind.decode()}: {shown}{_FATAL}") from None


def _sanitize(src: bytes, limit: int) -> bytes:
    """str_sanitize_append(): control bytes and invalid UTF-8 become '?', long text ends in '...'."""
    src = src.split(b"\0", 1)[0]
    out = bytearray()
    i = 0
    while i < limit and i < len(src):
        lead = src[i]
        size = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4
        if lead >= 0x80 and not 0xC2 <= lead <= 0xF4:
            size = -1
        elif size > limit - i:
            break  # a character that does not fit: the text is cut before it
        elif size > 1:
            try:
                src[i : i + size].decode()
            except UnicodeDecodeError:
                size = -1
        if size < 0:
            out += b"?"
            i += 1
            continue
        out += b"?" if lead < 32 else src[i : i + size]
        i += size
    if i >= len(src):
        return bytes(out)
    while len(out) > limit - 3:  # drop whole characters until "..." fits
        if 0x80 <= out.pop() < 0xC0:  # a continuation byte: its sequence goes too
            while out and 0x80 <= out[-1] < 0xC0:
                out.pop()
            if out and out[-1] >= 0xC0:
                out.pop()
    return bytes(out) + b"..."

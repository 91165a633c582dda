"""The Lua request object: what `req` is inside an entry point.

Dovecot passes a fresh table per call whose metatable serves the request's
variables (from the var-expand table), its methods and the passdb/userdb field
views. `LuaRequest` is the Python side of that table's `item`: it carries the
request's data and answers the methods that need Python (var_expand, logging and
password checks go through the daemon's `context`).
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lua_api.request_vars import RequestVars, lua_fields_23, var_table_23
from lua_api.var_expand import ExpandContext, VarExpandError, expand

FLAG_NAMES = (
    "skip_password_check",
    "passdbs_seen_user_unknown",
    "passdbs_seen_internal_failure",
    "userdbs_seen_internal_failure",
)


@dataclass(eq=False)
class LuaRequest:
    """One auth request as a Lua entry point sees it."""

    vars: RequestVars
    context: object = None
    passdb_fields: Mapping[bytes, bytes] = field(default_factory=dict)
    userdb_fields: Mapping[bytes, bytes] = field(default_factory=dict)
    flags: Mapping[str, bool] = field(default_factory=dict)
    userdb_lookup: bool = False
    expand_context: ExpandContext = field(default_factory=ExpandContext)

    def var_expand(self, template: bytes) -> bytes:
        return expand(template, var_table_23(self.vars), self._context())

    def _context(self) -> ExpandContext:
        ctx = self.expand_context
        return ExpandContext(
            env=ctx.env,
            passdb_field=lambda name: self.passdb_fields.get(name),
            userdb_field=lambda name: self.userdb_fields.get(name),
            hostname=ctx.hostname,
            pid=ctx.pid,
            uid=ctx.uid,
            gid=ctx.gid,
        )

    def response_from_template(self, template: bytes) -> list[tuple[bytes, bytes | None]]:
        """req:response_from_template(): `k=v k2` with each value %-expanded."""
        result: list[tuple[bytes, bytes | None]] = []
        for token in template.split(b" "):
            if not token:
                continue
            key, sep, value = token.partition(b"=")
            if not key:
                raise VarExpandError(
                    f"Invalid template {template.decode('utf-8', 'replace')} - key must not be empty"
                )
            if not sep:
                result.append((key, None))
                continue
            if self.userdb_lookup and key.lower() in (b"uid", b"gid"):
                value = _numeric_id(key.lower(), value)
            result.append((key, self.var_expand(value)))
        return result

    def to_lua(self, state: Any) -> Any:
        """Build the request table in `state` (call inside a slice)."""
        lua = state.lua
        variables = {k: v for k, v in lua_fields_23(self.vars).items() if v is not None}
        flags = {name.encode(): bool(self.flags.get(name)) for name in FLAG_NAMES}
        return state.api[b"new_request"](
            self,
            lua.table_from(variables),
            lua.table_from(dict(self.passdb_fields)),
            lua.table_from(dict(self.userdb_fields)),
            lua.table_from(flags),
        )


def _numeric_id(kind: bytes, value: bytes) -> bytes:
    """userdb templates resolve uid/gid names to numbers, as Dovecot does."""
    if value.isdigit():
        return value
    try:
        if kind == b"uid":
            return b"%d" % pwd.getpwnam(value.decode()).pw_uid
        return b"%d" % grp.getgrnam(value.decode()).gr_gid
    except (KeyError, UnicodeDecodeError):
        raise VarExpandError(f"Invalid {kind.decode()}: {value.decode('utf-8', 'replace')}") from None

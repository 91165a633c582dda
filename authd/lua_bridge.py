"""How the daemon hands requests to lua_api and answers the scripts' callbacks.

lua_api never imports the daemon; this module is the adapter: it turns an
AuthRequest into lua_api's RequestVars/LuaRequest and implements ScriptHost
(logging with the request's context, password checks with authd.passwords).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import replace

import structlog

from authd.auth_request import AuthRequest
from authd.fields import AuthFields
from authd.passwords import verify
from lua_api.library import EventLog
from lua_api.request import LuaRequest
from lua_api.request_vars import RequestVars
from lua_api.var_expand import ExpandContext

_LEVELS = ("debug", "info", "warning", "error")


def expand_context(environment: Mapping[str, str]) -> ExpandContext:
    return ExpandContext(
        env={k.encode(): v.encode() for k, v in environment.items()},
        hostname=socket.gethostname().encode(),
        pid=os.getpid(),
        uid=os.getuid(),
        gid=os.getgid(),
    )


class _FieldView:
    """`req.passdb` / `req.userdb` of a script: the request's fields as they are when read."""

    __slots__ = ("_fields",)

    def __init__(self, fields: AuthFields | None) -> None:
        self._fields = fields

    def get(self, key: bytes, /) -> bytes | None:
        return self._fields.find(key) if self._fields is not None else None


def lua_request(
    req: AuthRequest,
    environment: ExpandContext,
    *,
    userdb_lookup: bool = False,
    db_id: int | None = None,
    db_name: str = "lua",
    hide_password: bool = False,
) -> LuaRequest:
    """The request as a script sees it. `hide_password`: as a Dovecot auth worker sees a
    userdb request, which auth_request_export() sends without the password.

    Nothing is copied here: variables and fields are read when the script asks (most
    scripts read two or three), and nothing changes the request while its script runs.
    """

    def variables() -> RequestVars:
        found = req.vars(db_id=db_id)
        return replace(found, mech_password=None) if hide_password else found

    return LuaRequest(
        variables,
        req,
        _FieldView(req.extra_fields),
        _FieldView(req.userdb_reply),
        (
            req.skip_password_check,
            req.passdbs_seen_user_unknown,
            req.passdbs_seen_internal_failure,
            req.userdbs_seen_internal_failure,
        ),
        userdb_lookup=userdb_lookup,
        expand_context=environment,
        db_name=db_name,
    )


class DaemonScriptHost:
    """ScriptHost for one script: logs under `script`, checks passwords like Dovecot."""

    def __init__(self, script: str, *, debug: bool = False) -> None:
        self.script = script
        self.debug = debug

    def log(self, level: int, message: str, context: object | None) -> None:
        fields: dict[str, object] = {"script": self.script}
        if isinstance(context, EventLog):
            # An event's line carries its own prefix; a req:event() child is shown at
            # debug level when the request is (auth_debug or the client's debug flag).
            request = context.request
            wants_debug = context.forced_debug or self.debug
            if isinstance(request, AuthRequest):
                wants_debug = wants_debug or request.debug
                fields.update(request.log_context())
            if level == 0 and not wants_debug:
                return
            if context.name is not None:
                fields["event_name"] = context.name
            if context.fields:
                fields["event_fields"] = context.fields
        elif isinstance(context, AuthRequest):
            if level == 0 and not (self.debug or context.debug):
                return  # req:log_debug is shown only with auth debug, as in Dovecot
            fields.update(context.log_context())
            message = f"db-lua: {message}"
        getattr(structlog.get_logger("authd.lua"), _LEVELS[level])("lua.log", message=message, **fields)

    def password_verify(self, context: object, crypted: bytes, plain: bytes) -> tuple[int, str | None]:
        user = context.original_user if isinstance(context, AuthRequest) else None
        result = verify(plain, crypted, user=user or b"")
        return result.code, result.error

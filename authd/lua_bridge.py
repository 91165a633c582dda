"""How the daemon hands requests to lua_api and answers the scripts' callbacks.

lua_api never imports the daemon; this module is the adapter: it turns an
AuthRequest into lua_api's RequestVars/LuaRequest and implements ScriptHost
(logging with the request's context, password checks with authd.passwords).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

from authd.auth_request import AuthRequest
from authd.passwords import verify
from lua_api.request import LuaRequest
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


def lua_request(
    req: AuthRequest, environment: ExpandContext, *, userdb_lookup: bool = False, db_id: int | None = None
) -> LuaRequest:
    return LuaRequest(
        vars=req.vars(db_id=db_id),
        context=req,
        passdb_fields=req.extra_fields.as_dict(),
        userdb_fields=req.userdb_reply.as_dict() if req.userdb_reply is not None else {},
        flags={
            "skip_password_check": req.skip_password_check,
            "passdbs_seen_user_unknown": req.passdbs_seen_user_unknown,
            "passdbs_seen_internal_failure": req.passdbs_seen_internal_failure,
            "userdbs_seen_internal_failure": req.userdbs_seen_internal_failure,
        },
        userdb_lookup=userdb_lookup,
        expand_context=environment,
    )


class DaemonScriptHost:
    """ScriptHost for one script: logs under `script`, checks passwords like Dovecot."""

    def __init__(self, script: str, *, debug: bool = False) -> None:
        self.script = script
        self.debug = debug

    def log(self, level: int, message: str, context: object | None) -> None:
        fields: dict[str, str] = {"script": self.script}
        if isinstance(context, AuthRequest):
            if level == 0 and not (self.debug or context.debug):
                return  # req:log_debug is shown only with auth debug, as in Dovecot
            fields.update(context.log_context())
            message = f"db-lua: {message}"
        getattr(structlog.get_logger("authd.lua"), _LEVELS[level])("lua.log", message=message, **fields)

    def password_verify(self, context: object, crypted: bytes, plain: bytes) -> tuple[int, str | None]:
        user = context.original_user if isinstance(context, AuthRequest) else None
        result = verify(plain, crypted, user=user or b"")
        return result.code, result.error

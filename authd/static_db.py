"""The static passdb and userdb (Dovecot's passdb-static.c / userdb-static.c).

A static passdb answers every user from a template (`password=... allow_nets=...`);
a static userdb gives every user the same fields, but for a plain user lookup it
first asks the passdbs whether the user exists, unless `allow_all_users=yes`.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from authd.auth_request import AuthRequest
from authd.password_check import handle_credentials, password_missing, verify_password_off_loop
from authd.passwords import split_scheme
from authd.templates import export_passdb, export_userdb, parse_template, remove
from lua_api.results import PassdbResult, UserdbResult
from lua_api.var_expand import VarExpandError

log = structlog.get_logger("authd.static")


class StaticPassdb:
    def __init__(self, args: str) -> None:
        template = parse_template(args)
        self.template, password, self.has_password = remove(template, b"password")
        self.password_template = password or b""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _save_fields(self, req: AuthRequest) -> tuple[int, bytes | None, str]:
        try:
            export_passdb(self.template, req)
            password = req.expand(self.password_template) if self.has_password else None
        except VarExpandError as exc:
            log.error("passdb.static", message=f"Failed to expand template: {exc}", **req.log_context())
            return PassdbResult.INTERNAL_FAILURE, None, "PLAIN"
        if password is None:
            if b"nopassword" not in req.extra_fields:
                return password_missing(req), None, "PLAIN"
            password = b""
        scheme, password = split_scheme(password)
        scheme = scheme or "PLAIN"
        req.set_field(b"password", password, scheme)
        return PassdbResult.OK, password, scheme

    async def verify_plain(self, req: AuthRequest, password: bytes) -> int:
        code, stored, scheme = self._save_fields(req)
        if code != PassdbResult.OK:
            return code
        if await verify_password_off_loop(req, password, stored, scheme) <= 0:
            return PassdbResult.PASSWORD_MISMATCH
        return PassdbResult.OK

    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]:
        code, stored, stored_scheme = self._save_fields(req)
        return handle_credentials(req, code, stored, stored_scheme, scheme)


class CredentialsLookup(Protocol):
    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]: ...


class StaticUserdb:
    def __init__(self, args: str, passdbs: CredentialsLookup) -> None:
        template = parse_template(args, userdb=True)
        self.template, value, present = remove(template, b"allow_all_users")
        self.allow_all_users = present and (value is None or value.lower() == b"yes")
        self.passdbs = passdbs

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def lookup(self, req: AuthRequest) -> int:
        if not req.successful and not self.allow_all_users:
            # A userdb-only lookup: the user must exist in a passdb.
            req.userdb_lookup = False
            code, _ = await self.passdbs.lookup_credentials(req, "")
            req.userdb_lookup = True
            if code in (PassdbResult.USER_UNKNOWN, PassdbResult.USER_DISABLED, PassdbResult.PASS_EXPIRED):
                return UserdbResult.USER_UNKNOWN
            if code == PassdbResult.SCHEME_NOT_AVAILABLE:
                log.error(
                    "userdb.static",
                    message="passdb doesn't support lookups, can't verify user's existence",
                    **req.log_context(),
                )
            if code != PassdbResult.OK:
                return UserdbResult.INTERNAL_FAILURE
        try:
            export_userdb(self.template, req)
        except VarExpandError as exc:
            log.error("userdb.static", message=f"Failed to expand template: {exc}", **req.log_context())
            return UserdbResult.INTERNAL_FAILURE
        return UserdbResult.OK

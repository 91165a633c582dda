"""The Lua passdb and userdb drivers: Dovecot's passdb-lua.c and userdb-lua.c.

A driver owns a pool of Lua states for its script and turns LookupResults into
changes of the AuthRequest, with the post-processing Dovecot does around the
script (nopassword, missing passwords, the default scheme, log lines).
"""

from __future__ import annotations

from pathlib import Path

import structlog
import trio

from authd.auth_request import AuthRequest
from authd.lua_bridge import DaemonScriptHost, expand_context, lua_request
from authd.passdb import verify_password
from authd.passwords import SchemeNotAvailable, credentials, split_scheme
from lua_api.pool import ScriptPool, thread_executor
from lua_api.results import IterateResult, LookupResult, PassdbResult, UserdbResult
from lua_api.runtime import StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError

log = structlog.get_logger("authd.lua")


class LuaScriptDb:
    """What the passdb and userdb drivers share: the pool and the request adapter."""

    kind = "passdb"

    def __init__(
        self,
        path: Path,
        *,
        blocking: bool,
        options: StateOptions,
        workers: int,
        limiter: trio.CapacityLimiter,
        db_id: int,
        debug: bool = False,
    ) -> None:
        self.path = path
        self.db_id = db_id
        self.environment = expand_context(dict(options.environment))
        run = thread_executor(limiter) if blocking else run_in_loop
        self.pool = ScriptPool(
            path, DaemonScriptHost(str(path), debug=debug), options, size=workers if blocking else 1, run=run
        )

    async def start(self) -> None:
        try:
            await self.pool.start()
        except ScriptLoadError as exc:
            raise ScriptLoadError(f"{self.kind}-lua: initialization failed: {exc}") from None

    async def close(self) -> None:
        for error in await self.pool.close():
            log.error("lua.deinit_failed", script=str(self.path), message=error)

    def _apply_fields(self, req: AuthRequest, result: LookupResult, *, userdb: bool) -> None:
        for warning in result.warnings:
            log.warning("lua.result", message=f"db-lua: {warning}", **req.log_context())
        for key, value in result.fields:
            if userdb:
                req.set_userdb_field(key, value)
            else:
                req.set_field(key, value, "PLAIN")


class LuaPassdb(LuaScriptDb):
    """passdb lua: auth_password_verify for plain auth if defined, else lookup + verify."""

    def __init__(self, path: Path, *, default_scheme: str = "PLAIN", **kwargs: object) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.default_scheme = default_scheme

    async def verify_plain(self, req: AuthRequest, password: bytes) -> int:
        if self.pool.has_password_verify:
            binding = lua_request(req, self.environment, db_id=self.db_id)

            async def call(script: Script) -> LookupResult:
                return await script.password_verify(binding, password, self.pool.run)

            result = await self.pool.call(call)
            self._apply_fields(req, result, userdb=False)
            if result.code == PassdbResult.PASSWORD_MISMATCH:
                log.info("auth.password_mismatch", message="Password mismatch", **req.log_context())
            elif result.code == PassdbResult.INTERNAL_FAILURE and result.error:
                log.error("lua.error", message=f"passdb-lua: {result.error}", **req.log_context())
            return result.code
        code, scheme, stored = await self.lookup(req)
        if code == PassdbResult.OK and verify_password(req, password, stored, scheme or "PLAIN") <= 0:
            code = PassdbResult.PASSWORD_MISMATCH
        return code

    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]:
        """passdb_lua_lookup_credentials + passdb_handle_credentials."""
        code, stored_scheme, password = await self.lookup(req)
        if code != PassdbResult.OK:
            return code, None
        if b"noauthenticate" in req.extra_fields:
            return PassdbResult.NEXT, None
        if password is None:
            if scheme:
                log.info(
                    "auth.credentials",
                    message=f"Requested {scheme} scheme, but we have a NULL password",
                    **req.log_context(),
                )
                return PassdbResult.SCHEME_NOT_AVAILABLE, None
            return code, None
        stored = b"{" + (stored_scheme or "PLAIN").encode() + b"}" + password
        try:
            return code, credentials(stored, scheme, user=req.original_user or b"")
        except SchemeNotAvailable as exc:
            log.info("auth.credentials", message=str(exc), **req.log_context())
            return PassdbResult.SCHEME_NOT_AVAILABLE, None

    async def lookup(self, req: AuthRequest) -> tuple[int, str | None, bytes | None]:
        """passdb_lua_lookup: run auth_passdb_lookup and post-process its password."""
        binding = lua_request(req, self.environment, db_id=self.db_id)

        async def call(script: Script) -> LookupResult:
            return await script.passdb_lookup(binding, self.pool.run)

        result = await self.pool.call(call)
        self._apply_fields(req, result, userdb=False)
        code, scheme, password = result.code, None, result.password
        if password is not None:
            scheme, password = split_scheme(password)  # password_get_scheme, `$1$` included
        if scheme is None and not result.password_in_table and code in (PassdbResult.OK, PassdbResult.NEXT):
            scheme = "PLAIN"  # the string form never uses the passdb's default scheme
        if code == PassdbResult.INTERNAL_FAILURE and result.error:
            log.error("lua.error", message=f"db-lua: {result.error}", **req.log_context())
        elif code != PassdbResult.OK:
            pass
        elif b"nopassword" not in req.extra_fields:
            if not password:
                code = password_missing(req)
            else:
                scheme = scheme or self.default_scheme
                req.set_field(b"password", password, scheme)
        elif password:
            log.info(
                "auth.nopassword", message="nopassword given and password is not empty", **req.log_context()
            )
            code = PassdbResult.PASSWORD_MISMATCH
        return code, scheme, password


def password_missing(req: AuthRequest) -> int:
    """auth_request_password_missing."""
    if req.skip_password_check:
        return PassdbResult.OK
    log.info("auth.no_password", message="No password returned (and no nopassword)", **req.log_context())
    return PassdbResult.PASSWORD_MISMATCH


class LuaUserdb(LuaScriptDb):
    """userdb lua: auth_userdb_lookup and auth_userdb_iterate."""

    kind = "userdb"

    async def lookup(self, req: AuthRequest) -> int:
        binding = lua_request(req, self.environment, userdb_lookup=True, db_id=self.db_id)

        async def call(script: Script) -> LookupResult:
            return await script.userdb_lookup(binding, self.pool.run)

        result = await self.pool.call(call)
        self._apply_fields(req, result, userdb=True)
        if result.code == UserdbResult.INTERNAL_FAILURE and result.error:
            log.error("lua.error", message=f"userdb-lua: {result.error}", **req.log_context())
        return result.code

    async def iterate(self) -> IterateResult:
        async def call(script: Script) -> IterateResult:
            return await script.userdb_iterate(self.pool.run)

        result = await self.pool.call(call)
        if result.error:
            log.error("lua.error", message=result.error)
        return result

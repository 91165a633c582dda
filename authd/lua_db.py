"""The Lua passdb and userdb drivers: Dovecot's passdb-lua.c and userdb-lua.c.

A driver owns a pool of Lua states for its script and turns LookupResults into
changes of the AuthRequest, with the post-processing Dovecot does around the
script (nopassword, missing passwords, the default scheme, log lines).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog
import trio

from authd.auth_request import AuthRequest
from authd.lua_bridge import DaemonScriptHost, expand_context, lua_request
from authd.password_check import handle_credentials, password_missing, verify_password_off_loop
from authd.passwords import split_scheme
from lua_api.pool import ScriptPool, adaptive_executor
from lua_api.results import IterateResult, LookupResult, PassdbResult, UserdbResult
from lua_api.runtime import StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError

log = structlog.get_logger("authd.lua")


class LuaScriptDb:
    """What the passdb and userdb drivers share: the pool and the request adapter.

    blocking = true pools start with `workers` states, blocking = false ones with one;
    both grow to `max_states` while calls wait (a blocking = false state, too, waits
    for HTTP without holding anything but itself).
    """

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
        max_states: int | None = None,
        state_idle_timeout: float = 60.0,
        calls_per_state: int = 1,
        debug: bool = False,
        dialect: str = "2.3",
        lua_settings: tuple[tuple[str, str], ...] = (),
        name: str = "",
    ) -> None:
        self.path = path
        self.blocking = blocking
        self.db_id = db_id
        self.dialect = dialect
        #: How log prefixes name this db: its `name` setting, else the driver's name.
        self.log_name = name or "lua"
        #: 2.4: the template auth_*_get_cache_key() returned, set by start(); None: not cached.
        self.cache_key_template: bytes | None = None
        self.environment = expand_context(dict(options.environment))
        options = replace(options, dialect=dialect, lua_settings=lua_settings)
        run = adaptive_executor(limiter, options, str(path)) if blocking else run_in_loop
        self.pool = ScriptPool(
            path,
            DaemonScriptHost(str(path), debug=debug),
            options,
            size=workers if blocking else 1,
            run=run,
            max_size=max_states,
            idle_timeout=state_idle_timeout,
            calls_per_state=calls_per_state,
        )
        #: Called with a failed call's kind (timeout, memory, broken, error), for metrics.
        self.on_failure: Callable[[str], None] | None = None

    async def start(self) -> None:
        """Load the script into every state (then, in 2.4, ask it for its cache key).

        Failures raise ScriptLoadError with the text Dovecot's fatal error has:
        `passdb-lua: initialization failed: ...` (2.3), or 2.4's wording per stage.
        """
        try:
            await self.pool.start()
            for script in self.pool.scripts:
                await script.load_cache_key(self.kind, self.pool.run)
            self.cache_key_template = self.pool.scripts[0].cache_key_template
        except ScriptLoadError as exc:
            if self.dialect != "2.4":
                raise ScriptLoadError(f"{self.kind}-lua: initialization failed: {exc}") from None
            if exc.stage == "file":
                raise ScriptLoadError(f"{self.kind}-lua: Lua script '{self.path}': {exc}") from None
            if exc.stage == "cache_key":
                hook = f"auth_{self.kind}_get_cache_key"
                raise ScriptLoadError(f"{self.kind}-lua: {hook}() failed: {exc}") from None
            raise ScriptLoadError(f"{self.kind}-lua: script_init() failed: {exc}") from None

    async def close(self) -> None:
        for error in await self.pool.close():
            log.error("lua.deinit_failed", script=str(self.path), message=error)

    def _log_failure(self, req: AuthRequest, result: LookupResult, prefix: str) -> None:
        """An entry point failed (error, timeout, memory): log Dovecot's line and count it."""
        log.error("lua.error", message=f"{prefix}: {result.error}", **req.log_context())
        if self.on_failure is not None:
            self.on_failure(result.failure_kind or "error")

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
            binding = lua_request(req, self.environment, db_id=self.db_id, db_name=self.log_name)

            async def call(script: Script) -> LookupResult:
                return await script.password_verify(binding, password, self.pool.run)

            result = await self.pool.call(call)
            self._apply_fields(req, result, userdb=False)
            if result.code == PassdbResult.PASSWORD_MISMATCH:
                log.info("auth.password_mismatch", message="Password mismatch", **req.log_context())
            elif result.code == PassdbResult.INTERNAL_FAILURE and result.error is not None:
                self._log_failure(req, result, "passdb-lua")
            return result.code
        code, scheme, stored = await self.lookup(req)
        if code == PassdbResult.OK and await verify_password_off_loop(req, password, stored, scheme or "PLAIN") <= 0:
            code = PassdbResult.PASSWORD_MISMATCH
        return code

    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]:
        """passdb_lua_lookup_credentials + passdb_handle_credentials."""
        code, stored_scheme, password = await self.lookup(req)
        return handle_credentials(req, code, password, stored_scheme or "PLAIN", scheme)

    async def lookup(self, req: AuthRequest) -> tuple[int, str | None, bytes | None]:
        """passdb_lua_lookup: run auth_passdb_lookup and post-process its password."""
        binding = lua_request(req, self.environment, db_id=self.db_id, db_name=self.log_name)

        async def call(script: Script) -> LookupResult:
            return await script.passdb_lookup(binding, self.pool.run)

        result = await self.pool.call(call)
        self._apply_fields(req, result, userdb=False)
        code, scheme, password = result.code, None, result.password
        if password is not None:
            scheme, password = split_scheme(password)  # password_get_scheme, `$1$` included
        if scheme is None and not result.password_in_table and code in (PassdbResult.OK, PassdbResult.NEXT):
            scheme = "PLAIN"  # the string form never uses the passdb's default scheme
        if code == PassdbResult.INTERNAL_FAILURE and result.error is not None:
            self._log_failure(req, result, "db-lua")
        elif code != PassdbResult.OK:
            pass
        elif b"nopassword" not in req.extra_fields:
            if not password:
                code = password_missing(req)
            else:
                scheme = scheme or self.default_scheme
                req.set_field(b"password", password, scheme)
        elif password:
            log.info("auth.nopassword", message="nopassword given and password is not empty", **req.log_context())
            code = PassdbResult.PASSWORD_MISMATCH
        return code, scheme, password


class LuaUserdb(LuaScriptDb):
    """userdb lua: auth_userdb_lookup and auth_userdb_iterate."""

    kind = "userdb"

    async def lookup(self, req: AuthRequest) -> int:
        binding = lua_request(
            req,
            self.environment,
            userdb_lookup=True,
            db_id=self.db_id,
            db_name=self.log_name,
            hide_password=self.blocking,
        )

        async def call(script: Script) -> LookupResult:
            return await script.userdb_lookup(binding, self.pool.run)

        result = await self.pool.call(call)
        self._apply_fields(req, result, userdb=True)
        if result.code == UserdbResult.INTERNAL_FAILURE and result.error is not None:
            self._log_failure(req, result, "userdb-lua")
        return result.code

    async def iterate(self) -> IterateResult:
        async def call(script: Script) -> IterateResult:
            return await script.userdb_iterate(self.pool.run)

        result = await self.pool.call(call)
        if result.error:
            log.error("lua.error", message=result.error)
        return result

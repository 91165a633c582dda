"""One Dovecot Lua auth script loaded into one Lua state.

Loading follows Dovecot's dlua_script_create_file + auth_lua_script_init: check
the file is readable, compile it, define the `dovecot` API, run the main chunk,
then `script_init()`. Each failure raises `ScriptLoadError` with the message
Dovecot would log, so admins recognise it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from lua_api.request import LuaRequest
from lua_api.results import (
    EntryKind,
    IterateResult,
    LookupResult,
    PassdbResult,
    UserdbResult,
    init_result_23,
    iterate_result,
    lookup_result_23,
    lookup_result_24,
)
from lua_api.runtime import Executor, LuaState, drive


class ScriptLoadError(Exception):
    """The script cannot be used; the message is shaped like Dovecot's.

    `stage` says where it failed, which decides how Dovecot 2.4 words the fatal
    error around the message: "file" (reading, compiling), "init" (main chunk,
    script_init) or "cache_key" (auth_*_get_cache_key).
    """

    def __init__(self, message: str, stage: str = "init") -> None:
        super().__init__(message)
        self.stage = stage


def read_script(path: Path) -> bytes:
    """Read the file like luaL_loadfile: a leading '#' line (shebang) is ignored."""
    try:
        if not os.access(path, os.R_OK):
            raise OSError(errno.EACCES if path.exists() else errno.ENOENT, "")
        data = path.read_bytes()
    except OSError as exc:
        raise ScriptLoadError(f"access({path}) failed: {os.strerror(exc.errno or errno.EIO)}", "file") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith(b"#"):
        newline = data.find(b"\n")
        data = b"" if newline < 0 else data[newline:]
    return data


class Script:
    """A script in one state. Calls on it take turns unless the pool interleaves them (see lua_api.pool)."""

    def __init__(self, path: Path, state: LuaState) -> None:
        self.path = path
        self.state = state
        self.dialect = state.options.dialect
        self.has_password_verify = False
        #: 2.4: the cache key template auth_*_get_cache_key() returned; None: no caching.
        self.cache_key_template: bytes | None = None
        #: lua_api.pool's bookkeeping: calls running on the state, and since when it has had none.
        self.calls = 0
        self.idle_since = 0.0

    async def load(self, run: Executor, source: bytes | None = None) -> None:
        """Compile, run the main chunk and script_init(). Raises ScriptLoadError."""
        code = read_script(self.path) if source is None else source
        module = self.state.module
        try:
            chunk = self.state.lua.compile(code, name=f"@{self.path}")
        except module.LuaSyntaxError as exc:
            raise ScriptLoadError(f"lua_load({self.path}) failed: {_text(exc)}", "file") from None
        outcome = await drive(self.state, chunk, b"none", run)
        if not outcome.ok:
            raise ScriptLoadError(f"lua_pcall({self.path}) failed: {outcome.error}")
        if self.state.has_function(b"script_init"):
            if self.dialect == "2.4":
                await self._script_init_24(run)
            else:
                outcome = await drive(self.state, b"script_init", b"init", run)
                if not outcome.ok:
                    raise ScriptLoadError(f"lua_pcall(script_init, 0, 1) failed: {outcome.error}")
                problem = init_result_23(outcome.values)
                if problem is not None:
                    raise ScriptLoadError(problem)
        self._passthrough_leak()
        # Dovecot decides once, at init, whether plain auth uses auth_password_verify.
        self.has_password_verify = self.state.has_function(b"auth_password_verify")

    async def _script_init_24(self, run: Executor) -> None:
        """2.4: script_init(tbl) gets the lua_settings; its return value is ignored."""
        settings = {k.encode(): v.encode() for k, v in self.state.options.lua_settings}
        outcome = await drive(self.state, b"script_init", b"none", run, lambda: (self.state.lua.table_from(settings),))
        if not outcome.ok:
            raise ScriptLoadError(f"lua_pcall(script_init, 1, 0) failed: {outcome.error}")

    async def load_cache_key(self, kind: str, run: Executor) -> None:
        """2.4: call auth_passdb_get_cache_key() (kind "passdb") or auth_userdb_get_cache_key().

        The string it returns is the db's cache key template, kept in
        `cache_key_template`; without the function the db is not cached.
        Raises ScriptLoadError(stage="cache_key") as Dovecot's preinit fails.
        """
        name = f"auth_{kind}_get_cache_key"
        if self.dialect != "2.4" or not self.state.has_function(name.encode()):
            return
        outcome = await drive(self.state, self.state.api[b"cache_key_hook"], b"lookup", run, lambda: (name.encode(),))
        self._report_leak(outcome.leak)
        if not outcome.ok:
            raise ScriptLoadError(f"lua_pcall({name}, 0, 1) failed: {outcome.error}", "cache_key")
        value_type, value = [*outcome.values, None, None, None, None, None][3:5]
        if value_type not in (b"string", b"number"):
            got = value_type.decode() if isinstance(value_type, bytes) else "nil"
            raise ScriptLoadError(f"db-lua: {name} invalid return value (expected string, got {got})", "cache_key")
        self.cache_key_template = value

    async def passdb_lookup(self, request: LuaRequest, run: Executor) -> LookupResult:
        return await self._lookup(EntryKind.PASSDB_LOOKUP, request, run, ())

    async def password_verify(self, request: LuaRequest, password: bytes, run: Executor) -> LookupResult:
        return await self._lookup(EntryKind.PASSWORD_VERIFY, request, run, (password,))

    async def userdb_lookup(self, request: LuaRequest, run: Executor) -> LookupResult:
        return await self._lookup(EntryKind.USERDB_LOOKUP, request, run, ())

    async def _lookup(
        self, kind: EntryKind, request: LuaRequest, run: Executor, extra: tuple[Any, ...]
    ) -> LookupResult:
        request.dialect = self.dialect
        outcome = await drive(
            self.state, kind.value.encode(), b"request", run, lambda: (request, *request.flags, *extra)
        )
        leak = self._report_leak(outcome.leak, always=False)
        failure = UserdbResult.INTERNAL_FAILURE if kind is EntryKind.USERDB_LOOKUP else PassdbResult.INTERNAL_FAILURE
        if not outcome.ok:
            error = outcome.error
            if not outcome.missing_function:
                error = f"lua_pcall({kind.value}, {1 + len(extra)}, 2) failed: {error}"
            elif outcome.values[2:3] == (True,):
                error += (
                    " (with restrict_global_variables(true) Dovecot's lookup of the missing global"
                    " raises outside any pcall: the process would abort)"
                )
            return LookupResult(failure, error=error, failure_kind=outcome.failure_kind)
        if leak is not None and self.dialect == "2.3":
            return LookupResult(
                failure,
                error=f"Passthrough event leaked by Lua script at {leak}; "
                "Dovecot 2.3 would crash on the next passthrough event, failing the request",
            )
        if self.dialect == "2.4":
            return lookup_result_24(kind, outcome.values)
        return lookup_result_23(kind, outcome.values)

    def _passthrough_leak(self) -> None:
        """After loading: log a passthrough event the main chunk or script_init left unlogged."""
        self._report_leak(self.state.api[b"passthrough_leak"]())

    def _report_leak(self, leak: bytes | None, *, always: bool = True) -> str | None:
        """Where a call left a passthrough event without logging it, if it did.

        2.4.3+ aborts such an event after the call and logs an error; 2.3 keeps it
        pending and crashes at the next one (lookups then fail the request instead).
        """
        if leak is None:
            return None
        where: str = leak.decode("utf-8", "replace")
        if always or self.dialect == "2.4":
            self.state.host.log(3, f"Passthrough event leaked by Lua script at {where}", None)
        return where

    async def userdb_iterate(self, run: Executor) -> IterateResult:
        if not await self.state.between_slices(lambda: self.state.has_function(b"auth_userdb_iterate")):
            return IterateResult((), failed=True)  # Dovecot fails the listing silently
        outcome = await drive(self.state, b"auth_userdb_iterate", b"list", run)
        self._report_leak(outcome.leak)
        if not outcome.ok:
            error = f"lua_pcall(auth_userdb_iterate, 0, 1) failed: {outcome.error}"
            return IterateResult((), f"db-lua: auth_userdb_iterate failed: {error}", failed=True)
        return iterate_result(outcome.values)

    async def deinit(self, run: Executor) -> str | None:
        """Call script_deinit() if defined; returns the error text to log, if any."""
        if not await self.state.between_slices(lambda: self.state.has_function(b"script_deinit")):
            return None
        outcome = await drive(self.state, b"script_deinit", b"none", run)
        if not outcome.ok:
            return f"script_deinit() failed: lua_pcall(script_deinit, 0, 0) failed: {outcome.error}"
        return None


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)

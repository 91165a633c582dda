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
)
from lua_api.runtime import Executor, LuaState, drive


class ScriptLoadError(Exception):
    """The script cannot be used; the message is shaped like Dovecot's."""


def read_script(path: Path) -> bytes:
    """Read the file like luaL_loadfile: a leading '#' line (shebang) is ignored."""
    try:
        if not os.access(path, os.R_OK):
            raise OSError(errno.EACCES if path.exists() else errno.ENOENT, "")
        data = path.read_bytes()
    except OSError as exc:
        raise ScriptLoadError(f"access({path}) failed: {os.strerror(exc.errno or errno.EIO)}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith(b"#"):
        newline = data.find(b"\n")
        data = b"" if newline < 0 else data[newline:]
    return data


class Script:
    """A script in one state. Calls on it must not overlap (see lua_api.pool)."""

    def __init__(self, path: Path, state: LuaState) -> None:
        self.path = path
        self.state = state
        self.has_password_verify = False

    async def load(self, run: Executor, source: bytes | None = None) -> None:
        """Compile, run the main chunk and script_init(). Raises ScriptLoadError."""
        code = read_script(self.path) if source is None else source
        module = self.state.module
        try:
            chunk = self.state.lua.compile(code, name=f"@{self.path}")
        except module.LuaSyntaxError as exc:
            raise ScriptLoadError(f"lua_load({self.path}) failed: {_text(exc)}") from None
        outcome = await drive(self.state, chunk, b"none", run)
        if not outcome.ok:
            raise ScriptLoadError(f"lua_pcall({self.path}) failed: {outcome.error}")
        if self.state.has_function(b"script_init"):
            outcome = await drive(self.state, b"script_init", b"init", run)
            if not outcome.ok:
                raise ScriptLoadError(f"lua_pcall(script_init, 0, 1) failed: {outcome.error}")
            problem = init_result_23(outcome.values)
            if problem is not None:
                raise ScriptLoadError(problem)
        # Dovecot decides once, at init, whether plain auth uses auth_password_verify.
        self.has_password_verify = self.state.has_function(b"auth_password_verify")

    async def passdb_lookup(self, request: LuaRequest, run: Executor) -> LookupResult:
        return await self._lookup(EntryKind.PASSDB_LOOKUP, request, run, ())

    async def password_verify(self, request: LuaRequest, password: bytes, run: Executor) -> LookupResult:
        return await self._lookup(EntryKind.PASSWORD_VERIFY, request, run, (password,))

    async def userdb_lookup(self, request: LuaRequest, run: Executor) -> LookupResult:
        return await self._lookup(EntryKind.USERDB_LOOKUP, request, run, ())

    async def _lookup(
        self, kind: EntryKind, request: LuaRequest, run: Executor, extra: tuple[Any, ...]
    ) -> LookupResult:
        outcome = await drive(
            self.state, kind.value.encode(), b"lookup", run, lambda: (request.to_lua(self.state), *extra)
        )
        if not outcome.ok:
            failure = (
                UserdbResult.INTERNAL_FAILURE
                if kind is EntryKind.USERDB_LOOKUP
                else PassdbResult.INTERNAL_FAILURE
            )
            error = outcome.error
            if not outcome.missing_function:
                error = f"lua_pcall({kind.value}, {1 + len(extra)}, 2) failed: {error}"
            return LookupResult(failure, error=error)
        return lookup_result_23(kind, outcome.values)

    async def userdb_iterate(self, run: Executor) -> IterateResult:
        if not self.state.has_function(b"auth_userdb_iterate"):
            return IterateResult((), failed=True)  # Dovecot fails the listing silently
        outcome = await drive(self.state, b"auth_userdb_iterate", b"list", run)
        if not outcome.ok:
            error = f"lua_pcall(auth_userdb_iterate, 0, 1) failed: {outcome.error}"
            return IterateResult((), f"db-lua: auth_userdb_iterate failed: {error}", failed=True)
        return iterate_result(outcome.values)

    async def deinit(self, run: Executor) -> str | None:
        """Call script_deinit() if defined; returns the error text to log, if any."""
        if not self.state.has_function(b"script_deinit"):
            return None
        outcome = await drive(self.state, b"script_deinit", b"none", run)
        if not outcome.ok:
            return f"script_deinit() failed: lua_pcall(script_deinit, 0, 0) failed: {outcome.error}"
        return None


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else ""
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)

"""One Lua state with Dovecot's environment, and how authd drives calls in it.

Each state is a lupa `LuaRuntime` with the prelude (the `dovecot` table, the
request metatable, the I/O hook) loaded before any script code. Entry points run
as Lua coroutines: when a script does I/O (an HTTP request), the coroutine yields
to authd, the event loop performs the I/O without holding a thread, and the
coroutine resumes with the answer. Where a yield is impossible (Lua 5.1, inside a
C boundary, a script's own coroutine) the same I/O blocks the calling thread, as
it would in Dovecot.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import ModuleType
from typing import Any, Protocol

from lua_api.var_expand import VarExpandError

LUA_MODULES = {
    "5.4": "lupa.lua54",
    "5.3": "lupa.lua53",
    "5.1": "lupa.lua51",
    "luajit": "lupa.luajit21",
}

#: Debian 12's compiled-in defaults of liblua5.4, which Dovecot's Lua uses.
DEBIAN_PACKAGE_PATH = (
    "/usr/local/share/lua/{v}/?.lua;/usr/local/share/lua/{v}/?/init.lua;"
    "/usr/local/lib/lua/{v}/?.lua;/usr/local/lib/lua/{v}/?/init.lua;"
    "/usr/share/lua/{v}/?.lua;/usr/share/lua/{v}/?/init.lua;./?.lua;./?/init.lua"
)
DEBIAN_PACKAGE_CPATH = (
    "/usr/local/lib/lua/{v}/?.so;/usr/lib/x86_64-linux-gnu/lua/{v}/?.so;"
    "/usr/lib/lua/{v}/?.so;/usr/local/lib/lua/{v}/loadall.so;./?.so"
)

_loaded: dict[str, ModuleType] = {}


def lua_module(version: str) -> ModuleType:
    """Import the lupa module for a Lua version, with symbols global.

    C modules such as Debian's cjson.so are not linked against a Lua library; they
    find the Lua API in the process only if lupa's Lua was loaded RTLD_GLOBAL.
    """
    if version in _loaded:
        return _loaded[version]
    try:
        name = LUA_MODULES[version]
    except KeyError:
        raise ValueError(f"unknown Lua version {version!r} (known: {', '.join(LUA_MODULES)})") from None
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
    try:
        module = importlib.import_module(name)
    finally:
        sys.setdlopenflags(flags)
    _loaded[version] = module
    return module


class ScriptHost(Protocol):
    """What a Lua state needs from the daemon around it."""

    def log(self, level: int, message: str, context: object | None) -> None:
        """Log a script message; level 0 debug, 1 info, 2 warning, 3 error."""

    def password_verify(self, context: object, crypted: bytes, plain: bytes) -> tuple[int, str | None]:
        """Dovecot's password_verify for req:password_verify()."""


class LuaExtension(Protocol):
    """A piece of the Lua API that performs I/O (dovecot.http, DNS)."""

    kind: bytes

    def install(self, state: LuaState) -> None:
        """Define the extension's Lua side in a fresh state."""

    async def perform(self, payload: Any) -> Any:
        """Do the I/O in the event loop; payload and result are plain Python data."""

    def perform_blocking(self, payload: Any) -> Any:
        """Do the same I/O blocking the current thread (no yield possible here)."""


class RequestBinding(Protocol):
    """The Python side of a Lua request object's `item` (see lua_api.request)."""

    def var_expand(self, template: bytes) -> bytes: ...

    def response_from_template(self, template: bytes) -> list[tuple[bytes, bytes | None]]: ...

    @property
    def context(self) -> object: ...


@dataclass
class StateOptions:
    """How to build a state; shared by all states of one script."""

    version: str = "5.4"
    max_memory: int = 0
    package_path: str | None = None
    package_cpath: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    extensions: tuple[LuaExtension, ...] = ()


class LuaCallError(Exception):
    """An error raised by authd's own machinery inside a state (not by a script)."""


#: Read once at import: a service that drops privileges later may not read it again.
_PRELUDE = resources.files("lua_api").joinpath("prelude.lua").read_bytes()


class LuaState:
    """A Lua state prepared like Dovecot's: stdlib, dovecot table, request support."""

    def __init__(self, host: ScriptHost, options: StateOptions) -> None:
        self.module = lua_module(options.version)
        self.options = options
        self.host = host
        self.lua: Any = self.module.LuaRuntime(
            encoding=None,
            unpack_returned_tuples=True,
            register_eval=False,
            register_builtins=False,
            max_memory=options.max_memory or 0,
        )
        self.extensions = {ext.kind: ext for ext in options.extensions}
        host_table = self.lua.table_from(
            {
                b"log": self._log,
                b"request_log": self._request_log,
                b"password_verify": self._password_verify,
                b"var_expand": self._var_expand,
                b"response_from_template": self._response_from_template,
                b"io_blocking": self._io_blocking,
            }
        )
        self.api = self.lua.execute(_PRELUDE, host_table, name="=authd-prelude")
        self._set_package_paths()
        self._restrict_environment()
        for ext in options.extensions:
            ext.install(self)

    # --- environment -------------------------------------------------------------

    def _set_package_paths(self) -> None:
        version = {"luajit": "5.1"}.get(self.options.version, self.options.version)
        package = self.lua.globals()[b"package"]
        path = self.options.package_path or DEBIAN_PACKAGE_PATH.format(v=version)
        cpath = self.options.package_cpath or DEBIAN_PACKAGE_CPATH.format(v=version)
        package[b"path"] = path.encode()
        package[b"cpath"] = cpath.encode()

    def _restrict_environment(self) -> None:
        """os.getenv sees only the configured environment, like Dovecot's import_environment."""
        env = {k.encode(): v.encode() for k, v in self.options.environment.items()}
        os_table = self.lua.globals()[b"os"]
        if os_table is not None:
            os_table[b"getenv"] = self.lua.eval(
                b"function(env) return function(name) return env[name] end end"
            )(self.lua.table_from(env))

    # --- callbacks from Lua ----------------------------------------------------------

    def _log(self, level: int, message: bytes) -> None:
        self.host.log(level, message.decode("utf-8", "replace"), None)

    def _request_log(self, item: RequestBinding, level: int, message: bytes) -> None:
        self.host.log(level, message.decode("utf-8", "replace"), item.context)

    def _password_verify(self, item: RequestBinding, crypted: Any, plain: Any) -> tuple[int, bytes | None]:
        if not isinstance(crypted, bytes) or not isinstance(plain, bytes):
            crypted = crypted if isinstance(crypted, bytes) else b""
            plain = plain if isinstance(plain, bytes) else b""
        code, error = self.host.password_verify(item.context, crypted, plain)
        return code, error.encode() if error is not None else None

    def _var_expand(self, item: RequestBinding, template: bytes) -> tuple[bool, bytes]:
        try:
            return True, item.var_expand(template)
        except VarExpandError as exc:
            return False, b"var_expand(" + template + b") failed: " + exc.message

    def _response_from_template(self, item: RequestBinding, template: bytes) -> tuple[bool, Any]:
        try:
            pairs = item.response_from_template(template)
        except VarExpandError as exc:
            return False, exc.message
        flat: list[Any] = []
        for key, value in pairs:
            flat += [key, value if value is not None else False]
        return True, self.lua.table_from(flat)

    def _io_blocking(self, kind: bytes, payload: Any) -> Any:
        ext = self.extensions.get(kind)
        if ext is None:
            raise LuaCallError(f"no I/O extension for {kind!r}")
        return self.to_lua(ext.perform_blocking(self.to_python(payload)))

    # --- conversions -------------------------------------------------------------

    def to_python(self, value: Any) -> Any:
        """Copy Lua data into plain Python (tables become dicts, strings bytes)."""
        if self.module.lua_type(value) == "table":
            return {self.to_python(k): self.to_python(v) for k, v in value.items()}
        if self.module.lua_type(value) is not None:
            return None  # functions, userdata, threads: not data
        return value

    def to_lua(self, value: Any) -> Any:
        """Copy plain Python data into Lua (dicts and lists become tables)."""
        if isinstance(value, dict):
            return self.lua.table_from({self.to_lua(k): self.to_lua(v) for k, v in value.items()})
        if isinstance(value, list | tuple):
            return self.lua.table_from([self.to_lua(v) for v in value])
        if isinstance(value, str):
            return value.encode()
        return value

    # --- calls ---------------------------------------------------------------------

    def start(self, target: Any, mode: bytes, args: tuple[Any, ...]) -> Any:
        """Create the coroutine for one call of a global (bytes name) or a function; returns its handle.

        `mode` says how to describe the results: b"lookup" (code, data), b"list",
        b"init" or b"none" (see the prelude's describers).
        """
        return self.api[b"start_call"](target, mode, *args)

    def step(self, coroutine: Any, *values: Any) -> tuple[Any, ...]:
        """Resume a call until it yields for I/O or finishes. Runs Lua: any thread."""
        out = self.api[b"resume"](coroutine, *(self.to_lua(v) for v in values))
        if not isinstance(out, tuple):
            out = (out,)
        if out[:1] == (b"io",):
            return (b"io", out[1], self.to_python(out[2]) if len(out) > 2 else None)
        if out[:1] != (b"done",):
            # The script yielded by itself in authd's coroutine: in Dovecot this is
            # a yield from the main thread, which Lua rejects.
            return (b"done", False, b"attempt to yield from outside a coroutine")
        return tuple(self._as_list(v) for v in out)

    def _as_list(self, value: Any) -> Any:
        if self.module.lua_type(value) != "table":
            return value
        return [self._as_list(value[i]) for i in range(1, len(value) + 1)]

    def abandon(self, handle: Any) -> None:
        """Drop a suspended call that will not be resumed."""
        self.api[b"abandon"](handle)

    def has_function(self, name: bytes) -> bool:
        return bool(self.api[b"has_function"](name))


#: Runs a slice of Lua work somewhere (the event loop thread or a worker thread).
Executor = Callable[[Callable[[], Any]], Awaitable[Any]]


async def run_in_loop(fn: Callable[[], Any]) -> Any:
    """Run a Lua slice right here in the event loop thread (blocking = false)."""
    return fn()


async def drive(
    state: LuaState,
    target: Any,
    mode: bytes,
    run: Executor,
    args: Callable[[], tuple[Any, ...]] = tuple,
) -> CallOutcome:
    """Run one call to completion, doing its I/O in the event loop between slices.

    `args` builds the call's arguments inside the first slice, where the state is
    safe to touch (the Lua request table is created there).
    """
    coroutine: Any = None

    def first() -> tuple[Any, ...]:
        nonlocal coroutine
        coroutine = state.start(target, mode, args())
        return state.step(coroutine)

    out = await run(first)
    try:
        while out[0] == b"io":
            kind, payload = out[1], out[2]
            ext = state.extensions.get(kind)
            if ext is None:
                state.abandon(coroutine)
                return CallOutcome(False, (f"no I/O extension for {kind!r}".encode(),))
            result = await ext.perform(payload)
            out = await run(functools.partial(state.step, coroutine, result))
    except BaseException:
        state.abandon(coroutine)
        raise
    return CallOutcome(bool(out[1]), tuple(out[2:]))


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What an entry point call gave back: its results, or the error text."""

    ok: bool
    values: tuple[Any, ...]

    @property
    def error(self) -> str:
        value = self.values[0] if self.values else b""
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @property
    def missing_function(self) -> bool:
        """The called global was not a function (Dovecot: "'name' is not a function")."""
        return not self.ok and self.values[1:2] == (b"missing",)

"""One Lua state with Dovecot's environment, and how authd drives calls in it.

Each state is a lupa `LuaRuntime` with the prelude (the `dovecot` table, the
request metatable, the I/O hook) loaded before any script code. Entry points run
as Lua coroutines: when a script does I/O (an HTTP request), the coroutine yields
to authd, the event loop performs the I/O without holding a thread, and the
coroutine resumes with the answer. Where a yield is impossible (Lua 5.1, inside a
C boundary, a script's own coroutine) the same I/O blocks the calling thread, as
it would in Dovecot.

Guard rails (guard.lua holds the Lua half): a call, I/O included, ends after
[lua] call_timeout; a count hook stops pure Lua, a cancel scope stops I/O waits,
and a slice stuck in C is given up on together with its state. [lua] max_memory
binds script code only, never lupa's own pushes (an allocation failure there would
abort or deadlock the process); a state that ran out of memory is taken out of
service, and lua_api.pool replaces it.
"""

from __future__ import annotations

import functools
import gc
import importlib
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import ModuleType
from typing import Any, Protocol, TypeVar

import structlog
import trio

from lua_api import library
from lua_api.popen import run_command, run_shell
from lua_api.request import LuaRequest
from lua_api.request_vars import LUA_FIELDS_23, VARS_24
from lua_api.threads import GAVE_UP, STILL_RUNNING, ThreadRunner
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

T = TypeVar("T")

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
    #: Bytes a state may allocate while script code runs ([lua] max_memory); 0 = unlimited.
    max_memory: int = 0
    #: Seconds one call may take, I/O included ([lua] call_timeout); 0 = unlimited.
    call_timeout: float = 30.0
    package_path: str | None = None
    package_cpath: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    extensions: tuple[LuaExtension, ...] = ()
    #: Which Dovecot Lua API the state offers: "2.3" (2.3.19) or "2.4" (2.4.1 and later).
    dialect: str = "2.3"
    #: 2.4: the lua_settings (key, value) pairs handed to script_init(tbl).
    lua_settings: tuple[tuple[str, str], ...] = ()
    #: [lua] log_script_output: log what the script prints (print, io.write, io.stdout
    #: and io.stderr) at debug with its name; otherwise it is dropped, as Dovecot drops it.
    log_script_output: bool = False


class LuaCallError(Exception):
    """An error raised by authd's own machinery inside a state (not by a script)."""


#: Read once at import: a service that drops privileges later may not read it again.
_PRELUDE = resources.files("lua_api").joinpath("prelude.lua").read_bytes()
_GUARD = resources.files("lua_api").joinpath("guard.lua").read_bytes()
_POPEN = resources.files("lua_api").joinpath("popen.lua").read_bytes()

#: The most of one print/io.write that [lua] log_script_output logs, and the longest line.
MAX_OUTPUT = 64 * 1024
MAX_OUTPUT_LINE = 1024

#: VM instructions between two looks at the clock by a call's debug hook: about a
#: millisecond of pure Lua, so the Python call it makes costs nothing noticeable.
HOOK_COUNT = 100_000

#: How long a slice may run past its call's deadline before authd stops waiting for
#: its thread. The hook ends pure Lua within milliseconds; a slice still running
#: after this is stuck in C (a blocking socket read, os.execute, a __gc finalizer).
STUCK_GRACE = 1.0

#: How long after that an os.execute command still runs before it is killed, with what
#: it started: the state it blocks is given up by then, its thread is freed.
EXECUTE_KILL_AFTER = 1.0

log = structlog.get_logger("lua_api")


def _no_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    """lupa's attribute_filter: scripts hold a few Python objects (the request's item,
    callables) but must not walk from them into authd (obj.__class__.__init__.__globals__)."""
    attribute = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    raise AttributeError(f"a script cannot read or set attributes of authd's Python objects (.{attribute})")


class LuaState:
    """A Lua state prepared like Dovecot's: stdlib, dovecot table, request support."""

    def __init__(self, host: ScriptHost, options: StateOptions, *, name: str = "") -> None:
        self.module = lua_module(options.version)
        self.options = options
        self.host = host
        #: The script this state runs, for log lines.
        self.name = name
        #: Why the state must not serve again ("memory", "stuck", "broken"); None while usable.
        self.broken: str | None = None
        # max_memory=0 selects lupa's limiting allocator without a limit: guard.lua sets
        # options.max_memory only while script code runs.
        self.lua: Any = self.module.LuaRuntime(
            encoding=None,
            unpack_returned_tuples=True,
            register_eval=False,
            register_builtins=False,
            max_memory=0,
            attribute_filter=_no_attributes,
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
                b"run_in_threads": self._run_in_threads,
                b"log_output": options.log_script_output,
                b"script_output": self._script_output,
                b"run_command": self._run_command,
                b"request_var": LuaRequest.lua_var,
                b"request_field": LuaRequest.field,
                b"request_var_names": self.lua.table_from(list(VARS_24 if options.dialect == "2.4" else LUA_FIELDS_23)),
                **library.host_functions(self),
            }
        )
        self.api = self.lua.execute(_PRELUDE, host_table, name="=authd-prelude")
        guard_host = self.lua.table_from(
            {
                b"clock": time.monotonic,
                b"set_limit": self._set_limit,
                b"count": HOOK_COUNT if options.call_timeout > 0 else 0,
                b"limited": options.max_memory > 0,
            }
        )
        self.lua.execute(_GUARD, self.api, guard_host, name="=authd-guard")
        self.lua.execute(_POPEN, self.api[b"may_block"], self._run_shell, name="=authd-popen")
        self._set_package_paths()
        self._restrict_environment()
        for ext in options.extensions:
            ext.install(self)
        api = self.api
        self._call = api[b"call"]
        self._resume = api[b"resume"]
        self._abandon = api[b"abandon"]
        self._has_function = api[b"has_function"]
        self._lua_type = self.module.lua_type
        #: With several calls interleaved on this state in worker threads: held around
        #: every slice, so that the calls' slices take turns (set by lua_api.pool).
        self.slice_lock: trio.Lock | None = None
        #: Handles of calls dropped while another call's slice may be running in the
        #: state; forgotten at the start of the next slice.
        self._dropped: list[Any] = []
        #: Calls on this state waiting for their I/O right now, and who wants to know
        #: when one starts to (lua_api.pool grows for them).
        self.io_waits = 0
        self.on_io_wait: Callable[[], None] | None = None
        #: Whether the prelude's may_block() moves calls off the event loop (see
        #: AdaptiveExecutor), and whom to tell when a call could not move.
        self.on_loop = False
        self.on_blocking: Callable[[str], None] | None = None
        self._set_on_loop = api[b"set_on_loop"]

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
            os_table[b"getenv"] = self.lua.eval(b"function(env) return function(name) return env[name] end end")(
                self.lua.table_from(env)
            )

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

    def _set_limit(self, on: bool) -> None:
        """guard.lua: apply [lua] max_memory while script code runs, lift it otherwise."""
        self.lua.set_max_memory(self.options.max_memory if on else 0)

    def set_on_loop(self, flag: bool) -> None:
        """Tell the prelude whether the next slices run in the event loop (between slices only)."""
        if flag != self.on_loop:
            self.on_loop = flag
            self._set_on_loop(flag)

    def blocking_seen(self) -> str | None:
        """What first called may_block() in this state (loading included), if anything did."""
        what = self.api[b"blocking_seen"]()
        return what.decode("utf-8", "replace") if isinstance(what, bytes) else None

    def _run_shell(self, command: bytes, stdin: bytes | None) -> tuple[bytes, bytes, int]:
        done = run_shell(command, stdin, self.options.environment, self.options.call_timeout)
        for line in done.stderr_lines:
            log.error("lua.popen_stderr", script=self.name, line=line)
        return done.stdout, done.kind, done.code

    def _run_command(self, command: bytes) -> tuple[bytes, int]:
        """os.execute: how COMMAND ended ("exit" or "signal", the code); its stderr is logged."""
        limit = self.options.call_timeout
        done = run_command(command, self.options.environment, limit + STUCK_GRACE + EXECUTE_KILL_AFTER if limit else 0)
        for line in done.stderr_lines:
            log.error("lua.execute_stderr", script=self.name, line=line)
        return done.kind, done.code

    def _script_output(self, stream: bytes, text: bytes) -> None:
        """print/io.write output with [lua] log_script_output on: one debug event per line."""
        for line in text[:MAX_OUTPUT].decode("utf-8", "replace").splitlines():
            log.debug("lua.output", script=self.name, stream=stream.decode(), line=line[:MAX_OUTPUT_LINE])

    def _run_in_threads(self, what: bytes) -> None:
        if self.on_blocking is not None:
            self.on_blocking(what.decode("utf-8", "replace"))

    def _io_blocking(self, kind: bytes, payload: Any) -> Any:
        ext = self.extensions.get(kind)
        if ext is None:
            raise LuaCallError(f"no I/O extension for {kind!r}")
        return self.to_lua(ext.perform_blocking(self.to_python(payload)))

    # --- conversions -------------------------------------------------------------

    def to_python(self, value: Any) -> Any:
        """Copy Lua data into plain Python (tables become dicts, strings bytes)."""
        kind = self._lua_type(value)
        if kind is None:
            return value
        if kind == "table":
            return {self.to_python(k): self.to_python(v) for k, v in value.items()}
        return None  # functions, userdata, threads: not data

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
    # These run Lua: call them only where the state is ours (inside a slice).

    def begin(self, deadline: float | None, target: Any, mode: bytes, args: tuple[Any, ...]) -> tuple[Any, Slice]:
        """Start one call of a global (bytes name) or a function, and run its first slice.

        `mode` says how to describe the results: b"lookup" (code, data), b"request"
        (the same, with the request table built from the first five arguments: a
        LuaRequest and its flags), b"list", b"init" or b"none" (see the prelude). After
        `deadline` (a time.monotonic() value) guard.lua's hook ends the call. Returns the
        call's handle and what the slice gave (see `step`).
        """
        if self._dropped:
            self._forget_dropped()
        out = self._call(deadline, target, mode, *args)
        return out[0], self._slice_result(out[1:])

    def step(self, handle: Any, value: Any) -> Slice:
        """Resume a call with the result of its I/O, until it yields again or finishes.

        Returns (b"io", kind, payload as Python data) or (b"done", leak, ok, values...),
        where leak is where the call left a passthrough event unlogged ("file:line").
        """
        if self._dropped:
            self._forget_dropped()
        return self._slice_result(self._resume(handle, self.to_lua(value)))

    def _slice_result(self, out: Any) -> Slice:
        if out[0] == b"io":
            return (b"io", out[1], self.to_python(out[2]) if len(out) > 2 else None)
        if out[0] != b"done":
            # The script yielded by itself in authd's coroutine: in Dovecot this is
            # a yield from the main thread, which Lua rejects.
            return (b"done", None, False, b"attempt to yield from outside a coroutine")
        return out  # type: ignore[no-any-return]

    def as_list(self, value: Any) -> Any:
        """A Lua sequence (nested ones too) as a Python list; anything else as it is."""
        if self._lua_type(value) != "table":
            return value
        return [self.as_list(value[i]) for i in range(1, len(value) + 1)]

    def entry_name(self, target: Any, args: tuple[Any, ...]) -> str:
        name: bytes = self.api[b"entry_name"](target, *args)
        return name.decode("utf-8", "replace")

    def abandon(self, handle: Any) -> bytes | None:
        """Drop a suspended call that will not be resumed; returns its unlogged passthrough event."""
        if self.slice_lock is not None:
            self._dropped.append(handle)  # another call's slice may be running right now
            return None
        leak: bytes | None = self._abandon(handle)
        return leak

    def _forget_dropped(self) -> None:
        dropped = self._dropped
        while dropped:  # pop, not swap: the event loop may append meanwhile
            self._abandon(dropped.pop())

    def has_function(self, name: bytes) -> bool:
        return bool(self._has_function(name))

    async def between_slices(self, fn: Callable[[], T]) -> T:
        """Run a short Lua call from the event loop, where no slice of another call runs."""
        if self.slice_lock is None:
            return fn()
        async with self.slice_lock:
            return fn()

    def give_up(self) -> None:
        """A thread is stuck in this state: never touch it again (see _slice)."""
        self.broken = "stuck"
        self.api = _AbandonedApi()
        self._call = self._resume = self._abandon = self._has_function = _nothing


#: What one slice gave: (b"io", kind, payload) or (b"done", leak, ok, values...).
Slice = tuple[Any, ...]


class _AbandonedApi:
    """The api of a state given up on while a thread still runs Lua in it.

    Every function does nothing and returns None: calling into the state from
    another thread would wait for lupa's lock, that is, for the stuck call.
    """

    def __getitem__(self, name: bytes) -> Callable[..., None]:
        return _nothing


def _nothing(*args: Any) -> None:
    return None


#: Runs a slice of Lua work somewhere: run_in_loop (the event loop thread), or a
#: lua_api.threads.ThreadRunner (worker threads).
Executor = Callable[[Callable[[], Any]], Awaitable[Any]]


async def run_in_loop(fn: Callable[[], Any]) -> Any:
    """Run a Lua slice right here in the event loop thread (blocking = false)."""
    return fn()


#: Seconds one slice of a call may take in the event loop (Python's garbage
#: collections not counted), and how many slices (within SLOW_SLICES_WINDOW) may
#: take longer, before AdaptiveExecutor sends the script's calls to worker threads.
INLINE_SLICE_LIMIT = 0.005
SLOW_SLICES_ALLOWED = 2


#: Slices after which the count of slow ones starts again (a hiccup now and then
#: must not add up over days).
SLOW_SLICES_WINDOW = 10_000


class _GcClock(threading.local):
    """Seconds this thread spent in Python's garbage collector (gc.callbacks)."""

    spent = 0.0
    started = 0.0


_gc_clock = _GcClock()


def _count_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_clock.started = time.perf_counter()
    else:
        _gc_clock.spent += time.perf_counter() - _gc_clock.started


class AdaptiveExecutor:
    """blocking = true without the thread hand-offs, for scripts that never block.

    Dovecot runs blocking passdbs in worker processes so that a script stuck in a
    socket read holds only its worker. Most scripts never block by themselves: their
    HTTP and DNS calls yield to the event loop. So calls start in the event loop, and
    the script moves to worker threads for good (its calls, here `runner`) as soon as
    it does something that may block: a C module function (LuaSocket, ...), io.popen,
    os.execute, io.read, req:password_verify, either while loading or in a call (the
    call then continues in a thread), or when its slices keep running longer than
    INLINE_SLICE_LIMIT. Loading and script_deinit always run in threads.
    """

    def __init__(self, runner: ThreadRunner, name: str) -> None:
        self.runner = runner
        self.name = name
        self.inline = True
        self.slices = 0
        self.slow_slices = 0
        if _count_gc not in gc.callbacks:
            gc.callbacks.append(_count_gc)

    async def __call__(self, fn: Callable[[], Any]) -> Any:
        return await self.runner(fn)

    def slow_slice(self, took: float) -> None:
        self.slow_slices += 1
        if self.slow_slices > SLOW_SLICES_ALLOWED:
            self.to_threads(
                f"{self.slow_slices} slices took over {INLINE_SLICE_LIMIT * 1000:g} ms each "
                f"in the event loop, the last {took * 1000:.1f} ms"
            )

    def to_threads(self, reason: str) -> None:
        if self.inline:
            self.inline = False
            log.info("lua.threads", script=self.name, message=f"calls run in worker threads from now on: {reason}")


def _inline(run: Executor) -> bool:
    return run is run_in_loop or (type(run) is AdaptiveExecutor and run.inline)


def _timed(state: LuaState, run: Executor, fn: Callable[[], Any]) -> Any:
    """An inline slice; slices that run too long send an adaptive script to threads.

    What counts is the CPU time the slice took, minus Python's garbage collections
    (not the script's doing). Wall time alone would also count the time the slice
    waited for the GIL (a Lua state loading in a pool's thread holds it for up to
    Python's 5 ms switch interval) or for a core the scheduler gave to another
    process: under load, that sent scripts that never block to threads within a
    second. The CPU clock costs a system call (about 0.5 µs); its second reading is
    only taken for slices over the limit in wall time.
    """
    if type(run) is not AdaptiveExecutor:
        return _guarded(state, fn)
    started, cpu_started, collecting = time.perf_counter(), time.thread_time(), _gc_clock.spent
    try:
        return _guarded(state, fn)
    finally:
        collected = _gc_clock.spent - collecting
        if time.perf_counter() - started - collected > INLINE_SLICE_LIMIT:
            took = time.thread_time() - cpu_started - collected
            if took > INLINE_SLICE_LIMIT:
                run.slow_slice(took)
        run.slices += 1
        if run.slices >= SLOW_SLICES_WINDOW:
            run.slices = run.slow_slices = 0


def _guarded(state: LuaState, fn: Callable[[], Any]) -> Any:
    """Run a slice; a LuaError here is the machinery's (out of memory in lupa's pushes)."""
    try:
        return fn()
    except state.module.LuaError as exc:
        state.lua.set_max_memory(0)
        return (b"done", None, False, _error_text(exc), b"broken")


async def _slice(state: LuaState, run: Executor, fn: Callable[[], Any], deadline: float) -> Any:
    """Run one slice in a worker thread; None if authd stopped waiting for it at `deadline` + STUCK_GRACE.

    The slice is shielded from outside cancellation: a thread running Lua cannot be
    interrupted, only given up on, and that costs the state. When the grace runs out
    while the thread is inside the state, the state is marked "stuck": it is never
    touched again, and the thread finishes whenever its C call returns.
    """
    if type(run) is AdaptiveExecutor:
        run = run.runner
    assert isinstance(run, ThreadRunner)
    lock = state.slice_lock
    if lock is not None:
        acquired = False
        with trio.move_on_at(deadline + STUCK_GRACE):
            await lock.acquire()
            acquired = True
        if not acquired:
            return None
        if state.broken is not None:  # the call before ours got stuck in it
            lock.release()
            return None
    try:
        result = await run.run(functools.partial(_guarded, state, fn), deadline + STUCK_GRACE)
    finally:
        if lock is not None:
            lock.release()
    if result is STILL_RUNNING:
        state.give_up()
    elif result is not GAVE_UP:
        return result
    return None


def _error_text(exc: BaseException) -> bytes:
    arg = exc.args[0] if exc.args else ""
    return arg if isinstance(arg, bytes) else str(arg).encode("utf-8", "replace")


async def drive(
    state: LuaState,
    target: Any,
    mode: bytes,
    run: Executor,
    args: Callable[[], tuple[Any, ...]] = tuple,
) -> CallOutcome:
    """Run one call to completion, doing its I/O in the event loop between slices.

    `args` builds the call's arguments inside the first slice, where the state is
    safe to touch. The whole call, I/O included, must end within [lua] call_timeout;
    running out of time or memory fails it (and may cost the state, see
    LuaState.broken). A call without I/O is one slice: in the event loop (run_in_loop)
    it runs right here without a checkpoint, elsewhere it is one hand-off to `run`.
    """
    if state.broken is not None:
        return CallOutcome(False, (b"authd: this Lua state is out of service", b"broken"))
    timeout = state.options.call_timeout
    lua_deadline = time.monotonic() + timeout if timeout > 0 else None
    names: list[str] = []

    def first() -> tuple[Any, Slice]:
        argv = args()
        if not isinstance(target, bytes):
            names.append(state.entry_name(target, argv))
        return state.begin(lua_deadline, target, mode, argv)

    deadline = trio.current_time() + timeout if timeout > 0 else math.inf
    inline = _inline(run)
    if type(run) is AdaptiveExecutor:
        state.set_on_loop(inline)
    if inline:
        started = _timed(state, run, first)
    else:
        started = await _slice(state, run, first, deadline)
    handle: Any = None
    out: Slice | None = None
    if started is not None and started[0] == b"done":  # the machinery failed
        out = started
    elif started is not None:
        handle, out = started
        if out[0] == b"io":
            out = await _io(state, run, handle, out, deadline, inline)
    entry = target.decode("utf-8", "replace") if isinstance(target, bytes) else (names or ["main chunk"])[0]
    if out is None or out[0] == b"io":
        leak = state.abandon(handle) if handle is not None else None
        if out is not None:
            waiting = f"{out[1].decode('utf-8', 'replace')} I/O"
        else:
            waiting = "a blocking call" if state.broken == "stuck" else "a worker thread"
        return _timed_out(state, entry, waiting, b"", leak)
    leak, ok, values = out[1], out[2], out[3:]
    if ok:
        if mode == b"request" or mode == b"lookup":
            return CallOutcome(True, _lookup_values(values), leak)
        return CallOutcome(True, tuple(state.as_list(v) for v in values), leak)
    marker = values[1] if len(values) > 1 else None
    if marker == b"timeout":
        return _timed_out(state, entry, "Lua code", values[0] or b"", leak)
    text = values[0] if isinstance(values[0], bytes) else b""
    if b"not enough memory" in text or marker == b"broken":
        return _out_of_service(state, entry, text, leak)
    return CallOutcome(False, values, leak)


async def _io(state: LuaState, run: Executor, handle: Any, out: Slice, deadline: float, inline: bool) -> Slice | None:
    """Do the I/O a call yields for and resume it with the results, until it finishes.

    Returns the last slice's result, still an I/O request if the deadline passed
    while waiting for it, or None if authd stopped waiting for a slice's thread.
    """
    current: Slice | None = out
    try:
        with trio.move_on_at(deadline):
            while current is not None and current[0] == b"io":
                kind, payload = current[1], current[2]
                if kind == b"thread" and type(run) is AdaptiveExecutor:
                    # may_block() in an event-loop slice: go on in a worker thread
                    run.to_threads(f"the script called {payload.decode('utf-8', 'replace')}")
                    state.set_on_loop(False)
                    inline = False
                    current = await _slice(state, run, functools.partial(state.step, handle, None), deadline)
                    continue
                ext = state.extensions.get(kind)
                if ext is None:
                    state.abandon(handle)
                    return (b"done", None, False, f"no I/O extension for {kind!r}".encode())
                state.io_waits += 1
                if state.on_io_wait is not None:
                    state.on_io_wait()
                try:
                    result = await ext.perform(payload)
                finally:
                    state.io_waits -= 1
                resume = functools.partial(state.step, handle, result)
                if inline and not _inline(run):  # the script moved to threads meanwhile
                    inline = False
                    state.set_on_loop(False)
                if inline:
                    current = _timed(state, run, resume)
                else:
                    current = await _slice(state, run, resume, deadline)
    except BaseException:
        state.abandon(handle)
        raise
    return current


def _lookup_values(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """The prelude's flat describe_result() as (is_number, code, code_type, data_type, data, crash, warnings).

    For a table without a crash reason `data` is the field list [key, value, ...] and
    `warnings` the list of warnings.
    """
    if len(values) > 6 and values[3] == b"table" and values[5] is None:
        count = values[6]
        return (*values[:4], list(values[7 + count :]), None, list(values[7 : 7 + count]))
    return (*values, *(None,) * (7 - len(values)))[:7]


def _timed_out(state: LuaState, entry: str, waiting: str, where: bytes, leak: bytes | None) -> CallOutcome:
    """The call ran out of [lua] call_timeout; `where` is the script's traceback if it was running."""
    timeout = state.options.call_timeout
    stuck = state.broken == "stuck"
    log.error(
        "lua.timeout",
        script=state.name,
        entry=entry,
        timeout=timeout,
        waiting_for=waiting,
        where=where.decode("utf-8", "replace").partition("\n\t")[2].partition("\n")[0] or None,
        state="replaced" if stuck else "kept",
    )
    message = f"timed out after {timeout:g} s in {waiting} ([lua] call_timeout)".encode()
    if stuck:
        message += b"; the Lua state is abandoned and replaced"
    if where:
        message += b"\n" + where
    return CallOutcome(False, (message, b"timeout"), leak)


def _out_of_service(state: LuaState, entry: str, text: bytes, leak: bytes | None) -> CallOutcome:
    """Out of memory (or the machinery failed): the state may hold half-built data, so it is rebuilt."""
    limit = state.options.max_memory
    if b"not enough memory" in text:
        state.broken = "memory"
        log.error(
            "lua.memory",
            script=state.name,
            entry=entry,
            max_memory=limit,
            used=state.lua.get_memory_used(),
            state="rebuilt",
        )
        text += b" ([lua] max_memory = %d bytes; the Lua state is rebuilt)" % limit
    else:
        state.broken = "broken"
        log.error("lua.state_broken", script=state.name, entry=entry, message=_text(text), state="rebuilt")
        text += b" (the Lua state is rebuilt)"
    return CallOutcome(False, (text, b"broken"), leak)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What an entry point call gave back: its results, or the error text."""

    ok: bool
    values: tuple[Any, ...]
    #: Where an entry point left a passthrough event unlogged ("file:line"), if it did.
    leak: bytes | None = None

    @property
    def error(self) -> str:
        value = self.values[0] if self.values else b""
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @property
    def failure_kind(self) -> str:
        """Why the call failed, for metrics: timeout, memory, broken (the state), or error."""
        marker = self.values[1:2]
        if marker == (b"timeout",):
            return "timeout"
        if marker == (b"broken",):
            return "memory" if "not enough memory" in self.error else "broken"
        return "error"

    @property
    def missing_function(self) -> bool:
        """The called global was not a function (Dovecot: "'name' is not a function")."""
        return not self.ok and self.values[1:2] == (b"missing",)

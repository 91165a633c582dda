"""An elastic pool of independent Lua states running one script, like Dovecot's auth workers.

Every state loads the script on its own (main chunk, script_init) and, by default,
serves one call at a time, so scripts may keep per-request scratch data in globals
as they do under Dovecot. A call holds its state for its whole duration, including
any HTTP wait; the wait itself holds no thread (see lua_api.runtime), so what limits
how many calls wait on backends at once is the number of states.

The pool therefore grows: a call that finds no free state while states wait for I/O
starts loading a new one (up to `max_size`) and takes whichever state frees up
first, the new one or an old one. States beyond the base `size` that stay idle for `idle_timeout` seconds are
retired (script_deinit), as Dovecot's idle auth workers exit. A script that is safe
to interleave may take `calls_per_state` calls per state: they run as coroutines on
the same state, taking turns at each I/O wait.

A state that ran out of memory, or was given up on while stuck in C, may hold
half-built data (or still be in use by its thread): it never serves again. While the
pool has fewer states than `size`, a fresh state is loaded in the background to
replace it, retrying until the script loads.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog
import trio

from lua_api.runtime import AdaptiveExecutor, Executor, LuaState, ScriptHost, StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError, read_script
from lua_api.threads import runner_for

T = TypeVar("T")

#: Seconds before a failed rebuild (or, after a failed growth, the next growth) is
#: tried again; doubles up to REBUILD_MAX_DELAY.
REBUILD_DELAY = 1.0
REBUILD_MAX_DELAY = 60.0

log = structlog.get_logger("lua_api")


def adaptive_executor(limiter: trio.CapacityLimiter, options: StateOptions, name: str) -> Executor:
    """blocking = true: calls in the event loop until the script may block (Lua 5.3/5.4),
    then in worker threads; on Lua 5.1 and LuaJIT, which cannot move a call, always threads."""
    if options.version in ("5.4", "5.3"):
        return AdaptiveExecutor(runner_for(limiter), name)
    return thread_executor(limiter)


def thread_executor(limiter: trio.CapacityLimiter) -> Executor:
    """Run Lua slices in worker threads; lupa releases the GIL.

    At most `limiter.total_tokens` threads, shared by every pool using the limiter
    (lua_api.threads). Cancelling a slice abandons its thread (lua_api.runtime decides
    what that costs the state); the thread keeps its limiter token until it ends.
    """
    return runner_for(limiter)


class _Waiter:
    """A call waiting for a state; the pool hands it one by setting `script`."""

    __slots__ = ("event", "script")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.script: Script | None = None


class ScriptPool:
    """Between `size` and `max_size` states of the script at `path`; `call()` borrows one."""

    def __init__(
        self,
        path: Path,
        host: ScriptHost,
        options: StateOptions,
        *,
        size: int,
        run: Executor = run_in_loop,
        max_size: int | None = None,
        idle_timeout: float = 60.0,
        calls_per_state: int = 1,
    ) -> None:
        self.path = path
        self.host = host
        self.options = options
        #: States loaded at start and kept while idle.
        self.size = size
        #: States the pool may grow to while calls wait.
        self.max_size = max(size, max_size or size)
        self.idle_timeout = idle_timeout
        self.calls_per_state = calls_per_state
        self.run = run
        #: Every state in service, in the order they were loaded.
        self.scripts: list[Script] = []
        #: States that can take another call, the most recently released last.
        self._free: list[Script] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()
        #: States running at least one call.
        self.busy = 0
        #: Called with the seconds a call waited for a state, for calls that had to wait.
        self.on_wait: Callable[[float], None] | None = None
        self._source = b""
        self.has_password_verify = False
        #: States being loaded (growths and rebuilds), and the scopes that stop them.
        self._loading: set[trio.CancelScope] = set()
        self._loaded = trio.Event()
        self._grow_delay = REBUILD_DELAY
        self._grow_after = -float("inf")
        #: Stops the task that retires idle states, while it runs.
        self._reaper: trio.CancelScope | None = None
        self._closed = False

    async def start(self) -> None:
        """Load the script into `size` states. Raises ScriptLoadError on the first failure."""
        self._source = read_script(self.path)
        loaded: list[Script] = []
        errors: list[ScriptLoadError] = []
        async with trio.open_nursery() as nursery:
            for _ in range(self.size):
                nursery.start_soon(self._load_one, loaded, errors, nursery.cancel_scope)
        if errors:
            raise errors[0]
        # Dovecot decides once, at init, whether plain auth uses auth_password_verify.
        self.has_password_verify = loaded[0].has_password_verify
        for script in loaded:
            self._add(script)

    async def _load_one(self, loaded: list[Script], errors: list[ScriptLoadError], scope: trio.CancelScope) -> None:
        try:
            loaded.append(await self._load())
        except ScriptLoadError as exc:
            errors.append(exc)
            scope.cancel()  # one failure is enough: the script is broken

    async def _load(self) -> Script:
        state: LuaState = await self.run(self._new_state)
        state.on_io_wait = self._io_wait
        if self.calls_per_state > 1 and self.run is not run_in_loop:
            state.slice_lock = trio.Lock()
        script = Script(self.path, state)
        await script.load(self.run, self._source)
        if type(self.run) is AdaptiveExecutor:
            run = self.run
            state.on_blocking = lambda what: run.to_threads(f"the script called {what} where a call cannot move")
            seen = state.blocking_seen()
            if seen is not None:
                run.to_threads(f"loading the script called {seen}")
        return script

    def _new_state(self) -> LuaState:
        return LuaState(self.host, self.options, name=str(self.path))

    @property
    def states(self) -> int:
        """States in service (busy or not), for metrics."""
        return len(self.scripts)

    # --- calls -----------------------------------------------------------------------

    async def call(self, fn: Callable[[Script], Awaitable[T]]) -> T:
        """Run `fn` with one state (exclusively, unless calls_per_state > 1)."""
        if self._free:
            script = self._free[-1]
            self._take(script)
        else:
            script = await self._wait()
        try:
            return await fn(script)
        finally:
            self._release(script)

    def _take(self, script: Script) -> None:
        """Start a call on the state on top of the free list."""
        script.calls += 1
        if script.calls == 1:
            self.busy += 1
        if script.calls == self.calls_per_state:
            self._free.pop()

    async def _wait(self) -> Script:
        started = trio.current_time()
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._grow()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.script is not None:  # handed a state as the wait was cancelled
                self._release(waiter.script)
            else:
                self._waiters.remove(waiter)
            raise
        if self.on_wait is not None:
            self.on_wait(trio.current_time() - started)
        assert waiter.script is not None
        return waiter.script

    def _release(self, script: Script) -> None:
        script.calls -= 1
        if script.calls == 0:
            self.busy -= 1
            script.idle_since = trio.current_time()
        if script.state.broken is not None:
            self._retire_broken(script)
            return
        if script.calls == self.calls_per_state - 1:  # it was full: it has room again
            self._free.append(script)
        if self._waiters:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand free states to the calls that waited longest."""
        while self._waiters and self._free:
            script = self._free[-1]
            self._take(script)
            waiter = self._waiters.popleft()
            waiter.script = script
            waiter.event.set()

    def _add(self, script: Script) -> None:
        """A freshly loaded state enters service."""
        self.scripts.append(script)
        script.idle_since = trio.current_time()
        self._free.append(script)
        self._dispatch()
        if len(self.scripts) > self.size and self._reaper is None:
            self._reaper = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._reap, self._reaper)

    # --- growing, rebuilding, retiring -----------------------------------------------------

    def _grow(self) -> None:
        """A call is waiting: load one more state if the pool may grow and it would help.

        It helps while states are held by calls waiting for I/O. States busy with Lua
        (or waiting for a worker thread) all compete for the same threads and cores: more
        of them would only cost memory and loading time.
        """
        if (
            self._closed
            or len(self.scripts) + len(self._loading) >= self.max_size
            or len(self._loading) >= len(self._waiters)
            or trio.current_time() < self._grow_after
            or not any(script.state.io_waits for script in self.scripts)
        ):
            return
        scope = trio.CancelScope()
        self._loading.add(scope)
        trio.lowlevel.spawn_system_task(self._add_state, scope, None)

    def _io_wait(self) -> None:
        """A call started waiting for I/O: calls waiting for a state now have a reason to grow the pool."""
        if self._waiters:
            self._grow()

    def _retire_broken(self, script: Script) -> None:
        """Take a state out of service for good; reload one if the pool fell below `size`."""
        if script in self.scripts:
            self.scripts.remove(script)
            if script in self._free:
                self._free.remove(script)
            if not self._closed and len(self.scripts) + len(self._loading) < self.size:
                scope = trio.CancelScope()
                self._loading.add(scope)
                trio.lowlevel.spawn_system_task(self._add_state, scope, script)
        if self._waiters:
            self._grow()  # the waiting calls lost a state they were waiting for

    async def _add_state(self, scope: trio.CancelScope, broken: Script | None) -> None:
        """Load a state and put it into service: a growth, or a rebuild of `broken`, which retries until it loads.

        A system task: it outlives the call that started it, and must not raise.
        """
        delay = REBUILD_DELAY
        script: Script | None = None
        with scope:
            while script is None:
                try:
                    script = await self._load()
                except Exception as exc:  # ScriptLoadError, or anything else: log (and retry)
                    if broken is None:
                        log.error("lua.grow_failed", script=str(self.path), message=str(exc))
                        self._grow_after = trio.current_time() + self._grow_delay
                        self._grow_delay = min(self._grow_delay * 2, REBUILD_MAX_DELAY)
                        break
                    log.error("lua.rebuild_failed", script=str(self.path), message=str(exc), retry_in=delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, REBUILD_MAX_DELAY)
        self._loading.discard(scope)
        if script is not None and self._closed:
            with trio.CancelScope(shield=True):
                await self._deinit(script)
        elif script is not None:
            if broken is not None:
                script.cache_key_template = broken.cache_key_template
                log.info("lua.state_rebuilt", script=str(self.path), reason=broken.state.broken)
            else:
                script.cache_key_template = self.scripts[0].cache_key_template if self.scripts else None
                self._grow_delay = REBUILD_DELAY
                log.debug("lua.state_added", script=str(self.path), states=len(self.scripts) + 1)
            self._add(script)
        if not self._loading:
            self._loaded.set()
            self._loaded = trio.Event()

    async def _reap(self, scope: trio.CancelScope) -> None:
        """Retire the longest idle states above `size` once idle for `idle_timeout` (a system task).

        A state that is busy now becomes idle no earlier than now, so sleeping for
        `idle_timeout` when no state is idle never misses one that is due.
        """
        with scope:
            while len(self.scripts) > self.size:
                now = trio.current_time()
                idle = [s for s in self._free if s.calls == 0]
                oldest = min(idle, key=lambda s: s.idle_since, default=None)
                if oldest is None or oldest.idle_since + self.idle_timeout > now:
                    wake = oldest.idle_since + self.idle_timeout if oldest is not None else now + self.idle_timeout
                    await trio.sleep_until(wake)
                    continue
                self.scripts.remove(oldest)
                self._free.remove(oldest)
                log.debug("lua.state_retired", script=str(self.path), states=len(self.scripts))
                with trio.CancelScope(shield=True):
                    await self._deinit(oldest)
        self._reaper = None

    async def _deinit(self, script: Script) -> None:
        error = await script.deinit(self.run)
        if error is not None:
            log.error("lua.deinit_failed", script=str(self.path), message=error)

    async def close(self) -> list[str]:
        """Stop loading states and run script_deinit() on every usable one; returns the errors to log."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        for scope in self._loading:
            scope.cancel()
        while self._loading:  # loads finish (a slice in a thread may take a moment)
            await self._loaded.wait()
        errors = []
        scripts, self.scripts, self._free = self.scripts, [], []
        for script in scripts:
            if script.state.broken is not None:
                continue
            error = await script.deinit(self.run)
            if error is not None:
                errors.append(error)
        return errors

"""A pool of independent Lua states running one script, like Dovecot's auth workers.

Every state loads the script on its own (main chunk, script_init) and serves one
call at a time, so scripts may keep per-request scratch data in globals as they
do under Dovecot. A call holds its state for its whole duration, including any
HTTP wait; the wait itself holds no thread (see lua_api.runtime).

A state that ran out of memory, or was given up on while stuck in C, may hold
half-built data (or still be in use by its thread): it never serves again. A
fresh state loads the script in the background and takes its place; until then
the pool serves with one state fewer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import structlog
import trio

from lua_api.runtime import Executor, LuaState, ScriptHost, StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError, read_script

T = TypeVar("T")

#: Seconds before a failed rebuild is tried again; doubles up to REBUILD_MAX_DELAY.
REBUILD_DELAY = 1.0
REBUILD_MAX_DELAY = 60.0

log = structlog.get_logger("lua_api")


def thread_executor(limiter: trio.CapacityLimiter) -> Executor:
    """Run Lua slices in worker threads (blocking = true); lupa releases the GIL.

    Cancelling a slice abandons its thread (lua_api.runtime decides what that costs
    the state); the thread keeps its limiter token until it really ends.
    """

    async def run(fn: Callable[[], object]) -> object:
        return await trio.to_thread.run_sync(fn, limiter=limiter, abandon_on_cancel=True)

    return run


class ScriptPool:
    """`size` states of the script at `path`; `call()` borrows a free one."""

    def __init__(
        self,
        path: Path,
        host: ScriptHost,
        options: StateOptions,
        *,
        size: int,
        run: Executor = run_in_loop,
    ) -> None:
        self.path = path
        self.host = host
        self.options = options
        self.size = size
        self.run = run
        #: One script per state, in a fixed order (a rebuilt state takes its predecessor's place).
        self.scripts: list[Script] = []
        self._send, self._idle = trio.open_memory_channel[Script](size)
        self._source = b""
        self._rebuilds: set[trio.CancelScope] = set()
        self._closed = False

    async def start(self) -> None:
        """Load the script into every state. Raises ScriptLoadError on the first failure."""
        self._source = read_script(self.path)
        loaded: list[Script] = []
        errors: list[ScriptLoadError] = []
        async with trio.open_nursery() as nursery:
            for _ in range(self.size):
                nursery.start_soon(self._load_one, loaded, errors, nursery.cancel_scope)
        if errors:
            raise errors[0]
        self.scripts = loaded
        for script in loaded:
            self._send.send_nowait(script)

    async def _load_one(self, loaded: list[Script], errors: list[ScriptLoadError], scope: trio.CancelScope) -> None:
        try:
            loaded.append(await self._load())
        except ScriptLoadError as exc:
            errors.append(exc)
            scope.cancel()  # one failure is enough: the script is broken

    async def _load(self) -> Script:
        state: LuaState = await self.run(self._new_state)
        script = Script(self.path, state)
        await script.load(self.run, self._source)
        return script

    def _new_state(self) -> LuaState:
        return LuaState(self.host, self.options, name=str(self.path))

    @property
    def has_password_verify(self) -> bool:
        return self.scripts[0].has_password_verify

    async def call(self, fn: Callable[[Script], Awaitable[T]]) -> T:
        """Run `fn` with exclusive use of one state."""
        script = await self._idle.receive()
        try:
            return await fn(script)
        finally:
            if script.state.broken is None:
                self._send.send_nowait(script)
            elif not self._closed:
                scope = trio.CancelScope()
                self._rebuilds.add(scope)
                trio.lowlevel.spawn_system_task(self._rebuild, script, scope)

    async def _rebuild(self, broken: Script, scope: trio.CancelScope) -> None:
        """Load the script into a fresh state to replace `broken`, retrying until it works.

        A system task: it outlives the request that broke the state, and must not raise.
        """
        delay = REBUILD_DELAY
        with scope:
            while True:
                try:
                    script = await self._load()
                except Exception as exc:  # ScriptLoadError, or anything else: log, retry
                    log.error("lua.rebuild_failed", script=str(self.path), message=str(exc), retry_in=delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, REBUILD_MAX_DELAY)
                    continue
                if self._closed:
                    break
                script.cache_key_template = broken.cache_key_template
                self.scripts[self.scripts.index(broken)] = script
                self._send.send_nowait(script)
                log.info("lua.state_rebuilt", script=str(self.path), reason=broken.state.broken)
                break
        self._rebuilds.discard(scope)

    async def close(self) -> list[str]:
        """Stop rebuilds, run script_deinit() on every usable state; returns the errors to log."""
        self._closed = True
        for scope in self._rebuilds:
            scope.cancel()
        errors = []
        for script in self.scripts:
            if script.state.broken is not None:
                continue
            error = await script.deinit(self.run)
            if error is not None:
                errors.append(error)
        self.scripts = []
        return errors

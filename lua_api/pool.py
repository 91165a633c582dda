"""A pool of independent Lua states running one script, like Dovecot's auth workers.

Every state loads the script on its own (main chunk, script_init) and serves one
call at a time, so scripts may keep per-request scratch data in globals as they
do under Dovecot. A call holds its state for its whole duration, including any
HTTP wait; the wait itself holds no thread (see lua_api.runtime).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from lua_api.runtime import Executor, LuaState, ScriptHost, StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError, read_script

T = TypeVar("T")


def thread_executor(limiter: trio.CapacityLimiter) -> Executor:
    """Run Lua slices in worker threads (blocking = true); lupa releases the GIL."""

    async def run(fn: Callable[[], object]) -> object:
        return await trio.to_thread.run_sync(fn, limiter=limiter)

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
        self.scripts: list[Script] = []
        self._send, self._idle = trio.open_memory_channel[Script](size)

    async def start(self) -> None:
        """Load the script into every state. Raises ScriptLoadError on the first failure."""
        source = read_script(self.path)
        loaded: list[Script] = []
        errors: list[ScriptLoadError] = []
        async with trio.open_nursery() as nursery:
            for _ in range(self.size):
                nursery.start_soon(self._load_one, source, loaded, errors, nursery.cancel_scope)
        if errors:
            raise errors[0]
        self.scripts = loaded
        for script in loaded:
            self._send.send_nowait(script)

    async def _load_one(
        self, source: bytes, loaded: list[Script], errors: list[ScriptLoadError], scope: trio.CancelScope
    ) -> None:
        state: LuaState = await self.run(self._new_state)
        script = Script(self.path, state)
        try:
            await script.load(self.run, source)
        except ScriptLoadError as exc:
            errors.append(exc)
            scope.cancel()  # one failure is enough: the script is broken
            return
        loaded.append(script)

    def _new_state(self) -> LuaState:
        return LuaState(self.host, self.options)

    @property
    def has_password_verify(self) -> bool:
        return self.scripts[0].has_password_verify

    async def call(self, fn: Callable[[Script], Awaitable[T]]) -> T:
        """Run `fn` with exclusive use of one state."""
        script = await self._idle.receive()
        try:
            return await fn(script)
        finally:
            self._send.send_nowait(script)

    async def close(self) -> list[str]:
        """Run script_deinit() on every state; returns the errors to log."""
        errors = []
        for script in self.scripts:
            error = await script.deinit(self.run)
            if error is not None:
                errors.append(error)
        self.scripts = []
        return errors

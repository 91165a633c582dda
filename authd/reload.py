"""Hot reload: generations of databases, and the watcher that notices script edits.

A Generation is what one version of the config and its scripts answers with. A
database call holds the generation it started on until it returns. A reload builds
and starts (script_init) a new generation beside the serving one and switches to it
only when all of it loaded; the old one is then retired: once its last call has
returned, its states run script_deinit. A broken edit never replaces a working script.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from authd.auth_request import UsernameRules
from authd.passdb import PassdbChain
from authd.userdb import UserdbChain
from config.schema import Config
from protocol.mechanisms import Mechanism

log = structlog.get_logger("authd.reload")

#: What os.stat says about a file that matters for "did it change" (None: missing).
Stamp = tuple[int, int, int, int] | None


@dataclass(eq=False)
class Generation:
    """One config version's username rules, mechanisms, passdbs and userdbs."""

    number: int
    config: Config
    rules: UsernameRules
    mechanisms: list[type[Mechanism]]
    passdbs: PassdbChain
    userdbs: UserdbChain
    calls: int = 0
    retired: bool = False
    closed: bool = False
    idle: trio.Event = field(default_factory=trio.Event)

    @contextmanager
    def use(self) -> Iterator[Generation]:
        """Hold this generation for one database call."""
        self.calls += 1
        try:
            yield self
        finally:
            self.calls -= 1
            if self.retired and self.calls == 0:
                self.idle.set()

    async def start(self) -> None:
        """Load every script into its states (raises ScriptLoadError)."""
        await self.passdbs.start()
        await self.userdbs.start()

    async def close(self) -> None:
        """Run script_deinit on every state, once (a shutdown may close a retiring generation)."""
        if self.closed:
            return
        self.closed = True
        await self.passdbs.close()
        await self.userdbs.close()

    async def retire(self) -> None:
        """Wait for the calls still running on this generation, then deinit its scripts."""
        self.retired = True
        if self.calls == 0:
            self.idle.set()
        await self.idle.wait()
        with trio.CancelScope(shield=True):
            await self.close()
        log.info("reload.retired", generation=self.number)


def script_files(config: Config) -> tuple[Path, ...]:
    """The Lua scripts a config runs, each once."""
    files = [db.file for db in config.passdbs if db.driver == "lua" and db.file is not None]
    files += [db.file for db in config.userdbs if db.driver == "lua" and db.file is not None]
    return tuple(dict.fromkeys(files))


def stamp(path: Path) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


#: How long an edit must hold still before it is loaded (an editor may write in steps).
SETTLE_SECS = 0.2


class ScriptWatcher:
    """Polls the script files and calls `on_change` once an edit has settled.

    A poll that sees an edit looks again after SETTLE_SECS, and again, until the files
    stop changing: an editor that writes in steps triggers one reload, not one per step,
    and an edit is live at most `interval` + SETTLE_SECS after it is written (plus the
    load). Atomic renames change the inode and are seen like in-place writes.
    """

    def __init__(
        self,
        files: Callable[[], tuple[Path, ...]],
        on_change: Callable[[list[Path]], Awaitable[object]],
        interval: float,
    ) -> None:
        self.files = files
        self.on_change = on_change
        self.interval = interval
        self.seen: dict[Path, Stamp] = {}

    def snapshot(self, files: tuple[Path, ...] | None = None) -> dict[Path, Stamp]:
        """The stamps of `files` (by default the watched ones)."""
        return {path: stamp(path) for path in (self.files() if files is None else files)}

    def reset(self) -> None:
        """Take the files as they are now as the baseline: call it before loading them,
        so that an edit made while they load is seen as one."""
        self.seen = self.snapshot()

    async def run(self) -> None:
        if not self.seen:  # normally taken before the scripts were loaded
            self.reset()
        while True:
            await trio.sleep(self.interval)
            current = self.snapshot()
            while current != self.seen:
                await trio.sleep(min(SETTLE_SECS, self.interval))
                settled, current = current, self.snapshot()
                if current == settled:
                    changed = [path for path, value in current.items() if self.seen.get(path) != value]
                    self.seen = current
                    await self.on_change(changed)

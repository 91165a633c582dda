"""The script watcher on real files in virtual time (trio's MockClock): how soon an edit is live.

README promises an edited script is live within a second: with 0.5 s polls an edit is
noticed by the next poll and taken once it held still for SETTLE_SECS.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from authd.reload import SETTLE_SECS, ScriptWatcher

INTERVAL = 0.5


def watch(path: Path, edits: list[tuple[float, str]], until: float) -> list[tuple[float, list[Path]]]:
    """Run a watcher on PATH, write each (time, text) of EDITS, return (time, changed) per reload."""
    reloads: list[tuple[float, list[Path]]] = []

    async def on_change(changed: list[Path]) -> None:
        reloads.append((trio.current_time(), changed))

    async def main() -> None:
        watcher = ScriptWatcher(lambda: (path,), on_change, INTERVAL)
        watcher.reset()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.run)
            for at, text in edits:
                await trio.sleep_until(at)
                path.write_text(text)
            await trio.sleep_until(until)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return reloads


def test_an_edit_just_after_a_poll_is_live_within_a_second(tmp_path: Path) -> None:
    script = tmp_path / "s.lua"
    script.write_text("-- 1\n")
    edited = INTERVAL + 0.001  # the worst moment: just after a poll saw nothing
    reloads = watch(script, [(edited, "-- 2, longer\n")], until=5.0)
    assert [changed for _, changed in reloads] == [[script]]
    latency = reloads[0][0] - edited
    assert latency <= INTERVAL + SETTLE_SECS
    assert INTERVAL + SETTLE_SECS < 1.0


def test_an_edit_written_in_steps_is_one_reload_after_the_last_step(tmp_path: Path) -> None:
    script = tmp_path / "s.lua"
    script.write_text("-- 1\n")
    steps = [(0.45, "-- half"), (0.55, "-- half written\n"), (0.6, "-- all of it written\n")]
    reloads = watch(script, steps, until=5.0)
    assert len(reloads) == 1
    assert reloads[0][0] >= 0.6 + SETTLE_SECS

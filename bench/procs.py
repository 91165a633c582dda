"""What a server costs, read from /proc, and how it is stopped: always by PID.

Both servers are started in a session of their own, so "the server" is every live process of
that session: authd alone, or Dovecot's master with its log, config, anvil, auth and
auth-worker processes. PID 1 on these machines does not reap orphans, so zombies are skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0]), or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is SID."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU of each PID (all its threads), in seconds."""
    result = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            result[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return result


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (what other sessions use shows up here too)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """Sum of the resident set sizes of PIDS."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    return total


class Meter:
    """CPU used between two snapshots, and peak RSS, of the processes MEMBERS() lists."""

    def __init__(self, members: Callable[[], list[int]]) -> None:
        self.members = members
        self._start: dict[int, float] = {}
        self.peak_rss = 0

    @classmethod
    def session(cls, sid: int) -> Meter:
        """A meter for every process of session SID (a server started with start_new_session)."""
        return cls(lambda: session_members(sid))

    def start(self) -> None:
        self._start = cpu_seconds(self.members())
        self.peak_rss = 0
        self.sample()

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_bytes(self.members()))

    def cpu_since_start(self) -> float:
        """CPU seconds since start(); a process that started meanwhile counts from zero."""
        now = cpu_seconds(self.members())
        return sum(seconds - self._start.get(pid, 0.0) for pid, seconds in now.items())


def prioritise(pid: int, nice: int) -> None:
    """Run PID at niceness NICE, also against other sessions.

    With autogroup scheduling (Linux's default) niceness only ranks processes of one session;
    sessions compete as groups, so the group's own nice value is set as well.
    """
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def as_child() -> None:
    """Signals for a helper process we fork: the parent alone reacts to Ctrl-C, SIGTERM just ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def stop_session(popen: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the session leader POPEN, SIGKILL it after TIMEOUT, then SIGKILL what is left."""
    sid = popen.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(sid, signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sid, signal.SIGKILL)
        popen.wait(timeout)
    _wait_gone(session_members(sid), 2.0)  # Dovecot's master takes its children down itself
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not _wait_gone(session_members(sid), timeout):
        raise RuntimeError(f"processes of session {sid} survived SIGKILL: {session_members(sid)}")

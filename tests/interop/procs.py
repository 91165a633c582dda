"""Process and filesystem plumbing shared by the throwaway Dovecot and Postfix instances.

Everything here works on PIDs we started ourselves: `stop_session(pid)` ends a daemon's master
process and then every process still in its session (both Dovecot, started with a new session,
and Postfix, whose master calls setsid(), keep their children in the master's session). On this
machine PID 1 does not reap orphans, so dead children linger as zombies; `is_running()` treats
them as gone.

    workdir = make_workdir("interop")       # /tmp/authd-interop-xxxx, mode 0755
    refdir = subdir(workdir, "ref")         # workdir/ref-xxxx, mode 0755
    with running("reference dovecot", ReferenceDovecot(refdir, ...)) as ref:
        ...                                 # stopped by PID on exit, even on errors
    stop_session(master_pid, popen)         # what stop() uses; raises if anything survived SIGKILL

`running()` also registers the instance's log in `live_logs`, which the interop conftest
appends to the report of any test that fails while the instance runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar


def make_workdir(prefix: str) -> Path:
    """A fresh directory under /tmp that the unprivileged daemon users can traverse.

    pytest's tmp_path lives below /tmp/pytest-of-root (mode 0700), which dovenull, dovecot,
    postfix and the mail user cannot enter, so the instances get their own directory.
    """
    path = Path(tempfile.mkdtemp(prefix=f"authd-{prefix}-", dir="/tmp"))
    path.chmod(0o755)
    return path


def subdir(parent: Path, name: str) -> Path:
    """A new, uniquely named directory in PARENT (mode 0755), e.g. one per module-scoped instance."""
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    path.chmod(0o755)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the daemon binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def greets(port: int, prefix: bytes, host: str = "127.0.0.1") -> bool:
    """True if HOST:PORT accepts a connection and its first bytes are PREFIX (a server greeting)."""
    try:
        with socket.create_connection((host, port), timeout=2.0) as conn:
            return conn.recv(len(prefix)) == prefix
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def is_running(pid: int) -> bool:
    """True while PID exists and is not a zombie (zombies are never reaped here)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def session_members(sid: int) -> list[int]:
    """Live processes whose session id is SID."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # after the name: state ppid pgrp session ...
        if fields is not None and fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll PREDICATE until it holds or TIMEOUT seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_session(pid: int, popen: subprocess.Popen[bytes] | None = None, timeout: float = 10.0) -> None:
    """SIGTERM the master PID, SIGKILL it after TIMEOUT, then SIGKILL what is left of its session.

    POPEN is given when we are the parent (Dovecot -F) so the master gets reaped. Raises
    RuntimeError if any process of the session is still alive at the end.
    """
    _signal(pid, signal.SIGTERM)
    if popen is not None:
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(pid, signal.SIGKILL)
            popen.wait(timeout)
    elif not wait_until(lambda: not is_running(pid), timeout):
        _signal(pid, signal.SIGKILL)
        wait_until(lambda: not is_running(pid), timeout)
    # The master normally takes its children down; give them a moment before forcing it.
    wait_until(lambda: not session_members(pid), 2.0)
    for leftover in session_members(pid):
        _signal(leftover, signal.SIGKILL)
    wait_until(lambda: not session_members(pid), timeout)
    survivors = session_members(pid) + ([pid] if is_running(pid) else [])
    if survivors:
        raise RuntimeError(f"processes of session {pid} survived SIGKILL: {survivors}")


class Instance(Protocol):
    def start(self) -> None: ...
    def stop(self) -> object: ...
    def log_text(self) -> str: ...


InstanceT = TypeVar("InstanceT", bound=Instance)

live_logs: dict[str, Callable[[], str]] = {}
"""Log readers of the instances running now, by label; conftest adds them to failing reports."""


@contextlib.contextmanager
def running(label: str, instance: InstanceT) -> Iterator[InstanceT]:
    """Start INSTANCE, yield it, and always stop it (by PID) afterwards, whatever happened."""
    try:
        instance.start()
        live_logs[label] = instance.log_text
        yield instance
    finally:
        live_logs.pop(label, None)
        instance.stop()

"""io.popen for scripts: lupa's Lua is built without it ("'popen' not supported").

Scripts in the field shell out with io.popen (curl, doveadm pw, helper programs).
popen.lua gives them a file object; this runs the command through /bin/sh, with
the environment os.getenv shows (like Dovecot's import_environment), at most for
the call's time limit. A command that reads is run at once and its output kept; a
command that is written to runs when the file is closed, with what was written.
The command's stderr never reaches authd's: it comes back for authd to log, line
by line (Dovecot logs each line a child writes there as an error). os.execute's
commands run here too (run_command), with stdin and stdout /dev/null, as Dovecot's
auth processes have them.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

#: The most stderr kept from one command, and the longest line logged from it.
MAX_STDERR = 64 * 1024
MAX_STDERR_LINE = 1024


@dataclass(frozen=True, slots=True)
class ShellResult:
    """What a command gave: its stdout, how it ended as file:close() reports it, its stderr lines."""

    stdout: bytes
    kind: bytes  # b"exit" or b"signal"
    code: int
    stderr_lines: tuple[str, ...] = ()


def stderr_lines(data: bytes | None) -> tuple[str, ...]:
    """A child's stderr as log lines: non-empty, at most MAX_STDERR_LINE characters each."""
    if not data:
        return ()
    lines = data[:MAX_STDERR].decode("utf-8", "replace").splitlines()
    return tuple(line[:MAX_STDERR_LINE] for line in lines if line.strip())


def run_shell(command: bytes, stdin: bytes | None, environment: Mapping[str, str], timeout: float) -> ShellResult:
    """Run COMMAND with /bin/sh: its stdout if nothing is written to it (else dropped, as Dovecot's /dev/null)."""
    try:
        done = subprocess.run(
            [b"/bin/sh", b"-c", command],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdin is None else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(environment),
            timeout=timeout or None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # killed: the call's time is up anyway
        return ShellResult(exc.stdout or b"", b"signal", 9, stderr_lines(exc.stderr))
    except OSError:
        return ShellResult(b"", b"exit", 127)
    errors = stderr_lines(done.stderr)
    if done.returncode < 0:
        return ShellResult(done.stdout or b"", b"signal", -done.returncode, errors)
    return ShellResult(done.stdout or b"", b"exit", done.returncode, errors)


def run_command(command: bytes, environment: Mapping[str, str], timeout: float) -> ShellResult:
    """Run COMMAND with /bin/sh for os.execute: how it ended and its stderr lines.

    Its stdin and stdout are /dev/null. It runs in a process group of its own, so
    that after TIMEOUT seconds (0: no limit) it is killed with everything it started.
    """
    try:
        child = subprocess.Popen(
            [b"/bin/sh", b"-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(environment),
            start_new_session=True,
        )
    except (OSError, ValueError):  # no /bin/sh, no fork; a NUL in the environment
        return ShellResult(b"", b"exit", 127)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    with child:
        kept = _read_stderr(child, deadline)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            code = child.wait(left)
        except subprocess.TimeoutExpired:
            _kill_group(child.pid)
            child.wait()
            return ShellResult(b"", b"signal", 9, stderr_lines(kept))
    if code < 0:
        return ShellResult(b"", b"signal", -code, stderr_lines(kept))
    return ShellResult(b"", b"exit", code, stderr_lines(kept))


def _read_stderr(child: subprocess.Popen[bytes], deadline: float | None) -> bytes:
    """The child's stderr until the shell ends (as system() returns then, even if something it
    started in the background still writes there) or the deadline: the first MAX_STDERR bytes."""
    assert child.stderr is not None
    fd = child.stderr.fileno()
    kept = bytearray()
    try:
        ended = os.pidfd_open(child.pid)
    except OSError:  # no pidfd: look at the child between reads instead
        ended = -1
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            if ended >= 0:
                selector.register(ended, selectors.EVENT_READ)
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return bytes(kept)
                wait = left if ended >= 0 else min(left or 0.05, 0.05)
                ready = {key.fd for key, _ in selector.select(wait)}
                if fd in ready:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        return bytes(kept)
                    kept += chunk[: MAX_STDERR - len(kept)]
                elif ended in ready or (ended < 0 and child.poll() is not None):
                    os.set_blocking(fd, False)
                    try:  # what is left in the pipe
                        while (chunk := os.read(fd, 65536)) and len(kept) < MAX_STDERR:
                            kept += chunk[: MAX_STDERR - len(kept)]
                    except BlockingIOError:
                        pass
                    return bytes(kept)
    finally:
        if ended >= 0:
            os.close(ended)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):  # already gone
        os.killpg(pid, signal.SIGKILL)

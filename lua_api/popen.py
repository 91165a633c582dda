"""io.popen for scripts: lupa's Lua is built without it ("'popen' not supported").

Scripts in the field shell out with io.popen (curl, doveadm pw, helper programs).
popen.lua gives them a file object; this runs the command through /bin/sh, with
the environment os.getenv shows (like Dovecot's import_environment), at most for
the call's time limit. A command that reads is run at once and its output kept; a
command that is written to runs when the file is closed, with what was written.
The command's stderr never reaches authd's: it comes back for authd to log, line
by line (Dovecot logs each line a child writes there as an error).
"""

from __future__ import annotations

import subprocess
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

"""io.popen for scripts: lupa's Lua is built without it ("'popen' not supported").

Scripts in the field shell out with io.popen (curl, doveadm pw, helper programs).
popen.lua gives them a file object; this runs the command through /bin/sh, with
the environment os.getenv shows (like Dovecot's import_environment), at most for
the call's time limit. A command that reads is run at once and its output kept; a
command that is written to runs when the file is closed, with what was written.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping


def run_shell(
    command: bytes, stdin: bytes | None, environment: Mapping[str, str], timeout: float
) -> tuple[bytes, bytes, int]:
    """(stdout, "exit" or "signal", code) as Lua's file:close() reports them."""
    try:
        done = subprocess.run(
            [b"/bin/sh", b"-c", command],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdin is None else subprocess.DEVNULL,
            env=dict(environment),
            timeout=timeout or None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return exc.stdout or b"", b"signal", 9  # killed: the call's time is up anyway
    except OSError:
        return b"", b"exit", 127
    if done.returncode < 0:
        return done.stdout or b"", b"signal", -done.returncode
    return done.stdout or b"", b"exit", done.returncode

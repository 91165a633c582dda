"""What scripts print, and what their io.popen children write to stderr, never reach authd's own streams.

print/io.write/io.stdout/io.stderr output is dropped (Dovecot sends it to /dev/null) unless
[lua] log_script_output logs it at debug; each stderr line of a child is its own log event.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script
from tests.lua_api.conftest import RecordingHost, request

ROOT = Path(__file__).resolve().parents[2]

PRINTING = """
function auth_passdb_lookup(req)
  print("password", req.password, 1, nil, true)
  io.write("hex:", 0x41, "\\n", "second line\\n")
  io.stdout:write("to stdout")
  io.output():write("to output\\n")
  io.stderr:write("to stderr\\n")
  return dovecot.auth.PASSDB_RESULT_OK, "result=" .. req.password
end
"""

CHILD = f"""
import sys, trio
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script
from tests.lua_api.conftest import RecordingHost, request

async def main():
    script = Script(Path(sys.argv[1]), LuaState(RecordingHost(), StateOptions()))
    await script.load(run_in_loop)
    result = await script.passdb_lookup(request(mech_password=b"s3cret"), run_in_loop)
    sys.stdout.flush()
    sys.stdout.buffer.write(b"RESULT %d %s\\n" % (result.code, dict(result.fields)[b"result"]))

trio.run(main)
"""


@pytest.fixture
def load_script(tmp_path: Path, host: RecordingHost) -> Callable[..., Any]:
    """Like conftest's, with the state named after its script as the daemon names it."""

    async def load(source: str, options: StateOptions | None = None) -> Script:
        path = tmp_path / "script.lua"
        path.write_text(source)
        script = Script(path, LuaState(host, options or StateOptions(), name=str(path)))
        await script.load(run_in_loop)
        return script

    return load


def test_print_and_io_write_never_reach_the_process_streams(tmp_path: Path) -> None:
    script = tmp_path / "auth.lua"
    script.write_text(PRINTING)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(script)], capture_output=True, timeout=60, check=False, cwd=tmp_path
    )
    assert done.stderr == b""
    assert done.stdout == b"RESULT 1 s3cret\n"


async def test_output_is_dropped_by_default(load_script: Callable[..., Any], capfd: pytest.CaptureFixture[str]) -> None:
    script = await load_script(PRINTING)
    with structlog.testing.capture_logs() as logs:
        result = await script.passdb_lookup(request(mech_password=b"s3cret"), run_in_loop)
    assert result.error is None
    assert [entry for entry in logs if entry["event"].startswith("lua.")] == []
    assert capfd.readouterr() == ("", "")


async def test_output_logged_at_debug_with_the_option(
    load_script: Callable[..., Any], capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = await load_script(PRINTING, StateOptions(log_script_output=True))
    with structlog.testing.capture_logs() as logs:
        result = await script.passdb_lookup(request(mech_password=b"s3cret"), run_in_loop)
    assert result.error is None
    name = str(tmp_path / "script.lua")
    assert [(e["event"], e["log_level"], e["script"], e["stream"], e["line"]) for e in logs] == [
        ("lua.output", "debug", name, "stdout", "password\ts3cret\t1\tnil\ttrue"),
        ("lua.output", "debug", name, "stdout", "hex:65"),
        ("lua.output", "debug", name, "stdout", "second line"),
        ("lua.output", "debug", name, "stdout", "to stdout"),
        ("lua.output", "debug", name, "stdout", "to output"),
        ("lua.output", "debug", name, "stderr", "to stderr"),
    ]
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("io.write({})", "script.lua:2: bad argument #1 to 'write' (string expected, got table)"),
        ('io.write("a", nil)', "script.lua:2: bad argument #2 to 'write' (string expected, got nil)"),
        ("io.stdout:write(true)", "script.lua:2: bad argument #1 to 'write' (string expected, got boolean)"),
        (
            "print(setmetatable({}, {__tostring = function() return {} end}))",
            "script.lua:2: '__tostring' must return a string",
        ),
    ],
)
async def test_misuse_still_raises(load_script: Callable[..., Any], call: str, message: str) -> None:
    script = await load_script(f"function auth_passdb_lookup(req)\n{call}\nreturn 1, ''\nend\n")
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.error is not None and message in result.error.partition("\n")[0], result.error


async def test_writes_return_the_file_and_files_still_work(load_script: Callable[..., Any], tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    script = await load_script(
        "function auth_passdb_lookup(req)\n"
        "  local same = io.write('x') == io.stdout and io.stdout:write('y') == io.stdout\n"
        f"  local f = io.open({str(target)!r}, 'w'); f:write('kept', 1); f:close()\n"
        f"  io.output({str(target)!r}); io.write('via output'); io.close(); io.output(io.stdout)\n"
        "  return 1, 'same=' .. tostring(same)\n"
        "end\n"
    )
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.error is None and dict(result.fields) == {b"same": b"true"}
    assert target.read_bytes() == b"via output"


async def test_popen_stderr_lines_are_log_events(
    load_script: Callable[..., Any], capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = await load_script(
        "function auth_passdb_lookup(req)\n"
        "  local out = io.popen('echo out; printf \"first\\\\n{\\\\\"json\\\\\": 1}\\\\nlast\" >&2'):read('a')\n"
        "  local w = io.popen('cat; echo written >&2', 'w'); w:write('dropped'); w:close()\n"
        "  return 1, 'out=' .. out\n"
        "end\n"
    )
    with structlog.testing.capture_logs() as logs:
        result = await script.passdb_lookup(request(), run_in_loop)
    assert result.error is None and dict(result.fields) == {b"out": b"out\n"}
    name = str(tmp_path / "script.lua")
    assert [(e["event"], e["log_level"], e["script"], e["line"]) for e in logs] == [
        ("lua.popen_stderr", "error", name, "first"),
        ("lua.popen_stderr", "error", name, '{"json": 1}'),
        ("lua.popen_stderr", "error", name, "last"),
        ("lua.popen_stderr", "error", name, "written"),
    ]
    assert capfd.readouterr() == ("", "")

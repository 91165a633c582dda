"""Errors of the functions authd wraps (io.read, os.execute, C modules) read as Lua reports them.

The wrapper that moves such calls off the event loop must not show up in the message:
the position is the script's line and the name the one the script called the function by.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script
from tests.lua_api.conftest import RecordingHost, request


@pytest.fixture
def error_of(tmp_path: Path, host: RecordingHost) -> Callable[..., Any]:
    async def run(line: str) -> str:
        path = tmp_path / "auth.lua"
        path.write_text(f"function auth_passdb_lookup(req)\n  {line}\n  return 1, ''\nend\n")
        script = Script(path, LuaState(host, StateOptions(), name=str(path)))
        await script.load(run_in_loop)
        result = await script.passdb_lookup(request(), run_in_loop)
        assert result.error is not None
        first = result.error.partition("\n")[0].removeprefix("lua_pcall(auth_passdb_lookup, 1, 2) failed: ")
        # Lua shortens long chunk names to "...<end of the path>"
        where = first.partition("auth.lua:")[0]
        assert f"{path.parent}/".endswith(where.removeprefix("...")), first
        return first.removeprefix(where)

    return run


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("io.read({})", "bad argument #1 to 'read' (string expected, got table)"),
        ('io.read("x")', "bad argument #1 to 'read' (invalid format)"),
        ("os.execute({})", "bad argument #1 to 'execute' (string expected, got table)"),
        ("local run = os.execute; run({})", "bad argument #1 to 'run' (string expected, got table)"),
    ],
)
async def test_argument_errors_name_the_script_line_and_the_function(
    error_of: Callable[..., Any], tmp_path: Path, line: str, message: str
) -> None:
    assert await error_of(line) == f"auth.lua:2: {message}"


async def test_results_and_other_errors_pass_through(error_of: Callable[..., Any]) -> None:
    assert await error_of('assert(os.execute("exit 3") == nil); error("mine")') == "auth.lua:2: mine"
    # what os.execute returns comes back whole (three values on 5.4)
    assert await error_of(
        'error(table.concat({tostring(os.execute("true")), select(2, os.execute("true"))}, ","))'
    ) == ("auth.lua:2: true,exit,0")

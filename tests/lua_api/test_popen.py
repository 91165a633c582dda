"""io.popen for scripts (lupa's Lua has none): Lua 5.4's file semantics over /bin/sh."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lua_api.runtime import StateOptions, run_in_loop
from tests.lua_api.conftest import request


async def fields(load_script: Callable[..., Any], body: str, **options: Any) -> dict[bytes, bytes]:
    script = await load_script(f"function auth_passdb_lookup(req)\n{body}\nend\n", StateOptions(**options))
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.error is None, result.error
    return dict(result.fields)


async def test_reading_a_command(load_script: Callable[..., object]) -> None:
    got = await fields(
        load_script,
        """
        local f = io.popen("printf 'one\\\\ntwo\\\\n42 rest'")
        local a, b = f:read("l", "L")
        local n = f:read("n")
        local rest = f:read("a")
        local eof = f:read("l")
        local ok, kind, code = f:close()
        return dovecot.auth.PASSDB_RESULT_OK, {a = a, b = b, n = n, rest = rest, eof = tostring(eof),
          ok = tostring(ok), kind = kind, code = code, t = tostring(f)}
        """,
    )
    assert got == {
        b"a": b"one",
        b"b": b"two\n",
        b"n": b"42",
        b"rest": b" rest",
        b"eof": b"nil",
        b"ok": b"true",
        b"kind": b"exit",
        b"code": b"0",
        b"t": b"file (closed)",
    }


async def test_lines_exit_codes_and_environment(load_script: Callable[..., object]) -> None:
    got = await fields(
        load_script,
        """
        local seen = {}
        for line in io.popen("echo a; echo b; echo $AUTHD_SECRET"):lines() do seen[#seen + 1] = line end
        local ok, kind, code = io.popen("exit 3"):close()
        return dovecot.auth.PASSDB_RESULT_OK, {lines = table.concat(seen, ","), ok = tostring(ok),
          kind = kind, code = code}
        """,
        environment={"AUTHD_SECRET": "s3"},
    )
    assert got == {b"lines": b"a,b,s3", b"ok": b"nil", b"kind": b"exit", b"code": b"3"}


async def test_writing_to_a_command(load_script: Callable[..., object], tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    got = await fields(
        load_script,
        f"""
        local f = io.popen("cat > {out}", "w")
        f:write("user=", req.user, "\\n"):write(7)
        local ok, kind, code = f:close()
        local closed = pcall(f.write, f, "x")
        return dovecot.auth.PASSDB_RESULT_OK, {{ok = tostring(ok), code = code, closed = tostring(closed)}}
        """,
    )
    assert got == {b"ok": b"true", b"code": b"0", b"closed": b"false"}
    assert out.read_text() == "user=alice\n7"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('io.popen("true", "rw")', "bad argument #2 to 'popen' (invalid mode)"),
        ("io.popen({})", "bad argument #1 to 'popen' (string expected, got table)"),
        ('io.popen("true"):read("x")', "bad argument #1 to 'read' (invalid format)"),
    ],
)
async def test_misuse_raises_like_lua(load_script: Callable[..., Any], call: str, message: str) -> None:
    script = await load_script(f"function auth_passdb_lookup(req)\n{call}\nreturn 1, ''\nend\n")
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.error is not None and message in result.error

"""lua_api.script + results: Dovecot 2.3.19's result rules against real Lua (lua_api.md §2, §10)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from lua_api.request import LuaRequest
from lua_api.request_vars import RequestVars
from lua_api.results import PassdbResult, UserdbResult
from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script, ScriptLoadError
from tests.lua_api.conftest import request


@pytest.fixture
def short_tmp():  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory(prefix="a") as name:
        yield Path(name)


async def lookup(load_script, body: str):  # type: ignore[no-untyped-def]
    script = await load_script(f"function auth_passdb_lookup(req)\n{body}\nend\n")
    return await script.passdb_lookup(request(), run_in_loop)


async def test_missing_second_value_is_internal_failure(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 2: even USER_UNKNOWN without data fails internally in 2.3.19
    result = await lookup(load_script, "return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error == ("db-lua: auth_passdb_lookup(req) invalid return value (expected string or table, got nil)")


async def test_code_must_be_a_number(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, 'return "ok", "password=x"')
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error == "db-lua: auth_passdb_lookup(req) invalid return value (expected number got string)"


async def test_constants_are_floats(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 3
    result = await lookup(
        load_script,
        'return dovecot.auth.PASSDB_RESULT_OK, "password=x t=" .. tostring(dovecot.auth.PASSDB_RESULT_OK) '
        '.. " m=" .. math.type(dovecot.auth.PASSDB_RESULT_OK)',
    )
    assert result.fields == ((b"t", b"1.0"), (b"m", b"float"))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ('"1"', PassdbResult.OK),
        ("1.0", PassdbResult.OK),
        ('" 1 "', PassdbResult.OK),
        ("1.5", 0),
        ('"0x1"', 1),
    ],
)
async def test_numeric_codes(load_script, code: str, expected: int) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, f'return {code}, "password=x"')
    assert result.code == expected


async def test_number_as_data_is_a_string(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, "return dovecot.auth.PASSDB_RESULT_OK, 42")
    assert result.code == PassdbResult.OK and result.fields == ((b"42", b""),)


async def test_table_values_render_like_dovecot(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 4: numbers as unsigned integers, booleans yes/no, other types ""
    result = await lookup(
        load_script,
        "return dovecot.auth.PASSDB_RESULT_OK, {a=42, b=3.0, c=1.5, d=1e20, e=-5, f=2^53, g=true, h=false, i={}}",
    )
    fields = dict(result.fields)
    assert fields == {
        b"a": b"42",
        b"b": b"3",
        b"c": b"0",
        b"d": b"0",
        b"e": b"18446744073709551611",
        b"f": b"9007199254740992",
        b"g": b"yes",
        b"h": b"no",
        b"i": b"",
    }
    # db-lua.c names the type with lua_typename(L, -1): type code -1 is LUA_TNONE
    assert result.warnings == ("'i' has invalid value type no value - ignoring",)


@pytest.mark.parametrize("table", ['{"password=secret"}', '{[""] = "x"}', '{["a\\tb"] = "x"}', "{[true] = 1}"])
async def test_tables_that_crash_dovecot_fail_cleanly(load_script, table: str) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, f"return dovecot.auth.PASSDB_RESULT_OK, {table}")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error is not None and "Dovecot 2.3 would crash" in result.error


async def test_failure_table_drops_fields(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_USER_DISABLED, {reason="x"}')
    assert result.code == PassdbResult.USER_DISABLED and result.fields == () and result.error == "passb failed"


async def test_string_result_splits_on_spaces_only(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 5
    result = await lookup(
        load_script, 'return dovecot.auth.PASSDB_RESULT_OK, "password=secret  extra1=a=b flag tab=x\\ty"'
    )
    assert result.fields == ((b"extra1", b"a=b"), (b"flag", b""), (b"tab", b"x\ty"))
    assert result.password == b"secret" and not result.password_in_table


async def test_empty_key_token_fails_cleanly(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_OK, "password=x =y"')
    assert result.code == PassdbResult.INTERNAL_FAILURE


async def test_scheme_only_from_table_form(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 6: the string form always means PLAIN; the table form leaves it to scheme=
    table = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_OK, {password="abc"}')
    assert table.password == b"abc" and table.password_in_table
    string = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_OK, "password={SSHA256}abc"')
    assert string.password == b"{SSHA256}abc" and not string.password_in_table


async def test_next_keeps_string_fields_drops_table_fields(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 8
    string = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_NEXT, "a=1"')
    assert string.code == PassdbResult.NEXT and string.fields == ((b"a", b"1"),)
    table = await lookup(load_script, "return dovecot.auth.PASSDB_RESULT_NEXT, {a=1}")
    assert table.code == PassdbResult.NEXT and table.fields == ()


async def test_failure_message_is_only_error_text(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 9: the string of a failure code is an error text, never fields
    result = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_USER_DISABLED, "reason=disabled"')
    assert result.code == PassdbResult.USER_DISABLED and result.fields == ()
    assert result.error == "reason=disabled"


async def test_request_object_shape(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 10: a table with raw item/passdb/userdb/flags; unset variables are nil
    result = await lookup(
        load_script,
        """
        local keys = {}
        for k in pairs(req) do keys[#keys + 1] = k end
        table.sort(keys)
        return dovecot.auth.PASSDB_RESULT_OK, {
          keys = table.concat(keys, ","), t = type(req), domain = tostring(req.domain),
          user = req.user, service = req.service, nonexistent = tostring(req.nonexistent),
          passdb_foo = tostring(req.passdb.foo), lport = req.lport, mech = req.mech,
          protocol = tostring(req.protocol), pw = tostring(req.password)
        }
        """,
    )
    assert dict(result.fields) == {
        b"keys": b"item,passdb,passdbs_seen_internal_failure,passdbs_seen_user_unknown,"
        b"skip_password_check,userdb,userdbs_seen_internal_failure",
        b"t": b"table",
        b"domain": b"nil",
        b"user": b"alice",
        b"service": b"imap",
        b"nonexistent": b"nil",
        b"passdb_foo": b"nil",
        b"lport": b"0",
        b"mech": b"",
        b"protocol": b"nil",
        b"pw": b"nil",
    }


async def test_request_data_is_read_when_the_script_asks(load_script) -> None:  # type: ignore[no-untyped-def]
    built: list[bool] = []

    def variables() -> RequestVars:
        built.append(True)
        return RequestVars(user=b"alice@example.org", service=b"imap")

    script = await load_script(
        "function auth_passdb_lookup(req)\n"
        "  if req.skip_password_check then return 1, 'password=x' end\n"
        "  local user = req.user .. '/' .. req.user .. '/' .. tostring(req.domain) .. '/' .. tostring(req.session)\n"
        "  return 1, {user = user, foo = tostring(req.passdb.foo) .. '/' .. tostring(req.userdb.foo),\n"
        "    flags = tostring(req.passdbs_seen_user_unknown)}\n"
        "end\n"
    )
    fields = {b"foo": b"bar"}
    quiet = LuaRequest(variables, passdb_fields=fields, flags=(True, False, False, False))
    assert (await script.passdb_lookup(quiet, run_in_loop)).password == b"x"
    assert built == []  # a script that reads no variable costs none
    reading = LuaRequest(variables, passdb_fields=fields, flags=(False, True, False, False))
    result = await script.passdb_lookup(reading, run_in_loop)
    assert dict(result.fields) == {
        b"user": b"alice@example.org/alice@example.org/example.org/nil",
        b"foo": b"bar/nil",
        b"flags": b"true",
    }
    assert built == [True]  # built once, for the first variable the script read


async def test_password_verify_returns_numbers(load_script) -> None:  # type: ignore[no-untyped-def]
    # trap 11: 0 is truthy in Lua; the numbers are floats with an error string
    result = await lookup(
        load_script,
        """
        local ok, e1 = req:password_verify("{PLAIN}secret", "secret")
        local bad, e2 = req:password_verify("{PLAIN}secret", "wrong")
        local unk, e3 = req:password_verify("{NOSUCH}x", "x")
        return dovecot.auth.PASSDB_RESULT_OK, {
          ok = tostring(ok) .. "," .. tostring(e1), bad = tostring(bad) .. "," .. e2,
          unk = tostring(unk) .. "," .. e3, truthy = (bad and "yes" or "no")
        }
        """,
    )
    assert dict(result.fields) == {
        b"ok": b"1.0,nil",
        b"bad": b"0.0,Password mismatch",
        b"unk": b"0.0,Unknown scheme NOSUCH",
        b"truthy": b"yes",
    }


async def test_runtime_error_message(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script('function auth_passdb_lookup(req)\n  error("boom")\nend\n')
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error is not None
    assert result.error.startswith("lua_pcall(auth_passdb_lookup, 1, 2) failed: ")
    assert "script.lua:2: boom" in result.error and "stack traceback:" in result.error


async def test_error_object_with_failing_tostring(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script("function auth_passdb_lookup(req) error(setmetatable({}, {__tostring = error})) end\n")
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error is not None and "(error object is a table value)" in result.error


async def test_missing_entry_point(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script("function auth_password_verify(req, pass) return 1, '' end\n")
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error == "'auth_passdb_lookup' is not a function"
    assert script.has_password_verify


async def test_os_exit_is_an_error(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script("function auth_passdb_lookup(req) os.exit(1) end\n")
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.code == PassdbResult.INTERNAL_FAILURE and result.error is not None
    assert "os.exit() is not allowed" in result.error


async def test_userdb_rules(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        """
        function auth_userdb_lookup(req)
          if req.user == "alice" then return dovecot.auth.USERDB_RESULT_OK, {uid = 1000, home = "/h"} end
          if req.user == "bob" then return dovecot.auth.USERDB_RESULT_OK, "uid=7 home=/b" end
          return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
        end
        function auth_userdb_iterate() return {"a", "b", k = "c"} end
        """
    )
    alice = await script.userdb_lookup(request(b"alice"), run_in_loop)
    assert alice.code == UserdbResult.OK and dict(alice.fields) == {b"uid": b"1000", b"home": b"/h"}
    bob = await script.userdb_lookup(request(b"bob"), run_in_loop)
    assert bob.fields == ((b"uid", b"7"), (b"home", b"/b"))
    nobody = await script.userdb_lookup(request(b"x"), run_in_loop)
    assert nobody.code == UserdbResult.USER_UNKNOWN and nobody.error == "no such user"
    listed = await script.userdb_iterate(run_in_loop)
    assert sorted(listed.users) == [b"a", b"b", b"c"] and not listed.failed


async def test_iterate_bad_values(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script("function auth_userdb_iterate() return {true} end\n")
    result = await script.userdb_iterate(run_in_loop)
    assert result.failed and result.error == "db-lua: Value is not string"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = (", "lua_load({path}) failed: {path}:1: unexpected symbol near <eof>"),
        ('error("top")', "lua_pcall({path}) failed: {path}:1: top"),
        ("function script_init() end", "script_init() returned non-number"),
        ("function script_init() return 1 end", "Script init failed"),
        ("function script_init() return 0.0 end", "script_init() returned non-number"),
        (
            'function script_init() error("init boom") end',
            "lua_pcall(script_init, 0, 1) failed: {path}:1: init boom",
        ),
    ],
)
async def test_load_errors(short_tmp: Path, host, source: str, message: str) -> None:  # type: ignore[no-untyped-def]
    path = short_tmp / "broken.lua"  # Lua shortens chunk names over 60 bytes, as in Dovecot
    path.write_text(source)
    with pytest.raises(ScriptLoadError) as exc:
        await Script(path, LuaState(host, StateOptions())).load(run_in_loop)
    assert str(exc.value).startswith(message.format(path=path))


async def test_missing_file(tmp_path: Path, host) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ScriptLoadError) as exc:
        await Script(tmp_path / "nope.lua", LuaState(host, StateOptions())).load(run_in_loop)
    assert str(exc.value) == f"access({tmp_path / 'nope.lua'}) failed: No such file or directory"


async def test_dovecot_api_shape(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        """
        local keys = {}
        for k in pairs(dovecot) do keys[#keys + 1] = k end
        table.sort(keys)
        shape = table.concat(keys, ",")
        ok, err = pcall(dovecot.i_info, "a", "b")
        """
    )
    lua = script.state.lua.globals()
    assert lua[b"shape"] in (b"auth", b"auth,http")
    assert lua[b"ok"] is False and lua[b"err"].endswith(b"expected 1 arguments, got 2")


async def test_script_logging(load_script, host) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        'dovecot.i_warning("top level")\n'
        "function auth_passdb_lookup(req) req:log_info('hello ' .. req.user) return 1, 'password=x' end\n"
    )
    binding = request()
    await script.passdb_lookup(binding, run_in_loop)
    assert host.lines[0] == (2, "top level", None)
    assert host.lines[1] == (1, "hello alice", binding.context)


async def test_environment_is_limited(load_script, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SECRET_TOKEN", "leak")
    script = await load_script(
        'a = tostring(os.getenv("SECRET_TOKEN")); b = tostring(os.getenv("API_URL"))',
        StateOptions(environment={"API_URL": "http://x"}),
    )
    lua = script.state.lua.globals()
    assert lua[b"a"] == b"nil" and lua[b"b"] == b"http://x"

"""dovecot.restrict_global_variables() and req:response_from_template() (lua_api.md §4.4, §5.1)."""

from __future__ import annotations

import grp
import pwd

import pytest

from lua_api.results import PassdbResult, UserdbResult
from lua_api.runtime import run_in_loop
from tests.lua_api.conftest import request

STRICT = "dovecot.restrict_global_variables(true)\n"


async def test_functions_may_still_be_defined(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        STRICT + "local users = {alice = 'x'}\n"
        "function auth_passdb_lookup(req) return 1, {password = users[req.user]} end\n"
    )
    result = await script.passdb_lookup(request(), run_in_loop)
    assert (result.code, result.password) == (PassdbResult.OK, b"x")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("res = {}", "attempt to write to undeclared global variable res"),
        ("return 1, {x = tostring(undeclared)}", "attempt to write to read undeclared global variable undeclared"),
    ],
)
async def test_undeclared_globals_fail_the_call(load_script, body: str, message: str) -> None:  # type: ignore[no-untyped-def]
    # Dovecot's strict __index/__newindex raise through its luaL_error: no position
    script = await load_script(STRICT + f"function auth_passdb_lookup(req)\n{body}\nend\n")
    result = await script.passdb_lookup(request(), run_in_loop)
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error is not None
    assert result.error.startswith(f"lua_pcall(auth_passdb_lookup, 1, 2) failed: {message}\nstack traceback:")


async def test_missing_entry_point_under_restriction(load_script) -> None:  # type: ignore[no-untyped-def]
    # Dovecot's lua_getglobal runs the erroring __index outside any pcall: a Lua panic
    # that aborts the auth process. authd fails the request and says why.
    script = await load_script(STRICT + "function auth_passdb_lookup(req) return 1, {} end\n")
    result = await script.userdb_lookup(request(), run_in_loop)
    assert result.code == UserdbResult.INTERNAL_FAILURE
    assert result.error == (
        "'auth_userdb_lookup' is not a function (with restrict_global_variables(true) Dovecot's lookup "
        "of the missing global raises outside any pcall: the process would abort)"
    )
    verify = await script.password_verify(request(), b"pw", run_in_loop)
    assert verify.error is not None and verify.error.startswith("'auth_password_verify' is not a function (")
    assert not script.has_password_verify


async def test_restriction_can_be_lifted(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        STRICT + "dovecot.restrict_global_variables(false)\nfree = 1\n"
        "ok, err = pcall(dovecot.restrict_global_variables)\n"
    )
    g = script.state.lua.globals()
    assert g[b"free"] == 1 and g[b"err"] == b"expected 1 arguments, got 0"
    result = await script.userdb_lookup(request(), run_in_loop)
    assert result.error == "'auth_userdb_lookup' is not a function"


# --- req:response_from_template (2.3 only) ---------------------------------------------------


async def template(load_script, tpl: str, *, userdb: bool = False, **req: object):  # type: ignore[no-untyped-def]
    entry = "auth_userdb_lookup" if userdb else "auth_passdb_lookup"
    script = await load_script(
        f"function {entry}(req)\n"
        f"  local ok, t = pcall(req.response_from_template, req, {tpl!r})\n"
        "  if not ok then return 1, {err = t} end\n"
        "  local keys = {}\n"
        "  for k, v in pairs(t) do keys[#keys + 1] = k .. '=' .. v end\n"
        "  table.sort(keys)\n"
        "  return 1, {got = table.concat(keys, ' ')}\n"
        "end\n"
    )
    binding = request(**req)  # type: ignore[arg-type]
    binding.userdb_lookup = userdb
    result = await (script.userdb_lookup if userdb else script.passdb_lookup)(binding, run_in_loop)
    return dict(result.fields)


async def test_passdb_template(load_script) -> None:  # type: ignore[no-untyped-def]
    # verified on 2.3.19: "password=%u x=%n nokey" -> {password="dump@lookup", x="dump"}
    fields = await template(load_script, "password=%u x=%n nokey  uid=nobody", user=b"dump@lookup")
    assert fields == {b"got": b"password=dump@lookup uid=nobody x=dump"}


async def test_userdb_template_resolves_uid_gid(load_script) -> None:  # type: ignore[no-untyped-def]
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrgid(pwd.getpwnam("nobody").pw_gid)
    fields = await template(
        load_script, f"UID=nobody gid={nogroup.gr_name} home=/home/%n mail=%{{domain}}", userdb=True, user=b"a@b"
    )
    assert fields == {b"got": f"UID={nobody} gid={nogroup.gr_gid} home=/home/a mail=b".encode()}
    fields = await template(load_script, "uid=1000 gid=0", userdb=True)
    assert fields == {b"got": b"gid=0 uid=1000"}


@pytest.mark.parametrize(
    ("tpl", "userdb", "message"),
    [
        ("uid=nosuchuser-xyz", True, "lua userdb: Invalid uid: nosuchuser-xyz"),
        ("gid=%u", True, "lua userdb: Invalid gid: %u"),
        ("a=1 =x", False, "Invalid passdb template a=1 =x - key must not be empty"),
        ("=x", True, "Invalid userdb template =x - key must not be empty"),
    ],
)
async def test_template_fatal_errors_are_clean(load_script, tpl: str, userdb: bool, message: str) -> None:  # type: ignore[no-untyped-def]
    fields = await template(load_script, tpl, userdb=userdb)
    assert fields == {b"err": (message + " (a fatal error in Dovecot: the auth process exits)").encode()}


async def test_template_expansion_error(load_script) -> None:  # type: ignore[no-untyped-def]
    fields = await template(load_script, "x=%{md5;rounds=x:user}")
    assert fields[b"err"].startswith(b"var_expand(%{md5;rounds=x:user}) failed: ")

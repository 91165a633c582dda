"""dovecot.event(), req:event() and passthrough events against real Lua (lua_api.md §5.2).

Dovecot's own errors (DLUA_REQUIRE_ARGS, "Bad argument #1") carry no position, the
luaL_check* ones do; event log lines carry the event's prefix and no "db-lua: ".
"""

from __future__ import annotations

import pytest
import structlog

from authd.auth_request import AuthRequest, UsernameRules
from authd.lua_bridge import DaemonScriptHost
from lua_api.library import EventLog
from lua_api.results import PassdbResult
from lua_api.runtime import StateOptions, run_in_loop
from tests.lua_api.conftest import request

DIALECTS = ("2.3", "2.4")


async def run(load_script, body: str, dialect: str = "2.3", **req: object):  # type: ignore[no-untyped-def]
    script = await load_script(f"function auth_passdb_lookup(req)\n{body}\nend\n", StateOptions(dialect=dialect))
    return await script.passdb_lookup(request(**req), run_in_loop)  # type: ignore[arg-type]


def lines(host) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return [(level, message) for level, message, _ in host.lines]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_request_event_prefix(load_script, host, dialect: str) -> None:  # type: ignore[no-untyped-def]
    # The verified 2.3 line: lua(dump@lookup,10.1.2.3,<abc123>): event log_info from lua
    await run(
        load_script,
        'req:event():log_info("event log_info from lua") return 1, {}',
        dialect,
        user=b"dump@lookup",
        remote_ip=b"10.1.2.3",
        session_id=b"abc123",
    )
    assert lines(host) == [(1, "lua(dump@lookup,10.1.2.3,<abc123>): event log_info from lua")]
    assert isinstance(host.lines[0][2], EventLog)


async def test_request_event_prefix_parts(load_script, host) -> None:  # type: ignore[no-untyped-def]
    # no rip: no ",ip"; a master-user login adds ",master"; long names end in "..."
    await run(load_script, 'req:event():log_warning("w") return 1, {}', login_user=b"bob")
    await run(load_script, 'req:event():log_error("e") return 1, {}', user=b"x" * 70)
    assert lines(host) == [(2, "lua(alice,master): w"), (3, "lua(" + "x" * 61 + "...): e")]


async def test_prefixes_chain_and_replace(load_script, host) -> None:  # type: ignore[no-untyped-def]
    result = await run(
        load_script,
        """
        local e = dovecot.event():append_log_prefix("a: ")
        local same = e:append_log_prefix("b: ") == e
        local child = dovecot.event(e):append_log_prefix("c: ")
        child:log_info("one")
        child:replace_log_prefix("r: "):log_info("two")
        dovecot.event(child):append_log_prefix("g: "):log_warning("three")
        dovecot.event(req:event()):append_log_prefix("x: "):log_info("four")
        return 1, {same = same}
        """,
    )
    assert result.fields == ((b"same", b"yes"),)
    # append_log_prefix sets the event's own prefix: "b: " replaced "a: "
    assert lines(host) == [(1, "b: c: one"), (1, "r: two"), (2, "r: g: three"), (1, "lua(alice): x: four")]


async def test_name_and_fields_reach_the_host(load_script, host) -> None:  # type: ignore[no-untyped-def]
    await run(
        load_script,
        """
        local e = dovecot.event():set_name("lookup"):add_str("k", "v"):add_int("n", "7")
        e:inc_int("n", 2):inc_int("m", 1):add_timeval("t", 1700000000):set_always_log_source()
        dovecot.event(e):add_str("k", "child"):log_info("x")
        return 1, {}
        """,
    )
    context = host.lines[0][2]
    assert context == EventLog(None, None, {"k": "child", "n": 9, "m": 1, "t": 1700000000})
    await run(load_script, 'dovecot.event():set_name("named"):log_info("y") return 1, {}')
    assert host.lines[1][2].name == "named"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("e:log_info()", "expected 2 arguments, got 1"),
        ('e:add_str("k")', "expected 3 arguments, got 2"),
        ("e:set_always_log_source(1)", "expected 1 arguments, got 2"),
        ("dovecot.event(e, e)", "expected 0 to 1 arguments, got 2"),
        ('e.log_info("x", "y")', "Bad argument #1, expected struct event got string"),
        ('dovecot.event("x")', "Bad argument #1, expected struct event got string"),
        ('e:add_int("n", 1.5)', "{at}bad argument #2 to 'add_int' (number has no integer representation)"),
        ('e:add_int("n", "x")', "{at}bad argument #2 to 'add_int' (number expected, got string)"),
        ("e:log_info(nil)", "{at}bad argument #1 to 'log_info' (string expected, got nil)"),
        ("e:set_name({})", "{at}bad argument #1 to 'set_name' (string expected, got table)"),
        ('e.add_int(e, "n", {})', "{at}bad argument #3 to 'add_int' (number expected, got table)"),
        (
            "pcall(e.log_info, e, true) error(select(2, pcall(e.log_info, e, true)), 0)",
            "bad argument #2 to '?' (string expected, got boolean)",
        ),
    ],
)
async def test_argument_errors(load_script, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    result = await run(
        load_script,
        f"local e = dovecot.event()\nlocal ok, err = pcall(function()\n{code}\nend)\nreturn 1, {{err = err}}",
    )
    err = dict(result.fields)[b"err"].decode()
    if message.startswith("{at}"):  # luaL_argerror: at the script's line (the path may be shortened)
        position, _, rest = err.partition(".lua:4: ")
        assert position.endswith("script") and rest == message[4:]
    else:
        assert err == message


async def test_passthrough_logs_once(load_script, host) -> None:  # type: ignore[no-untyped-def]
    result = await run(
        load_script,
        """
        local e = dovecot.event():append_log_prefix("e: ")
        local pt = e:passthrough_event()
        local same = pt:set_name("pt"):append_log_prefix("p: ") == pt
        pt:log_info("through")
        local ok, err = pcall(pt.log_info, pt, "again")
        e:log_info("after")
        return 1, {same = same, err = err, mt = getmetatable(pt).__name}
        """,
    )
    assert dict(result.fields) == {
        b"same": b"yes",
        b"err": b"authd: this passthrough event was already logged (Dovecot would crash here)",
        b"mt": b"struct event_passthrough",
    }
    assert lines(host) == [(1, "e: p: through"), (1, "e: after")]
    assert host.lines[0][2].name == "pt"


async def test_second_pending_passthrough(load_script, host) -> None:  # type: ignore[no-untyped-def]
    # 2.3 panics ("Can't create multiple passthrough events"): a clean Lua error instead
    result = await run(
        load_script,
        "local e = dovecot.event()\ne:passthrough_event()\n"
        "local ok, err = pcall(e.passthrough_event, e)\nreturn 1, {err = err}",
        "2.3",
    )
    assert result.code == PassdbResult.INTERNAL_FAILURE  # the first one still leaked
    result = await run(
        load_script,
        "local e = dovecot.event()\nlocal pt = e:passthrough_event()\n"
        "local ok, err = pcall(e.passthrough_event, e)\npt:log_info('x')\nreturn 1, {err = err}",
        "2.3",
    )
    assert result.fields == (
        (
            b"err",
            b"authd: Can't create multiple passthrough events - finish the earlier with a log call "
            b"(Dovecot would crash here)",
        ),
    )
    # 2.4.3+ aborts the first one with an error line
    host.lines.clear()
    result = await run(
        load_script,
        "local e = dovecot.event()\ne:passthrough_event()\ne:passthrough_event():log_info('x')\nreturn 1, {}",
        "2.4",
    )
    assert result.code == PassdbResult.OK
    assert lines(host) == [(3, "Passthrough event leaked by Lua script at script.lua:3"), (1, "x")]


async def test_leaked_passthrough_at_end_of_call(load_script, host) -> None:  # type: ignore[no-untyped-def]
    body = "dovecot.event():passthrough_event()\nreturn 1, {}"
    result = await run(load_script, body, "2.3")
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error == (
        "Passthrough event leaked by Lua script at script.lua:2; "
        "Dovecot 2.3 would crash on the next passthrough event, failing the request"
    )
    result = await run(load_script, body, "2.4")
    assert result.code == PassdbResult.OK
    assert lines(host) == [(3, "Passthrough event leaked by Lua script at script.lua:2")]


async def test_forced_debug_is_24_only(load_script, host) -> None:  # type: ignore[no-untyped-def]
    body = "return 1, {f = type(dovecot.event().set_forced_debug)}"
    assert (await run(load_script, body, "2.3")).fields == ((b"f", b"nil"),)
    result = await run(
        load_script,
        "dovecot.event():set_forced_debug():log_debug('d')\nreturn 1, {f = type(dovecot.event().set_forced_debug)}",
        "2.4",
    )
    assert result.fields == ((b"f", b"function"),)
    assert host.lines[0][0] == 0 and host.lines[0][2].forced_debug


async def test_passthrough_is_not_an_event(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await run(
        load_script,
        "local pt = dovecot.event():passthrough_event()\npt:log_info('x')\n"
        "local ok, err = pcall(dovecot.event, pt)\nreturn 1, {err = err}",
    )
    assert dict(result.fields)[b"err"] == (
        b"authd: Bad argument #1, expected struct event (Dovecot would crash on this table)"
    )


def _auth_request(debug: bool = False) -> AuthRequest:
    req = AuthRequest(UsernameRules(), id=1)
    req.user = b"alice"
    req.remote_ip = "10.0.0.1"
    req.debug = debug
    return req


def test_daemon_host_event_lines() -> None:
    host = DaemonScriptHost("/etc/auth.lua")
    req = _auth_request()
    with structlog.testing.capture_logs() as logs:
        host.log(1, "lua(alice,10.0.0.1): hi", EventLog(req, "ev", {"n": 1}))
        host.log(0, "lua(alice,10.0.0.1): hidden", EventLog(req))
        host.log(0, "shown", EventLog(None, forced_debug=True))
        host.log(0, "db-lua less", EventLog(_auth_request(debug=True)))
        host.log(1, "plain", req)
    assert [(e["log_level"], e["message"]) for e in logs] == [
        ("info", "lua(alice,10.0.0.1): hi"),
        ("debug", "shown"),
        ("debug", "db-lua less"),
        ("info", "db-lua: plain"),
    ]
    assert logs[0]["event_name"] == "ev" and logs[0]["event_fields"] == {"n": 1}
    assert logs[0]["user"] == "alice" and logs[0]["rip"] == "10.0.0.1"


def test_daemon_host_debug_setting() -> None:
    host = DaemonScriptHost("/etc/auth.lua", debug=True)
    with structlog.testing.capture_logs() as logs:
        host.log(0, "script event", EventLog(None))
    assert [e["message"] for e in logs] == ["script event"]

"""The Dovecot 2.4 dialect against real Lua (lua_api.md §1.2, §1.4, §2 "2.4.1+", §4.3, §5.1, §5.3).

Texts come from 2.4.1+ src/auth/db-lua.c, src/auth/passdb-lua.c, src/lib-lua/dlua-script.c,
dlua-dovecot.c and dlua-dovecot-http.c (and Dovecot's own test-lua-http-client.c).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from authd.lua_db import LuaPassdb, LuaUserdb
from lua_api.http import (
    ClientSettings,
    HttpExtension,
    SettingsError,
    parse_client_settings_24,
    parse_interval,
)
from lua_api.library import base64_decode, net_ip_family
from lua_api.request_vars import Secured
from lua_api.results import PassdbResult, UserdbResult
from lua_api.runtime import StateOptions, run_in_loop
from lua_api.script import ScriptLoadError
from lua_api.var_expand import VarExpandError
from lua_api.var_expand24 import ExpandContext24, expand24
from tests.lua_api.conftest import request
from tests.lua_api.test_http import Backend, Handler, _Server

V24 = StateOptions(dialect="2.4")


async def lookup(load_script, body: str, entry: str = "auth_passdb_lookup(req)", **req: object):  # type: ignore[no-untyped-def]
    script = await load_script(f"function {entry}\n{body}\nend\n", V24)
    if entry.startswith("auth_userdb"):
        return await script.userdb_lookup(request(**req), run_in_loop)  # type: ignore[arg-type]
    if entry.startswith("auth_password_verify"):
        return await script.password_verify(request(**req), b"pw", run_in_loop)  # type: ignore[arg-type]
    return await script.passdb_lookup(request(**req), run_in_loop)  # type: ignore[arg-type]


# --- script_init(tbl) ---------------------------------------------------------------------


async def test_script_init_gets_lua_settings(load_script) -> None:  # type: ignore[no-untyped-def]
    options = StateOptions(dialect="2.4", lua_settings=(("password", "{PLAIN}test"), ("n", "1")))
    script = await load_script(
        "function script_init(args) seen = args.password .. ',' .. args.n .. ',' .. math.type(0)\n"
        "  return 7 end  -- ignored in 2.4",
        options,
    )
    assert script.state.lua.globals()[b"seen"] == b"{PLAIN}test,1,integer"


@pytest.mark.parametrize("returned", ["", "return", "return -1", "return 'x'", "return 0.0"])
async def test_script_init_return_value_is_ignored(load_script, returned: str) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        f"function script_init(args) n = 0 for _ in pairs(args) do n = n + 1 end {returned} end", V24
    )
    assert script.state.lua.globals()[b"n"] == 0  # an empty table when there are no lua_settings


async def test_script_init_error(load_script) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ScriptLoadError) as exc:
        await load_script('function script_init(args) error("no backend") end', V24)
    assert str(exc.value).startswith("lua_pcall(script_init, 1, 0) failed: ")
    assert "script.lua:1: no backend" in str(exc.value)


# --- what Dovecot 2.4's fatal start-up errors say ------------------------------------------


async def start_db(path: Path, kind: str = "passdb") -> LuaPassdb | LuaUserdb:
    cls = LuaPassdb if kind == "passdb" else LuaUserdb
    db = cls(
        path,
        blocking=False,
        options=StateOptions(),
        workers=1,
        limiter=trio.CapacityLimiter(1),
        db_id=1,
        dialect="2.4",
    )
    await db.start()
    return db


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = (", "passdb-lua: Lua script '{p}': lua_load({p}) failed: {p}:1: unexpected symbol near <eof>"),
        ('error("top")', "passdb-lua: script_init() failed: lua_pcall({p}) failed: {p}:1: top"),
        (
            "function script_init() error('init') end",
            "passdb-lua: script_init() failed: lua_pcall(script_init, 1, 0) failed: {p}:1: init",
        ),
        (
            "function auth_passdb_get_cache_key() end",
            "passdb-lua: auth_passdb_get_cache_key() failed: "
            "db-lua: auth_passdb_get_cache_key invalid return value (expected string, got nil)",
        ),
        (
            "function auth_passdb_get_cache_key() return {} end",
            "passdb-lua: auth_passdb_get_cache_key() failed: "
            "db-lua: auth_passdb_get_cache_key invalid return value (expected string, got table)",
        ),
        (
            "function auth_passdb_get_cache_key() error('key') end",
            "passdb-lua: auth_passdb_get_cache_key() failed: "
            "lua_pcall(auth_passdb_get_cache_key, 0, 1) failed: {p}:1: key",
        ),
    ],
)
async def test_start_up_errors(short_path: Path, source: str, message: str) -> None:
    short_path.write_text(source)
    with pytest.raises(ScriptLoadError) as exc:
        await start_db(short_path)
    assert str(exc.value).startswith(message.format(p=short_path))


async def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.lua"
    with pytest.raises(ScriptLoadError) as exc:
        await start_db(path, "userdb")
    assert str(exc.value) == f"userdb-lua: Lua script '{path}': access({path}) failed: No such file or directory"


@pytest.fixture
def short_path() -> Iterator[Path]:
    # Lua shortens chunk names over 60 bytes in messages, as Dovecot's does
    import tempfile

    with tempfile.TemporaryDirectory(prefix="a") as name:
        yield Path(name) / "x.lua"


# --- the cache key hooks ---------------------------------------------------------------------


async def test_cache_key_hooks(tmp_path: Path) -> None:
    path = tmp_path / "auth.lua"
    path.write_text(
        'function auth_passdb_get_cache_key() return "%{user | username}\\t%{protocol}" end\n'
        "function auth_userdb_get_cache_key() return 42 end\n"
    )
    passdb = await start_db(path, "passdb")
    userdb = await start_db(path, "userdb")
    assert passdb.cache_key_template == b"%{user | username}\t%{protocol}"
    assert userdb.cache_key_template == b"42"  # lua_isstring: numbers are strings


async def test_no_cache_key_hook_or_23(tmp_path: Path, load_script) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "auth.lua"
    path.write_text("function auth_userdb_get_cache_key() return 'x' end\n")
    assert (await start_db(path, "passdb")).cache_key_template is None
    script = await load_script("function auth_passdb_get_cache_key() return 'x' end")  # 2.3
    await script.load_cache_key("passdb", run_in_loop)
    assert script.cache_key_template is None


# --- result rules (db-lua.c auth_lua_call_lookup, 2.4.1+) ----------------------------------


@pytest.mark.parametrize(
    ("body", "code", "error"),
    [
        (
            'return dovecot.auth.PASSDB_RESULT_OK, "nopassword=y"',
            PassdbResult.INTERNAL_FAILURE,
            "db-lua: auth_passdb_lookup(req) invalid return value (expected nil or table, got string)",
        ),
        (
            "return dovecot.auth.PASSDB_RESULT_OK, 42",
            PassdbResult.INTERNAL_FAILURE,
            "db-lua: auth_passdb_lookup(req) invalid return value (expected nil or table, got number)",
        ),
        ("return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN", PassdbResult.USER_UNKNOWN, "passdb failed"),
        ('return dovecot.auth.PASSDB_RESULT_USER_DISABLED, "gone"', PassdbResult.USER_DISABLED, "gone"),
        ("return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, 7", PassdbResult.PASSWORD_MISMATCH, "7"),
        (
            "return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, {}",
            PassdbResult.INTERNAL_FAILURE,
            "db-lua: auth_passdb_lookup(req) invalid error return value (expected nil or string, got table)",
        ),
        (
            'return "ok", {}',
            PassdbResult.INTERNAL_FAILURE,
            "db-lua: auth_passdb_lookup(req) invalid return value (expected number got string)",
        ),
        ('return "1", nil', PassdbResult.OK, None),  # lua_isnumber: numeric strings still pass
        ('return dovecot.auth.PASSDB_RESULT_NEXT, "a=1"', PassdbResult.NEXT, "a=1"),
    ],
)
async def test_passdb_rules(load_script, body: str, code: int, error: str | None) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, body)
    assert (result.code, result.error, result.fields) == (code, error, ())


async def test_verify_and_userdb_texts(load_script) -> None:  # type: ignore[no-untyped-def]
    verify = await lookup(load_script, 'return 1, ""', "auth_password_verify(req, pass)")
    assert verify.error == ("db-lua: auth_password_verify invalid return value (expected nil or table, got string)")
    userdb = await lookup(load_script, "return dovecot.auth.USERDB_RESULT_USER_UNKNOWN", "auth_userdb_lookup(req)")
    assert (userdb.code, userdb.error) == (UserdbResult.USER_UNKNOWN, "userdb failed")
    userdb = await lookup(load_script, "return dovecot.auth.USERDB_RESULT_OK", "auth_userdb_lookup(req)")
    assert (userdb.code, userdb.fields) == (UserdbResult.OK, ())


async def test_table_export_skips_bad_fields(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(
        load_script,
        'local t = {password = "{SHA256}x", n = -5, f = 1.5, y = true, s = "a b", bad = {}}\n'
        't[""] = "e" t["a\\tb"] = "t" t["c\\rd"] = "r"\n'
        "return dovecot.auth.PASSDB_RESULT_OK, t",
    )
    assert result.code == PassdbResult.OK
    assert result.password == b"{SHA256}x" and result.password_in_table
    assert dict(result.fields) == {b"n": b"18446744073709551611", b"f": b"0", b"y": b"yes", b"s": b"a b"}
    assert sorted(result.warnings) == [
        "'bad' has invalid value type no value - ignoring",
        "Field key cannot be empty - ignoring",
        "Field key cannot contain <CR>, <LF> or <TAB> - ignoring",
        "Field key cannot contain <CR>, <LF> or <TAB> - ignoring",
    ]


async def test_integer_keys_still_fail_cleanly(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(load_script, 'return dovecot.auth.PASSDB_RESULT_OK, {"password=x"}')
    assert result.code == PassdbResult.INTERNAL_FAILURE
    assert result.error is not None and "would crash" in result.error


# --- the request object ------------------------------------------------------------------


async def test_request_fields_24(load_script) -> None:  # type: ignore[no-untyped-def]
    names = [
        # 2.4 (2.4.2+)
        "user",
        "protocol",
        "home",
        "local_ip",
        "remote_ip",
        "client_pid",
        "password",
        "id",
        "mechanism",
        "secured",
        "local_port",
        "remote_port",
        "cert",
        "login_user",
        "session",
        "real_local_ip",
        "real_remote_ip",
        "real_local_port",
        "real_remote_port",
        "domain_first",
        "domain_last",
        "master_user",
        "session_pid",
        "original_user",
        "auth_user",
        "local_name",
        "client_id",
        "ssl_client_cert_fp",
        "ssl_client_cert_pubkey_fp",
        "owner_user",
        "username",
        # 2.3 names, nil in 2.4
        "domain",
        "service",
        "lip",
        "rip",
        "pid",
        "mech",
        "lport",
        "rport",
        "real_lip",
        "orig_user",
        "auth_username",
        "login_domain",
    ]
    shown = " .. ',' .. ".join(f"tostring(req.{name})" for name in names)
    result = await lookup(
        load_script,
        f"return 1, {{v = {shown}, rft = type(req.response_from_template)}}",
        user=b"bob@a@b",
        remote_ip=b"10.0.0.2",
        local_port=143,
        mechanism=b"PLAIN",
        secured=Secured.TLS,
        db_id=3,
    )
    values = dict(result.fields)
    assert dict(zip(names, values[b"v"].decode().split(","), strict=True)) == {
        **dict.fromkeys(names, "nil"),
        "user": "bob@a@b",
        "protocol": "imap",
        "remote_ip": "10.0.0.2",
        "client_pid": "0",
        "id": "3",
        "mechanism": "PLAIN",
        "secured": "TLS",
        "local_port": "143",
        "remote_port": "0",
        "cert": "",
        "real_local_port": "0",
        "real_remote_port": "0",
        "domain_first": "a",
        "domain_last": "b",
        "session_pid": "",  # "" when unset in 2.4 (nil in 2.3)
        "original_user": "bob@a@b",
        "auth_user": "bob@a@b",
        "owner_user": "bob@a@b",
    }
    assert values[b"rft"] == b"nil"  # response_from_template was removed in 2.4.1


async def test_req_var_expand_24(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(
        load_script,
        'local ok, err = pcall(req.var_expand, req, "%{nosuch}")\n'
        "return 1, {v = req:var_expand(\"%{user | upper}/%{protocol}/%{passdb:x | default('d')}\"), err = err}",
        user=b"alice",
    )
    values = dict(result.fields)
    assert values[b"v"] == b"ALICE/imap/d"
    with pytest.raises(VarExpandError) as exc:
        expand24(b"%{nosuch}", {}, ExpandContext24())
    assert values[b"err"] == b"var_expand(%{nosuch}) failed: " + exc.value.message


async def test_password_verify_nil_arguments(load_script) -> None:  # type: ignore[no-untyped-def]
    result = await lookup(
        load_script,
        "local _, a = pcall(req.password_verify, req, nil, 'x')\n"
        "local _, b = pcall(req.password_verify, req, '{PLAIN}x', {})\n"
        "return 1, {a = a, b = b, c = req:password_verify('{PLAIN}x', 'x')}",
    )
    assert dict(result.fields) == {
        b"a": b"Crypted password must not be nil",
        b"b": b"Plain password must not be nil",
        b"c": b"1",
    }


# --- dovecot table additions ---------------------------------------------------------------


async def test_dovecot_table_24(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        """
        keys = {}
        for k in pairs(dovecot) do keys[#keys + 1] = k end
        table.sort(keys)
        keys = table.concat(keys, ",")
        local tv = dovecot.gettimeofday()
        times = math.type(tv.tv_sec) .. math.type(tv.tv_usec) .. math.type(dovecot.nanoseconds())
          .. math.type(dovecot.microseconds())
        sane = math.abs(tv.tv_sec - os.time()) < 5 and tv.tv_usec < 1000000
          and dovecot.nanoseconds() // 1000000000 >= tv.tv_sec
        fam = dovecot.net_ip_family("::1") .. dovecot.net_ip_family("[::1]") .. dovecot.net_ip_family("127.1")
          .. dovecot.net_ip_family("10.0.0.1 ") .. dovecot.net_ip_family("host")
        esc = dovecot.tabescape("a\\tb\\1c\\rd\\ne")
        unesc = dovecot.tabunescape("a\\1tb\\0011\\1x\\1")
        nul = dovecot.tabunescape("a\\0010b")
        split = table.concat(dovecot.split_tabescaped("a\\tb\\1tc\\t"), "|") .. "#"
          .. #dovecot.split_tabescaped("")
        b64 = dovecot.base64.encode("test value") .. "," .. dovecot.base64.decode("dGVzdCB2YWx1ZQ==")
        dict = dovecot.dict.ITERATE_FLAG_ASYNC .. "," .. dovecot.doveadm_client.DOVEADM_PROXY_TTL
        local ok, err = pcall(dovecot.tabescape)
        args = err
        """,
        V24,
    )
    g = script.state.lua.globals()
    assert g[b"keys"] == b"auth,base64,dict,doveadm_client"
    assert g[b"times"] == b"integerintegerintegerinteger" and g[b"sane"] is True
    assert g[b"fam"] == b"66400"
    assert g[b"esc"] == b"a\x01tb\x011c\x01rd\x01ne"
    assert g[b"unesc"] == b"a\tb\x01x"
    assert g[b"nul"] == b"a"  # pushed as a C string
    assert g[b"split"] == b"a|b\tc|#0"
    assert g[b"b64"] == b"dGVzdCB2YWx1ZQ==,test value"
    assert g[b"dict"] == b"32.0,5.0"
    assert g[b"args"] == b"expected 1 arguments, got 0"


async def test_dovecot_table_23_has_none_of_it(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        "x = tostring(dovecot.base64) .. tostring(dovecot.var_expand) .. tostring(dovecot.gettimeofday)"
    )
    assert script.state.lua.globals()[b"x"] == b"nilnilnil"


async def test_dovecot_var_expand(load_script) -> None:  # type: ignore[no-untyped-def]
    options = StateOptions(dialect="2.4", environment={"MAIL_DOMAIN": "example.org"})
    script = await load_script(
        'v = dovecot.var_expand("%{env:MAIL_DOMAIN | upper}")\nok, err = pcall(dovecot.var_expand, "%{user}")',
        options,
    )
    g = script.state.lua.globals()
    assert g[b"v"] == b"EXAMPLE.ORG"
    with pytest.raises(VarExpandError) as exc:
        expand24(b"%{user}", {}, ExpandContext24())
    assert g[b"err"] == b"failed to expand '%{user}': " + exc.value.message


def test_base64_decode_like_dovecot() -> None:
    # bytes come out as soon as their bits are complete; '=' or garbage ends the input
    assert base64_decode(b"QQ") == b"A"
    assert base64_decode(b"QUJD!x") == b"ABC"
    assert base64_decode(b"QU\r\n JD") == b"ABC"
    assert base64_decode(b"QQ==QQ==") == b"A"


def test_net_ip_family() -> None:
    assert [net_ip_family(x) for x in (b"192.0.2.1", b"2001:db8::1", b"[2001:db8::1]", b"", b"1.2.3.4\0x")] == [
        4,
        6,
        6,
        0,
        4,
    ]


# --- dovecot.http.client with 2.4 option names -----------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("timeout = 10000", "Invalid HTTP client setting: timeout is unknown setting"),
        (
            'auto_retry = "cow"',
            "Invalid HTTP client setting: auto_retry=cow: Invalid boolean value: cow (use yes or no)",
        ),
        (
            'request_max_attempts = "three"',
            "Invalid HTTP client setting: request_max_attempts=three: Invalid number three: Not a valid number",
        ),
        ("debug = true", "Invalid HTTP client setting: debug is unknown setting"),
        ("max_attempts = 3", "Invalid HTTP client setting: max_attempts is unknown setting"),
        (
            "request_timeout = 2000",
            "Invalid HTTP client setting: request_timeout=2000: "
            "Time interval '2000' is missing units (add e.g. 's' for seconds)",
        ),
        (
            "request_max_attempts = 0",
            "Invalid HTTP client setting: http_client settings: Invalid settings: request_max_attempts must not be 0",
        ),
        (
            'proxy_url = "http://u:p@proxy/"',
            "Invalid HTTP client setting: http_client settings: Invalid settings: "
            "Invalid http_client_proxy_url: HTTP URL does not allow `userinfo@' part",
        ),
        ("[1] = 'x'", "Invalid HTTP client setting: 1 is unknown setting"),
    ],
)
async def test_client_option_errors(load_script, options: str, message: str) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        f"ok, err = pcall(dovecot.http.client, {{{options}}})",
        StateOptions(dialect="2.4", extensions=(HttpExtension(),)),
    )
    assert script.state.lua.globals()[b"err"].decode() == message


async def test_client_options_accepted(load_script) -> None:  # type: ignore[no-untyped-def]
    script = await load_script(
        "c = dovecot.http.client({request_timeout = '2s', request_max_attempts = 3, ssl_min_protocol = 'cow',"
        " event_parent = dovecot.event(), dns_client_socket_path = './dns', user_agent = 'x', auto_retry = 'no'})\n"
        "ok, err = pcall(dovecot.http.client, {auto_retry = false})",
        StateOptions(dialect="2.4", extensions=(HttpExtension(),)),
    )
    g = script.state.lua.globals()
    assert g[b"c"] is not None  # unknown-to-authd ssl values are read only when Dovecot connects
    assert g[b"err"].endswith(
        b"authd: the HTTP client setting auto_retry is not a string or number (Dovecot would crash here)"
    )


def test_client_settings_mapping() -> None:
    settings = parse_client_settings_24(
        [
            ("request_timeout", "2s"),
            ("request_max_attempts", "3"),
            ("auto_redirect", "no"),
            ("auto_retry", "yes"),
            ("connect_timeout", "100ms"),
            ("max_idle_time", "1 min"),
            ("read_request_timeout", "5s"),
            ("write_request_max_attempts", "1"),
            ("request_max_redirects", "2"),
            ("user_agent", "authd-test"),
            ("proxy_url", "http://proxy:3128/"),
            ("proxy_username", "u"),
            ("proxy_password", "p"),
        ]
    )
    base = settings.for_method(b"PROPFIND")
    assert isinstance(base, ClientSettings)
    assert (base.request_timeout_msecs, base.max_attempts, base.no_auto_redirect, base.no_auto_retry) == (
        2000,
        3,
        True,
        False,
    )
    assert (base.connect_timeout_msecs, base.max_idle_time_msecs, base.max_redirects) == (100, 60_000, 2)
    assert base.user_agent == b"authd-test"
    assert base.proxy_url is not None and (base.proxy_url.user, base.proxy_url.password) == (b"u", b"p")
    assert settings.for_method(b"get").request_timeout_msecs == 5000
    assert settings.for_method(b"POST").max_attempts == 1
    assert settings.for_method(b"POST").request_timeout_msecs == 2000


@pytest.mark.parametrize(
    ("text", "msecs"),
    [
        ("2s", 2000),
        ("100ms", 100),
        ("1 min", 60_000),
        ("2m", 120_000),
        ("1h", 3_600_000),
        ("0", 0),
        ("3 secs", 3000),
        ("1w", 604_800_000),
        ("5 millisecs", 5),
    ],
)
def test_intervals(text: str, msecs: int) -> None:
    assert parse_interval(text, milliseconds=True) == msecs


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "Invalid time interval: "),
        ("2x", "Invalid time interval: 2x"),
        ("s", "Invalid time interval: s"),
        ("5000000h", "Time interval is too large: 5000000h"),
    ],
)
def test_bad_intervals(text: str, error: str) -> None:
    with pytest.raises(SettingsError) as exc:
        parse_interval(text, milliseconds=True)
    assert str(exc.value) == error


@pytest.fixture
def recorder() -> Iterator[Backend]:
    server = _Server(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    server.backend = Backend(f"http://127.0.0.1:{port}", port)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server.backend
    server.shutdown()
    server.server_close()


async def test_set_payload_sync_flag(load_script, recorder: Backend) -> None:  # type: ignore[no-untyped-def]
    # 2.4: Expect: 100-continue only with set_payload(data, true); 2.3 always asks for it
    extension = HttpExtension()
    try:
        script = await load_script(
            f"""
            local client = dovecot.http.client({{request_timeout = "5s"}})
            for _, sync in ipairs({{false, true}}) do
              local req = client:request({{url = "{recorder.url}/ok", method = "POST"}})
              if sync then req:set_payload("x", true) else req:set_payload("x") end
              statuses = (statuses or "") .. req:submit():status()
            end
            local r = client:request({{url = "{recorder.url}/"}})
            ok, err = pcall(r.set_payload, r, "a", true, 1)
            """,
            StateOptions(dialect="2.4", extensions=(extension,)),
        )
    finally:
        await extension.aclose()
    g = script.state.lua.globals()
    assert g[b"statuses"] == b"200200"
    assert g[b"err"] == b"expected 2 to 3 arguments, got 4"
    assert [r.header("Expect") for r in recorder.requests] == [None, "100-continue"]
    assert [r.body for r in recorder.requests] == [b"x", b"x"]

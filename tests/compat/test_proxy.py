"""Compat: scripts/proxy.lua (nginx-style mail auth headers -> proxy fields, dialect 2.3) in authd."""

from __future__ import annotations

import pytest

from .harness import (
    Auth,
    CompatAuthd,
    Deployment,
    Exchange,
    LoginRequest,
    PassLookup,
    UserLookup,
    expect,
    wait_logged,
    without_script_dir,
)

SCRIPT = "proxy.lua"
PROXY = "proxy\thost=192.0.2.25\tport=10143\tdestuser=alice\tproxy_timeout=15\tproxy_noauth=Y"

REPLIES: list[tuple[str, Exchange, list[str]]] = [
    # "proxy=y" is sent as a bare "proxy"; "nopassword=Y" is not shown to clients.
    ("good", Auth("alice@example.org", "alicepass"), [f"OK\t1\tuser=alice@example.org\t{PROXY}"]),
    # On a login socket a proxy OK also carries the client's password.
    (
        "good-login-socket",
        Auth("alice@example.org", "alicepass", socket="auth-login"),
        [f"OK\t1\tuser=alice@example.org\t{PROXY}\tpass=alicepass"],
    ),
    ("wrong-password", Auth("alice@example.org", "wrong"), ["FAIL\t1\tuser=alice@example.org"]),
    ("unknown-user", Auth("nobody@example.org", "x"), ["FAIL\t1\tuser=nobody@example.org"]),
    ("backend-502", Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"]),
    (
        "login-mech",
        Auth("alice@example.org", "alicepass", mech="LOGIN", service="pop3"),
        ["CONT\t1\tVXNlcm5hbWU6", "CONT\t1\tUGFzc3dvcmQ6", f"OK\t1\tuser=alice@example.org\t{PROXY}"],
    ),
    # add_header("Auth-Pass", nil) raises in credential lookups: an internal failure.
    ("pass-lookup", PassLookup("alice@example.org"), ["FAIL\t1"]),
    ("user-lookup", UserLookup("alice@example.org"), ["FAIL\t1"]),
    # A proxied login is not kept for the post-login REQUEST.
    (
        "request",
        LoginRequest(Auth("alice@example.org", "alicepass")),
        [f"OK\t1\tuser=alice@example.org\t{PROXY}\tpass=alicepass", "FAIL\t77", "FAIL\t78"],
    ),
]


@pytest.mark.parametrize(("exchange", "expected"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str]) -> None:
    expect(compat.servers[SCRIPT], exchange, expected)


def test_request_headers(compat: Deployment[CompatAuthd]) -> None:
    proc, backend = compat.servers[SCRIPT], compat.backends[SCRIPT].backend
    fields = ("rip=192.0.2.80", "rport=51000")
    expect(
        proc,
        Auth("alice@example.org", "alicepass", service="pop3", fields=fields),
        [f"OK\t1\tuser=alice@example.org\t{PROXY}"],
    )
    seen = [r for r in backend.seen if r.headers.get("Client-Ip") == "192.0.2.80"]
    assert [(r.method, r.path, r.body) for r in seen] == [("GET", "/auth/email", b"")]
    headers = {k: v for k, v in seen[0].headers.items() if k.startswith(("Auth-", "Client-"))}
    assert headers == {
        "Auth-Method": "plain",
        "Auth-User": "alice@example.org",
        "Auth-Pass": "alicepass",
        "Auth-Protocol": "pop3",
        "Client-Ip": "192.0.2.80",
        "Client-Port": "51000",
    }


def test_missing_status_header_is_logged(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"])
    wait_logged(proc, "down@example.org", "db-lua: mail auth endpoint returned 502 without Auth-Status", "error")


def test_nil_header_value_is_a_lua_error(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, PassLookup("alice@example.org", service="nil-header"), ["FAIL\t1"])
    lines = compat.script(SCRIPT).read_text().splitlines()
    line = lines.index('  request:add_header("Auth-Pass", req.password)') + 1
    first_line = (
        f"db-lua: lua_pcall(auth_passdb_lookup, 1, 2) failed: <lua>/{SCRIPT}:{line}: "
        "bad argument #2 to 'add_header' (string expected, got nil)"
    )
    proc.wait_for_log(
        lambda e: (
            e.get("service") == "nil-header" and without_script_dir(str(e.get("message")).split("\n")[0]) == first_line
        )
    )

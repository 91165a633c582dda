"""Compat: scripts/nextcloud.lua (Nextcloud app passwords over WebDAV, dialect 2.3) in authd."""

from __future__ import annotations

import base64

import pytest

from .harness import (
    NEXTCLOUD_APP_PASSWORD,
    Auth,
    CompatAuthd,
    Deployment,
    Exchange,
    ListUsers,
    LoginRequest,
    PassLookup,
    UserLookup,
    expect,
    wait_logged,
    without_script_dir,
)

SCRIPT = "nextcloud.lua"
APP = NEXTCLOUD_APP_PASSWORD

REPLIES: list[tuple[str, Exchange, list[str]]] = [
    ("good", Auth("alice", APP), ["OK\t1\tuser=alice"]),
    ("uppercase-user", Auth("ALICE", APP), ["OK\t1\tuser=alice\toriginal_user=ALICE"]),
    ("not-an-app-password", Auth("alice", "secret"), ["FAIL\t1\tuser=alice"]),
    ("wrong-app-password", Auth("alice", "Abcde-Fghij-Klmno-Pqrst-Uvwxz"), ["FAIL\t1\tuser=alice"]),
    ("unknown-user", Auth("bob", APP), ["FAIL\t1\tuser=bob"]),
    ("backend-503", Auth("maint", APP), ["FAIL\t1\tuser=maint\tcode=temp_fail"]),
    (
        "login-mech",
        Auth("alice", APP, mech="LOGIN"),
        ["CONT\t1\tVXNlcm5hbWU6", "CONT\t1\tUGFzc3dvcmQ6", "OK\t1\tuser=alice"],
    ),
    # req.password is nil in credential lookups: string.find raises, an internal failure.
    ("pass-lookup", PassLookup("alice"), ["FAIL\t1"]),
    # No auth_userdb_lookup, no auth_userdb_iterate in this script.
    ("user-lookup", UserLookup("alice"), ["FAIL\t1"]),
    ("list", ListUsers(), ["DONE\t1\tfail"]),
    ("request", LoginRequest(Auth("alice", APP)), ["OK\t1\tuser=alice", "FAIL\t77", "FAIL\t78"]),
]


@pytest.mark.parametrize(("exchange", "expected"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str]) -> None:
    expect(compat.servers[SCRIPT], exchange, expected)


def test_propfind_with_basic_auth(compat: Deployment[CompatAuthd]) -> None:
    expect(compat.servers[SCRIPT], Auth("alice", APP, fields=("rip=192.0.2.55",)), ["OK\t1\tuser=alice"])
    seen = [r for r in compat.backends[SCRIPT].backend.seen if r.headers.get("X-Forwarded-For") == "192.0.2.55"]
    assert [(r.method, r.path, r.body) for r in seen] == [("PROPFIND", "/remote.php/dav/files/alice/", b"")]
    assert seen[0].headers["Authorization"] == "Basic " + base64.b64encode(f"alice:{APP}".encode()).decode()


def test_other_passwords_never_reach_nextcloud(compat: Deployment[CompatAuthd]) -> None:
    expect(compat.servers[SCRIPT], Auth("alice", "not-an-app-password-9"), ["FAIL\t1\tuser=alice"])
    leaked = base64.b64encode(b"alice:not-an-app-password-9").decode()
    assert all(leaked not in r.headers.get("Authorization", "") for r in compat.backends[SCRIPT].backend.seen)


def test_backend_error_is_logged(compat: Deployment[CompatAuthd]) -> None:
    expect(compat.servers[SCRIPT], Auth("maint", APP), ["FAIL\t1\tuser=maint\tcode=temp_fail"])
    wait_logged(compat.servers[SCRIPT], "maint", "db-lua: Auth request returned 503 Service Unavailable for maint")


def test_lua_error_in_credentials_lookup_is_logged(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, PassLookup("alice", service="lookup-test"), ["FAIL\t1"])
    lines = compat.script(SCRIPT).read_text().splitlines()
    line = lines.index("  if not string.find(req.password, app_password_pattern) then") + 1
    first_line = (
        f"db-lua: lua_pcall(auth_passdb_lookup, 1, 2) failed: <lua>/{SCRIPT}:{line}: "
        "bad argument #1 to 'find' (string expected, got nil)"
    )
    proc.wait_for_log(
        lambda e: (
            e.get("user") == "alice"
            and e.get("service") == "lookup-test"
            and without_script_dir(str(e.get("message")).split("\n")[0]) == first_line
        )
    )

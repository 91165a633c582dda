"""Compat: scripts/json_cjson.lua (JSON verify API through the C module cjson, dialect 2.3) in authd."""

from __future__ import annotations

import json

import pytest

from .harness import (
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
)

SCRIPT = "json_cjson.lua"
LOGIN_PROMPTS = ["CONT\t1\tVXNlcm5hbWU6", "CONT\t1\tUGFzc3dvcmQ6"]

REPLIES: list[tuple[str, Exchange, list[str], str]] = [
    # The userdb_* fields are hidden: Dovecot 2.3 leaves an empty field behind them.
    ("good", Auth("alice@example.org", "alicepass"), ["OK\t1\tuser=alice@example.org\t"], ""),
    ("wrong-password", Auth("alice@example.org", "wrong"), ["FAIL\t1\tuser=alice@example.org"], ""),
    ("no-domain", Auth("alice", "alicepass"), ["FAIL\t1\tuser=alice"], ""),
    ("unknown-user", Auth("nobody@example.org", "x"), ["FAIL\t1\tuser=nobody@example.org"], ""),
    ("disabled", Auth("dis@example.org", "dispass"), ["FAIL\t1\tuser=dis@example.org\tcode=user_disabled"], ""),
    (
        "expired",
        Auth("exp@example.org", "exppass"),
        ["FAIL\t1\tuser=exp@example.org\tcode=pass_expired\treason=Password expired"],
        "",
    ),
    ("backend-500", Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"], ""),
    # NEXT with a string exports it as fields ("api said 300"), then the last passdb said NEXT.
    (
        "next",
        Auth("nxt@example.org", "nxtpass"),
        ["FAIL\t1\tuser=nxt@example.org\tcode=temp_fail\tapi\tsaid\t300"],
        "",
    ),
    ("scheme-not-available", Auth("sch@example.org", "schpass"), ["FAIL\t1\tuser=sch@example.org"], ""),
    (
        "login-mech",
        Auth("bob@example.org", "bobpass", mech="LOGIN"),
        [*LOGIN_PROMPTS, "OK\t1\tuser=bob@example.org\t"],
        "",
    ),
    # cjson decodes numbers as floats; table numbers are printed as integers.
    (
        "user-lookup",
        UserLookup("alice@example.org"),
        ["USER\t1\talice@example.org\tuid=5000\tgid=5000\thome=/var/vmail/example.org/alice"],
        "uid gid home",
    ),
    ("user-lookup-unknown", UserLookup("nobody@example.org"), ["NOTFOUND\t1"], ""),
    ("user-lookup-backend-500", UserLookup("down@example.org"), ["FAIL\t1"], ""),
    ("pass-lookup", PassLookup("alice@example.org"), ["NOTFOUND\t1"], ""),
    ("list", ListUsers(), ["DONE\t1\tfail"], ""),
    # Prefetched userdb_* fields, then the userdb's own; "*:bytes=" .. 1073741824.0 keeps the ".0".
    (
        "request",
        LoginRequest(Auth("alice@example.org", "alicepass")),
        [
            "OK\t1\tuser=alice@example.org\t",
            "USER\t77\talice@example.org\tuid=5000\tgid=5000\thome=/var/vmail/example.org/alice"
            "\tmail_crypt=yes\tquota_rule=*:bytes=1073741824.0\tauth_mech=PLAIN\tauth_token=<token>",
            "FAIL\t78",
        ],
        "uid gid home quota_rule mail_crypt",
    ),
]


@pytest.mark.parametrize(("exchange", "expected", "unordered"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str], unordered: str) -> None:
    expect(compat.servers[SCRIPT], exchange, expected, unordered)


def test_posts_json(compat: Deployment[CompatAuthd]) -> None:
    proc, backend = compat.servers[SCRIPT], compat.backends[SCRIPT].backend
    expect(proc, Auth("bob@example.org", "bobpass", fields=("rip=192.0.2.61",)), ["OK\t1\tuser=bob@example.org\t"])
    expect(proc, Auth("bob@example.org", "bobpass", service="smtp"), ["OK\t1\tuser=bob@example.org\t"])
    bodies = [json.loads(r.body) for r in backend.seen if r.path == "/api/verify"]
    assert {
        "username": "bob@example.org",
        "password": "bobpass",
        "service": "imap",
        "remote_ip": "192.0.2.61",
    } in bodies
    assert {"username": "bob@example.org", "password": "bobpass", "service": "smtp", "remote_ip": None} in bodies
    posted = next(r for r in backend.seen if r.path == "/api/verify")
    assert (posted.method, posted.headers["Content-Type"]) == ("POST", "application/json")


def test_failure_messages_are_logged_only_for_internal_failures(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"])
    wait_logged(proc, "down@example.org", "passdb-lua: api returned 500 Internal Server Error", "error")
    expect(proc, Auth("dis@example.org", "dispass"), ["FAIL\t1\tuser=dis@example.org\tcode=user_disabled"])
    assert not [e for e in proc.log_events() if "api said 403" in str(e.get("message"))]


def test_userdb_failure_is_logged(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, UserLookup("down@example.org"), ["FAIL\t1"])
    wait_logged(proc, "down@example.org", "userdb-lua: userdb api returned 500", "error")

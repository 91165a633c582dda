"""Compat: scripts/users_file.lua (the docs' io.lines + global variables style, dialect 2.3) in authd."""

from __future__ import annotations

import pytest

from .harness import (
    Auth,
    CompatAuthd,
    Deployment,
    Exchange,
    Greeting,
    ListUsers,
    LoginRequest,
    PassLookup,
    UserLookup,
    expect,
    wait_logged,
)

SCRIPT = "users_file.lua"
LOGIN_PROMPTS = ["CONT\t1\tVXNlcm5hbWU6", "CONT\t1\tUGFzc3dvcmQ6"]
CLIENT_GREETING = [
    "VERSION\t1\t2",
    "MECH\tPLAIN\tplaintext",
    "MECH\tLOGIN\tplaintext",
    "SPID\t<SPID>",
    "CUID\t<CUID>",
    "COOKIE\t<COOKIE>",
    "DONE",
]
#: users.txt, in the order auth_userdb_iterate() sorts them.
USERS = ("alice", "bob", "carol", "dave", "erin@example.org", "frank", "guest", "kiosk")
CONNECTION = ("rip=192.0.2.10", "lip=192.0.2.1", "lport=143", "rport=50000", "secured", "session=sess1")

REPLIES: list[tuple[str, Exchange, list[str], str]] = [
    ("greeting-client", Greeting("auth-client"), CLIENT_GREETING, ""),
    ("greeting-login", Greeting("auth-login"), CLIENT_GREETING, ""),
    ("greeting-master", Greeting("auth-master"), ["VERSION\t1\t1", "SPID\t<SPID>"], ""),
    ("greeting-userdb", Greeting("auth-userdb"), ["VERSION\t1\t1", "SPID\t<SPID>"], ""),
    ("good", Auth("alice", "alicepass"), ["OK\t1\tuser=alice"], ""),
    ("wrong-password", Auth("alice", "wrong"), ["FAIL\t1\tuser=alice"], ""),
    ("sha512-crypt", Auth("bob", "bobpass"), ["OK\t1\tuser=bob"], ""),
    (
        "ssha256-nologin",
        Auth("carol", "carolpass", fields=CONNECTION),
        ["OK\t1\tuser=carol\tnologin\treason=Mailbox_moved"],
        "",
    ),
    (
        "proxy",
        Auth("dave", "davepass"),
        ["OK\t1\tuser=dave\tproxy\thost=192.0.2.25\tport=10143\tdestuser=dave@backend"],
        "",
    ),
    (
        "proxy-login-socket",
        Auth("dave", "davepass", socket="auth-login"),
        ["OK\t1\tuser=dave\tproxy\thost=192.0.2.25\tport=10143\tdestuser=dave@backend\tpass=davepass"],
        "",
    ),
    # userdb_quota_rule is hidden; Dovecot 2.3 leaves the empty field.
    ("domain-user", Auth("erin@example.org", "erinpass"), ["OK\t1\tuser=erin@example.org\t"], ""),
    ("empty-password", Auth("frank", ""), ["FAIL\t1\tuser=frank"], ""),
    ("nopassword", Auth("guest", "whatever"), ["OK\t1\tuser=guest"], ""),
    ("nopassword-and-password", Auth("kiosk", "kioskpass"), ["FAIL\t1\tuser=kiosk"], ""),
    ("unknown-user", Auth("nobody", "x"), ["FAIL\t1\tuser=nobody"], ""),
    ("uppercase-user", Auth("ALICE", "alicepass"), ["OK\t1\tuser=alice\toriginal_user=ALICE"], ""),
    ("login-mech", Auth("bob", "bobpass", mech="LOGIN", service="smtp"), [*LOGIN_PROMPTS, "OK\t1\tuser=bob"], ""),
    (
        "login-mech-wrong",
        Auth("bob", "wrong", mech="LOGIN", service="smtp"),
        [*LOGIN_PROMPTS, "FAIL\t1\tuser=bob"],
        "",
    ),
    ("user-lookup", UserLookup("alice"), ["USER\t1\talice\tuid=1000\tgid=1000\thome=/srv/mail/alice"], "uid gid home"),
    (
        "user-lookup-domain",
        UserLookup("erin@example.org"),
        ["USER\t1\terin@example.org\tuid=1004\tgid=1004\thome=/srv/mail/example.org/erin"],
        "uid gid home",
    ),
    ("user-lookup-unknown", UserLookup("nobody"), ["NOTFOUND\t1"], ""),
    ("pass-lookup", PassLookup("alice"), ["PASS\t1\tuser=alice"], ""),
    ("pass-lookup-nologin", PassLookup("carol"), ["PASS\t1\tuser=carol\tnologin\treason=Mailbox_moved"], ""),
    ("pass-lookup-no-password", PassLookup("frank"), ["FAIL\t1"], ""),
    ("pass-lookup-unknown", PassLookup("nobody"), ["NOTFOUND\t1"], ""),
    (
        "list",
        ListUsers(),
        [
            *(f"LIST\t1\t{name}" for name in USERS),
            "DONE\t1\t",
        ],
        "",
    ),
    (
        "request",
        LoginRequest(Auth("alice", "alicepass")),
        [
            "OK\t1\tuser=alice",
            "USER\t77\talice\tuid=1000\tgid=1000\thome=/srv/mail/alice\tauth_mech=PLAIN\tauth_token=<token>",
            "FAIL\t78",
        ],
        "uid gid home",
    ),
    # The passdb's userdb_quota_rule comes first, then the userdb table.
    (
        "request-prefetch",
        LoginRequest(Auth("erin@example.org", "erinpass")),
        [
            "OK\t1\tuser=erin@example.org\t",
            "USER\t77\terin@example.org\tquota_rule=*:storage=1G\tuid=1004\tgid=1004"
            "\thome=/srv/mail/example.org/erin\tauth_mech=PLAIN\tauth_token=<token>",
            "FAIL\t78",
        ],
        "uid gid home",
    ),
    (
        "request-nologin",
        LoginRequest(Auth("carol", "carolpass")),
        ["OK\t1\tuser=carol\tnologin\treason=Mailbox_moved", "FAIL\t77", "FAIL\t78"],
        "",
    ),
    (
        "request-wrong-password",
        LoginRequest(Auth("alice", "wrong")),
        ["FAIL\t1\tuser=alice", "FAIL\t77", "FAIL\t78"],
        "",
    ),
]


@pytest.mark.parametrize(("exchange", "expected", "unordered"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str], unordered: str) -> None:
    expect(compat.servers[SCRIPT], exchange, expected, unordered)


def test_password_checks_are_logged(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, Auth("alice", "wrong", service="logcheck"), ["FAIL\t1\tuser=alice"])
    wait_logged(proc, "alice", "Password mismatch", "info")
    expect(proc, Auth("frank", "x"), ["FAIL\t1\tuser=frank"])
    wait_logged(proc, "frank", "No password returned (and no nopassword)", "info")
    expect(proc, Auth("kiosk", "kioskpass"), ["FAIL\t1\tuser=kiosk"])
    wait_logged(proc, "kiosk", "nopassword given and password is not empty", "info")

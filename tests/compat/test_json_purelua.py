"""Compat: scripts/json_purelua.lua (Mailu-style JSON tables via scripts/json.lua, dialect 2.3) in authd."""

from __future__ import annotations

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

SCRIPT = "json_purelua.lua"
CONNECTION = ("rip=192.0.2.70", "lip=192.0.2.1", "lport=993", "rport=40000", "secured")

REPLIES: list[tuple[str, Exchange, list[str], str]] = [
    ("good", Auth("alice@example.org", "alicepass"), ["OK\t1\tuser=alice@example.org\t"], ""),
    ("wrong-password", Auth("alice@example.org", "wrong"), ["FAIL\t1\tuser=alice@example.org"], ""),
    ("unknown-user", Auth("nobody@example.org", "x"), ["FAIL\t1\tuser=nobody@example.org"], ""),
    # JSON true becomes "yes"; the auth-client reply carries nologin as a bare flag.
    (
        "nologin",
        Auth("moved@example.org", "movedpass", service="pop3"),
        ["OK\t1\tuser=moved@example.org\tnologin\treason=Mailbox moved away"],
        "nologin reason",
    ),
    # Table numbers: 1.5 -> 0, 1e20 -> 0, -5 -> 2^64-5, false -> no.
    (
        "numbers",
        Auth("quirky@example.org", "quirkypass"),
        ["OK\t1\tuser=quirky@example.org\tcount=3\tratio=0\tflag=no\tbig=0\toffset=18446744073709551611"],
        "count ratio flag big offset",
    ),
    ("nopassword", Auth("token@example.org", "anything"), ["OK\t1\tuser=token@example.org\t"], ""),
    ("backend-502", Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"], ""),
    (
        "uppercase-user",
        Auth("ALICE@Example.ORG", "alicepass"),
        ["OK\t1\tuser=alice@example.org\t\toriginal_user=ALICE@Example.ORG"],
        "",
    ),
    ("pass-lookup", PassLookup("alice@example.org"), ["PASS\t1\tuser=alice@example.org\t"], ""),
    (
        "pass-lookup-nologin",
        PassLookup("moved@example.org"),
        ["PASS\t1\tuser=moved@example.org\tnologin=yes\treason=Mailbox moved away"],
        "nologin reason",
    ),
    (
        "user-lookup",
        UserLookup("alice@example.org"),
        ["USER\t1\talice@example.org\tuid=8\tgid=12\thome=/mail/alice@example.org"],
        "uid gid home",
    ),
    # gid -1 is printed as 18446744073709551615, which is no valid gid: the lookup fails.
    ("user-lookup-numbers", UserLookup("quirky@example.org"), ["FAIL\t1"], ""),
    ("user-lookup-unknown", UserLookup("nobody@example.org"), ["NOTFOUND\t1"], ""),
    (
        "list",
        ListUsers(),
        [
            "LIST\t1\talice@example.org",
            "LIST\t1\tdown@example.org",
            "LIST\t1\tmoved@example.org",
            "LIST\t1\tquirky@example.org",
            "LIST\t1\ttoken@example.org",
            "DONE\t1\t",
        ],
        "",
    ),
    (
        "request",
        LoginRequest(Auth("alice@example.org", "alicepass")),
        [
            "OK\t1\tuser=alice@example.org\t",
            "USER\t77\talice@example.org\tuid=8\tgid=12\tquota_rule=*:storage=1000000000"
            "\thome=/mail/alice@example.org\tauth_mech=PLAIN\tauth_token=<token>",
            "FAIL\t78",
        ],
        "uid gid quota_rule home",
    ),
    (
        "request-nologin",
        LoginRequest(Auth("moved@example.org", "movedpass")),
        ["OK\t1\tuser=moved@example.org\tnologin\treason=Mailbox moved away", "FAIL\t77", "FAIL\t78"],
        "nologin reason",
    ),
]


@pytest.mark.parametrize(("exchange", "expected", "unordered"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str], unordered: str) -> None:
    expect(compat.servers[SCRIPT], exchange, expected, unordered)


def test_posts_request_details_as_json(compat: Deployment[CompatAuthd]) -> None:
    proc, backend = compat.servers[SCRIPT], compat.backends[SCRIPT].backend
    expect(proc, Auth("alice@example.org", "alicepass", fields=CONNECTION), ["OK\t1\tuser=alice@example.org\t"])
    posted = [r for r in backend.seen if b'"remote_ip":"192.0.2.70"' in r.body]
    # The script URL-encodes the user; Dovecot's URL parser decodes the "@" again.
    assert [(r.method, r.path) for r in posted] == [("POST", "/api/mailu/passdb/alice@example.org")]
    assert posted[0].body == (
        b'{"local_port":"993","mechanism":"PLAIN","password":"alicepass","protocol":"imap",'
        b'"remote_ip":"192.0.2.70","remote_port":"40000","secured":"secured","user":"alice@example.org"}'
    )
    assert posted[0].headers["Content-Type"] == "application/json"


def test_credentials_lookup_posts_no_password(compat: Deployment[CompatAuthd]) -> None:
    proc, backend = compat.servers[SCRIPT], compat.backends[SCRIPT].backend
    expect(proc, PassLookup("alice@example.org", service="json-check"), ["PASS\t1\tuser=alice@example.org\t"])
    posted = [r for r in backend.seen if b'"protocol":"json-check"' in r.body]
    assert [r.body for r in posted] == [
        b'{"local_port":"0","mechanism":"","protocol":"json-check","remote_port":"0","secured":"",'
        b'"user":"alice@example.org"}'
    ]


def test_backend_error_is_logged(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"])
    wait_logged(proc, "down@example.org", "db-lua: passdb api returned 502", "error")

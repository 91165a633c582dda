"""Compat: scripts/request_api.lua (req:var_expand, req:password_verify, req.passdb/req.userdb,
dovecot.i_info and req:log_info; dialect 2.3) in authd."""

from __future__ import annotations

import hashlib

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
)

SCRIPT = "request_api.lua"
TABLE = "expanded user_md5 odd seen_passdb"
ODD = "odd=UNSUPPORTED_VARIABLE_Z UNSUPPORTED_VARIABLE_nosuchvar"
CONNECTION = ("rip=192.0.2.90", "lip=192.0.2.1", "lport=143", "rport=50000", "secured", "session=sess9")


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def verified(user: str, expanded: str) -> str:
    """The OK line of a verified user: var_expand results in a table (hash order)."""
    return f"OK\t1\tuser={user}\texpanded={expanded}\tuser_md5={md5(user)}\tseen_passdb=nil\t{ODD}"


REPLIES: list[tuple[str, Exchange, list[str], str]] = [
    (
        "ssha256",
        Auth("alice@example.org", "pw-SSHA256", fields=CONNECTION),
        [verified("alice@example.org", "alice|example.org|a|al|ce|ALICE|ecila|example.org|ours")],
        TABLE,
    ),
    (
        "sha256-crypt",
        Auth("bob@example.org", "pw-SHA256-CRYPT"),
        [verified("bob@example.org", "bob|example.org|b|bo|ob|BOB|bob|example.org|ours")],
        TABLE,
    ),
    (
        "plain",
        Auth("carol@example.net", "carolpass", service="pop3"),
        [verified("carol@example.net", "carol|example.net|c|ca|ol|CAROL|lorac|example.net|theirs")],
        TABLE,
    ),
    ("wrong-password", Auth("alice@example.org", "wrong"), ["FAIL\t1\tuser=alice@example.org"], ""),
    ("unknown-user", Auth("nobody@example.org", "x"), ["FAIL\t1\tuser=nobody@example.org"], ""),
    # password_verify: unknown scheme -> 0 (mismatch), undecodable hash -> -1 (internal failure).
    ("unknown-scheme", Auth("odd@example.org", "x"), ["FAIL\t1\tuser=odd@example.org"], ""),
    ("undecodable-hash", Auth("broken@example.org", "x"), ["FAIL\t1\tuser=broken@example.org\tcode=temp_fail"], ""),
    (
        "login-mech",
        Auth("bob@example.org", "pw-SHA256-CRYPT", mech="LOGIN"),
        [
            "CONT\t1\tVXNlcm5hbWU6",
            "CONT\t1\tUGFzc3dvcmQ6",
            verified("bob@example.org", "bob|example.org|b|bo|ob|BOB|bob|example.org|ours"),
        ],
        TABLE,
    ),
    (
        "pass-lookup",
        PassLookup("alice@example.org"),
        [f"PASS\t1\tuser=alice@example.org\tlookup={hashlib.sha1(b'alice@example.org').hexdigest()}"],
        "",
    ),
    (
        "user-lookup",
        UserLookup("alice@example.org"),
        ["USER\t1\talice@example.org\thome=/srv/mail/example.org/alice\tuid=3000\tgid=3000"],
        "",
    ),
    # After a login the userdb sees the passdb's fields (req.passdb) and prefetched userdb_* (req.userdb).
    (
        "request",
        LoginRequest(Auth("alice@example.org", "pw-SSHA256", fields=CONNECTION)),
        [
            verified("alice@example.org", "alice|example.org|a|al|ce|ALICE|ecila|example.org|ours"),
            "USER\t77\talice@example.org\tuid=2000\thome=/srv/mail/example.org/alice\tgid=3000"
            "\tfrom_passdb=alice|example.org|a|al|ce|ALICE|ecila|example.org|ours\tauth_mech=PLAIN\tauth_token=<token>",
            "FAIL\t78",
        ],
        f"{TABLE} uid home",
    ),
]


@pytest.mark.parametrize(("exchange", "expected", "unordered"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str], unordered: str) -> None:
    expect(compat.servers[SCRIPT], exchange, expected, unordered)


def test_load_log_lines(compat: Deployment[CompatAuthd]) -> None:
    """dovecot.i_info at the top of the script logs once per Lua state (2 passdb, 2 userdb)."""
    loaded = [e for e in compat.servers[SCRIPT].log_events() if e.get("message") == "request_api.lua loaded"]
    assert [(e["level"], e.get("user")) for e in loaded] == [("info", None)] * 4


def test_request_log_lines(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    user = "alice@example.org"
    fields = ("rip=192.0.2.91", "lip=192.0.2.1", "lport=993", "secured", "session=logs1")
    expect(
        proc,
        Auth(user, "pw-SSHA256", fields=fields),
        [verified(user, "alice|example.org|a|al|ce|ALICE|ecila|example.org|ours")],
        TABLE,
    )
    wait_logged(
        proc, None, f"verify {user} service=imap mech=PLAIN rip=192.0.2.91 lip=192.0.2.1 port=993 secured=secured"
    )
    proc.wait_for_log(
        lambda e: (
            e.get("message") == "db-lua: password_verify returned 1.0 nil"
            and (e.get("user"), e.get("rip"), e.get("session"), e.get("level")) == (user, "192.0.2.91", "logs1", "info")
        )
    )
    expect(proc, Auth("odd@example.org", "x"), ["FAIL\t1\tuser=odd@example.org"])
    wait_logged(proc, "odd@example.org", "db-lua: password_verify returned 0.0 Unknown scheme NOSUCH", "info")
    expect(proc, Auth("broken@example.org", "x"), ["FAIL\t1\tuser=broken@example.org\tcode=temp_fail"])
    bad_data = "Password data is not valid for scheme SSHA256: Input isn't valid base64 encoded data"
    wait_logged(proc, "broken@example.org", f"db-lua: password_verify returned -1.0 {bad_data}", "info")
    wait_logged(proc, "broken@example.org", f"passdb-lua: {bad_data}", "error")

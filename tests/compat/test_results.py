"""Compat: scripts/results_lookup.lua and results_verify.lua (lua_api.md §9 result corner cases,
dialect 2.3) in authd. The expected bytes are Dovecot 2.3.19's (see test_differential.py), except
where Dovecot crashes: there authd answers the temporary failure Dovecot's clients would see."""

from __future__ import annotations

import pytest

from .harness import Auth, CompatAuthd, Deployment, Exchange, ListUsers, LoginRequest, PassLookup, UserLookup, expect

LOOKUP = "results_lookup.lua"
VERIFY = "results_verify.lua"
NUMBERS = "neg=18446744073709551611\thuge=0\tyes=yes\tthree=3\thalf=0\tno=no\tbig=9007199254740992"

REPLIES: list[tuple[str, str, Exchange, list[str], str]] = [
    # 1. renames
    (
        "rename-table",
        LOOKUP,
        Auth("tbl@lookup", "secret"),
        ["OK\t1\tuser=renamed@lookup\t\toriginal_user=tbl@lookup"],
        "",
    ),
    ("rename-table-pass", LOOKUP, PassLookup("tbl@lookup"), ["PASS\t1\tuser=renamed@lookup\t"], ""),
    (
        "rename-table-request",
        LOOKUP,
        LoginRequest(Auth("tbl@lookup", "secret")),
        [
            "OK\t1\tuser=renamed@lookup\t\toriginal_user=tbl@lookup",
            "USER\t77\trenamed@lookup\thome=/home/renamed\tuid=7\tauth_mech=PLAIN\tauth_token=<token>"
            "\tauth_user=tbl@lookup",
            "FAIL\t78",
        ],
        "uid home",
    ),
    ("rename-userdb", LOOKUP, UserLookup("uren@lookup"), ["USER\t1\tother@lookup\tuid=8"], ""),
    ("rename-verify", VERIFY, Auth("vren", "secret"), ["OK\t1\tuser=renamed@verify\t\toriginal_user=vren"], ""),
    # 2. Dovecot verifies returned passwords
    ("password-good", LOOKUP, Auth("plain", "secret"), ["OK\t1\tuser=plain"], ""),
    ("password-wrong", LOOKUP, Auth("plain", "wrong"), ["FAIL\t1\tuser=plain"], ""),
    ("password-crypt", LOOKUP, Auth("crypt", "bobpass"), ["OK\t1\tuser=crypt"], ""),
    ("password-empty", LOOKUP, Auth("empty", "x"), ["FAIL\t1\tuser=empty"], ""),
    ("password-missing", LOOKUP, Auth("nopass", "x"), ["FAIL\t1\tuser=nopass"], ""),
    ("password-missing-pass", LOOKUP, PassLookup("nopass"), ["FAIL\t1"], ""),
    ("nopassword", LOOKUP, Auth("anypass", "whatever"), ["OK\t1\tuser=anypass"], ""),
    ("unknown-scheme", LOOKUP, Auth("scheme", "secret"), ["FAIL\t1\tuser=scheme"], ""),
    # 3. a missing second value is an internal failure, whatever the code
    ("nil-second-value", LOOKUP, Auth("nonil", "x"), ["FAIL\t1\tuser=nonil\tcode=temp_fail"], ""),
    ("nil-second-value-userdb", LOOKUP, UserLookup("nonil"), ["FAIL\t1"], ""),
    ("nil-second-value-verify", VERIFY, Auth("vnil", "secret"), ["FAIL\t1\tuser=vnil\tcode=temp_fail"], ""),
    # 4. numeric strings as codes, numbers as data
    ("numeric-string-code", LOOKUP, Auth("strcode", "secret"), ["OK\t1\tuser=strcode"], ""),
    ("numeric-string-code-verify", VERIFY, Auth("vstr", "secret"), ["OK\t1\tuser=vstr\tvia=verify"], ""),
    ("number-as-data", LOOKUP, Auth("numdata", "x"), ["FAIL\t1\tuser=numdata"], ""),
    ("number-as-data-verify", VERIFY, Auth("vnum", "secret"), ["OK\t1\tuser=vnum\t42"], ""),
    # 5. keys Dovecot 2.3.19 crashes on: a clean temporary failure
    ("integer-key", LOOKUP, Auth("intkey", "secret"), ["FAIL\t1\tuser=intkey\tcode=temp_fail"], ""),
    ("integer-key-userdb", LOOKUP, UserLookup("intkey"), ["FAIL\t1"], ""),
    ("integer-key-verify", VERIFY, Auth("vintkey", "secret"), ["FAIL\t1\tuser=vintkey\tcode=temp_fail"], ""),
    ("empty-key", LOOKUP, Auth("emptykey", "secret"), ["FAIL\t1\tuser=emptykey\tcode=temp_fail"], ""),
    ("empty-token", LOOKUP, Auth("emptytok", "secret"), ["FAIL\t1\tuser=emptytok\tcode=temp_fail"], ""),
    # 6. numbers print as unsigned integers, booleans as yes/no
    (
        "numbers",
        LOOKUP,
        Auth("numbers", "secret"),
        [f"OK\t1\tuser=numbers\t{NUMBERS}"],
        "neg huge yes three half no big",
    ),
    (
        "numbers-pass",
        LOOKUP,
        PassLookup("numbers"),
        [f"PASS\t1\tuser=numbers\t{NUMBERS}"],
        "neg huge yes three half no big",
    ),
    # uid 3, gid 2^64-5: no valid gid, so the userdb lookup fails
    ("numbers-userdb", LOOKUP, UserLookup("numbers"), ["FAIL\t1"], ""),
    ("invalid-value-type", LOOKUP, Auth("badval", "secret"), ["OK\t1\tuser=badval\tfn"], ""),
    ("tab-in-value", LOOKUP, Auth("escaped", "secret"), ["OK\t1\tuser=escaped\treason=two words\x01tand a tab"], ""),
    ("runs-of-spaces", LOOKUP, Auth("spaced", "secret"), ["OK\t1\tuser=spaced\textra1=a=b\tflag"], ""),
    ("uid-gid-names", LOOKUP, UserLookup("named"), ["USER\t1\tnamed\tuid=65534\tgid=65534"], "uid gid"),
    ("uid-gid-31-bit-max", LOOKUP, UserLookup("maxid"), ["USER\t1\tmaxid\tuid=2147483647\tgid=2147483647"], ""),
    ("uid-beyond-31-bits", LOOKUP, UserLookup("bigid"), ["FAIL\t1"], ""),
    ("uid-unknown-name", LOOKUP, UserLookup("badname_gid"), ["FAIL\t1"], ""),
    # 7. failure codes; their messages never reach the client
    ("disabled", LOOKUP, Auth("disabled", "x"), ["FAIL\t1\tuser=disabled\tcode=user_disabled"], ""),
    ("disabled-pass", LOOKUP, PassLookup("disabled"), ["NOTFOUND\t1"], ""),
    (
        "expired",
        LOOKUP,
        Auth("expired", "x"),
        ["FAIL\t1\tuser=expired\tcode=pass_expired\treason=Password expired"],
        "",
    ),
    ("internal", LOOKUP, Auth("internal", "x"), ["FAIL\t1\tuser=internal\tcode=temp_fail"], ""),
    ("internal-pass", LOOKUP, PassLookup("internal"), ["FAIL\t1"], ""),
    ("failure-with-table", LOOKUP, Auth("failtbl", "x"), ["FAIL\t1\tuser=failtbl\tcode=user_disabled"], ""),
    ("failure-with-table-userdb", LOOKUP, UserLookup("failtbl"), ["NOTFOUND\t1"], ""),
    (
        "failure-with-table-verify",
        VERIFY,
        Auth("vfailtbl", "secret"),
        ["FAIL\t1\tuser=vfailtbl\tcode=user_disabled"],
        "",
    ),
    # 8. NEXT: a string's fields are kept, a table's dropped; the last passdb's NEXT fails
    ("next-string", LOOKUP, Auth("nextstr", "secret"), ["FAIL\t1\tuser=nextstr\tcode=temp_fail\textra=a=b\tflag"], ""),
    ("next-table", LOOKUP, Auth("nexttbl", "secret"), ["FAIL\t1\tuser=nexttbl\tcode=temp_fail"], ""),
    (
        "next-string-verify",
        VERIFY,
        Auth("vnextstr", "secret"),
        ["FAIL\t1\tuser=vnextstr\tcode=temp_fail\tvia=next"],
        "",
    ),
    ("noauthenticate", LOOKUP, Auth("noauth", "secret"), ["FAIL\t1\tuser=noauth"], ""),
    # iterate: keys are ignored
    ("list", LOOKUP, ListUsers(), ["LIST\t1\ta", "LIST\t1\tb", "LIST\t1\tc", "DONE\t1\t"], ""),
    # no auth_passdb_lookup / auth_userdb_lookup in results_verify.lua
    ("verify-only-pass-lookup", VERIFY, PassLookup("vren"), ["FAIL\t1"], ""),
    ("verify-only-user-lookup", VERIFY, UserLookup("vren"), ["FAIL\t1"], ""),
]


@pytest.mark.parametrize(
    ("script", "exchange", "expected", "unordered"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES]
)
def test_reply(
    compat: Deployment[CompatAuthd], script: str, exchange: Exchange, expected: list[str], unordered: str
) -> None:
    expect(compat.servers[script], exchange, expected, unordered)

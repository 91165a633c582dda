"""Differential tests: the same requests to a real Dovecot 2.3.19 and to authd, same script.

Every fixture script of tests/compat/scripts runs as passdb and userdb lua (blocking=yes)
in a throwaway Dovecot (its own auth process on auth-client/auth-login/auth-master/
auth-userdb, auth_verbose = yes) and in authd (the session's compat deployment), with the
same auth_username_format and mechanisms, each with its own copy of the HTTP backends.

* test_same_reply: each case sends one exchange to both; the replies must be identical
  after `normalise` (SPID, CUID, COOKIE and auth_token values masked; the fields a case names
  as coming from a Lua table compared as a set, since Lua hash order differs between states).
* test_expected_difference: where Dovecot 2.3.19 crashes (lua_api.md §10 trap 4 and one
  more found here) authd deliberately answers cleanly; EXPECTED_DIFFERENCES lists those
  cases with the reason, and the test pins what each side actually does.
* test_same_request_log_lines: both log the same per-request lines (level, user, message).
* test_same_http_requests: both made the same HTTP requests to their backends.
* test_script_init_failure: both refuse to start when script_init() returns 1.

All cases run at once in a thread pool when the module starts (Dovecot answers failures
only from a 500 ms timer), except the ones that kill Dovecot's auth process, which run
after them; each test then checks one case.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.http_backend import HttpBackend, Seen
from tests.interop.dovecot import ReferenceDovecot
from tests.interop.procs import make_workdir, subdir
from tests.interop.wire import WireError

from .harness import (
    BACKEND_SCRIPTS,
    NEXTCLOUD_APP_PASSWORD,
    SCRIPTS,
    Auth,
    CompatAuthd,
    Deployment,
    Exchange,
    Greeting,
    ListUsers,
    LoginRequest,
    PassLookup,
    Reply,
    Server,
    UserLookup,
    backends_for_scripts,
    deployment,
    dovecot_instance,
    make_authd,
    normalise,
    render_scripts,
    without_script_dir,
)

LUA_AUTH_MODULE = Path("/usr/lib/dovecot/modules/auth/libauthdb_lua.so")

pytestmark = pytest.mark.requires("dovecot", "doveadm", "dovecot-lua")


@dataclass(frozen=True)
class Case:
    """One exchange for one script; UNORDERED names the reply fields that come from a Lua table.

    KILLS_AUTH marks cases that crash Dovecot's main auth process (not just a worker): they run
    one by one after all the others, which would otherwise lose their connections.
    """

    script: str
    name: str
    exchange: Exchange
    unordered: frozenset[str] = frozenset()
    kills_auth: bool = False

    @property
    def id(self) -> str:
        return f"{Path(self.script).stem}-{self.name}"


def cases(script: str, *entries: tuple[str, Exchange] | tuple[str, Exchange, str]) -> list[Case]:
    """Cases for SCRIPT from (name, exchange[, "space separated unordered keys"]) tuples."""
    out = []
    for name, exchange, *unordered in entries:
        keys = frozenset(unordered[0].split()) if unordered else frozenset()
        out.append(Case(script, name, exchange, keys))
    return out


APP_PASSWORD = NEXTCLOUD_APP_PASSWORD
CONNECTION = ("rip=192.0.2.10", "lip=192.0.2.1", "lport=143", "rport=50000", "secured", "session=sess1")
#: trusted_nets.lua's networks: 10.0.0.0/8 is trusted, 192.0.2.10 is not.
INSIDE, OUTSIDE = "real_rip=10.1.2.3", "real_rip=192.0.2.10"

CASES: list[Case] = [
    *cases(
        "nextcloud.lua",
        ("good", Auth("alice", APP_PASSWORD)),
        ("uppercase-user", Auth("ALICE", APP_PASSWORD, fields=("rip=192.0.2.7",))),
        ("not-an-app-password", Auth("alice", "secret")),
        ("wrong-app-password", Auth("alice", "Abcde-Fghij-Klmno-Pqrst-Uvwxz")),
        ("unknown-user", Auth("bob", APP_PASSWORD)),
        ("backend-503", Auth("maint", APP_PASSWORD)),
        ("login-mech", Auth("alice", APP_PASSWORD, mech="LOGIN")),
        ("pass-lookup", PassLookup("alice")),
        ("user-lookup", UserLookup("alice")),
        ("list", ListUsers()),
        ("request", LoginRequest(Auth("alice", APP_PASSWORD))),
    ),
    *cases(
        "json_cjson.lua",
        ("good", Auth("alice@example.org", "alicepass")),
        ("wrong-password", Auth("alice@example.org", "wrong")),
        ("no-domain", Auth("alice", "alicepass")),
        ("unknown-user", Auth("nobody@example.org", "x")),
        ("disabled", Auth("dis@example.org", "dispass")),
        ("expired", Auth("exp@example.org", "exppass")),
        ("backend-500", Auth("down@example.org", "downpass")),
        ("next", Auth("nxt@example.org", "nxtpass")),
        ("scheme-not-available", Auth("sch@example.org", "schpass")),
        ("login-mech", Auth("bob@example.org", "bobpass", mech="LOGIN")),
        ("user-lookup", UserLookup("alice@example.org"), "uid gid home"),
        ("user-lookup-unknown", UserLookup("nobody@example.org")),
        ("user-lookup-backend-500", UserLookup("down@example.org")),
        ("pass-lookup", PassLookup("alice@example.org")),
        ("list", ListUsers()),
        (
            "request",
            LoginRequest(Auth("alice@example.org", "alicepass")),
            "uid gid home quota_rule mail_crypt",
        ),
    ),
    *cases(
        "json_purelua.lua",
        ("good", Auth("alice@example.org", "alicepass")),
        ("wrong-password", Auth("alice@example.org", "wrong")),
        ("unknown-user", Auth("nobody@example.org", "x")),
        ("nologin", Auth("moved@example.org", "movedpass", service="pop3"), "nologin reason"),
        ("numbers", Auth("quirky@example.org", "quirkypass"), "ratio offset big flag count"),
        ("nopassword", Auth("token@example.org", "anything")),
        ("backend-502", Auth("down@example.org", "downpass")),
        ("uppercase-user", Auth("ALICE@Example.ORG", "alicepass")),
        ("login-mech", Auth("alice@example.org", "alicepass", mech="LOGIN")),
        ("pass-lookup", PassLookup("alice@example.org")),
        ("pass-lookup-nologin", PassLookup("moved@example.org"), "nologin reason"),
        ("user-lookup", UserLookup("alice@example.org"), "uid gid home"),
        ("user-lookup-numbers", UserLookup("quirky@example.org"), "uid gid home"),
        ("user-lookup-unknown", UserLookup("nobody@example.org")),
        ("list", ListUsers()),
        ("request", LoginRequest(Auth("alice@example.org", "alicepass")), "uid gid home quota_rule"),
        ("request-nologin", LoginRequest(Auth("moved@example.org", "movedpass")), "nologin reason"),
    ),
    *cases(
        "proxy.lua",
        ("good", Auth("alice@example.org", "alicepass")),
        ("good-login-socket", Auth("alice@example.org", "alicepass", socket="auth-login")),
        ("wrong-password", Auth("alice@example.org", "wrong")),
        ("unknown-user", Auth("nobody@example.org", "x")),
        ("backend-502", Auth("down@example.org", "downpass")),
        ("login-mech", Auth("alice@example.org", "alicepass", mech="LOGIN", service="pop3")),
        ("pass-lookup", PassLookup("alice@example.org")),
        ("user-lookup", UserLookup("alice@example.org")),
        ("request", LoginRequest(Auth("alice@example.org", "alicepass"))),
    ),
    *cases(
        "userli.lua",
        ("good", Auth("alice@example.org", "alicepass")),
        ("wrong-password", Auth("alice@example.org", "wrong")),
        ("unknown-user", Auth("nobody@example.org", "x")),
        ("disabled", Auth("dis@example.org", "dispass")),
        ("expired", Auth("exp@example.org", "exppass")),
        ("backend-500-no-second-value", Auth("down@example.org", "downpass")),
        ("login-mech", Auth("bob@example.org", "bobpass", mech="LOGIN")),
        (
            "user-lookup",
            UserLookup("alice@example.org"),
            "uid gid home mail_crypt_save_version mail_crypt_global_public_key quota_rule",
        ),
        ("user-lookup-plain", UserLookup("bob@example.org"), "uid gid home"),
        ("user-lookup-unknown", UserLookup("nobody@example.org")),
        ("user-lookup-backend-500", UserLookup("down@example.org")),
        ("pass-lookup", PassLookup("alice@example.org")),
        ("list", ListUsers()),
        (
            "request",
            LoginRequest(Auth("alice@example.org", "alicepass")),
            "uid gid home mail_crypt_save_version mail_crypt_global_public_key quota_rule"
            " mail_crypt_private_key mail_crypt_private_password",
        ),
    ),
    *cases(
        "users_file.lua",
        ("greeting-client", Greeting("auth-client")),
        ("greeting-login", Greeting("auth-login")),
        ("greeting-master", Greeting("auth-master")),
        ("greeting-userdb", Greeting("auth-userdb")),
        ("good", Auth("alice", "alicepass")),
        ("wrong-password", Auth("alice", "wrong")),
        ("sha512-crypt", Auth("bob", "bobpass")),
        ("ssha256-nologin", Auth("carol", "carolpass", fields=CONNECTION)),
        ("proxy", Auth("dave", "davepass")),
        ("proxy-login-socket", Auth("dave", "davepass", socket="auth-login")),
        ("domain-user", Auth("erin@example.org", "erinpass")),
        ("empty-password", Auth("frank", "")),
        ("nopassword", Auth("guest", "whatever")),
        ("nopassword-and-password", Auth("kiosk", "kioskpass")),
        ("unknown-user", Auth("nobody", "x")),
        ("uppercase-user", Auth("ALICE", "alicepass")),
        ("login-mech", Auth("bob", "bobpass", mech="LOGIN", service="smtp")),
        ("login-mech-wrong", Auth("bob", "wrong", mech="LOGIN", service="smtp")),
        ("user-lookup", UserLookup("alice"), "uid gid home"),
        ("user-lookup-domain", UserLookup("erin@example.org"), "uid gid home"),
        ("user-lookup-unknown", UserLookup("nobody")),
        ("pass-lookup", PassLookup("alice")),
        ("pass-lookup-nologin", PassLookup("carol")),
        ("pass-lookup-no-password", PassLookup("frank")),
        ("pass-lookup-unknown", PassLookup("nobody")),
        ("list", ListUsers()),
        ("request", LoginRequest(Auth("alice", "alicepass")), "uid gid home"),
        ("request-prefetch", LoginRequest(Auth("erin@example.org", "erinpass")), "uid gid home"),
        ("request-nologin", LoginRequest(Auth("carol", "carolpass"))),
        ("request-wrong-password", LoginRequest(Auth("alice", "wrong"))),
    ),
    *cases(
        "request_api.lua",
        (
            "good",
            Auth("alice@example.org", "pw-SSHA256", fields=CONNECTION),
            "expanded user_md5 odd seen_passdb",
        ),
        ("sha256-crypt", Auth("bob@example.org", "pw-SHA256-CRYPT"), "expanded user_md5 odd seen_passdb"),
        (
            "plain",
            Auth("carol@example.net", "carolpass", service="pop3"),
            "expanded user_md5 odd seen_passdb",
        ),
        ("wrong-password", Auth("alice@example.org", "wrong")),
        ("unknown-user", Auth("nobody@example.org", "x")),
        ("unknown-scheme", Auth("odd@example.org", "x")),
        ("undecodable-hash", Auth("broken@example.org", "x")),
        (
            "login-mech",
            Auth("bob@example.org", "pw-SHA256-CRYPT", mech="LOGIN"),
            "expanded user_md5 odd seen_passdb",
        ),
        ("pass-lookup", PassLookup("alice@example.org")),
        ("user-lookup", UserLookup("alice@example.org")),
        (
            "request",
            LoginRequest(Auth("alice@example.org", "pw-SSHA256", fields=CONNECTION)),
            "expanded user_md5 odd seen_passdb uid home",
        ),
    ),
    *cases(
        "results_lookup.lua",
        ("rename-table", Auth("tbl@lookup", "secret")),
        ("rename-table-pass-lookup", PassLookup("tbl@lookup")),
        ("rename-table-request", LoginRequest(Auth("tbl@lookup", "secret")), "uid home"),
        ("rename-userdb", UserLookup("uren@lookup"), "user uid"),
        ("password-good", Auth("plain", "secret")),
        ("password-wrong", Auth("plain", "wrong")),
        ("password-crypt", Auth("crypt", "bobpass")),
        ("password-empty", Auth("empty", "x")),
        ("password-missing", Auth("nopass", "x")),
        ("password-missing-pass-lookup", PassLookup("nopass")),
        ("nopassword", Auth("anypass", "whatever")),
        ("nil-second-value", Auth("nonil", "x")),
        ("nil-second-value-user-lookup", UserLookup("nonil")),
        ("numeric-string-code", Auth("strcode", "secret")),
        ("number-as-data", Auth("numdata", "x")),
        ("number-as-data-pass-lookup", PassLookup("numdata")),
        ("numbers", Auth("numbers", "secret"), "half three huge neg big yes no"),
        ("numbers-pass-lookup", PassLookup("numbers"), "half three huge neg big yes no"),
        ("numbers-user-lookup", UserLookup("numbers"), "uid gid quota"),
        ("disabled", Auth("disabled", "x")),
        ("disabled-pass-lookup", PassLookup("disabled")),
        ("expired", Auth("expired", "x")),
        ("expired-pass-lookup", PassLookup("expired")),
        ("internal", Auth("internal", "x")),
        ("internal-pass-lookup", PassLookup("internal")),
        ("internal-user-lookup", UserLookup("internal")),
        ("internal-empty-message", Auth("internal_empty", "x")),
        ("internal-empty-message-user-lookup", UserLookup("internal_empty")),
        ("unknown", Auth("unknown", "x")),
        ("unknown-pass-lookup", PassLookup("unknown")),
        ("unknown-user-lookup", UserLookup("unknown")),
        ("next-string", Auth("nextstr", "secret")),
        ("next-string-pass-lookup", PassLookup("nextstr")),
        ("next-table", Auth("nexttbl", "secret")),
        ("noauthenticate", Auth("noauth", "secret")),
        ("noauthenticate-pass-lookup", PassLookup("noauth")),
        ("failure-with-table", Auth("failtbl", "x")),
        ("failure-with-table-user-lookup", UserLookup("failtbl")),
        ("uid-gid-names", UserLookup("named"), "uid gid"),
        ("uid-unknown-name", UserLookup("badname_gid"), "uid gid"),
        ("uid-gid-31-bit-max", UserLookup("maxid")),
        ("uid-beyond-31-bits", UserLookup("bigid"), "uid gid"),
        ("invalid-value-type", Auth("badval", "secret"), "fn"),
        ("tab-in-value", Auth("escaped", "secret"), "reason"),
        ("runs-of-spaces", Auth("spaced", "secret")),
        ("unknown-scheme", Auth("scheme", "secret")),
        ("lua-error", Auth("raises", "x")),
        ("integer-key", Auth("intkey", "secret")),
        ("integer-key-user-lookup", UserLookup("intkey")),
        ("empty-key", Auth("emptykey", "secret")),
        ("empty-token", Auth("emptytok", "secret")),
        ("list", ListUsers()),
    ),
    Case("results_lookup.lua", "uid-unknown-name-only-field", UserLookup("badname"), kills_auth=True),
    *cases(
        "results_verify.lua",
        ("rename-table", Auth("vren", "secret")),
        ("numeric-string-code", Auth("vstr", "secret")),
        ("number-as-data", Auth("vnum", "secret")),
        ("mismatch", Auth("vmis", "secret")),
        ("wrong-password", Auth("vren", "wrong")),
        ("failure-with-table", Auth("vfailtbl", "secret")),
        ("next-string", Auth("vnextstr", "secret")),
        ("string-fields", Auth("vfields", "secret")),
        ("password-field", Auth("vpass", "secret"), "password"),
        ("nil-second-value", Auth("vnil", "secret")),
        ("internal-empty-message", Auth("vinternal_empty", "secret")),
        ("unknown-user", Auth("nobody", "secret")),
        ("integer-key", Auth("vintkey", "secret")),
        ("pass-lookup", PassLookup("vren")),
        ("user-lookup", UserLookup("vren")),
        ("request", LoginRequest(Auth("vpass", "secret"))),
    ),
    *cases(
        "trusted_nets.lua",
        ("pass-lookup-no-ip", PassLookup("webmail")),
        ("pass-lookup-outside", PassLookup("webmail", fields=(OUTSIDE,))),
        ("pass-lookup-inside", PassLookup("webmail", fields=(INSIDE,))),
        ("pass-lookup-rip-inside-real-outside", PassLookup("webmail", fields=("rip=10.1.2.3", OUTSIDE))),
        ("pass-lookup-real-inside-rip-outside", PassLookup("webmail", fields=("rip=192.0.2.10", INSIDE))),
        ("pass-lookup-table-outside", PassLookup("tbl", fields=(OUTSIDE,))),
        ("pass-lookup-allow-nets-outside", PassLookup("clients", fields=("rip=198.51.100.1",))),
        ("pass-lookup-allow-nets-inside", PassLookup("clients", fields=("rip=192.0.2.77",))),
        ("pass-lookup-local", PassLookup("localonly")),
        ("pass-lookup-local-with-ip", PassLookup("localonly", fields=(INSIDE,))),
        ("pass-lookup-nopassword-outside", PassLookup("token", fields=(OUTSIDE,))),
        ("pass-lookup-nopassword-inside", PassLookup("token", fields=(INSIDE,))),
        ("pass-lookup-unrestricted", PassLookup("anyone")),
        ("pass-lookup-unknown", PassLookup("nobody")),
        ("outside", Auth("webmail", "webpass", fields=(OUTSIDE,))),
        ("inside", Auth("webmail", "webpass", fields=(INSIDE,))),
        ("outside-wrong-password", Auth("webmail", "wrong", fields=(OUTSIDE,))),
        ("table-outside", Auth("tbl", "tblpass", fields=(OUTSIDE,))),
        ("allow-nets-outside", Auth("clients", "clientpass", fields=("rip=198.51.100.1",))),
        ("nopassword-outside", Auth("token", "x", fields=(OUTSIDE,))),
        ("login-socket-outside", Auth("webmail", "webpass", fields=("rip=10.1.2.3", OUTSIDE), socket="auth-login")),
        ("request-outside", LoginRequest(Auth("webmail", "webpass", fields=(OUTSIDE,)))),
        ("user-lookup", UserLookup("webmail")),
    ),
]


@dataclass(frozen=True)
class ExpectedDifference:
    """A case where authd deliberately differs from Dovecot 2.3.19: why, and what each side does.

    The replies are exact lines; the logs are substrings that must appear in each side's log
    (for authd: in the message of an event about the case's user).
    """

    user: str
    reason: str
    dovecot: tuple[str, ...]
    dovecot_log: tuple[str, ...]
    authd: tuple[str, ...]
    authd_log: str


_CRASH = "Dovecot 2.3 would crash on this, failing the request"
_INTEGER_KEY = (
    "Dovecot 2.3.19 converts an integer key in place with lua_tostring(), so the next lua_next() "
    "raises 'invalid key to next' outside any protected call: the auth worker panics (SIGABRT) "
    "and its request fails; authd rejects the table before using it"
)
_EMPTY_KEY = (
    "Dovecot 2.3.19 passes the empty field name to auth_request_set_field(), whose assertion "
    "kills the auth worker (SIGABRT) and fails its request; authd rejects the field first"
)
_EMPTY_KEY_PANIC = "Panic: file auth-request.c: line 1780 (auth_request_set_field): assertion failed: (*name != '\\0')"

#: Every case where authd is meant to behave differently from Dovecot 2.3.19, by case id.
EXPECTED_DIFFERENCES: dict[str, ExpectedDifference] = {
    "results_lookup-integer-key": ExpectedDifference(
        user="intkey",
        reason=_INTEGER_KEY,
        dovecot=("FAIL\t1\tuser=intkey\tcode=temp_fail",),
        dovecot_log=(
            "Panic: Lua script '{script}': invalid key to 'next'",
            "auth-worker: Aborted PASSV request for intkey: Worker process died unexpectedly",
        ),
        authd=("FAIL\t1\tuser=intkey\tcode=temp_fail",),
        authd_log=f"db-lua: db-lua: auth_passdb_lookup(req) returned result table has a number key (1); {_CRASH}",
    ),
    "results_lookup-integer-key-user-lookup": ExpectedDifference(
        user="intkey",
        reason=_INTEGER_KEY,
        dovecot=("FAIL\t1",),
        dovecot_log=(
            "Panic: Lua script '{script}': invalid key to 'next'",
            "auth-worker: Aborted USER request for intkey: Worker process died unexpectedly",
        ),
        authd=("FAIL\t1",),
        authd_log=f"userdb-lua: db-lua: auth_userdb_lookup(req) returned result table has a number key (1); {_CRASH}",
    ),
    "results_lookup-empty-key": ExpectedDifference(
        user="emptykey",
        reason=_EMPTY_KEY,
        dovecot=("FAIL\t1\tuser=emptykey\tcode=temp_fail",),
        dovecot_log=(
            _EMPTY_KEY_PANIC,
            "auth-worker: Aborted PASSV request for emptykey: Worker process died unexpectedly",
        ),
        authd=("FAIL\t1\tuser=emptykey\tcode=temp_fail",),
        authd_log=f"db-lua: db-lua: auth_passdb_lookup(req) returned an empty field name; {_CRASH}",
    ),
    "results_lookup-empty-token": ExpectedDifference(
        user="emptytok",
        reason=_EMPTY_KEY + " (here from the string token '=x')",
        dovecot=("FAIL\t1\tuser=emptytok\tcode=temp_fail",),
        dovecot_log=(
            _EMPTY_KEY_PANIC,
            "auth-worker: Aborted PASSV request for emptytok: Worker process died unexpectedly",
        ),
        authd=("FAIL\t1\tuser=emptytok\tcode=temp_fail",),
        authd_log=f"db-lua: db-lua: auth_passdb_lookup(req) returned an empty field name; {_CRASH}",
    ),
    "results_verify-integer-key": ExpectedDifference(
        user="vintkey",
        reason=_INTEGER_KEY,
        dovecot=("FAIL\t1\tuser=vintkey\tcode=temp_fail",),
        dovecot_log=(
            "Panic: Lua script '{script}': invalid key to 'next'",
            "auth-worker: Aborted PASSV request for vintkey: Worker process died unexpectedly",
        ),
        authd=("FAIL\t1\tuser=vintkey\tcode=temp_fail",),
        authd_log=f"passdb-lua: db-lua: auth_password_verify returned result table has a number key (1); {_CRASH}",
    ),
    "results_lookup-uid-unknown-name-only-field": ExpectedDifference(
        user="badname",
        reason=(
            "Dovecot 2.3.19's auth worker answers a userdb lookup whose only field failed "
            "(uid name not found) with 'OK<TAB>user<TAB><TAB>tempfail'; the main auth process "
            "imports the empty field and its assertion in auth_fields_add() kills the whole auth "
            "process, dropping every connection; authd answers the temporary failure"
        ),
        dovecot=("<WireClosed: connection closed while waiting for a line>",),
        dovecot_log=(
            "Invalid UID value 'no-such-user-xyz'",
            "auth: Panic: file auth-fields.c: line 64 (auth_fields_add): assertion failed: (*key != '\\0')",
        ),
        authd=("FAIL\t1",),
        authd_log="'no-such-user-xyz'",
    ),
}
_EXPECTED_DIFFERENT_USERS = {(case_id.split("-", 1)[0], d.user) for case_id, d in EXPECTED_DIFFERENCES.items()}


@dataclass(frozen=True)
class Outcome:
    dovecot: Reply
    authd: Reply


@dataclass(frozen=True)
class Differential:
    """Both deployments and every case's outcome.

    authd is the session's compat deployment, which other modules use too: only what it
    logged and was asked from `log_mark`/`http_mark` on (when this module started) counts.
    """

    authd: Deployment[CompatAuthd]
    dovecot: Deployment[ReferenceDovecot]
    outcomes: dict[str, Outcome]
    log_mark: dict[str, int]
    http_mark: dict[str, int]

    def authd_events(self, script: str) -> list[dict[str, Any]]:
        return self.authd.servers[script].log_events()[self.log_mark[script] :]


def _run(exchange: Exchange, server: Server) -> Reply:
    try:
        return exchange.run(server)
    except WireError as exc:
        return Reply([f"<{type(exc).__name__}: {exc.problem}>"], exc.transcript)


def _settled(read: Callable[[], str], quiet: float = 0.3, timeout: float = 5.0) -> None:
    """Wait until READ() stops changing for QUIET seconds (log lines trail the replies)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = read()
        if now == last:
            return
        last = now


@pytest.fixture(scope="module")
def differential(compat: Deployment[CompatAuthd]) -> Iterator[Differential]:
    """A Dovecot for every script (own backends) next to the compat authds; all cases already run."""
    authd = compat
    log_mark = {name: len(authd.servers[name].log_events()) for name in SCRIPTS}
    http_mark = {name: len(authd.backends[name].backend.seen) for name in BACKEND_SCRIPTS}
    workdir = make_workdir("differential")
    try:
        with deployment(workdir, "dovecot", dovecot_instance) as dovecot:
            with ThreadPoolExecutor(max_workers=64) as pool:
                futures = {
                    case.id: (
                        pool.submit(_run, case.exchange, dovecot.servers[case.script]),
                        pool.submit(_run, case.exchange, authd.servers[case.script]),
                    )
                    for case in CASES
                    if not case.kills_auth
                }
                outcomes = {key: Outcome(d.result(), a.result()) for key, (d, a) in futures.items()}
            for case in CASES:
                if case.kills_auth:
                    outcomes[case.id] = Outcome(
                        _run(case.exchange, dovecot.servers[case.script]),
                        _run(case.exchange, authd.servers[case.script]),
                    )
            for name in SCRIPTS:
                _settled(dovecot.servers[name].log_text)
                _settled(authd.servers[name].log_text)
            yield Differential(authd, dovecot, outcomes, log_mark, http_mark)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _explain(case: Case, outcome: Outcome) -> str:
    return (
        f"{case.id}: {case.exchange}\n--- dovecot ---\n{outcome.dovecot.transcript}"
        f"\n--- authd ---\n{outcome.authd.transcript}"
    )


@pytest.mark.parametrize("case", [c for c in CASES if c.id not in EXPECTED_DIFFERENCES], ids=lambda c: c.id)
def test_same_reply(differential: Differential, case: Case) -> None:
    outcome = differential.outcomes[case.id]
    dovecot = normalise(outcome.dovecot.lines, case.unordered)
    authd = normalise(outcome.authd.lines, case.unordered)
    assert authd == dovecot, _explain(case, outcome)


def test_expected_differences_are_cases() -> None:
    assert set(EXPECTED_DIFFERENCES) <= {case.id for case in CASES}


@pytest.mark.parametrize("case_id", sorted(EXPECTED_DIFFERENCES))
def test_expected_difference(differential: Differential, case_id: str) -> None:
    case = next(c for c in CASES if c.id == case_id)
    expected = EXPECTED_DIFFERENCES[case_id]
    outcome = differential.outcomes[case_id]
    assert outcome.dovecot.lines == list(expected.dovecot), _explain(case, outcome)
    assert outcome.authd.lines == list(expected.authd), _explain(case, outcome)
    dovecot_log = differential.dovecot.servers[case.script].log_text()
    for text in expected.dovecot_log:
        assert text.format(script=differential.dovecot.script(case.script)) in dovecot_log
    authd = differential.authd.servers[case.script]
    events = differential.authd_events(case.script)
    messages = [e.get("message", "") for e in events if e.get("user") == expected.user]
    assert any(expected.authd_log in message for message in messages), messages
    assert authd.alive


# --- log lines ----------------------------------------------------------------------------

_DOVECOT_REQUEST_LOG = re.compile(
    r": (Info|Warning|Error): (?:conn unix:auth-worker \(.*?\): auth-worker<\d+>: )?lua\(([^,)]*)[^)]*\): (.*)$"
)
#: authd's own per-request summary events, which Dovecot has no counterpart for.
_AUTHD_ONLY_EVENTS = ("auth.request", "auth.mechanism_failed")

LogLine = tuple[str, str, str]


def dovecot_request_logs(text: str) -> set[LogLine]:
    """(level, user, message) of Dovecot's per-request log lines (`lua(user,...): message`)."""
    lines = set()
    for line in text.splitlines():
        match = _DOVECOT_REQUEST_LOG.search(line)
        if match:
            lines.add((match[1].lower(), match[2], match[3]))
    return lines


def authd_request_logs(events: list[dict[str, Any]]) -> set[LogLine]:
    """(level, user, first message line) of authd's log events about a request."""
    return {
        (event["level"], event["user"], str(event["message"]).split("\n", 1)[0])
        for event in events
        if "user" in event and "message" in event and event.get("event") not in _AUTHD_ONLY_EVENTS
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: Path(s).stem)
def test_same_request_log_lines(differential: Differential, script: str) -> None:
    """Both log the same per-request lines (Lua's req:log_*, errors, mismatches), as sets.

    Dovecot runs with auth_verbose = yes, so its info-level request lines are shown too.
    """
    skip = {user for name, user in _EXPECTED_DIFFERENT_USERS if name == Path(script).stem}
    dovecot = dovecot_request_logs(differential.dovecot.servers[script].log_text())
    dovecot = {(lvl, user, without_script_dir(msg)) for lvl, user, msg in dovecot if user not in skip}
    authd = authd_request_logs(differential.authd_events(script))
    authd = {(lvl, user, without_script_dir(msg)) for lvl, user, msg in authd if user not in skip}
    # (only in authd's log, only in Dovecot's log)
    assert (sorted(authd - dovecot), sorted(dovecot - authd)) == ([], [])


# --- HTTP requests ------------------------------------------------------------------------

#: Headers that differ by nature (the backend's port, the clock).
_VOLATILE_HEADERS = ("Host", "Date")
#: What the scripts request from script_init() (userli.lua's health check).
_SCRIPT_INIT_PATHS = ("/api/dovecot/status",)

HttpRequest = tuple[str, str, bytes, tuple[tuple[str, str], ...]]


def _canonical(body: bytes, content_type: str) -> bytes:
    """A JSON body with sorted keys: cjson writes objects in Lua's hash order."""
    if content_type != "application/json" or not body:
        return body
    return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()


def http_requests(requests: Iterable[Seen]) -> set[HttpRequest]:
    """Method, path, body (JSON canonical) and headers but Host and Date of REQUESTS."""
    return {
        (
            seen.method,
            seen.path,
            _canonical(seen.body, seen.headers.get("Content-Type", "")),
            tuple(sorted((k, v) for k, v in seen.headers.items() if k not in _VOLATILE_HEADERS)),
        )
        for seen in requests
    }


@pytest.mark.parametrize("script", BACKEND_SCRIPTS, ids=lambda s: Path(s).stem)
def test_same_http_requests(differential: Differential, script: str) -> None:
    """Both made the same HTTP requests (as sets: Dovecot runs script_init in more processes).

    authd's script_init() requests were made when the session started, before the mark.
    """
    seen = list(differential.authd.backends[script].backend.seen)
    at_init = [r for r in seen[: differential.http_mark[script]] if r.path in _SCRIPT_INIT_PATHS]
    authd = http_requests(at_init + seen[differential.http_mark[script] :])
    dovecot = http_requests(list(differential.dovecot.backends[script].backend.seen))
    # (only authd sent these, only Dovecot sent these)
    assert (sorted(authd - dovecot), sorted(dovecot - authd)) == ([], [])


# --- script_init() failing ------------------------------------------------------------------


def _start_error(server: CompatAuthd | ReferenceDovecot) -> str:
    """Start SERVER expecting it to refuse (both stop what they started); the error text."""
    try:
        server.start()
    except RuntimeError as exc:
        return str(exc)
    server.stop()
    raise AssertionError(f"{server} started although script_init() failed")


def test_script_init_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """userli.lua's health check is refused, script_init() returns 1: neither server starts."""
    workdir = make_workdir("init-failure")
    try:
        with HttpBackend(backends_for_scripts()["userli.lua"]) as backend:
            lua_dir = subdir(workdir, "lua")
            render_scripts(lua_dir, {"userli.lua": backend.url})
            monkeypatch.setenv("USERLI_API_URL", backend.url)
            monkeypatch.setenv("USERLI_API_ACCESS_TOKEN", "not-the-token")
            servers = [
                make_authd(subdir(workdir, "authd"), lua_dir / "userli.lua"),
                dovecot_instance(subdir(workdir, "dovecot"), lua_dir / "userli.lua"),
            ]
            with ThreadPoolExecutor(max_workers=2) as pool:
                authd_error, dovecot_error = pool.map(_start_error, servers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert "auth: Error: userli: health check failed: 401 Unauthorized\n" in dovecot_error
    assert "auth: Fatal: passdb-lua: initialization failed: Script init failed\n" in dovecot_error
    assert '"message": "userli: health check failed: 401 Unauthorized"' in authd_error
    assert authd_error.endswith("\nauthd: passdb-lua: initialization failed: Script init failed\n")

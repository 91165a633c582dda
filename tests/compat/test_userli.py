"""Compat: scripts/userli.lua (the userli adapter shape, dialect 2.3) in authd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.http_backend import HttpBackend
from tests.interop.procs import subdir

from .harness import (
    USERLI_TOKEN,
    Auth,
    CompatAuthd,
    Deployment,
    Exchange,
    ListUsers,
    LoginRequest,
    PassLookup,
    UserLookup,
    authd_config,
    backends_for_scripts,
    expect,
    render_scripts,
    wait_logged,
)

SCRIPT = "userli.lua"
ALICE_USERDB = "uid gid home mail_crypt_save_version mail_crypt_global_public_key quota_rule"

REPLIES: list[tuple[str, Exchange, list[str], str]] = [
    ("good", Auth("alice@example.org", "alicepass"), ["OK\t1\tuser=alice@example.org\t"], ""),
    ("wrong-password", Auth("alice@example.org", "wrong"), ["FAIL\t1\tuser=alice@example.org"], ""),
    ("unknown-user", Auth("nobody@example.org", "x"), ["FAIL\t1\tuser=nobody@example.org"], ""),
    ("disabled", Auth("dis@example.org", "dispass"), ["FAIL\t1\tuser=dis@example.org\tcode=user_disabled"], ""),
    (
        "expired",
        Auth("exp@example.org", "exppass"),
        ["FAIL\t1\tuser=exp@example.org\tcode=pass_expired\treason=Password expired"],
        "",
    ),
    # `return INTERNAL_FAILURE` without a second value: an invalid return value in 2.3.
    (
        "backend-500-no-second-value",
        Auth("down@example.org", "downpass"),
        ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"],
        "",
    ),
    (
        "login-mech",
        Auth("bob@example.org", "bobpass", mech="LOGIN"),
        ["CONT\t1\tVXNlcm5hbWU6", "CONT\t1\tUGFzc3dvcmQ6", "OK\t1\tuser=bob@example.org\t"],
        "",
    ),
    (
        "user-lookup",
        UserLookup("alice@example.org"),
        [
            "USER\t1\talice@example.org\tuid=5000\tgid=5000\thome=/var/vmail/example.org/alice"
            "\tmail_crypt_save_version=2\tmail_crypt_global_public_key=PUBLIC-KEY\tquota_rule=*:storage=1G"
        ],
        ALICE_USERDB,
    ),
    (
        "user-lookup-plain",
        UserLookup("bob@example.org"),
        ["USER\t1\tbob@example.org\tuid=5001\tgid=5000\thome=/var/vmail/bob"],
        "uid gid home",
    ),
    ("user-lookup-unknown", UserLookup("nobody@example.org"), ["NOTFOUND\t1"], ""),
    ("user-lookup-backend-500", UserLookup("down@example.org"), ["FAIL\t1"], ""),
    # No auth_passdb_lookup, no auth_userdb_iterate.
    ("pass-lookup", PassLookup("alice@example.org"), ["FAIL\t1"], ""),
    ("list", ListUsers(), ["DONE\t1\tfail"], ""),
    # The passdb's userdb_* fields come first, then the userdb's own.
    (
        "request",
        LoginRequest(Auth("alice@example.org", "alicepass")),
        [
            "OK\t1\tuser=alice@example.org\t",
            "USER\t77\talice@example.org\tuid=5000\tgid=5000\thome=/var/vmail/example.org/alice"
            "\tmail_crypt_private_key=PRIVATE-KEY\tmail_crypt_private_password=alicepass"
            "\tmail_crypt_save_version=2\tmail_crypt_global_public_key=PUBLIC-KEY\tquota_rule=*:storage=1G"
            "\tauth_mech=PLAIN\tauth_token=<token>",
            "FAIL\t78",
        ],
        f"{ALICE_USERDB} mail_crypt_private_key mail_crypt_private_password",
    ),
]


@pytest.mark.parametrize(("exchange", "expected", "unordered"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str], unordered: str) -> None:
    expect(compat.servers[SCRIPT], exchange, expected, unordered)


def test_script_init_health_check(compat: Deployment[CompatAuthd]) -> None:
    status = [r for r in compat.backends[SCRIPT].backend.seen if r.path == "/api/dovecot/status"]
    # One per Lua state: 2 workers for the passdb, 2 for the userdb.
    assert len(status) == 4
    assert {(r.method, r.headers["Authorization"], r.headers["User-Agent"]) for r in status} == {
        ("GET", f"Bearer {USERLI_TOKEN}", "userli-dovecot-adapter")
    }


def test_verify_posts_password(compat: Deployment[CompatAuthd]) -> None:
    proc, backend = compat.servers[SCRIPT], compat.backends[SCRIPT].backend
    expect(proc, Auth("bob@example.org", "bobpass", service="pop3"), ["OK\t1\tuser=bob@example.org\t"])
    posted = [r for r in backend.seen if r.method == "POST" and r.path == "/api/dovecot/bob@example.org"]
    assert posted and json.loads(posted[-1].body) == {"password": "bobpass"}
    assert posted[-1].headers["Content-Type"] == "application/json"


def test_request_logs(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, Auth("dis@example.org", "dispass"), ["FAIL\t1\tuser=dis@example.org\tcode=user_disabled"])
    wait_logged(proc, "dis@example.org", "db-lua: userli: account is disabled", "warning")
    expect(proc, Auth("down@example.org", "downpass"), ["FAIL\t1\tuser=down@example.org\tcode=temp_fail"])
    wait_logged(proc, "down@example.org", "db-lua: userli: passdb request failed with 500", "error")
    wait_logged(
        proc,
        "down@example.org",
        "passdb-lua: db-lua: auth_password_verify invalid return value (expected string or table, got nil)",
        "error",
    )


def _failed_start(workdir: Path, config: str) -> str:
    """Start authd expecting script_init() to fail; the error text of the failed start."""
    proc = CompatAuthd(workdir, config)
    try:
        with pytest.raises(RuntimeError) as failure:
            proc.start()
    finally:
        proc.stop()
    return str(failure.value)


@pytest.fixture
def userli_dir(compat_dir: Path) -> Path:
    """The userli script rendered for its own backend (each test brings one)."""
    return subdir(compat_dir, "userli-init")


def test_script_init_failure_stops_startup(userli_dir: Path, compat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HttpBackend(backends_for_scripts()[SCRIPT]) as backend:
        render_scripts(userli_dir, {SCRIPT: backend.url})
        monkeypatch.setenv("USERLI_API_URL", backend.url)
        monkeypatch.setenv("USERLI_API_ACCESS_TOKEN", "not-the-token")
        error = _failed_start(subdir(compat_dir, "authd-bad-token"), authd_config(userli_dir / SCRIPT))
    assert "userli: health check failed: 401 Unauthorized" in error
    assert error.endswith("authd: passdb-lua: initialization failed: Script init failed\n")


def test_environment_is_only_what_is_imported(
    userli_dir: Path, compat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variables are set, but not in import_environment: os.getenv() sees nothing."""
    with HttpBackend(backends_for_scripts()[SCRIPT]) as backend:
        render_scripts(userli_dir, {SCRIPT: backend.url})
        monkeypatch.setenv("USERLI_API_URL", backend.url)
        monkeypatch.setenv("USERLI_API_ACCESS_TOKEN", USERLI_TOKEN)
        config = authd_config(userli_dir / SCRIPT, environment=())
        error = _failed_start(subdir(compat_dir, "authd-no-env"), config)
        assert backend.backend.seen == []
    assert "userli: USERLI_API_URL and USERLI_API_ACCESS_TOKEN must be set" in error
    assert error.endswith("authd: passdb-lua: initialization failed: Script init failed\n")

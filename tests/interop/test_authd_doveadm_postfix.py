"""Issue 2 interop: real doveadm and a real Postfix authenticate through authd.

authd runs as a real process on unix sockets in a 0755 work directory (so Postfix's
smtpd, running as `postfix`, can reach them); scripts are unmodified Dovecot Lua.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.http_backend import Backend, HttpBackend

from .dovecot import doveadm
from .postfix import SWAKS_AUTH_OK, SWAKS_AUTH_REJECTED, ThrowawayPostfix, swaks
from .procs import make_workdir, running

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

pytestmark = pytest.mark.requires("dovecot", "doveadm", "dovecot-lua", "postfix", "swaks")

USERS_LUA = """\
function auth_passdb_lookup(req)
  if req.user == "cptemp" then error("database is down") end
  if req.user == "alice" then return dovecot.auth.PASSDB_RESULT_OK, "password=alicepass" end
  if req.user == "bob" then
    return dovecot.auth.PASSDB_RESULT_OK,
      "password={SHA512-CRYPT}$6$Q2q6UjWv81ca/TBL$ICWYLApTCvZ5VGMqAACxAwCPTVZHRUtEKvmdYf8SA7z2gMOfakHOmxkxodaa1ONpE6qYNILzpqgpwhQQ0a9ac."
  end
  if req.user == "carol" then
    return dovecot.auth.PASSDB_RESULT_OK, {password = "carolpass", nologin = "y", reason = "Account moved"}
  end
  if req.user == "renamed" then return dovecot.auth.PASSDB_RESULT_OK, "password=renamedpass user=newname" end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
end
"""

CONFIG = (
    """
[auth]
mechanisms = ["plain", "login", "cram-md5"]
failure_delay = 0
penalty = false

[[passdb]]
driver = "lua"
file = "users.lua"

[lua]
workers = 4
"""
    + LISTENERS
)
#: doveadm and Postfix meet both of authd's processes: client connections take turns.
TWO_PROCESSES = "\n[server]\nprocesses = 2\n"


@pytest.fixture(scope="module")
def authd() -> Iterator[AuthdProcess]:
    workdir = make_workdir("authd-doveadm")
    proc = AuthdProcess(workdir, CONFIG + TWO_PROCESSES, {"users.lua": USERS_LUA})
    try:
        with running("authd", proc):
            yield proc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def auth_test(authd: AuthdProcess, user: str, password: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return doveadm(None, "auth", "test", "-a", str(authd.socket("auth-client")), *extra, user, password)


def test_doveadm_success(authd: AuthdProcess) -> None:
    done = auth_test(authd, "alice", "alicepass")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "passdb: alice auth succeeded\nextra fields:\n  user=alice\n"


def test_doveadm_hashed_password(authd: AuthdProcess) -> None:
    assert auth_test(authd, "bob", "bobpass").returncode == 0
    assert auth_test(authd, "bob", "alicepass").returncode == 77


def test_doveadm_wrong_password(authd: AuthdProcess) -> None:
    done = auth_test(authd, "alice", "wrong")
    assert done.returncode == 77
    assert done.stdout == "passdb: alice auth failed\nextra fields:\n  user=alice\n"


def test_doveadm_unknown_user(authd: AuthdProcess) -> None:
    done = auth_test(authd, "nosuchuser", "x")
    assert done.returncode == 77
    assert done.stdout == "passdb: nosuchuser auth failed\nextra fields:\n  user=nosuchuser\n"


def test_doveadm_temp_fail(authd: AuthdProcess) -> None:
    done = auth_test(authd, "cptemp", "x")
    assert done.returncode == 77
    assert done.stdout == "passdb: cptemp auth failed\nextra fields:\n  user=cptemp\n  code=temp_fail\n"
    event = authd.wait_for_log(lambda e: e.get("event") == "lua.error" and e.get("user") == "cptemp")
    assert "database is down" in event["message"]


def test_doveadm_renamed_user(authd: AuthdProcess) -> None:
    # Dovecot 2.3 leaves an empty field where the (hidden) user= field sits.
    done = auth_test(authd, "renamed", "renamedpass")
    assert done.returncode == 0
    assert done.stdout == (
        "passdb: renamed auth succeeded\nextra fields:\n  user=newname\n  \n  original_user=renamed\n"
    )


def test_doveadm_nologin_with_reason(authd: AuthdProcess) -> None:
    done = auth_test(authd, "carol", "carolpass", "-x", "service=imap")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[:3] == ["passdb: carol auth succeeded", "extra fields:", "  user=carol"]
    assert sorted(lines[3:]) == ["  nologin", "  reason=Account moved"]


def test_doveadm_connections_are_served_by_both_processes(authd: AuthdProcess) -> None:
    before = len(authd.log_events())
    for _ in range(4):
        assert auth_test(authd, "alice", "alicepass").returncode == 0
    served = [e for e in authd.log_events()[before:] if e.get("event") == "auth.request"]
    assert sorted(e.get("worker", 0) for e in served) == [0, 0, 1, 1]


def test_passwords_never_logged(authd: AuthdProcess) -> None:
    auth_test(authd, "alice", "alicepass")
    auth_test(authd, "alice", "wrong-secret-xyz")
    log = authd.log_text()
    assert "alicepass" not in log and "wrong-secret-xyz" not in log


# --- Postfix smtpd_sasl_type = dovecot -----------------------------------------


@pytest.fixture(scope="module")
def postfix(authd: AuthdProcess) -> Iterator[ThrowawayPostfix]:
    workdir = make_workdir("postfix-authd")
    try:
        with running("postfix", ThrowawayPostfix(workdir, authd.socket("auth-client"))) as pf:
            yield pf
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_postfix_good_password(postfix: ThrowawayPostfix, mech: str) -> None:
    code, transcript = swaks(postfix.port, mech=mech, user="alice", password="alicepass")
    assert code == SWAKS_AUTH_OK, transcript
    assert "235 2.7.0 Authentication successful" in transcript


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_postfix_bad_password(postfix: ThrowawayPostfix, mech: str) -> None:
    code, transcript = swaks(postfix.port, mech=mech, user="alice", password="wrong")
    assert code == SWAKS_AUTH_REJECTED, transcript
    assert "535 5.7.8 Error: authentication failed" in transcript


# --- the docker-mailserver Nextcloud script against a real HTTP server -----------


@pytest.fixture(scope="module")
def nextcloud() -> Iterator[HttpBackend]:
    with HttpBackend(Backend(users={"alice": "app-password-1"})) as server:
        yield server


@pytest.fixture(scope="module")
def nextcloud_authd(nextcloud: HttpBackend) -> Iterator[AuthdProcess]:
    workdir = make_workdir("authd-nextcloud")
    script = (FIXTURES / "nextcloud_app_password.lua").read_text()
    prologue = f'SCRIPT_DIR = "{workdir}"\nNEXTCLOUD_URL = "{nextcloud.url}"\n'
    proc = AuthdProcess(
        workdir,
        CONFIG.replace("users.lua", "nextcloud.lua"),
        {"nextcloud.lua": prologue + script, "base64.lua": (FIXTURES / "base64.lua").read_text()},
    )
    try:
        with running("authd nextcloud", proc):
            yield proc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_nextcloud_app_password_accepted(nextcloud_authd: AuthdProcess, nextcloud: HttpBackend) -> None:
    done = auth_test(nextcloud_authd, "alice", "app-password-1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "passdb: alice auth succeeded\nextra fields:\n  user=alice\n"
    seen = nextcloud.backend.seen[-1]
    assert seen.method == "PROPFIND" and seen.path == "/remote.php/dav/files/alice/"
    assert seen.headers["Authorization"] == "Basic YWxpY2U6YXBwLXBhc3N3b3JkLTE="


def test_nextcloud_wrong_password(nextcloud_authd: AuthdProcess) -> None:
    done = auth_test(nextcloud_authd, "alice", "guess")
    assert done.returncode == 77
    assert done.stdout == "passdb: alice auth failed\nextra fields:\n  user=alice\n"


def test_nextcloud_backend_error_is_temp_fail(nextcloud_authd: AuthdProcess, nextcloud: HttpBackend) -> None:
    nextcloud.backend.broken = True
    try:
        done = auth_test(nextcloud_authd, "alice", "app-password-1")
    finally:
        nextcloud.backend.broken = False
    assert done.returncode == 77
    assert "code=temp_fail" in done.stdout
    event = nextcloud_authd.wait_for_log(lambda e: e.get("event") == "lua.error" and "500" in str(e.get("message")))
    assert event["message"] == "db-lua: Auth request returned 500 Internal Server Error for alice"

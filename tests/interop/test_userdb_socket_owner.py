"""Who may use a 0666 auth-userdb socket owned by another uid: authd against Dovecot 2.3's own auth.

Root (LMTP, LDA, doveadm) and peers with the socket's uid or gid get everything; any other peer
may only look up users whose userdb uid is its own, and may not PASS or LIST.
"""

from __future__ import annotations

import pwd
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import AuthdProcess

from .dovecot import (
    DOVEADM,
    INTERNAL_USER,
    LOGIN_USER,
    MAIL_GROUP,
    MAIL_USER,
    DovecotBuild,
    DovecotImap,
    ExternalSockets,
    ReferenceDovecot,
    db_block,
    host_build,
    mail_ids,
)
from .procs import make_workdir, running, subdir

pytestmark = pytest.mark.skipif(shutil.which("dovecot") is None, reason="Debian's dovecot-core is not installed")

SOCKET_OWNER = INTERNAL_USER  # "dovecot": neither root nor the mail user

MESSAGE = b"From: sender@example.com\r\nTo: alice@example.com\r\nSubject: root LMTP\r\n\r\nhello\r\n"


def users_lua() -> str:
    uid, gid = mail_ids()
    return f"""\
function auth_passdb_lookup(req)
  if req.user == "alice" then
    return dovecot.auth.PASSDB_RESULT_OK, {{ password = "alicepass" }}
  end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
end

function auth_userdb_lookup(req)
  if req.user == "alice" then
    return dovecot.auth.USERDB_RESULT_OK, {{ uid = "{uid}", gid = "{gid}" }}
  end
  return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
end

function auth_userdb_iterate()
  return {{ "alice" }}
end
"""


CONFIG = f"""
[auth]
mechanisms = ["plain"]
failure_delay = 0
penalty = false

[[passdb]]
driver = "lua"
file = "users.lua"

[[userdb]]
driver = "lua"
file = "users.lua"

[[listener]]
type = "client"
path = "auth-client"
mode = 0o666

[[listener]]
type = "login"
path = "auth-login"
mode = 0o666

[[listener]]
type = "master"
path = "auth-master"
mode = 0o600

[[listener]]
type = "userdb"
path = "auth-userdb"
mode = 0o666
user = "{SOCKET_OWNER}"
group = "{SOCKET_OWNER}"
"""

REFERENCE_OWNER = (
    "service auth {\n"
    "  unix_listener auth-userdb {\n"
    f"    user = {SOCKET_OWNER}\n"
    f"    group = {SOCKET_OWNER}\n"
    "  }\n"
    "}\n"
)

#: peer (user, group) -> exit codes of doveadm user / auth lookup (PASS) / user '*' (LIST).
#: 0 ok, 75 temporary failure (the FAIL reply).
EXPECTED = {
    ("root", "root"): (0, 0, 0),
    (SOCKET_OWNER, MAIL_GROUP): (0, 0, 0),  # the socket's uid
    (LOGIN_USER, SOCKET_OWNER): (0, 0, 0),  # the socket's gid
    (MAIL_USER, MAIL_GROUP): (0, 75, 75),  # alice's userdb uid is its own
    (LOGIN_USER, LOGIN_USER): (75, 75, 75),  # nothing
}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = make_workdir("userdb-owner")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def authd(workdir: Path) -> Iterator[AuthdProcess]:
    proc = AuthdProcess(subdir(workdir, "authd"), CONFIG, {"users.lua": users_lua()})
    with running("authd", proc):
        yield proc


@pytest.fixture(scope="module")
def reference(workdir: Path) -> Iterator[ReferenceDovecot]:
    directory = subdir(workdir, "ref")
    script = directory / "users.lua"
    script.write_text(users_lua())
    script.chmod(0o644)
    # The host's Dovecot, like the doveadm peers below (a 2.4 doveadm's lookups are not 2.3's).
    build = host_build_or_fail()
    databases = db_block("passdb", "lua", f"file={script} blocking=no", dialect=build.dialect) + db_block(
        "userdb", "lua", f"file={script} blocking=no", dialect=build.dialect
    )
    reference = ReferenceDovecot(directory, databases, extra_config=REFERENCE_OWNER, build=build)
    with running("reference dovecot", reference) as ref:
        yield ref


@pytest.fixture(scope="module")
def lmtp_server(workdir: Path, authd: AuthdProcess) -> Iterator[DovecotImap]:
    sockets = ExternalSockets(authd.socket("auth-login"), authd.socket("auth-master"), authd.socket("auth-userdb"))
    with running("dovecot lmtp", DovecotImap(subdir(workdir, "lmtp"), sockets)) as imap:
        yield imap


def host_build_or_fail() -> DovecotBuild:
    """The host's doveadm runs as USER below (a chroot's needs root to enter)."""
    build = host_build()
    assert build is not None
    return build


def doveadm_as(user: str, group: str, socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """doveadm -c /dev/null ARGS -a SOCKET run as USER:GROUP (no supplementary groups)."""
    command, rest = args[0], args[1:]
    return subprocess.run(
        [DOVEADM, *host_build_or_fail().empty_config, *command.split(), "-a", str(socket), *rest],
        user=user,
        group=group,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def outcomes(socket: Path, user: str, group: str) -> tuple[int, int, int]:
    return (
        doveadm_as(user, group, socket, "user", "alice").returncode,
        doveadm_as(user, group, socket, "auth lookup", "alice").returncode,
        doveadm_as(user, group, socket, "user", "*").returncode,
    )


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def test_socket_owned_by_another_uid(authd: AuthdProcess, reference: ReferenceDovecot) -> None:
    for path in (authd.socket("auth-userdb"), reference.socket("auth-userdb")):
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (uid_of(SOCKET_OWNER), 0o666)


@pytest.mark.parametrize(("user", "group"), list(EXPECTED))
def test_peer_permissions_match_dovecot(
    authd: AuthdProcess, reference: ReferenceDovecot, user: str, group: str
) -> None:
    assert outcomes(reference.socket("auth-userdb"), user, group) == EXPECTED[user, group]
    assert outcomes(authd.socket("auth-userdb"), user, group) == EXPECTED[user, group]


def test_restricted_peer_is_logged(authd: AuthdProcess) -> None:
    done = doveadm_as(LOGIN_USER, LOGIN_USER, authd.socket("auth-userdb"), "user", "alice")
    assert done.returncode == 75, done.stderr
    event = authd.wait_for_log(lambda e: e.get("event") == "userdb.restricted" and e.get("user") == "alice")
    assert event["message"] == (
        "client doesn't have lookup permissions for this user: userdb uid (65534) doesn't match peer uid "
        f"({uid_of(LOGIN_USER)}) (to bypass this check, set mode = 0o777 on {authd.socket('auth-userdb')})"
    )


def test_lmtp_as_root_delivers(lmtp_server: DovecotImap) -> None:
    with smtplib.LMTP("127.0.0.1", lmtp_server.lmtp_port) as lmtp:
        lmtp.ehlo()
        assert lmtp.mail("sender@example.com")[0] == 250
        assert lmtp.rcpt("alice") == (250, b"2.1.5 OK")
        assert lmtp.data(MESSAGE)[0] == 250
    delivered = list((lmtp_server.home_root / "alice" / "Maildir" / "new").iterdir())
    assert len(delivered) == 1
    assert delivered[0].read_bytes().endswith(b"hello\n")

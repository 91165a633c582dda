"""Issue 14 interop: a real Dovecot 2.4 (Debian 13's 2.4.1: the host's or the .cache chroot's)
logs users in through authd by route A, with either handshake authd offers.

Dovecot 2.4's imap-login (login_socket_path), imap (`-a` master socket), LMTP and doveadm
(auth_socket_path, or `-a`) all talk to authd's sockets; Dovecot runs no auth process of its own.
The module's header line in the summary and test_runs_dovecot_24 say which Dovecot it ran.
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, SINGLE_PROCESS, AuthdProcess

from .dovecot import DovecotBuild, DovecotImap, ExternalSockets, doveadm, dovecot_build, imap_connect, mail_ids
from .procs import make_workdir, running, subdir
from .test_authd_dovecot import MESSAGE, users_lua

BUILD = dovecot_build("2.4")
pytestmark = pytest.mark.skipif(
    BUILD is None, reason="no Dovecot 2.4: run ./scripts/bootstrap as root (Debian 12: builds .cache/dovecot-trixie)"
)

CONFIG = """
[auth]
mechanisms = ["plain", "login"]
failure_delay = 0
penalty = false

[[passdb]]
driver = "lua"
file = "users.lua"

[[userdb]]
driver = "lua"
file = "users.lua"
"""


def build() -> DovecotBuild:
    assert BUILD is not None
    return BUILD


def listeners(handshake: str) -> str:
    """authd's four listeners, the client and login ones with HANDSHAKE ("2.3": all at once)."""
    text = LISTENERS
    for kind in ("client", "login"):
        text = text.replace(f'type = "{kind}"\n', f'type = "{kind}"\nhandshake = "{handshake}"\n')
    return text


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = make_workdir("dovecot24")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=["2.3", "2.4"], ids=lambda h: f"handshake-{h}")
def authd(workdir: Path, request: pytest.FixtureRequest) -> Iterator[AuthdProcess]:
    config = CONFIG + listeners(request.param) + SINGLE_PROCESS
    proc = AuthdProcess(subdir(workdir, "authd"), config, {"users.lua": users_lua()})
    with running("authd", proc):
        yield proc


@pytest.fixture(scope="module")
def route_a(workdir: Path, authd: AuthdProcess) -> Iterator[DovecotImap]:
    sockets = ExternalSockets(authd.socket("auth-login"), authd.socket("auth-master"), authd.socket("auth-userdb"))
    with running("dovecot 2.4 route A", DovecotImap(subdir(workdir, "imap24"), sockets, build=build())) as imap:
        yield imap


def login_and_count(imap: DovecotImap, user: str = "alice", password: str = "alicepass") -> int:
    conn = imap_connect(imap.imap_port)
    try:
        conn.login(user, password)
        status, data = conn.select("INBOX")
        assert status == "OK", data
        return int(data[0] or 0)
    finally:
        conn.logout()


def doveadm24(*args: str) -> str:
    done = doveadm(None, *args, build=build())
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_runs_dovecot_24(route_a: DovecotImap) -> None:
    assert route_a.build.version.startswith("2.4.")
    assert f"master: Info: Dovecot v{route_a.build.version} starting up for imap, lmtp" in route_a.log_text()
    assert "dovecot_config_version = 2.4.0\n" in route_a.conf_path.read_text()


# --- IMAP -------------------------------------------------------------------------------------


def test_imap_login_and_select(route_a: DovecotImap) -> None:
    assert login_and_count(route_a) >= 0
    assert "imap-login: Info: Logged in: user=<alice>, method=PLAIN" in route_a.log_text()


def test_imap_authenticate_plain(route_a: DovecotImap) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        status, _ = conn.authenticate("PLAIN", lambda _: b"\0alice\0alicepass")
        assert status == "OK"
    finally:
        conn.logout()


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", "x")])
def test_imap_login_fails(route_a: DovecotImap, user: str, password: str) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\] Authentication failed\."):
            conn.login(user, password)
    finally:
        conn.logout()


def test_imap_nologin_shows_reason(route_a: DovecotImap) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[CONTACTADMIN\] Account moved"):
            conn.login("carol", "carolpass")
    finally:
        conn.logout()


# --- LMTP -------------------------------------------------------------------------------------


def test_lmtp_rcpt(route_a: DovecotImap) -> None:
    with smtplib.LMTP("127.0.0.1", route_a.lmtp_port) as lmtp:
        lmtp.ehlo()
        assert lmtp.mail("sender@example.com")[0] == 250
        assert lmtp.rcpt("alice")[0] == 250
        code, text = lmtp.rcpt("mallory")
        assert code == 550, text


def test_lmtp_delivers_into_the_maildir(route_a: DovecotImap) -> None:
    before = login_and_count(route_a)
    with smtplib.LMTP("127.0.0.1", route_a.lmtp_port) as lmtp:
        assert lmtp.sendmail("sender@example.com", ["alice"], MESSAGE) == {}
    assert login_and_count(route_a) == before + 1
    maildir = route_a.home_root / "alice" / "Maildir"
    assert len([*(maildir / "new").iterdir(), *(maildir / "cur").iterdir()]) == before + 1
    assert "lmtp(alice)" in route_a.log_text() and "saved mail to INBOX" in route_a.log_text()


# --- doveadm 2.4 ------------------------------------------------------------------------------


def test_doveadm_user(authd: AuthdProcess) -> None:
    uid, gid = mail_ids()
    lines = doveadm24("user", "-a", str(authd.socket("auth-userdb")), "alice").splitlines()
    assert lines[:3] == ["field\tvalue", f"uid\t{uid}", f"gid\t{gid}"]


def test_doveadm_user_unknown(authd: AuthdProcess) -> None:
    done = doveadm(None, "user", "-a", str(authd.socket("auth-userdb")), "mallory", build=build())
    assert done.returncode == 67, done.stdout + done.stderr
    assert "userdb lookup: user mallory doesn't exist" in done.stdout


def test_doveadm_user_list(authd: AuthdProcess) -> None:
    assert doveadm24("user", "-a", str(authd.socket("auth-userdb")), "*").split() == ["alice", "carol"]


def test_doveadm_auth_test(authd: AuthdProcess) -> None:
    out = doveadm24("auth", "test", "-a", str(authd.socket("auth-client")), "alice", "alicepass")
    assert out.splitlines()[:3] == ["passdb: alice auth succeeded", "extra fields:", "  user=alice"]


def test_doveadm_auth_login(authd: AuthdProcess) -> None:
    login, master = str(authd.socket("auth-login")), str(authd.socket("auth-master"))
    lines = doveadm24("auth", "login", "-a", login, "-m", master, "alice", "alicepass").splitlines()
    assert lines[0] == "passdb: alice auth succeeded"
    assert "userdb extra fields:" in lines and "  auth_mech=PLAIN" in lines


def test_doveadm_auth_lookup_and_cache_flush(authd: AuthdProcess) -> None:
    out = doveadm24("auth", "lookup", "-a", str(authd.socket("auth-master")), "alice")
    assert out.splitlines()[:2] == ["passdb: alice", "  user      : alice"]
    doveadm24("auth", "cache", "flush", "-a", str(authd.socket("auth-master")))


def test_doveadm_mail_commands(route_a: DovecotImap) -> None:
    with smtplib.LMTP("127.0.0.1", route_a.lmtp_port) as lmtp:
        assert lmtp.sendmail("sender@example.com", ["alice"], MESSAGE) == {}
    conf = route_a.conf_path
    done = doveadm(conf, "mailbox", "list", "-u", "alice", build=build())
    assert done.returncode == 0 and done.stdout.split() == ["INBOX"], done.stdout + done.stderr
    done = doveadm(conf, "fetch", "-u", "alice", "hdr.subject", "mailbox", "INBOX", build=build())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hdr.subject: via authd" in done.stdout

"""Issue 3 interop: a real Dovecot 2.3 logs users in through authd, by both routes.

Route A points Dovecot's login/post-login processes and auth_socket_path at authd's
sockets; route B has Dovecot's master start `authd serve --dovecot-service` as its
own auth service, under Dovecot 2.3 and (issue 14) 2.4. Both are checked with IMAP
(imaplib), LMTP, dovecot-lda and doveadm.
"""

from __future__ import annotations

import dataclasses
import imaplib
import re
import shutil
import smtplib
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from scramp import ScramClient

from tests.authd_process import LISTENERS, AuthdProcess

from .dovecot import (
    AuthCommand,
    DovecotBuild,
    DovecotImap,
    ExternalSockets,
    doveadm,
    dovecot_build,
    dovecot_lda,
    imap_connect,
    mail_ids,
)
from .procs import make_workdir, running, subdir

pytestmark = pytest.mark.requires("dovecot", "doveadm")

MESSAGE = b"From: sender@example.com\r\nTo: alice@example.com\r\nSubject: via authd\r\n\r\nhello\r\n"


def users_lua() -> str:
    uid, gid = mail_ids()
    return f"""\
local USERS = {{ alice = "alicepass", carol = "carolpass" }}

function auth_passdb_lookup(req)
  local password = USERS[req.user]
  if password == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  if req.user == "carol" then
    return dovecot.auth.PASSDB_RESULT_OK, {{ password = password, nologin = "y", reason = "Account moved" }}
  end
  return dovecot.auth.PASSDB_RESULT_OK, "password=" .. password .. " userdb_quota_rule=*:storage=1G"
end

function auth_userdb_lookup(req)
  if req.user == "broken" then error("userdb backend down") end
  if USERS[req.user] == nil then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return dovecot.auth.USERDB_RESULT_OK, {{ uid = "{uid}", gid = "{gid}" }}
end

function auth_userdb_iterate()
  return {{ "alice", "carol" }}
end
"""


CONFIG = (
    """
[auth]
mechanisms = ["plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256", "oauthbearer", "xoauth2"]
failure_delay = 0
penalty = false

[[passdb]]
driver = "lua"
file = "users.lua"

[[userdb]]
driver = "lua"
file = "users.lua"

[lua]
workers = 4
"""
    + LISTENERS
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = make_workdir("authd-dovecot")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def authd(workdir: Path) -> Iterator[AuthdProcess]:
    # Two processes: logins and REQUEST stay in the main one, the userdb socket is shared.
    config = CONFIG + "\n[server]\nprocesses = 2\n"
    proc = AuthdProcess(subdir(workdir, "authd"), config, {"users.lua": users_lua()})
    with running("authd", proc):
        yield proc


@pytest.fixture(scope="module")
def route_a(workdir: Path, authd: AuthdProcess) -> Iterator[DovecotImap]:
    sockets = ExternalSockets(authd.socket("auth-login"), authd.socket("auth-master"), authd.socket("auth-userdb"))
    with running("dovecot route A", DovecotImap(subdir(workdir, "imap-a"), sockets)) as imap:
        yield imap


REPO = Path(__file__).resolve().parents[2]
# The console script, not `python -m`: Dovecot's master execs with a bare argv[0], and a
# venv's python finds its site-packages only through an absolute path (the shebang's).
AUTHD_BIN = Path(sys.executable).parent / "authd"


@dataclasses.dataclass(frozen=True)
class RouteBBuild(DovecotBuild):
    """A build whose processes also see BINDS (this repository, its venv's Python and the
    libraries it needs that the root lacks) at the same paths: a chroot's master must exec
    the host's authd."""

    binds: tuple[Path, ...] = ()

    def argv(self, command: list[str]) -> list[str]:
        argv = super().argv(command)
        if self.root is None:
            return argv
        mounts = "".join(
            f'{"mkdir -p" if path.is_dir() else "touch"} "$0{path}" && mount --bind {path} "$0{path}" && '
            for path in self.binds
        )
        script = argv.index("-c") + 1
        return [*argv[:script], mounts + argv[script], *argv[script + 1 :]]


# Python's _ctypes (trio imports ctypes) and pyexpat; a minimal Debian root may have neither.
PYTHON_LIBRARIES = ("libffi.so.8", "libexpat.so.1")


def route_b_build(dialect: str) -> DovecotBuild:
    """The DIALECT build that can run this host's authd, else skip (e.g. a chroot older than the
    host's Python: Debian 13's python3.13 does not run in a bookworm root)."""
    build = dovecot_build("2.3" if dialect == "2.3" else "2.4")
    if build is None:
        pytest.skip(f"no Dovecot {dialect}: run ./scripts/bootstrap as root")
    if build.root is None:
        return build
    python = Path(sys.executable)
    base = Path(sys.base_prefix).resolve()
    if base == Path("/usr") or Path("/usr") in base.parents:
        # Binding a system Python's /usr would replace the root's own Dovecot with the host's.
        pytest.skip(f"this host's system Python ({base}) runs only in its own root, not in {build.label}")
    binds = {REPO, base, Path(sys.prefix).resolve()}
    libdir = Path("/usr/lib") / str(sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu")
    for name in PYTHON_LIBRARIES:
        inside = build.root / libdir.relative_to("/") / name  # an empty file: the mount point of an earlier run
        if (libdir / name).exists() and (not inside.exists() or inside.stat().st_size == 0):
            binds.add(libdir / name)
    wrapped = RouteBBuild(build.root, build.version, tuple(sorted(binds)))
    probe = [str(python), "-c", "import authd.cli, authd.dovecot_service, lupa, trio"]
    done = subprocess.run(wrapped.argv(probe), capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.skip(f"this host's Python does not run in {build.label}: {done.stderr.strip()[-300:]}")
    return wrapped


@pytest.fixture(scope="module", params=["2.3", "2.4"], ids=lambda d: f"dovecot-{d}")
def route_b(workdir: Path, request: pytest.FixtureRequest) -> Iterator[DovecotImap]:
    build = route_b_build(request.param)
    directory = subdir(workdir, f"authd-b{request.param}")
    (directory / "users.lua").write_text(users_lua())
    (directory / "users.lua").chmod(0o644)
    config = directory / "authd.toml"
    config.write_text(CONFIG.split("[[listener]]")[0])  # Dovecot's master provides the listeners
    config.chmod(0o644)
    command = AuthCommand(f"{AUTHD_BIN} serve --dovecot-service --config {config}")
    imap_dir = subdir(workdir, f"imap-b{request.param}")
    with running(f"dovecot {request.param} route B", DovecotImap(imap_dir, command, build=build)) as imap:
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


# --- doveadm against authd's userdb/master sockets ----------------------------------------


def test_doveadm_user_found(authd: AuthdProcess) -> None:
    uid, gid = mail_ids()
    done = doveadm(None, "user", "-a", str(authd.socket("auth-userdb")), "alice")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == ["field\tvalue", f"uid\t{uid}", f"gid\t{gid}"]


def test_doveadm_user_not_found(authd: AuthdProcess) -> None:
    done = doveadm(None, "user", "-a", str(authd.socket("auth-userdb")), "mallory")
    assert done.returncode == 67
    assert "userdb lookup: user mallory doesn't exist" in done.stdout


def test_doveadm_user_temp_fail(authd: AuthdProcess) -> None:
    done = doveadm(None, "user", "-a", str(authd.socket("auth-userdb")), "broken")
    assert done.returncode == 75
    assert "Auth USER lookup failed" in done.stderr


def test_doveadm_user_list(authd: AuthdProcess) -> None:
    done = doveadm(None, "user", "-a", str(authd.socket("auth-userdb")), "*")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["alice", "carol"]


def test_doveadm_auth_lookup(authd: AuthdProcess) -> None:
    done = doveadm(None, "auth", "lookup", "-a", str(authd.socket("auth-master")), "alice")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["passdb: alice", "  user      : alice"]


def test_doveadm_auth_login_runs_the_request_flow(authd: AuthdProcess) -> None:
    uid, gid = mail_ids()
    done = doveadm(
        None,
        "auth",
        "login",
        "-a",
        str(authd.socket("auth-login")),
        "-m",
        str(authd.socket("auth-master")),
        "alice",
        "alicepass",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:7] == [
        "passdb: alice auth succeeded",
        "extra fields:",
        "  user=alice",
        "  ",
        "userdb extra fields:",
        "  alice",
        "  quota_rule=*:storage=1G",  # prefetched from the passdb, so first
    ]
    # a Lua table's order is the hash order, in Dovecot too
    assert sorted(lines[7:9]) == [f"  gid={gid}", f"  uid={uid}"]
    assert lines[9:] == ["  auth_mech=PLAIN"]


# --- route A ----------------------------------------------------------------------------------


def test_route_a_imap_login(route_a: DovecotImap) -> None:
    assert login_and_count(route_a) >= 0


def test_route_a_logins_in_both_processes_reach_the_mailbox(route_a: DovecotImap, authd: AuthdProcess) -> None:
    """Each imap-login process has its own auth connection, dealt in turn: a login served by
    the worker passes Dovecot's post-login checks (SPID, cookie, REQUEST) like one served by
    the main process."""
    before = len(authd.log_events())
    for _ in range(4):
        assert login_and_count(route_a) >= 0
    logins = [e for e in authd.log_events()[before:] if e.get("event") == "auth.request" and e.get("service") == "imap"]
    assert len(logins) == 4 and {e.get("worker", 0) for e in logins} == {0, 1}


def test_route_a_imap_authenticate_plain(route_a: DovecotImap) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        status, _ = conn.authenticate("PLAIN", lambda _: b"\0alice\0alicepass")
        assert status == "OK"
    finally:
        conn.logout()


def test_route_a_imap_cram_md5(route_a: DovecotImap) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        assert "AUTH=CRAM-MD5" in conn.capabilities
        status, _ = conn.login_cram_md5("alice", "alicepass")
        assert status == "OK"
    finally:
        conn.logout()


class ScramSteps:
    """imaplib's authenticate() callback, driven by scramp (an independent SCRAM client)."""

    def __init__(self, mechanism: str, user: str, password: str) -> None:
        self.client = ScramClient([mechanism], user, password)
        self.challenges: list[str] = []

    def __call__(self, challenge: bytes) -> bytes:
        self.challenges.append(challenge.decode())
        if len(self.challenges) == 1:
            return self.client.get_client_first().encode()
        if len(self.challenges) == 2:
            self.client.set_server_first(challenge.decode())
            return self.client.get_client_final().encode()
        self.client.set_server_final(challenge.decode())  # raises if the server signature is wrong
        return b""


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_route_a_imap_scram(route_a: DovecotImap, mechanism: str) -> None:
    steps = ScramSteps(mechanism, "alice", "alicepass")
    conn = imap_connect(route_a.imap_port)
    try:
        assert f"AUTH={mechanism}" in conn.capabilities
        status, _ = conn.authenticate(mechanism, steps)
        assert status == "OK" and len(steps.challenges) == 3 and steps.challenges[2].startswith("v=")
    finally:
        conn.logout()


def test_route_a_imap_scram_wrong_password(route_a: DovecotImap) -> None:
    steps = ScramSteps("SCRAM-SHA-256", "alice", "wrong")
    conn = imap_connect(route_a.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            conn.authenticate("SCRAM-SHA-256", steps)
        assert len(steps.challenges) == 2  # no server signature for a wrong proof
    finally:
        conn.logout()


@pytest.mark.parametrize(
    ("mechanism", "message"),
    [
        ("XOAUTH2", b"user=alice\x01auth=Bearer alicepass\x01\x01"),
        ("OAUTHBEARER", b"n,a=alice,\x01host=127.0.0.1\x01port=143\x01auth=Bearer alicepass\x01\x01"),
    ],
)
def test_route_a_imap_oauth(route_a: DovecotImap, mechanism: str, message: bytes) -> None:
    """The bearer token reaches the Lua passdb as the password."""
    conn = imap_connect(route_a.imap_port)
    try:
        assert f"AUTH={mechanism}" in conn.capabilities
        status, _ = conn.authenticate(mechanism, lambda _: message)
        assert status == "OK"
    finally:
        conn.logout()


def test_route_a_imap_xoauth2_bad_token(route_a: DovecotImap) -> None:
    answers = iter([b"user=alice\x01auth=Bearer expired\x01\x01", b""])  # then acknowledge the JSON error
    conn = imap_connect(route_a.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            conn.authenticate("XOAUTH2", lambda _: next(answers))
    finally:
        conn.logout()


def test_route_a_imap_wrong_password(route_a: DovecotImap) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            conn.login("alice", "wrong")
    finally:
        conn.logout()


def test_route_a_nologin_shows_reason(route_a: DovecotImap) -> None:
    conn = imap_connect(route_a.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="Account moved"):
            conn.login("carol", "carolpass")
    finally:
        conn.logout()


def test_route_a_lmtp_rcpt(route_a: DovecotImap) -> None:
    with smtplib.LMTP("127.0.0.1", route_a.lmtp_port) as lmtp:
        lmtp.ehlo()
        assert lmtp.mail("sender@example.com")[0] == 250
        assert lmtp.rcpt("alice")[0] == 250
        code, text = lmtp.rcpt("mallory")
        assert code == 550, text


def test_route_a_lmtp_and_lda_deliver(route_a: DovecotImap) -> None:
    before = login_and_count(route_a)
    with smtplib.LMTP("127.0.0.1", route_a.lmtp_port) as lmtp:
        assert lmtp.sendmail("sender@example.com", ["alice"], MESSAGE) == {}
    delivered = dovecot_lda(route_a.conf_path, "alice", MESSAGE, "-f", "sender@example.com")
    assert delivered.returncode == 0, delivered
    assert login_and_count(route_a) == before + 2


def test_route_a_lda_unknown_user(route_a: DovecotImap) -> None:
    assert dovecot_lda(route_a.conf_path, "mallory", MESSAGE).returncode == 67


# --- route B ----------------------------------------------------------------------------------


def test_route_b_imap_login_and_lmtp(route_b: DovecotImap) -> None:
    assert login_and_count(route_b) >= 0
    with smtplib.LMTP("127.0.0.1", route_b.lmtp_port) as lmtp:
        lmtp.ehlo()
        assert lmtp.mail("sender@example.com")[0] == 250
        assert lmtp.rcpt("alice")[0] == 250
        assert lmtp.rcpt("mallory")[0] == 550


def test_route_b_wrong_password(route_b: DovecotImap) -> None:
    conn = imap_connect(route_b.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            conn.login("alice", "wrong")
    finally:
        conn.logout()


def test_route_b_logs_through_dovecot(route_b: DovecotImap) -> None:
    login_and_count(route_b)
    log = route_b.log_text()
    assert "auth: Info: listener.ready" in log
    assert "auth: Error:" not in log


def test_route_b_takes_every_listener_with_its_type(route_b: DovecotImap) -> None:
    """2.3 hands the listeners over from fd 7 by name, 2.4 from fd 8 as `NAME<TAB>type=TYPE`:
    authd serves each as Dovecot's auth would (token-login refused: authd has no DOVECOT-TOKEN)."""
    base = route_b.base_dir
    log = route_b.log_text()
    ready = re.findall(r"auth: Info: listener\.ready type=(\S+) where=(\S+)\n", log)
    assert sorted(ready) == [
        ("client", f"{base}/auth-client"),
        ("login", f"{base}/auth-login"),
        ("login", f"{base}/login/login"),
        ("master", f"{base}/auth-master"),
        ("userdb", f"{base}/auth-userdb"),
    ]
    refused = re.findall(r"auth: Warning: listener\.refused: .* type=(\S+) where=(\S+)\n", log)
    assert refused == [("token", f"{base}/token-login/tokenlogin")]

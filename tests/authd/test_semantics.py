"""Dovecot 2.3's passdb/userdb semantics end to end, over real sockets (lua_api.md §2, §10).

One script covers the result codes and fields that change what clients see; each test
asserts the exact reply bytes and, where Dovecot logs, the log line.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire

SCRIPT = """\
local OK = dovecot.auth.PASSDB_RESULT_OK
local passdb = {
  disabled = {dovecot.auth.PASSDB_RESULT_USER_DISABLED, "disabled by lua"},
  expired = {dovecot.auth.PASSDB_RESULT_PASS_EXPIRED, "expired by lua"},
  internal = {dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "backend down"},
  next = {dovecot.auth.PASSDB_RESULT_NEXT, "a=b"},
  noauth = {OK, "noauthenticate"},
  anypass = {OK, "nopassword=y"},
  nopass = {OK, "quota=1"},
  both = {OK, "password=x nopassword=y"},
  nets = {OK, "password=x allow_nets=192.0.2.0/24"},
  localnets = {OK, "password=x allow_nets=local"},
  hashed = {OK, "password={SSHA256}dKhOsxVR7SrFwDTY9SpVWkjT0q5A00E69E37tZsXotIMoVhQ"},
  tabled = {OK, {password = "x", nologin = true, num = -5, flag = false}},
  nodelay = {OK, "password=x nodelay"},
}

function auth_passdb_lookup(req)
  calls = (calls or 0) + 1
  local entry = passdb[req.user]
  if entry == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "unknown " .. req.user
  end
  return entry[1], entry[2]
end

function auth_userdb_lookup(req)
  if req.user == "named" then return dovecot.auth.USERDB_RESULT_OK, {uid = "nobody", gid = "nogroup"} end
  if req.user == "badid" then return dovecot.auth.USERDB_RESULT_OK, {uid = "no-such-user-xyz"} end
  if req.user == "tempfail" then
    return dovecot.auth.USERDB_RESULT_OK, "uid=1 tempfail reason=try_later"
  end
  if req.user == "rename" then return dovecot.auth.USERDB_RESULT_OK, "user=renamed@example.org uid=7" end
  if req.user == "fields" then
    return dovecot.auth.USERDB_RESULT_OK, "uid=7 home=/a home:protected=/b mail=x mail:remove system_user=u"
  end
  if req.user == "seen" then
    return dovecot.auth.USERDB_RESULT_OK, "uid=7 prefetched=" .. tostring(req.userdb.quota_rule)
  end
  return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no"
end
"""

VERIFY_SCRIPT = """\
function auth_password_verify(req, password)
  if password == "verified" then return dovecot.auth.PASSDB_RESULT_OK, "via=verify" end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, "bad password text"
end
"""

CONFIG = (
    """
[auth]
failure_delay = 0
penalty = false
[[passdb]]
driver = "lua"
file = "semantics.lua"
[[userdb]]
driver = "lua"
file = "semantics.lua"
[lua]
workers = 2
"""
    + LISTENERS
)


@pytest.fixture(scope="module")
def authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    proc = AuthdProcess(tmp_path_factory.mktemp("semantics"), CONFIG, {"semantics.lua": SCRIPT})
    proc.start(wait_for=("auth-client", "auth-master", "auth-userdb"))
    yield proc
    proc.stop()


def auth(authd: AuthdProcess, user: str, password: str = "x", extra: str = "", socket: str = "auth-client") -> str:
    resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with Wire.auth_client(authd.socket(socket)) as w:
        w.send("VERSION\t1\t2", "CPID\t77", f"AUTH\t1\tPLAIN\tservice=imap{extra}\tresp={resp}")
        return w.read_line()


def master(authd: AuthdProcess, line: str, socket: str = "auth-master") -> str:
    with Wire.auth_master(authd.socket(socket)) as w:
        w.send("VERSION\t1\t0", line)
        return w.read_line()


def logged(authd: AuthdProcess, user: str, text: str) -> dict[str, object]:
    return authd.wait_for_log(lambda e: e.get("user") == user and text in str(e.get("message", "")))


@pytest.mark.parametrize(
    ("user", "reply"),
    [
        ("disabled", "FAIL\t1\tuser=disabled\tcode=user_disabled"),
        ("expired", "FAIL\t1\tuser=expired\tcode=pass_expired\treason=Password expired"),
        ("internal", "FAIL\t1\tuser=internal\tcode=temp_fail"),
        ("next", "FAIL\t1\tuser=next\tcode=temp_fail\ta=b"),  # NEXT keeps its string fields
        ("noauth", "FAIL\t1\tuser=noauth\tcode=temp_fail"),
        ("anypass", "OK\t1\tuser=anypass"),  # nopassword is removed after its passdb
        ("nopass", "FAIL\t1\tuser=nopass"),
        ("both", "FAIL\t1\tuser=both"),
        ("nets", "FAIL\t1\tuser=nets"),
        ("localnets", "OK\t1\tuser=localnets\t"),
        ("unknown", "FAIL\t1\tuser=unknown"),
    ],
)
def test_result_codes_and_fields(authd: AuthdProcess, user: str, reply: str) -> None:
    assert auth(authd, user) == reply


def test_failure_messages_are_only_logged_for_internal_failures(authd: AuthdProcess) -> None:
    auth(authd, "internal")
    auth(authd, "disabled")
    assert logged(authd, "internal", "db-lua: backend down")
    assert not [e for e in authd.log_events() if "disabled by lua" in str(e)]


def test_last_passdb_next_is_logged(authd: AuthdProcess) -> None:
    auth(authd, "next")
    logged(authd, "next", "Last passdb had noauthenticate field, cannot authenticate user")


def test_missing_password_is_logged(authd: AuthdProcess) -> None:
    auth(authd, "nopass")
    logged(authd, "nopass", "No password returned (and no nopassword)")
    auth(authd, "both")
    logged(authd, "both", "nopassword given and password is not empty")


def test_allow_nets(authd: AuthdProcess) -> None:
    assert auth(authd, "nets", extra="\trip=192.0.2.7") == "OK\t1\tuser=nets\t"
    assert auth(authd, "nets", extra="\trip=198.51.100.1") == "FAIL\t1\tuser=nets"
    logged(authd, "nets", "allow_nets check failed: IP 198.51.100.1 not in allowed networks")


def test_hashed_password_and_table_rendering(authd: AuthdProcess) -> None:
    assert auth(authd, "hashed", "secret") == "OK\t1\tuser=hashed"
    assert auth(authd, "hashed", "wrong") == "FAIL\t1\tuser=hashed"
    reply = auth(authd, "tabled").split("\t")
    assert reply[:3] == ["OK", "1", "user=tabled"]
    assert sorted(reply[3:]) == ["flag=no", "nologin", "num=18446744073709551611"]


def test_nodelay_is_echoed_on_failure(authd: AuthdProcess) -> None:
    # The field of an earlier successful lookup survives; here the password mismatch
    # rolls the fields back, so no nodelay appears (as in Dovecot 2.3).
    assert auth(authd, "nodelay", "wrong") == "FAIL\t1\tuser=nodelay"


def test_credentials_lookup_always_calls_passdb_lookup(authd: AuthdProcess) -> None:
    assert master(authd, "PASS\t1\tanypass\tservice=doveadm") == "PASS\t1\tuser=anypass"
    assert master(authd, "PASS\t2\tdisabled\tservice=doveadm") == "NOTFOUND\t2"
    assert master(authd, "PASS\t3\tinternal\tservice=doveadm") == "FAIL\t3"


@pytest.mark.parametrize(
    ("user", "reply"),
    [
        ("named", f"USER\t1\tnamed\tuid={pwd.getpwnam('nobody').pw_uid}\tgid=65534"),  # from names
        ("badid", "FAIL\t1"),
        ("tempfail", "FAIL\t1\treason=try_later"),
        ("rename", "USER\t1\trenamed@example.org\tuid=7"),
        ("fields", "USER\t1\tfields\tuid=7\thome=/a\tsystem_groups_user=u"),
        ("mallory", "NOTFOUND\t1"),
    ],
)
def test_userdb_field_semantics(authd: AuthdProcess, user: str, reply: str) -> None:
    got = master(authd, f"USER\t1\t{user}\tservice=lmtp", "auth-userdb").split("\t")
    want = reply.split("\t")
    assert got[:3] == want[:3] and sorted(got[3:]) == sorted(want[3:])  # tables come in hash order


def test_userdb_sees_prefetched_fields_in_request(authd: AuthdProcess) -> None:
    # req.userdb shows userdb_* fields a passdb returned; in a plain USER lookup there are none
    assert master(authd, "USER\t1\tseen\tservice=lmtp", "auth-userdb") == "USER\t1\tseen\tuid=7\tprefetched=nil"


def test_passdb_and_userdb_have_separate_states(authd: AuthdProcess) -> None:
    # the passdb's global counter is not visible to the userdb state of the same file
    script = authd.workdir / "semantics.lua"
    assert script.exists()
    auth(authd, "anypass")
    assert master(authd, "USER\t1\tfields\tservice=lmtp", "auth-userdb").startswith("USER\t1\tfields")


@pytest.fixture(scope="module")
def verify_authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    config = CONFIG.replace("semantics.lua", "verify.lua").split("[[userdb]]")[0] + "[lua]\nworkers = 2\n" + LISTENERS
    proc = AuthdProcess(tmp_path_factory.mktemp("verify"), config, {"verify.lua": VERIFY_SCRIPT})
    proc.start(wait_for=("auth-client", "auth-master"))
    yield proc
    proc.stop()


def test_password_verify_wins_for_plain_auth(verify_authd: AuthdProcess) -> None:
    assert auth(verify_authd, "anyone", "verified") == "OK\t1\tuser=anyone\tvia=verify"
    assert auth(verify_authd, "anyone", "nope") == "FAIL\t1\tuser=anyone"
    logged(verify_authd, "anyone", "Password mismatch")


def test_verify_only_script_fails_credential_lookups(verify_authd: AuthdProcess) -> None:
    assert master(verify_authd, "PASS\t1\tanyone\tservice=doveadm") == "FAIL\t1"
    logged(verify_authd, "anyone", "'auth_passdb_lookup' is not a function")


@pytest.fixture(scope="module")
def prefetch_authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    script = (
        "function auth_passdb_lookup(req)\n"
        "  return dovecot.auth.PASSDB_RESULT_OK, 'password=p userdb_uid=42 userdb_home=/h/' .. req.user\n"
        "end\n"
    )
    config = (
        '[auth]\nfailure_delay = 0\npenalty = false\n[[passdb]]\ndriver = "lua"\nfile = "p.lua"\n'
        '[[userdb]]\ndriver = "prefetch"\n[lua]\nworkers = 1\n' + LISTENERS
    )
    proc = AuthdProcess(tmp_path_factory.mktemp("prefetch"), config, {"p.lua": script})
    proc.start(wait_for=("auth-login", "auth-master", "auth-userdb"))
    yield proc
    proc.stop()


def test_prefetch_userdb_serves_passdb_fields(prefetch_authd: AuthdProcess) -> None:
    resp = base64.b64encode(b"\0pat\0p").decode()
    with Wire.auth_client(prefetch_authd.socket("auth-login")) as login:
        cookie = login.greeting_value("COOKIE")
        login.send("VERSION\t1\t2", "CPID\t4711", f"AUTH\t1\tPLAIN\tservice=imap\tresp={resp}")
        assert login.read_line() == "OK\t1\tuser=pat\t"
        with Wire.auth_master(prefetch_authd.socket("auth-master")) as m:
            m.send("VERSION\t1\t1", f"REQUEST\t9\t4711\t1\t{cookie}")
            assert m.read_line() == "USER\t9\tpat\tuid=42\thome=/h/pat\tauth_mech=PLAIN"
    # a plain userdb lookup has no passdb fields to prefetch
    assert master(prefetch_authd, "USER\t1\tpat\tservice=lmtp", "auth-userdb") == "FAIL\t1"
    logged(prefetch_authd, "pat", "userdb lookup not possible with only userdb prefetch")


def talk_as(uid: int, gid: int, path: Path, data: bytes, lines: int) -> list[str]:
    """Send `data` from a forked child running as uid/gid; return the reply lines."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no exec, so no need to reach the interpreter as that user
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(data)
            received = b""
            while received.count(b"\n") < lines:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
            os.write(write_end, received)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    return output.decode().splitlines()


def test_restricted_userdb_socket() -> None:
    """A 0666 userdb socket: peers owning neither its uid nor gid see only their own uid."""
    nobody = pwd.getpwnam("nobody")
    workdir = Path(tempfile.mkdtemp(prefix="authd-restricted-"))  # reachable by nobody
    workdir.chmod(0o755)
    script = (
        "function auth_userdb_lookup(req)\n"
        f"  if req.user == 'me' then return 1, 'uid={nobody.pw_uid}' end\n"
        "  return 1, 'uid=0'\nend\nfunction auth_userdb_iterate() return {'me'} end\n"
    )
    config = '[[userdb]]\ndriver = "lua"\nfile = "u.lua"\n[[listener]]\ntype = "userdb"\npath = "u"\nmode = 0o666\n'
    proc = AuthdProcess(workdir, config, {"u.lua": script})
    proc.start(wait_for=("u",))
    try:
        lines = talk_as(
            nobody.pw_uid,
            nobody.pw_gid,
            proc.socket("u"),
            b"VERSION\t1\t0\nUSER\t1\tme\tservice=x\nUSER\t2\tother\tservice=x\nPASS\t3\tme\tservice=x\nLIST\t4\n",
            6,
        )
        assert sorted(lines[2:]) == sorted([f"USER\t1\tme\tuid={nobody.pw_uid}", "FAIL\t2", "FAIL\t3", "DONE\t4\tfail"])
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

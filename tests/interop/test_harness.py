"""The interop harness itself, proven against Dovecot's own auth process as the stand-in server.

If these fail, the later authd interop tests cannot be trusted: they check that doveadm, the
raw wire client, Postfix + swaks, a route-A and a route-B Dovecot IMAP/LMTP server and a Lua
passdb all work with the reference Dovecot, and that stopping leaves nothing running.
"""

from __future__ import annotations

import base64
import imaplib
import os
import re
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .dovecot import DovecotImap, ReferenceDovecot, db_block, doveadm, dovecot_lda, imap_connect, mail_ids
from .postfix import SWAKS_AUTH_OK, SWAKS_AUTH_REJECTED, ThrowawayPostfix, swaks
from .procs import greets, is_running, running, session_members, subdir
from .wire import Wire, WireClosed, WireTimeout

pytestmark = pytest.mark.requires("dovecot", "doveadm", "dovecot-lua", "postfix", "swaks")

ALICE_PLAIN = base64.b64encode(b"\0alice\0alicepass").decode()
MESSAGE = b"From: sender@example.com\nTo: alice\nSubject: interop\n\nhello\n"


def sock(instance: ReferenceDovecot | DovecotImap, name: str) -> str:
    return str(instance.socket(name))


# --- doveadm against the reference auth sockets ---------------------------------------------


def test_doveadm_auth_test_success(ref_dovecot: ReferenceDovecot) -> None:
    done = doveadm(None, "auth", "test", "-a", sock(ref_dovecot, "auth-client"), "alice", "alicepass")
    assert done.returncode == 0, done
    assert "passdb: alice auth succeeded" in done.stdout


def test_doveadm_auth_test_failure(ref_dovecot: ReferenceDovecot, fresh_ip: Callable[[], str]) -> None:
    # Without rip all doveadm requests share one penalty bucket: fail from an address of our own.
    done = doveadm(
        None,
        "auth",
        "test",
        "-x",
        f"rip={fresh_ip()}",
        "-a",
        sock(ref_dovecot, "auth-client"),
        "alice",
        "wrong",
    )
    assert done.returncode == 77, done
    assert "passdb: alice auth failed" in done.stdout


def test_doveadm_user_found(ref_dovecot: ReferenceDovecot) -> None:
    done = doveadm(None, "user", "-a", sock(ref_dovecot, "auth-userdb"), "alice")
    assert done.returncode == 0, done
    fields = dict(line.split("\t", 1) for line in done.stdout.splitlines()[1:])
    assert (fields["uid"], fields["gid"]) == tuple(str(n) for n in mail_ids())


def test_doveadm_user_not_found(ref_dovecot: ReferenceDovecot) -> None:
    done = doveadm(None, "user", "-a", sock(ref_dovecot, "auth-userdb"), "mallory")
    assert done.returncode == 67, done
    assert "user mallory doesn't exist" in done.stderr + done.stdout


def test_doveadm_auth_login_runs_request_flow(ref_dovecot: ReferenceDovecot) -> None:
    done = doveadm(
        None,
        "auth",
        "login",
        "-a",
        sock(ref_dovecot, "auth-login"),
        "-m",
        sock(ref_dovecot, "auth-master"),
        "alice",
        "alicepass",
    )
    assert done.returncode == 0, done
    assert "userdb extra fields:" in done.stdout
    assert "auth_mech=PLAIN" in done.stdout


def test_doveadm_auth_lookup_and_cache_flush(ref_dovecot: ReferenceDovecot) -> None:
    lookup = doveadm(None, "auth", "lookup", "-a", sock(ref_dovecot, "auth-userdb"), "alice")
    assert lookup.returncode == 0, lookup
    assert "user      : alice" in lookup.stdout
    flush = doveadm(None, "auth", "cache", "flush", "-a", sock(ref_dovecot, "auth-master"))
    assert flush.returncode == 0, flush
    assert "cache entries flushed" in flush.stdout


# --- the raw wire client ----------------------------------------------------------------------


def test_wire_client_handshake_and_plain(ref_dovecot: ReferenceDovecot) -> None:
    with Wire.auth_client(ref_dovecot.socket("auth-client")) as wire:
        assert wire.greeting[0] == "VERSION\t1\t2"
        assert wire.greeting[1:3] == ["MECH\tPLAIN\tplaintext", "MECH\tLOGIN\tplaintext"]
        assert [line.split("\t")[0] for line in wire.greeting[3:]] == ["SPID", "CUID", "COOKIE", "DONE"]
        wire.send("VERSION\t1\t2", "CPID\t4242", f"AUTH\t1\tPLAIN\tservice=smtp\tno-penalty\tresp={ALICE_PLAIN}")
        assert wire.read_line() == "OK\t1\tuser=alice"


def test_wire_failure_is_fast_with_zero_failure_delay(ref_dovecot: ReferenceDovecot) -> None:
    bad = base64.b64encode(b"\0alice\0wrong").decode()
    with Wire.auth_client(ref_dovecot.socket("auth-client")) as wire:
        wire.send("VERSION\t1\t2", "CPID\t4243", f"AUTH\t1\tPLAIN\tservice=smtp\tno-penalty\tresp={bad}")
        started = time.monotonic()
        assert wire.read_line() == "FAIL\t1\tuser=alice"
        # auth_failure_delay = 0 still waits for Dovecot's 500 ms failure timer.
        assert time.monotonic() - started < 1.0


def test_wire_master_user_lookup(ref_dovecot: ReferenceDovecot) -> None:
    with Wire.auth_master(ref_dovecot.socket("auth-userdb")) as wire:
        assert wire.greeting[0] == "VERSION\t1\t1"
        wire.send("VERSION\t1\t0", "USER\t1\talice\tservice=lmtp", "USER\t2\tmallory\tservice=lmtp")
        assert wire.read_line() == "USER\t1\talice\tuid={}\tgid={}".format(*mail_ids())
        assert wire.read_line() == "NOTFOUND\t2"


def test_wire_request_flow(ref_dovecot: ReferenceDovecot) -> None:
    cpid = os.getpid()
    with (
        Wire.auth_client(ref_dovecot.socket("auth-login")) as login,
        Wire.auth_master(ref_dovecot.socket("auth-master")) as master,
    ):
        assert login.greeting_value("SPID") == master.greeting_value("SPID")
        cookie = login.greeting_value("COOKIE")
        login.send("VERSION\t1\t2", f"CPID\t{cpid}", f"AUTH\t1\tPLAIN\tservice=imap\tno-penalty\tresp={ALICE_PLAIN}")
        assert login.read_line() == "OK\t1\tuser=alice"
        master.send("VERSION\t1\t1", f"REQUEST\t7\t{cpid}\t1\t{cookie}")
        assert master.read_line() == "USER\t7\talice\tuid={}\tgid={}\tauth_mech=PLAIN".format(*mail_ids())
        master.send(f"REQUEST\t8\t{cpid}\t1\t{cookie}")  # a request is consumed by the first REQUEST
        assert master.read_line() == "FAIL\t8"


def test_wire_timeout_reports_the_conversation(ref_dovecot: ReferenceDovecot) -> None:
    with Wire.auth_client(ref_dovecot.socket("auth-client")) as wire:
        wire.send("VERSION\t1\t2")
        with pytest.raises(WireTimeout) as caught:
            wire.read_line(timeout=0.3)
    message = str(caught.value)
    assert "timed out waiting for a line" in message
    assert "S>C b'VERSION\\t1\\t2\\nMECH\\tPLAIN" in message
    assert "C>S b'VERSION\\t1\\t2\\n'" in message


def test_wire_sees_the_server_close(ref_dovecot: ReferenceDovecot) -> None:
    with Wire.auth_client(ref_dovecot.socket("auth-client")) as wire:
        wire.send("VERSION\t1\t2", "CPID\t4244", "AUTH\t1\tFOO-BAR\tservice=smtp")
        assert wire.read_until_eof() == []
        with pytest.raises(WireClosed, match="<EOF>"):
            wire.read_line()


# --- Postfix + swaks --------------------------------------------------------------------------


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_postfix_auth_good_password(postfix: ThrowawayPostfix, mech: str) -> None:
    code, transcript = swaks(postfix.port, mech=mech, user="alice", password="alicepass")
    assert code == SWAKS_AUTH_OK, transcript
    assert "<-  235 " in transcript


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_postfix_auth_bad_password(postfix: ThrowawayPostfix, fresh_ip: Callable[[], str], mech: str) -> None:
    code, transcript = swaks(postfix.port, mech=mech, user="alice", password="wrong", source_ip=fresh_ip())
    assert code == SWAKS_AUTH_REJECTED, transcript
    assert "<** 535 " in transcript


# --- route A: Dovecot IMAP/LMTP/LDA on the reference's sockets -----------------------------


def inbox_count(imap: DovecotImap) -> int:
    conn = imap_connect(imap.imap_port)
    try:
        conn.login("alice", "alicepass")
        status, data = conn.select("INBOX")
        assert status == "OK", data
        return int(data[0] or 0)
    finally:
        conn.logout()


def test_route_a_imap_login(imap_route_a: DovecotImap) -> None:
    assert inbox_count(imap_route_a) >= 0


def test_route_a_imap_bad_password(imap_route_a: DovecotImap, fresh_ip: Callable[[], str]) -> None:
    conn = imap_connect(imap_route_a.imap_port, fresh_ip())
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login("alice", "wrong")
    finally:
        conn.logout()


def test_route_a_lmtp_rcpt(imap_route_a: DovecotImap) -> None:
    with smtplib.LMTP("127.0.0.1", imap_route_a.lmtp_port) as lmtp:
        lmtp.ehlo()
        assert lmtp.mail("sender@example.com")[0] == 250
        assert lmtp.rcpt("alice")[0] == 250
        code, text = lmtp.rcpt("mallory")
        assert code == 550, text


def test_route_a_lmtp_and_lda_deliver(imap_route_a: DovecotImap) -> None:
    before = inbox_count(imap_route_a)
    with smtplib.LMTP("127.0.0.1", imap_route_a.lmtp_port) as lmtp:
        assert lmtp.sendmail("sender@example.com", ["alice"], MESSAGE) == {}
    delivered = dovecot_lda(imap_route_a.conf_path, "alice", MESSAGE, "-f", "sender@example.com")
    assert delivered.returncode == 0, delivered
    assert inbox_count(imap_route_a) == before + 2


def test_route_a_lda_unknown_user(imap_route_a: DovecotImap) -> None:
    assert dovecot_lda(imap_route_a.conf_path, "mallory", MESSAGE).returncode == 67


def test_route_a_runs_no_auth_process(imap_route_a: DovecotImap) -> None:
    assert imap_route_a.pid is not None
    titles = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in session_members(imap_route_a.pid)]
    assert [title for title in titles if title.endswith(b"/log")], titles  # we do see its processes
    assert not [title for title in titles if title.endswith((b"/auth", b"/auth-worker"))], titles


# --- route B: Dovecot starts a foreign auth service (the relay stand-in) --------------------


def test_route_b_hands_listeners_to_the_command(imap_route_b: DovecotImap) -> None:
    done = doveadm(
        None, "auth", "test", "-a", sock(imap_route_b, "auth-client"), "alice", "alicepass", build=imap_route_b.build
    )
    assert done.returncode == 0, done
    log = imap_route_b.log_text()
    if imap_route_b.dialect == "2.3":
        names = ["login", "tokenlogin", "auth-login", "auth-client", "auth-userdb", "auth-master"]
        first = 7
    else:  # 2.4: the config fd is 7; every listener says its type
        names = [
            "auth-client\ttype=auth",
            "auth-login\ttype=login",
            "auth-master\ttype=master",
            "auth-userdb\ttype=userdb",
            "login\ttype=login",
            "tokenlogin\ttype=token-login",
        ]
        first = 8
    relayed = re.findall(r"relay_auth: fd (\d+) (\S+(?:\ttype=\S+)?) ", log)
    assert sorted(relayed) == sorted((str(fd), name) for fd, name in enumerate(names, first)) or (
        imap_route_b.dialect == "2.4"  # 2.4 orders the listeners it was configured with last
        and sorted(name for _, name in relayed) == sorted(names)
        and sorted(int(fd) for fd, _ in relayed) == list(range(first, first + len(names)))
    ), relayed


def test_route_b_imap_lmtp(imap_route_b: DovecotImap) -> None:
    assert inbox_count(imap_route_b) >= 0
    with smtplib.LMTP("127.0.0.1", imap_route_b.lmtp_port) as lmtp:
        lmtp.ehlo()
        assert lmtp.mail("sender@example.com")[0] == 250
        assert lmtp.rcpt("alice")[0] == 250
        assert lmtp.rcpt("mallory")[0] == 550


# --- Lua passdb in the reference --------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password", "code"), [("alice", "alicepass", 0), ("alice", "wrong", 77), ("mallory", "x", 77)]
)
def test_lua_passdb(
    lua_dovecot: ReferenceDovecot, fresh_ip: Callable[[], str], user: str, password: str, code: int
) -> None:
    rip = f"rip={fresh_ip()}"
    done = doveadm(None, "auth", "test", "-x", rip, "-a", sock(lua_dovecot, "auth-client"), user, password)
    assert done.returncode == code, (done, lua_dovecot.log_text())


# --- teardown leaves nothing behind -----------------------------------------------------------


def test_stop_leaves_nothing_running(interop_dir: Path, users_file: Path) -> None:
    workdir = subdir(interop_dir, "stop-check")
    ref = ReferenceDovecot(subdir(workdir, "ref"), db_block("passdb", "passwd-file", str(users_file)))
    with running("stop-check dovecot", ref):
        postfix = ThrowawayPostfix(subdir(workdir, "postfix"), ref.socket("auth-client"))
        with running("stop-check postfix", postfix):
            dovecot_pid, postfix_pid = ref.pid, postfix.master_pid
            assert dovecot_pid is not None and postfix_pid is not None
            assert len(session_members(dovecot_pid)) > 1 and len(session_members(postfix_pid)) > 1
        assert not is_running(postfix_pid) and session_members(postfix_pid) == []
        assert not greets(postfix.port, b"220 ")
    assert not is_running(dovecot_pid) and session_members(dovecot_pid) == []

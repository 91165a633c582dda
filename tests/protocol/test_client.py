"""protocol.client: the auth-client server state machine, byte for byte (protocol.md §1, §6)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.client import AuthClientServer, HandshakeSettings, RequestState, RequestTimedOut
from protocol.errors import PeerError, UsageError
from protocol.events import (
    Authenticated,
    AuthFailed,
    AuthStarted,
    ClientConnected,
    CredentialsWanted,
    Field,
    Params,
    PassdbVerdict,
    PasswordReceived,
    RequestDropped,
    UsernameReceived,
)
from protocol.mechanisms import Login, Plain, ScramSha256

#: erin / erinpass (protocol.md §2.7)
SCRAM_ERIN = (
    b"4096,8h0DZ4pyARdjelb8OYMOgg==,dKq3OAb78bdrpRZeTjqv/92Hn7RSLxX5heunb3fmUHE="
    b",SHI5o3Gqkyve0nIO7NJbouZNahHHu4YmvYxDSxawPpA="
)
COOKIE = bytes.fromhex("29953adde20f7bac35222a06c220e7ba")
HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
    b"SPID\t13256\nCUID\t2\nCOOKIE\t29953adde20f7bac35222a06c220e7ba\nDONE\n"
)


def server(*, login: bool = False, wait: bool = False, clock: list[float] | None = None) -> AuthClientServer:
    now = clock if clock is not None else [0.0]
    conn = AuthClientServer(
        HandshakeSettings([Plain, Login], spid=13256, cuid=2, cookie=COOKIE, wait_for_client_version=wait),
        login=login,
        clock=lambda: now[0],
    )
    conn.initiate()
    return conn


def connected(minor: int = 2, **kwargs: object) -> AuthClientServer:
    conn = server(**kwargs)  # type: ignore[arg-type]
    assert conn.data_to_send() == HANDSHAKE
    events = conn.receive_data(b"VERSION\t1\t%d\nCPID\t13465\n" % minor)
    assert events == [ClientConnected(13465, minor)]
    return conn


def test_handshake_is_sent_at_once() -> None:
    conn = server()
    assert conn.data_to_send() == HANDSHAKE
    assert len(HANDSHAKE) < 1024  # Radicale reads it with one recv(1024)


def test_dovecot_24_style_handshake_waits_for_client_version() -> None:
    conn = server(wait=True)
    assert conn.data_to_send() == b"VERSION\t1\t2\n"
    assert conn.receive_data(b"VERSION\t1\t3\n") == []
    assert conn.data_to_send() == HANDSHAKE[len(b"VERSION\t1\t2\n") :]


def test_plain_success_transcript() -> None:
    # protocol.md §6.1
    conn = connected()
    events = conn.receive_data(b"AUTH\t1\tPLAIN\tservice=doveadm\tdebug\tresp=YWxpY2UAYWxpY2UAYWxpY2VwYXNz\n")
    assert events == [AuthStarted(1, "PLAIN", Params(((b"service", b"doveadm"), (b"debug", b""))))]
    assert conn.begin(1) == [PasswordReceived(1, b"alice", b"alicepass", b"")]
    assert conn.password_result(1, PassdbVerdict.OK) == [Authenticated(1)]
    conn.succeed(1, b"alice", [Field(b"quota_rule", b"*:storage=1G", hidden=True)])
    assert conn.data_to_send() == b"OK\t1\tuser=alice\t\n"
    assert list(conn.request_ids()) == []


def test_ok_with_visible_fields_and_trailer() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=imap\tresp=Y2Fyb2wAY2Fyb2wAY2Fyb2xwYXNz\n")
    conn.begin(1)
    conn.password_result(1, PassdbVerdict.OK)
    conn.succeed(
        1,
        b"carol",
        [Field(b"nologin"), Field(b"reason", b"Account_moved")],
        [Field(b"original_user", b"Carol")],
    )
    assert conn.data_to_send() == b"OK\t1\tuser=carol\tnologin\treason=Account_moved\toriginal_user=Carol\n"


def test_fail_is_returned_not_queued() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=doveadm\tresp=YWxpY2UAYWxpY2UAd3JvbmdwYXNz\n")
    conn.begin(1)
    assert conn.password_result(1, PassdbVerdict.FAILED) == [AuthFailed(1, "authentication failed")]
    line = conn.fail(1, b"alice")
    assert line == b"FAIL\t1\tuser=alice\n"
    assert conn.data_to_send() == b""
    # The id is free again while the FAIL waits for the failure delay.
    assert conn.receive_data(b"AUTH\t1\tPLAIN\tservice=x\n")[0] == AuthStarted(
        1, "PLAIN", Params(((b"service", b"x"),))
    )


def test_fail_fields_order() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tno-penalty\tresp=AGNwdGVtcAB4\n")
    conn.begin(1)
    conn.password_result(1, PassdbVerdict.INTERNAL_FAILURE)
    assert conn.fail(1, b"cptemp", code=b"temp_fail") == b"FAIL\t1\tuser=cptemp\tcode=temp_fail\n"
    conn.receive_data(b"AUTH\t2\tPLAIN\tservice=smtp\tresp=AGNwdGVtcAB4\n")
    conn.begin(2)
    line = conn.fail(2, b"u", code=b"user_disabled", nodelay=True, fields=[Field(b"nodelay")])
    assert line == b"FAIL\t2\tuser=u\tnodelay\tcode=user_disabled\tnodelay\n"


def test_malformed_plain_fails() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t4\tPLAIN\tservice=smtp\tno-penalty\tresp=Zm9vYmFy\n")
    assert conn.begin(4) == [AuthFailed(4, "invalid input")]
    assert conn.fail(4) == b"FAIL\t4\n"


@pytest.mark.parametrize("resp", [b"AGFAYgBjAGQ=", b"AGFsaWNl"])  # three NULs / one NUL
def test_plain_needs_exactly_two_nuls(resp: bytes) -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + resp + b"\n")
    assert conn.begin(1) == [AuthFailed(1, "invalid input")]


def test_plain_authzid_equal_to_authcid_is_ignored() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=YWxpY2UAYWxpY2UAcA==\n")
    assert conn.begin(1) == [PasswordReceived(1, b"alice", b"p", b"")]
    conn.receive_data(b"AUTH\t2\tPLAIN\tservice=smtp\tresp=Ym9zcwBhbGljZQBw\n")
    assert conn.begin(2) == [PasswordReceived(2, b"alice", b"p", b"boss")]


def test_plain_without_initial_response_gets_empty_challenge() -> None:
    # protocol.md §2.2
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tno-penalty\n")
    assert conn.begin(1) == []
    assert conn.data_to_send() == b"CONT\t1\t\n"
    assert conn.receive_data(b"CONT\t1\tAGFsaWNlAGFsaWNlcGFzcw==\n") == [
        PasswordReceived(1, b"alice", b"alicepass", b"")
    ]


def test_login_transcript() -> None:
    # protocol.md §6.3
    conn = connected()
    conn.receive_data(b"AUTH\t7\tLOGIN\tservice=smtp\tno-penalty\tlip=127.0.0.1\trip=127.0.0.2\n")
    conn.begin(7)
    assert conn.data_to_send() == b"CONT\t7\tVXNlcm5hbWU6\n"
    assert conn.receive_data(b"CONT\t7\tYWxpY2U=\n") == [UsernameReceived(7, b"alice")]
    assert conn.username_result(7, True) == []
    assert conn.data_to_send() == b"CONT\t7\tUGFzc3dvcmQ6\n"
    assert conn.receive_data(b"CONT\t7\tYWxpY2VwYXNz\n") == [PasswordReceived(7, b"alice", b"alicepass", b"")]
    conn.password_result(7, PassdbVerdict.OK)
    conn.succeed(7, b"alice", [Field(b"x", b"y", hidden=True)])
    assert conn.data_to_send() == b"OK\t7\tuser=alice\t\n"


def test_login_with_initial_response_skips_username_prompt() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t8\tLOGIN\tservice=smtp\tno-penalty\tresp=YWxpY2U=\n")
    assert conn.begin(8) == [UsernameReceived(8, b"alice")]
    conn.username_result(8, True)
    assert conn.data_to_send() == b"CONT\t8\tUGFzc3dvcmQ6\n"


def test_login_empty_initial_response_still_prompts() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t8\tLOGIN\tservice=smtp\tresp==\n")
    conn.begin(8)
    assert conn.data_to_send() == b"CONT\t8\tVXNlcm5hbWU6\n"


def test_login_rejects_nul_bytes() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tLOGIN\tservice=smtp\n")
    conn.begin(1)
    conn.data_to_send()
    assert conn.receive_data(b"CONT\t1\tYQBi\n") == [AuthFailed(1, "Unexpected NUL in auth data")]


def test_invalid_base64_transcript() -> None:
    # protocol.md §6.5
    conn = connected()
    assert conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tno-penalty\tresp=!!!notbase64\n") == [
        RequestDropped(1, "Invalid base64 data in initial response")
    ]
    assert conn.data_to_send() == b"FAIL\t1\tcode=invalid_base64\treason=Invalid base64 data in initial response\n"
    conn.receive_data(b"AUTH\t2\tPLAIN\tservice=smtp\tno-penalty\tresp=AGFsaWNlAGFsaWNlcGFzcw==\n")
    assert conn.begin(2) == [PasswordReceived(2, b"alice", b"alicepass", b"")]
    conn.receive_data(b"AUTH\t3\tPLAIN\tservice=smtp\tno-penalty\tresp=AGFsaWNlAGFsaWNlcGFzcw\n")
    assert conn.data_to_send() == b"FAIL\t3\tcode=invalid_base64\treason=Invalid base64 data in initial response\n"
    conn.receive_data(b"AUTH\t4\tPLAIN\tservice=smtp\tno-penalty\n")
    conn.begin(4)
    assert conn.data_to_send() == b"CONT\t4\t\n"
    conn.receive_data(b"CONT\t4\t@@@\n")
    assert conn.data_to_send() == b"FAIL\t4\tcode=invalid_base64\treason=Invalid base64 data in continued response\n"


def test_cont_for_unknown_or_cancelled_id() -> None:
    conn = connected()
    conn.receive_data(b"CONT\t99\tAAAA\n")
    assert conn.data_to_send() == b"FAIL\t99\treason=Authentication request timed out\n"
    conn.receive_data(b"AUTH\t5\tPLAIN\tservice=smtp\n")
    conn.begin(5)
    conn.data_to_send()
    assert conn.receive_data(b"CANCEL\t5\n") == [RequestDropped(5, "cancelled by client")]
    conn.receive_data(b"CONT\t5\tYWxpY2U=\n")
    assert conn.data_to_send() == b"FAIL\t5\treason=Authentication request timed out\n"


def test_unexpected_continuation() -> None:
    # CONT while the request waits for the passdb (or the penalty): protocol.md §6.2
    conn = connected()
    conn.receive_data(b"AUTH\t2\tPLAIN\tservice=smtp\trip=10.9.9.9\tresp=AGFsaWNlAGFsaWNlcGFzcw==\n")
    assert conn.receive_data(b"CONT\t2\tAAAA\n") == [RequestDropped(2, "Unexpected continuation")]
    assert conn.data_to_send() == b"FAIL\t2\treason=Unexpected continuation\n"
    assert conn.begin(2) == []  # the caller's late answer is ignored


def test_refuse_before_the_mechanism_runs() -> None:
    # auth_request_handler_auth_fail: at once, with the reason, no user, no delay
    conn = connected()
    conn.receive_data(b"AUTH\t7\tPLAIN\tservice=imap\tresp=AGFsaWNlAGFsaWNlcGFzcw==\n")
    assert conn.refuse(7, b"Client didn't present valid SSL certificate") == [
        RequestDropped(7, "Client didn't present valid SSL certificate")
    ]
    assert conn.data_to_send() == b"FAIL\t7\treason=Client didn't present valid SSL certificate\n"
    assert conn.begin(7) == []
    conn.receive_data(b"AUTH\t8\tPLAIN\tservice=imap\tresp=AGFsaWNlAGFsaWNlcGFzcw==\n")
    conn.begin(8)
    with pytest.raises(UsageError):
        conn.refuse(8, b"too late: the mechanism runs")


def test_empty_resp_depends_on_client_minor_version() -> None:
    # protocol.md §6.5: minor 0 -> empty resp= means none; minor 2 -> zero-length PLAIN
    old = connected(minor=0)
    old.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\trip=192.0.2.9\tlip=192.0.2.1\tnologin\tresp=\n")
    assert old.begin(1) == []
    assert old.data_to_send() == b"CONT\t1\t\n"
    new = connected(minor=2)
    new.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tno-penalty\tresp=\n")
    assert new.begin(1) == [AuthFailed(1, "invalid input")]
    equals = connected(minor=0)
    equals.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tresp==\n")
    assert equals.begin(1) == [AuthFailed(1, "invalid input")]


def test_protocol_and_service_both_accepted() -> None:
    conn = connected()
    assert conn.receive_data(b"AUTH\t1\tplain\tprotocol=imap\n") == [
        AuthStarted(1, "PLAIN", Params(((b"protocol", b"imap"),)))
    ]


def test_unknown_parameters_are_kept_but_harmless() -> None:
    conn = connected()
    [event] = conn.receive_data(b"AUTH\t1\tPLAIN\tservice=imap\tfoo=bar\tnologin\tlip=NULL\n")
    assert isinstance(event, AuthStarted)
    assert event.params.get(b"foo") == b"bar"
    assert event.params.get(b"lip") == b"NULL"


@pytest.mark.parametrize(
    "lines",
    [
        b"VERSION\t2\t0\n",  # major != 1
        b"VERSION\t1\n",  # malformed
        b"CPID\t1\n",  # no VERSION first
        b"VERSION\t1\t2\nAUTH\t1\tPLAIN\tservice=x\n",  # AUTH before CPID
        b"VERSION\t1\t2\nCPID\t0\n",
        b"VERSION\t1\t2\nCPID\tabc\n",
        b"VERSION\t1\t2\nCPID\t1\nFOO\t1\n",  # unknown command
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t0\tPLAIN\tservice=x\n",  # id 0
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\n",  # missing mechanism
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tFOO-BAR\tservice=smtp\n",  # unknown mechanism (§6.4)
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tPLAIN\n",  # no service
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tPLAIN\tservice=x\tresp=\tfoo\n",  # field after resp
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tPLAIN\tservice=x\nAUTH\t1\tPLAIN\tservice=x\n",  # duplicate id
        b"VERSION\t1\t2\nCPID\t1\nCONT\t1\n",  # CONT without data
        b"VERSION\t1\t2\nCPID\t1\nCANCEL\tx\n",
        b"VERSION\t1\t2\nCPID\t1\n" + b"A" * 17000 + b"\n",  # 17 000-byte line
    ],
)
def test_disconnect_rows(lines: bytes) -> None:
    # protocol.md §1.8: each of these makes Dovecot close the connection.
    conn = server()
    conn.data_to_send()
    with pytest.raises(PeerError):
        conn.receive_data(lines)


def test_16000_byte_line_is_accepted() -> None:
    conn = connected()
    padding = b"x" * (16000 - 40)
    [event] = conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\tpad=" + padding + b"\n")
    assert isinstance(event, AuthStarted)


def test_login_connection_keeps_request_for_master() -> None:
    conn = connected(login=True)
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=imap\tresp=AGFsaWNlAGFsaWNlcGFzcw==\n")
    conn.begin(1)
    conn.password_result(1, PassdbVerdict.OK)
    marker = object()
    conn.succeed(1, b"alice", [], keep=marker)
    assert conn.data_to_send() == b"OK\t1\tuser=alice\n"
    taken = conn.take_request(1)
    assert taken is not None and taken.finished and taken.keep is marker
    assert conn.take_request(1) is None  # one-shot


def test_requests_expire_after_150_seconds() -> None:
    clock = [100.0]
    conn = server(login=True, clock=clock)
    conn.receive_data(b"VERSION\t1\t2\nCPID\t7\nAUTH\t1\tPLAIN\tservice=imap\n")
    clock[0] += 149
    assert conn.expire() == []
    clock[0] += 1
    assert conn.expire() == [RequestTimedOut(1, "timed out", 150, RequestState.NEW)]


def test_misuse_is_a_usage_error() -> None:
    conn = connected()
    conn.receive_data(b"AUTH\t1\tPLAIN\tservice=smtp\n")
    with pytest.raises(UsageError):
        conn.password_result(1, PassdbVerdict.OK)  # begin() was never called
    with pytest.raises(UsageError):
        conn.initiate()


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_garbage_only_raises_peer_error(chunks: list[bytes]) -> None:
    conn = server()
    conn.data_to_send()
    try:
        for chunk in [b"VERSION\t1\t2\nCPID\t9\n", *chunks]:
            for event in conn.receive_data(chunk):
                if isinstance(event, AuthStarted):
                    conn.begin(event.request_id)
    except PeerError:
        pass


def test_line_by_line_keeps_immediate_fails_in_line_order() -> None:
    """feed() + next_events(): a later line's immediate FAIL is queued only when that line is parsed."""
    conn = connected()
    conn.feed(b"AUTH\t1\tLOGIN\tservice=smtp\nAUTH\t2\tPLAIN\tservice=smtp\tresp=!!!\nCONT\t9\tAAAA\nAUTH\t3")
    assert conn.next_events() == [AuthStarted(1, "LOGIN", Params(((b"service", b"smtp"),)))]
    assert conn.data_to_send() == b""
    assert conn.begin(1) == []
    assert conn.next_events() == [RequestDropped(2, "Invalid base64 data in initial response")]
    assert conn.next_events() == []
    assert conn.next_events() is None  # "AUTH\t3" has no LF yet
    assert conn.data_to_send() == (
        b"CONT\t1\tVXNlcm5hbWU6\n"
        b"FAIL\t2\tcode=invalid_base64\treason=Invalid base64 data in initial response\n"
        b"FAIL\t9\treason=Authentication request timed out\n"
    )
    conn.feed(b"\tPLAIN\n")
    with pytest.raises(PeerError, match="didn't specify service"):
        conn.next_events()


@pytest.mark.parametrize(("login", "pid_in_message"), [(False, 0), (True, 13465)])
def test_duplicate_id_while_scram_waits_for_cont(login: bool, pid_in_message: int) -> None:
    """Dovecot 2.3.19 logs "BUG: Authentication client <pid> sent a duplicate ID <id>" (pid 0 on
    sockets that only authenticate) and disconnects; the request it duplicates is left as it was."""
    conn = AuthClientServer(HandshakeSettings([Plain, ScramSha256], spid=1, cuid=2, cookie=COOKIE), login=login)
    conn.initiate()
    conn.data_to_send()
    conn.receive_data(b"VERSION\t1\t2\nCPID\t13465\n")
    auth = b"AUTH\t1\tSCRAM-SHA-256\tservice=imap\tresp=" + base64.b64encode(b"n,,n=erin,r=abc") + b"\n"
    [started] = conn.receive_data(auth)
    assert isinstance(started, AuthStarted)
    assert conn.begin(1) == [CredentialsWanted(1, b"erin", "SCRAM-SHA-256", b"")]
    assert conn.credentials_result(1, PassdbVerdict.OK, SCRAM_ERIN) == []
    assert conn.data_to_send().startswith(b"CONT\t1\t")
    with pytest.raises(PeerError) as exc:
        conn.receive_data(auth)
    assert str(exc.value) == f"BUG: Authentication client {pid_in_message} sent a duplicate ID 1"
    assert type(exc.value) is PeerError
    assert conn.data_to_send() == b""
    assert list(conn.request_ids()) == [1]


def test_a_dropped_requests_answer_does_not_reach_a_reused_id() -> None:
    """A CONT while SCRAM's credentials lookup runs drops request 1; a new AUTH reuses id 1.
    The old lookup's answer, given through its handle, is ignored (Dovecot ends it on the old,
    removed request), so the new PLAIN request goes on undisturbed."""
    conn = AuthClientServer(HandshakeSettings([Plain, ScramSha256], spid=1, cuid=2, cookie=COOKIE))
    conn.initiate()
    conn.data_to_send()
    conn.receive_data(b"VERSION\t1\t2\nCPID\t13465\n")
    scram = b"AUTH\t1\tSCRAM-SHA-256\tservice=imap\tresp=" + base64.b64encode(b"n,,n=erin,r=abc") + b"\n"
    assert conn.receive_data(scram) == [AuthStarted(1, "SCRAM-SHA-256", Params(((b"service", b"imap"),)))]
    assert conn.begin(1) == [CredentialsWanted(1, b"erin", "SCRAM-SHA-256", b"")]
    old = conn.handle(1)
    assert old is not None and old.id == 1
    assert conn.receive_data(b"CONT\t1\tYWJj\n") == [RequestDropped(1, "Unexpected continuation")]
    assert conn.data_to_send() == b"FAIL\t1\treason=Unexpected continuation\n"
    plain = b"AUTH\t1\tPLAIN\tservice=imap\tresp=" + base64.b64encode(b"\0alice\0alicepass") + b"\n"
    assert conn.receive_data(plain) == [AuthStarted(1, "PLAIN", Params(((b"service", b"imap"),)))]
    new = conn.handle(1)
    assert new is not None and new != old
    assert conn.begin(new) == [PasswordReceived(1, b"alice", b"alicepass", b"")]
    # The stale answers: none reaches PLAIN (which would raise UsageError), nothing is sent.
    assert conn.credentials_result(old, PassdbVerdict.OK, SCRAM_ERIN) == []
    assert conn.password_result(old, PassdbVerdict.FAILED) == []
    assert conn.fail(old, b"erin") is None
    assert conn.succeed(old, b"erin") is False
    assert conn.data_to_send() == b""
    assert conn.password_result(new, PassdbVerdict.OK) == [Authenticated(1)]
    assert conn.succeed(new, b"alice") is True
    assert conn.data_to_send() == b"OK\t1\tuser=alice\n"
    assert conn.handle(1) is None
    # An answer by bare id still goes to whatever request has the id now.
    conn.receive_data(plain)
    conn.begin(1)
    with pytest.raises(UsageError, match="PLAIN never looks up credentials"):
        conn.credentials_result(1, PassdbVerdict.OK, SCRAM_ERIN)

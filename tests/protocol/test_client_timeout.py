"""protocol.client: Dovecot's request timeout (auth_request_timeout) and the open-request count.

A request times out `request_timeout` seconds (150 in Dovecot) after its AUTH, its last accepted
CONT or its OK, silently; a CONT for it afterwards gets "Authentication request timed out".
"""

from __future__ import annotations

import base64

from protocol.client import AuthClientServer, HandshakeSettings, RequestState, RequestTimedOut
from protocol.events import Authenticated, ClientConnected, PassdbVerdict, PasswordReceived, UsernameReceived
from protocol.mechanisms import Login, Plain

COOKIE = bytes.fromhex("29953adde20f7bac35222a06c220e7ba")


def connected(clock: list[float], *, login: bool = False, timeout: float | None = None) -> AuthClientServer:
    kwargs = {} if timeout is None else {"request_timeout": timeout}
    conn = AuthClientServer(
        HandshakeSettings([Plain, Login], spid=13256, cuid=2, cookie=COOKIE),
        login=login,
        clock=lambda: clock[0],
        **kwargs,  # type: ignore[arg-type]
    )
    conn.initiate()
    assert conn.receive_data(b"VERSION\t1\t2\nCPID\t13465\n") == [ClientConnected(13465, 2)]
    conn.data_to_send()
    return conn


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_a_request_waiting_for_the_client_times_out_150_s_after_its_last_cont() -> None:
    clock = [1000.0]
    conn = connected(clock)
    conn.receive_data(b"AUTH\t1\tLOGIN\tservice=smtp\n")
    assert conn.begin(1) == []
    assert conn.data_to_send() == b"CONT\t1\tVXNlcm5hbWU6\n"
    assert conn.next_expiry() == 1150.0
    clock[0] += 100
    assert conn.receive_data(b"CONT\t1\t" + b64(b"alice") + b"\n") == [UsernameReceived(1, b"alice")]
    assert conn.username_result(1, True) == []
    assert conn.data_to_send() == b"CONT\t1\tUGFzc3dvcmQ6\n"
    assert conn.next_expiry() == 1250.0  # the CONT started the timeout again
    clock[0] += 149
    assert conn.expire() == []
    clock[0] += 1
    assert conn.expire() == [RequestTimedOut(1, "timed out", 150, RequestState.MECH_CONTINUE)]
    assert conn.data_to_send() == b""  # nothing is sent
    assert conn.open_requests == 0 and conn.next_expiry() is None
    assert conn.receive_data(b"CONT\t1\t" + b64(b"alicepass") + b"\n") == []
    assert conn.data_to_send() == b"FAIL\t1\treason=Authentication request timed out\n"


def test_the_state_is_dovecots_and_a_kept_login_times_out_after_its_ok() -> None:
    clock = [0.0]
    conn = connected(clock, login=True, timeout=1.0)
    conn.receive_data(
        b"AUTH\t1\tPLAIN\tservice=imap\n"  # never begun: a penalty wait
        b"AUTH\t2\tPLAIN\tservice=imap\tresp=" + b64(b"\0bob\0pw") + b"\n"  # at its passdb
        b"AUTH\t3\tPLAIN\tservice=imap\tresp=" + b64(b"\0alice\0pw") + b"\n"
    )
    assert conn.begin(2) == [PasswordReceived(2, b"bob", b"pw", b"")]
    assert conn.begin(3) == [PasswordReceived(3, b"alice", b"pw", b"")]
    clock[0] = 0.5
    assert conn.password_result(3, PassdbVerdict.OK) == [Authenticated(3)]
    assert conn.succeed(3, b"alice", keep=object())
    assert conn.data_to_send() == b"OK\t3\tuser=alice\n"
    assert conn.open_requests == 3
    clock[0] = 1.0
    assert conn.expire() == [
        RequestTimedOut(1, "timed out", 1, RequestState.NEW),
        RequestTimedOut(2, "timed out", 1, RequestState.PASSDB),
    ]
    assert conn.next_expiry() == 1.5
    assert conn.expire(1.5) == [RequestTimedOut(3, "timed out", 1, RequestState.FINISHED)]
    assert conn.take_request(3) is None
    assert conn.open_requests == 0

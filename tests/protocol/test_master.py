"""protocol.master: the auth-master/userdb server state machine (protocol.md §3, §6.6-§6.8, §6.10)."""

from __future__ import annotations

import pytest

from protocol.errors import PeerError
from protocol.events import Field, Params
from protocol.master import AuthMasterServer, CacheFlush, ListUsers, LoginRequest, PassLookup, UserLookup


def master(userdb_only: bool = False) -> AuthMasterServer:
    conn = AuthMasterServer(13256, userdb_only=userdb_only)
    conn.initiate()
    assert conn.data_to_send() == b"VERSION\t1\t1\nSPID\t13256\n"
    return conn


def test_user_found_and_not_found() -> None:
    conn = master(userdb_only=True)
    [event] = conn.receive_data(b"VERSION\t1\t0\nUSER\t1\talice\tservice=doveadm\tdebug\n")
    assert event == UserLookup(1, b"alice", Params(((b"service", b"doveadm"), (b"debug", b""))))
    conn.user_found(
        1,
        b"alice",
        [
            Field(b"uid", b"65534"),
            Field(b"gid", b"65534"),
            Field(b"home", b"/srv/example/home/alice"),
            Field(b"quota_rule", b"*:storage=1G"),
        ],
    )
    assert conn.data_to_send() == (
        b"USER\t1\talice\tuid=65534\tgid=65534\thome=/srv/example/home/alice\tquota_rule=*:storage=1G\n"
    )
    conn.not_found(2)
    conn.user_found(3, b"a\tb", [])
    assert conn.data_to_send() == b"NOTFOUND\t2\nUSER\t3\ta\x01tb\t\n"


def test_pass_reply_like_ok() -> None:
    conn = master()
    [event] = conn.receive_data(b"VERSION\t1\t0\nPASS\t1\tcarol\tservice=doveadm\tdebug\n")
    assert isinstance(event, PassLookup)
    conn.pass_found(1, b"carol", [Field(b"nologin"), Field(b"reason", b"Account_moved")])
    conn.pass_found(2, b"alice", [Field(b"password", b"x", hidden=True)])
    conn.failed(3)
    assert conn.data_to_send() == (
        b"PASS\t1\tuser=carol\tnologin\treason=Account_moved\nPASS\t2\tuser=alice\t\nFAIL\t3\n"
    )


def test_list_one_at_a_time() -> None:
    # protocol.md §6.8: a second LIST fails at once, before the first one's lines
    conn = master(userdb_only=True)
    events = conn.receive_data(b"VERSION\t1\t0\nLIST\t4\nLIST\t5\n")
    assert events == [ListUsers(4, None, Params(()))]
    assert conn.data_to_send() == b"DONE\t5\tfail\n"
    conn.list_user(4, b"alice")
    conn.list_done(4)
    assert conn.data_to_send() == b"LIST\t4\talice\nDONE\t4\t\n"
    [event] = conn.receive_data(b"LIST\t6\tuser=a*\tservice=doveadm\n")
    assert isinstance(event, ListUsers) and event.mask == b"a*"


def test_request_and_cache_flush_on_master() -> None:
    conn = master()
    events = conn.receive_data(
        b"VERSION\t1\t1\nREQUEST\t555\t31337\t1\t653c1969a9c181295a8ae17bd650d7ed\tsession_pid=16228\t"
        b"request_auth_token\nCACHE-FLUSH\t1\talice\tbob\n"
    )
    assert events == [
        LoginRequest(
            555,
            31337,
            1,
            bytes.fromhex("653c1969a9c181295a8ae17bd650d7ed"),
            Params(((b"session_pid", b"16228"), (b"request_auth_token", b""))),
        ),
        CacheFlush(b"1", (b"alice", b"bob")),
    ]
    conn.cache_flushed(b"1", 0)
    assert conn.data_to_send() == b"OK\t1\t0\n"


def test_fail_reason_is_not_escaped() -> None:
    conn = master()
    conn.failed(1, b"user=x temporarily broken")
    assert conn.data_to_send() == b"FAIL\t1\treason=user=x temporarily broken\n"


@pytest.mark.parametrize(
    ("userdb_only", "lines"),
    [
        (True, b"VERSION\t1\t0\nUSER\t1\talice\n"),  # no service
        (True, b"VERSION\t2\t0\n"),
        (True, b"USER\t1\talice\tservice=x\n"),  # no VERSION
        (False, b"VERSION\t1\t0\nCPID\t1\n"),  # a client on the master socket
        (True, b"VERSION\t1\t0\nREQUEST\t1\t2\t3\t00\n"),  # REQUEST on auth-userdb
        (True, b"VERSION\t1\t0\nCACHE-FLUSH\t1\n"),
        (False, b"VERSION\t1\t0\nREQUEST\t1\t2\t3\n"),  # too few args
        (False, b"VERSION\t1\t0\nREQUEST\t1\t2\t3\tzz\n"),  # bad cookie hex
        (False, b"VERSION\t1\t0\nUSER\tx\talice\tservice=a\n"),
        (False, b"VERSION\t1\t0\nLIST\tx\n"),
        (False, b"VERSION\t1\t0\nFOO\t1\n"),
        (False, b"VERSION\t1\t0\nUSER\t1\t" + b"a" * 2048 + b"\tservice=x\n"),  # > 1024 bytes
    ],
)
def test_disconnect_rows(userdb_only: bool, lines: bytes) -> None:
    conn = master(userdb_only)
    with pytest.raises(PeerError):
        conn.receive_data(lines)

"""The per-IP auth penalty: Dovecot's anvil rules, unit-level and through a real authd."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.penalty import PenaltyTracker, penalty_to_secs
from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_waits_grow_and_cap() -> None:
    assert [penalty_to_secs(n) for n in range(6)] == [2, 4, 8, 15, 15, 15]


def test_failures_escalate_and_success_resets() -> None:
    clock = Clock()
    tracker = PenaltyTracker(clock=clock)
    ident = tracker.ident("192.0.2.7", no_penalty=False)
    assert ident == "192.0.2.7" and tracker.lookup(ident) == 0
    for attempt, expected in enumerate([1, 2, 3, 4, 4]):
        tracker.update(ident, tracker.lookup(ident) + 1, user=b"alice", password=b"guess%d" % attempt)
        assert tracker.lookup(ident) == expected
    tracker.update(ident, 0)
    assert tracker.lookup(ident) == 0


def test_same_password_does_not_escalate() -> None:
    tracker = PenaltyTracker(clock=Clock())
    tracker.update("a", 1, user=b"alice", password=b"typo")
    tracker.update("a", tracker.lookup("a") + 1, user=b"alice", password=b"typo")
    assert tracker.lookup("a") == 1


def test_penalty_decays_with_time() -> None:
    clock = Clock()
    tracker = PenaltyTracker(clock=clock)
    tracker.update("a", 2, user=b"u", password=b"x")
    clock.now += 14
    assert tracker.lookup("a") == 2
    clock.now += 2  # 15 s after the last failure the whole penalty has drained
    assert tracker.lookup("a") == 0
    clock.now += 40  # records are forgotten after 29 s without updates
    assert tracker.lookup("a") == 0 and len(tracker) == 0


def test_buckets_and_exemptions() -> None:
    tracker = PenaltyTracker(["10.0.0.0/8"], clock=Clock())
    assert tracker.ident("2001:db8:1:2::5", no_penalty=False) == "2001:db8:1::"
    assert tracker.ident("2001:db8:1:ffff::9", no_penalty=False) == "2001:db8:1::"
    assert tracker.ident(None, no_penalty=False) == ""  # no rip: one shared bucket, as in Dovecot
    assert tracker.ident("10.1.2.3", no_penalty=False) is None
    assert tracker.ident("192.0.2.1", no_penalty=True) is None
    assert PenaltyTracker(enabled=False).ident("192.0.2.1", no_penalty=False) is None


def test_memory_is_bounded() -> None:
    tracker = PenaltyTracker(max_records=100, clock=Clock())
    for n in range(1000):
        tracker.update(f"192.0.2.{n % 250}.{n}", 1, user=b"u", password=b"p")
    assert len(tracker) <= 100


@pytest.fixture
def authd(tmp_path: Path) -> Iterator[AuthdProcess]:
    script = 'function auth_passdb_lookup(req) return dovecot.auth.PASSDB_RESULT_OK, "password=right" end\n'
    config = '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 1\n' + LISTENERS
    proc = AuthdProcess(tmp_path, config, {"s.lua": script})
    proc.start()
    yield proc
    proc.stop()


def timed_auth(authd: AuthdProcess, password: str, extra: str) -> tuple[str, float]:
    resp = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    with Wire.auth_client(authd.socket("auth-client"), timeout=20) as w:
        started = time.monotonic()
        w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp{extra}\tresp={resp}")
        return w.read_line(), time.monotonic() - started


def test_failed_address_waits_before_next_attempt(authd: AuthdProcess) -> None:
    reply, _ = timed_auth(authd, "wrong", "\trip=192.0.2.10")
    assert reply == "FAIL\t1\tuser=alice"
    reply, waited = timed_auth(authd, "right", "\trip=192.0.2.10")
    assert reply == "OK\t1\tuser=alice"
    assert 3.8 <= waited < 6, waited  # penalty 1: 4 s
    reply, waited = timed_auth(authd, "right", "\trip=192.0.2.10")
    assert waited < 1, waited  # the success reset it
    timed_auth(authd, "wrong", "\trip=192.0.2.11")
    reply, waited = timed_auth(authd, "right", "\trip=192.0.2.11\tno-penalty")
    assert reply == "OK\t1\tuser=alice" and waited < 1, waited
    reply, waited = timed_auth(authd, "right", "\trip=198.51.100.1")
    assert waited < 1, waited

"""The penalty record's lifetime: anvil forgets an address AUTH_PENALTY_TIMEOUT (2+4+8+15 = 29 s)
after its last update, and with it the user+password checksums that keep a retry from escalating."""

from __future__ import annotations

from authd.penalty import EXPIRE_SECS, PenaltyTracker
from tests.authd.test_penalty import Clock


def test_record_lives_29_seconds() -> None:
    assert EXPIRE_SECS == 29
    clock = Clock()
    tracker = PenaltyTracker(clock=clock)
    tracker.update("a", 1, user=b"alice", password=b"typo")
    clock.now += 28.9
    assert tracker.lookup("a") == 0 and len(tracker) == 1  # drained, but still remembered
    clock.now += 0.1
    assert tracker.lookup("a") == 0 and len(tracker) == 0


def test_same_password_escalates_again_once_forgotten() -> None:
    clock = Clock()
    tracker = PenaltyTracker(clock=clock)
    tracker.update("a", 1, user=b"alice", password=b"typo")
    clock.now += 20  # drained, still remembered: the same retry does not raise it
    tracker.update("a", tracker.lookup("a") + 1, user=b"alice", password=b"typo")
    assert tracker.lookup("a") == 0
    clock.now += 29  # forgotten: the same retry counts as a new failure
    tracker.update("a", tracker.lookup("a") + 1, user=b"alice", password=b"typo")
    assert tracker.lookup("a") == 1

"""Failures that used to pass without a word are logged once, with their cause.

The control channel between processes, sd_notify, and the systemd watchdog (which had no
test): each over real sockets, the daemon ones in a real authd process.
"""

from __future__ import annotations

import itertools
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from authd import control, systemd
from tests.authd_process import LISTENERS, AuthdProcess

CONFIG = (
    '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "static"\nargs = "password=pw"\n'
    "[reload]\nwatch_scripts = false\n" + LISTENERS
)


def send_all_queued(sock: socket.socket, peer: str, messages: list[dict[str, Any]]) -> bool:
    """Send `messages` over a channel on `sock`; whether the channel closed itself."""
    closed = []

    async def run() -> None:
        channel = control.ControlChannel(sock, peer)
        for message in messages:
            channel.send(message)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.run_sender)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        closed.append(channel.closed)
        channel.close()

    trio.run(run)
    return closed[0]


def test_control_send_to_a_gone_peer_is_logged_once() -> None:
    ours, theirs = control.socketpair()
    theirs.close()
    with structlog.testing.capture_logs() as logs:
        closed = send_all_queued(ours, "worker 3", [{"op": "metrics", "id": 1}, {"op": "penalty"}, {"op": "stop"}])
    assert closed
    assert [e for e in logs if e["event"].startswith("control.")] == [
        {
            "event": "control.send_failed",
            "log_level": "error",
            "peer": "worker 3",
            "op": "metrics",
            "message": "Broken pipe: channel closed",
        }
    ]


def test_control_message_too_large_is_logged_and_the_channel_stays() -> None:
    ours, theirs = control.socketpair()
    value = "x" * (control.BUFFER_SIZE + 1)
    huge: dict[str, Any] = {"op": "answer", "id": 7, "value": value}
    with structlog.testing.capture_logs() as logs:
        closed = send_all_queued(ours, "worker 1", [huge, {"op": "ready"}])
    assert not closed
    assert [e for e in logs if e["event"].startswith("control.")] == [
        {
            "event": "control.send_failed",
            "log_level": "error",
            "peer": "worker 1",
            "op": "answer",
            "bytes": len(value) + len('{"op":"answer","id":7,"value":""}'),
            "message": "Message too long",
        }
    ]
    theirs.settimeout(5)
    assert theirs.recv(100) == b'{"op":"ready"}'  # the next message still gets through
    theirs.close()


def test_notify_failure_is_logged_once_with_its_cause(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-notify-socket")
    with structlog.testing.capture_logs() as logs:
        assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": missing})
        assert not systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": missing})
    assert logs == [
        {
            "event": "systemd.notify_failed",
            "log_level": "error",
            "address": missing,
            "message": "No such file or directory",
        }
    ]
    # Working again, then failing again: said again.
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(missing)
    with structlog.testing.capture_logs() as logs:
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": missing})
        receiver.close()
        os.unlink(missing)
        assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": missing})
    assert [e["event"] for e in logs] == ["systemd.notify_failed"]


def test_daemon_logs_a_broken_notify_socket_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "gone"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a WATCHDOG=1 every 50 ms, each failing too
    proc = AuthdProcess(tmp_path, CONFIG)
    proc.start()
    time.sleep(0.5)
    assert proc.stop() == 0
    failed = [e for e in proc.log_events() if e.get("event") == "systemd.notify_failed"]
    assert [(e["address"], e["message"], e["level"]) for e in failed] == [
        (str(missing), "No such file or directory", "error")
    ]


def test_watchdog_pings_at_half_the_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # systemd's WatchdogSec=0.4
    proc = AuthdProcess(tmp_path, CONFIG)
    proc.start()
    try:
        pings: list[float] = []
        while len(pings) < 8:
            message = notify.recv(200)
            if message == b"WATCHDOG=1":
                pings.append(time.monotonic())
            else:
                assert message == b"READY=1\nSTATUS=serving"
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert 0.15 <= statistics.median(gaps) <= 0.3, gaps  # 0.2 s: half of WATCHDOG_USEC
        assert max(gaps) < 0.4, gaps  # never as late as the watchdog's timeout
    finally:
        assert proc.stop() == 0
        notify.close()


def test_no_watchdog_for_another_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # the watchdog is the service's main process's, not ours
    proc = AuthdProcess(tmp_path, CONFIG)
    proc.start()
    try:
        assert notify.recv(200) == b"READY=1\nSTATUS=serving"
        with pytest.raises(TimeoutError):
            notify.recv(200)
    finally:
        proc.stop()
        notify.close()


def test_control_receive_drops_a_truncated_message() -> None:
    ours, theirs = control.socketpair()
    theirs.send(b'{"op":"answer","value":"' + b"x" * control.BUFFER_SIZE + b'"}')  # too long to receive whole
    theirs.send(b'{"op":"ready"}')
    received = []

    async def run() -> None:
        channel = control.ControlChannel(ours, "worker 2")
        received.append(await channel.receive())
        channel.close()

    with structlog.testing.capture_logs() as logs:
        trio.run(run)
    theirs.close()
    assert received == [({"op": "ready"}, None)]
    assert logs == [
        {
            "event": "control.receive_failed",
            "log_level": "error",
            "peer": "worker 2",
            "message": f"message dropped: longer than {control.BUFFER_SIZE} bytes",
        }
    ]


def test_a_watchdog_interval_that_is_not_a_number_is_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "30s")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    proc = AuthdProcess(tmp_path, CONFIG)
    try:
        proc.start()
        event = proc.wait_for_log(lambda e: e.get("event") == "systemd.watchdog_invalid")
        assert (event["level"], event["value"]) == ("error", "30s")
        assert proc.alive
    finally:
        assert proc.stop() == 0
        notify.close()

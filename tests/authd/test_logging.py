"""authd's console renderer writes exactly the lines structlog's ConsoleRenderer writes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import structlog
from hypothesis import given
from hypothesis import strategies as st

from authd.logging import ConsoleRenderer, configure
from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire

VALUES = st.none() | st.integers() | st.floats(allow_nan=False) | st.binary(max_size=6) | st.text(max_size=8)
KEYS = st.sampled_from(["user", "service", "rip", "message", "a", "z_last", "logger", "logger_name", "timestamp"])
LEVELS = st.sampled_from(["debug", "info", "warning", "error", "critical", "exception", "custom-level"])


def both(event: dict[str, Any]) -> tuple[str, str]:
    ours = ConsoleRenderer()(None, "info", dict(event))
    theirs = structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(event))
    return ours, theirs


@given(
    name=st.text(max_size=40),
    level=LEVELS,
    fields=st.dictionaries(KEYS, VALUES | st.lists(VALUES, max_size=2), max_size=5),
)
def test_same_lines_as_structlog(name: str, level: str, fields: dict[str, Any]) -> None:
    ours, theirs = both({"event": name, "level": level, **fields})
    assert ours == theirs


def test_request_line() -> None:
    event = {
        "event": "auth.request",
        "level": "info",
        "timestamp": "2026-11-22T02:10:35.375684",
        "command": "AUTH",
        "result": "ok",
        "mech": "PLAIN",
        "duration_ms": 0.3,
        "user": "bench",
        "service": "smtp",
        "message": "two words",
    }
    ours, theirs = both(event)
    assert (
        ours
        == theirs
        == (
            "2026-11-22T02:10:35.375684 [info     ] auth.request                   command=AUTH duration_ms=0.3 "
            "mech=PLAIN message='two words' result=ok service=smtp user=bench"
        )
    )


def test_events_without_columns() -> None:
    assert both({}) == ("", "")
    assert both({"event": "", "x": 1}) == (" " * 30 + " x=1", " " * 30 + " x=1")


def test_tracebacks_go_to_structlog() -> None:
    stream = io.StringIO()
    previous = structlog.get_config()
    configure(fmt="console", stream=stream)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            structlog.get_logger("test").exception("auth.internal_error", request_id=7)
    finally:
        structlog.configure(**previous)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("[error    ] auth.internal_error            request_id=7")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


#: A password that only a frame's locals hold (the source lines in a traceback do not).
SECRET = "-".join(["s3cret", "pw"])


def _check(password: str) -> None:
    if password:
        raise ValueError("boom")


def logged_exception(fmt: str) -> str:
    """What one auth.internal_error with a real traceback (a password among its locals) writes."""
    stream = io.StringIO()
    previous = structlog.get_config()
    configure(fmt=fmt, stream=stream)
    try:
        try:
            _check(SECRET)
        except ValueError:
            structlog.get_logger("test").exception("auth.internal_error", request_id=7)
    finally:
        structlog.configure(**previous)
    return stream.getvalue()


def test_json_lines_carry_the_traceback_as_a_string() -> None:
    [line] = logged_exception("json").splitlines()
    event = json.loads(line)
    assert "exc_info" not in event
    assert set(event) == {"request_id", "event", "level", "timestamp", "exception"}
    assert (event["request_id"], event["event"], event["level"]) == (7, "auth.internal_error", "error")
    lines = event["exception"].splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    raise_line = _check.__code__.co_firstlineno + 2
    assert lines[-3:] == [
        f'  File "{__file__}", line {raise_line}, in _check',
        '    raise ValueError("boom")',
        "ValueError: boom",
    ]
    assert SECRET not in line  # frame locals are not rendered


def test_console_and_json_show_the_same_traceback() -> None:
    console = logged_exception("console")
    [line] = logged_exception("json").splitlines()
    assert console.endswith("request_id=7\n" + json.loads(line)["exception"] + "\n")
    assert SECRET not in console
    dovecot = logged_exception("dovecot")
    assert "exception=Traceback (most recent call last):\\n" in dovecot
    assert "ValueError: boom" in dovecot and SECRET not in dovecot and "exc_info" not in dovecot


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_one_write_per_line() -> None:
    """A log line and its newline leave in one write() (print() on stderr makes two syscalls)."""
    stream = Recorder()
    previous = structlog.get_config()
    configure(fmt="json", stream=stream)
    try:
        structlog.get_logger("test").info("auth.request", result="ok")
    finally:
        structlog.configure(**previous)
    assert len(stream.writes) == 1
    assert stream.writes[0].startswith('{"result": "ok", "event": "auth.request", "level": "info", "timestamp": ')
    assert stream.writes[0].endswith('"}\n')


def test_loggers_are_assembled_once() -> None:
    """After configure(), a module logger builds its bound logger on first use and keeps it."""
    previous = structlog.get_config()
    stream = io.StringIO()
    configure(fmt="json", stream=stream)
    try:
        proxy = structlog.get_logger("authd.test")
        proxy.info("first")
        assert proxy.bind() is proxy.bind()
        proxy.info("second", n=2)
    finally:
        structlog.configure(**previous)
    assert [line.split('"event": ')[1][:8] for line in stream.getvalue().splitlines()] == ['"first",', '"second"']


SCRIPT = """
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw"
end
"""


def test_request_event_follows_the_log_level(tmp_path: Path) -> None:
    """One auth.request event per request at level info, none at warning."""
    logged = {}
    for level in ("info", "warning"):
        config = f'[auth]\nfailure_delay = 0\n[log]\nlevel = "{level}"\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n'
        proc = AuthdProcess(tmp_path / level, config + LISTENERS, {"s.lua": SCRIPT})
        proc.start()
        try:
            with Wire.auth_client(proc.socket("auth-client")) as w:
                w.send("VERSION\t1\t2", "CPID\t1")
                resp = base64.b64encode(b"\0u\0pw").decode()
                w.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={resp}")
                assert w.read_line() == "OK\t1\tuser=u"
        finally:
            proc.stop()
        logged[level] = [
            {k: v for k, v in e.items() if k not in ("timestamp", "duration_ms")}
            for e in proc.log_events()
            if e.get("event") == "auth.request"
        ]
    assert logged == {
        "info": [
            {
                "command": "AUTH",
                "result": "ok",
                "mech": "PLAIN",
                "user": "u",
                "service": "smtp",
                "event": "auth.request",
                "level": "info",
            }
        ],
        "warning": [],
    }

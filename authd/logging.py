"""structlog set-up: console lines for people, JSON lines for log shippers.

Events are nouns (`auth.request`, `lua.error`) with fields; passwords are never
passed to the logger in the first place, and tracebacks show no frame locals.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from authd.dovecot_service import DovecotLogRenderer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_MISSING = object()
#: structlog's ConsoleRenderer pads levels to its longest name ("exception") and events to 30.
_LEVEL_WIDTH = 9
_EVENT_WIDTH = 30
#: Characters that make ConsoleRenderer show a string value with repr().
_QUOTED = frozenset(" \t=\r\n\"'")


def _console_value(value: object) -> str:
    if isinstance(value, str) and _QUOTED.isdisjoint(value):
        return value
    return repr(value)


class ConsoleRenderer:
    """The lines of structlog's ConsoleRenderer(colors=False), in a fraction of its time.

    Its generic column machinery cost about 12 µs per line, most of the price of the
    one `auth.request` line every request logs. Events with a traceback or stack are
    handed to structlog's renderer itself.
    """

    def __init__(self) -> None:
        self._full = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if "exc_info" in event or "exception" in event or "stack" in event:
            return self._full(logger, method, event)  # type: ignore[arg-type]
        parts = []
        timestamp = event.pop("timestamp", _MISSING)
        if timestamp is not _MISSING:
            parts.append(str(timestamp))
        level = event.pop("level", _MISSING)
        if level is not _MISSING:
            parts.append(f"[{str(level).ljust(_LEVEL_WIDTH)}]")
        name = event.pop("event", _MISSING)
        if name is not _MISSING:
            parts.append(str(name).ljust(_EVENT_WIDTH))
        for key in ("logger", "logger_name"):
            value = event.pop(key, _MISSING)
            if value is not _MISSING:
                parts.append(f"[{value}]")
        parts += [f"{key}={_console_value(event[key])}" for key in sorted(event)]
        return " ".join(part for part in parts if part).rstrip(" ")


def configure(*, fmt: str = "console", level: str = "info", stream: object = None, worker: int | None = None) -> None:
    """Set up structlog: `console`, `json`, or `dovecot` (Dovecot's log-pipe format).

    Called once per process, before anything logs. Module loggers are assembled on
    their first use and kept (about a quarter of the price of the per-request event);
    code that reconfigures structlog afterwards for its own capture (authd try) must
    do so before those loggers are first used. A worker process's events carry its
    `worker` number. An event logged with exc_info carries its traceback as the string
    field `exception` in every format (Python's own formatting: frames and source lines,
    never their locals, which may hold a password).
    """
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "dovecot":
        renderer = DovecotLogRenderer()
    else:
        renderer = ConsoleRenderer()
    structlog.configure(
        processors=[
            *([_add_worker(worker)] if worker is not None else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # WriteLogger writes line and newline in one write(); print() makes two on stderr.
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def _add_worker(worker: int) -> structlog.types.Processor:
    def add(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["worker"] = worker
        return event

    return add

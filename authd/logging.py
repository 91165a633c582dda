"""structlog set-up: console lines for people, JSON lines for log shippers.

Events are nouns (`auth.request`, `lua.error`) with fields; passwords are never
passed to the logger in the first place.
"""

from __future__ import annotations

import logging
import sys

import structlog

from authd.dovecot_service import DovecotLogRenderer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(*, fmt: str = "console", level: str = "info", stream: object = None) -> None:
    """Set up structlog: `console`, `json`, or `dovecot` (Dovecot's log-pipe format)."""
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "dovecot":
        renderer = DovecotLogRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )

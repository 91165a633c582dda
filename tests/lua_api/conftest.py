"""Helpers for driving real Lua states without the daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from lua_api.http import HttpExtension
from lua_api.request import LuaRequest
from lua_api.request_vars import RequestVars
from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script


class RecordingHost:
    """A ScriptHost that records log lines and checks passwords by plain comparison."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str, object]] = []

    def log(self, level: int, message: str, context: object | None) -> None:
        self.lines.append((level, message, context))

    def password_verify(self, context: object, crypted: bytes, plain: bytes) -> tuple[int, str | None]:
        if crypted.startswith(b"{PLAIN}"):
            crypted = crypted[7:]
        elif crypted.startswith(b"{NOSUCH}"):
            return 0, "Unknown scheme NOSUCH"
        return (1, None) if crypted == plain else (0, "Password mismatch")


@pytest.fixture
async def ext() -> AsyncIterator[HttpExtension]:
    """A dovecot.http extension for the test's Lua states, closed (its pools too) afterwards."""
    extension = HttpExtension()
    yield extension
    await extension.aclose()


@pytest.fixture
def host() -> RecordingHost:
    return RecordingHost()


@pytest.fixture
def load_script(tmp_path: Path, host: RecordingHost) -> Callable[..., object]:
    async def load(source: str, options: StateOptions | None = None) -> Script:
        path = tmp_path / "script.lua"
        path.write_text(source)
        script = Script(path, LuaState(host, options or StateOptions()))
        await script.load(run_in_loop)
        return script

    return load


def request(user: bytes = b"alice", **kwargs: object) -> LuaRequest:
    return LuaRequest(RequestVars(user=user, service=b"imap", **kwargs))  # type: ignore[arg-type]

"""authd.password_check: slow password schemes are verified off the event loop."""

from __future__ import annotations

import threading

import bcrypt
import pytest
import structlog

from authd import password_check
from authd.auth_request import AuthRequest, UsernameRules
from authd.password_check import verify_password_off_loop
from lua_api.results import PassdbResult

HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(rounds=4))


def request() -> AuthRequest:
    req = AuthRequest(UsernameRules(), id=1)
    req.original_user = req.user = b"alice"
    return req


@pytest.mark.parametrize(
    ("scheme", "stored", "in_loop"),
    [
        ("BLF-CRYPT", HASH, False),
        ("CRYPT", HASH, False),
        ("PLAIN", b"secret", True),
        ("SSHA256", b"", True),
    ],
)
async def test_slow_schemes_run_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch, scheme: str, stored: bytes, in_loop: bool
) -> None:
    threads = []
    real = password_check.verify

    def watched(*args: object, **kwargs: object) -> object:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(password_check, "verify", watched)
    result = await verify_password_off_loop(request(), b"secret", stored, scheme)
    assert (threads == [threading.get_ident()]) is in_loop
    if stored:
        assert result == 1
    assert await verify_password_off_loop(request(), b"wrong", stored, scheme) <= 0


async def test_nopassword_needs_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    req = request()
    req.extra_fields.add(b"nopassword", None)
    monkeypatch.setattr(password_check.trio.to_thread, "run_sync", None)  # would raise if used
    assert await verify_password_off_loop(req, b"anything", HASH, "BLF-CRYPT") == PassdbResult.OK


@pytest.mark.parametrize("scheme", ["BLF-CRYPT", "PLAIN"])
async def test_the_cache_can_keep_a_mismatch_quiet(scheme: str) -> None:
    stored = HASH if scheme == "BLF-CRYPT" else b"secret"
    with structlog.testing.capture_logs() as logs:
        assert await verify_password_off_loop(request(), b"wrong", stored, scheme, log_mismatch=False) == 0
        assert await verify_password_off_loop(request(), b"wrong", stored, scheme) == 0
    assert [e["message"] for e in logs] == ["Password mismatch"]

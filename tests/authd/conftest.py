"""Fixtures that run a real authd process for daemon-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.http_backend import Backend, HttpBackend

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

#: The reference users' passdb and userdb on all four socket types: a config's part after its own [auth].
REFERENCE_BACKENDS = (
    """
[[passdb]]
driver = "lua"
file = "reference_users.lua"

[[userdb]]
driver = "lua"
file = "reference_users.lua"

[lua]
workers = 4
"""
    + LISTENERS
)

REFERENCE_CONFIG = (
    """
[auth]
mechanisms = ["plain", "login"]
failure_delay = 0
penalty = false
"""
    + REFERENCE_BACKENDS
)


def reference_files() -> dict[str, str]:
    """The script REFERENCE_BACKENDS names, for AuthdProcess."""
    return {"reference_users.lua": (FIXTURES / "reference_users.lua").read_text()}


@pytest.fixture
def slow_and_fast() -> Iterator[tuple[HttpBackend, HttpBackend]]:
    """An HTTP backend that hangs for 600 s, and one that answers at once (good / goodpass)."""
    with (
        HttpBackend(Backend(delay=600)) as slow,
        HttpBackend(Backend(users={"good": "goodpass"})) as fast,
    ):
        yield slow, fast


@pytest.fixture(scope="module")
def reference_authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    """authd serving the protocol.md §6 reference users on all four socket types."""
    workdir = tmp_path_factory.mktemp("authd")
    proc = AuthdProcess(workdir, REFERENCE_CONFIG, reference_files())
    proc.start(wait_for=("auth-client", "auth-login", "auth-master", "auth-userdb"))
    try:
        yield proc
    finally:
        proc.stop()

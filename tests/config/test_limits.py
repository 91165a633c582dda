"""[limits]: the open-request bound per auth-client connection and the request timeout."""

from __future__ import annotations

import pytest

from config import ConfigError, parse_config

MINIMAL = {"listener": [{"type": "client", "path": "/run/authd/auth-client"}]}


def test_defaults_are_dovecots_timeout_and_1024_open_requests() -> None:
    limits = parse_config(MINIMAL).limits
    assert (limits.open_requests_per_connection, limits.request_timeout) == (1024, 150.0)


def test_settings_and_a_default_that_follows_requests_per_connection() -> None:
    limits = parse_config(
        {"limits": {"open_requests_per_connection": 8, "requests_per_connection": 8, "request_timeout": 1}, **MINIMAL}
    ).limits
    assert (limits.open_requests_per_connection, limits.request_timeout) == (8, 1.0)
    raised = parse_config({"limits": {"requests_per_connection": 2000, "requests_total": 4096}, **MINIMAL}).limits
    assert raised.open_requests_per_connection == 2000


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            {"open_requests_per_connection": 10, "requests_per_connection": 20},
            "limits.open_requests_per_connection: expected at least requests_per_connection (20), got 10",
        ),
        ({"request_timeout": 0}, "limits.request_timeout: expected a number >= 0.001, got 0.0"),
    ],
)
def test_bad_values(limits: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"limits": limits, **MINIMAL})
    assert str(info.value).endswith(message)

"""config: TOML loading, defaults, and errors that name the file, the key and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_config, parse_config

MINIMAL = {"listener": [{"type": "client", "path": "/run/authd/auth-client"}]}


def test_defaults_follow_dovecot() -> None:
    config = parse_config(MINIMAL)
    assert config.auth.mechanisms == ("plain",)
    assert config.auth.failure_delay == 2.0
    assert config.auth.username_format == "%Lu"
    assert config.lua.version == "5.4" and config.lua.workers == 30
    assert config.listeners[0].mode == 0o666
    assert config.reload.watch_scripts is True and config.reload.watch_interval == 0.5
    assert config.metrics.address is None and config.cache.size == 0


def test_the_documented_example(tmp_path: Path) -> None:
    path = tmp_path / "authd.toml"
    path.write_text(
        """
[auth]
mechanisms = ["plain", "login"]
failure_delay = 2.0
username_format = "%Lu"
[[listener]]
type = "client"
path = "/run/authd/auth-client"
mode = 0o666
[[listener]]
type = "client"
address = "127.0.0.1"
port = 24100
[[passdb]]
driver = "lua"
file = "auth.lua"
blocking = true
[lua]
version = "5.4"
workers = 30
"""
    )
    config = load_config(path)
    assert config.auth.mechanisms == ("plain", "login")
    assert config.listeners[1].where == "127.0.0.1:24100"
    assert config.passdbs[0].file == tmp_path / "auth.lua"  # relative to the config file
    assert config.passdbs[0].blocking is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"auth": {"failure_delay": "2s"}, **MINIMAL},
            "auth.failure_delay: expected a number, got a string ('2s')",
        ),
        (
            {"auth": {"mechanisms": ["plain", "gssapi"]}, **MINIMAL},
            "auth.mechanisms: unknown mechanism 'gssapi'",
        ),
        ({"auth": {"failure_dalay": 1}, **MINIMAL}, "auth.failure_dalay: unknown setting"),
        (
            {"listener": [{"path": "/x"}]},
            "listener[0].type: missing; expected one of client, login, master, userdb",
        ),
        (
            {"listener": [{"type": "client"}]},
            "listener[0].path: a listener needs either path, or address and port",
        ),
        ({"listener": [{"type": "imap", "path": "/x"}]}, "listener[0].type: expected one of"),
        (
            {"passdb": [{"driver": "lua"}], **MINIMAL},
            'passdb[0].file: a lua passdb needs file = "/path/to/script.lua"',
        ),
        ({"passdb": [{"driver": "sql", "file": "x"}], **MINIMAL}, "passdb[0].driver: unknown driver 'sql'"),
        (
            {"passdb": [{"driver": "lua", "file": "x", "blocking": "yes"}], **MINIMAL},
            "passdb[0].blocking: expected true or false, got a string",
        ),
        ({"lua": {"workers": 0}, **MINIMAL}, "lua.workers: expected an integer >= 1, got 0"),
        (
            {"lua": {"version": "5.2"}, **MINIMAL},
            "lua.version: expected one of '5.4', '5.3', '5.1', 'luajit', got '5.2'",
        ),
        ({}, "listener: at least one [[listener]] is needed"),
        (
            {"reload": {"watch_interval": 0}, **MINIMAL},
            "reload.watch_interval: expected a number >= 0.05, got 0",
        ),
        (
            {"metrics": {"port": 9090}, **MINIMAL},
            "metrics.address: metrics need both address and port",
        ),
        ({"listenr": [], **MINIMAL}, "listenr: unknown setting"),
    ],
)
def test_errors_name_key_and_expectation(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, Path("/etc/authd/authd.toml"))
    assert str(exc.value).startswith("/etc/authd/authd.toml: " + message), str(exc.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[auth\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)

"""config: TOML loading, defaults, and errors that name the file, the key and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from authd.databases import build_passdbs, build_userdbs, lua_pools
from authd.lua_db import LuaPassdb, LuaUserdb
from config import ConfigError, load_config, parse_config
from lua_api.runtime import StateOptions

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


def test_lua_pool_settings() -> None:
    defaults = parse_config(MINIMAL)
    assert (defaults.lua.max_states, defaults.lua.state_idle_timeout) == (256, 60.0)
    # More workers than the default max_states: the pools may still start them all.
    assert parse_config({"lua": {"workers": 300}, **MINIMAL}).lua.max_states == 300
    config = parse_config(
        {
            "lua": {"workers": 4, "max_states": 4, "state_idle_timeout": 2.5},
            "passdb": [{"driver": "lua", "file": "p.lua", "calls_per_state": 16}],
            "userdb": [{"driver": "lua", "file": "u.lua"}],
            **MINIMAL,
        }
    )
    assert (config.lua.max_states, config.lua.state_idle_timeout) == (4, 2.5)
    assert (config.passdbs[0].calls_per_state, config.userdbs[0].calls_per_state) == (16, 1)


def test_lua_pool_settings_reach_the_pools(tmp_path: Path) -> None:
    config = parse_config(
        {
            "lua": {"workers": 3, "max_states": 7, "state_idle_timeout": 9},
            "passdb": [{"driver": "lua", "file": "p.lua", "calls_per_state": 5}],
            "userdb": [{"driver": "lua", "file": "u.lua", "blocking": False}],
            **MINIMAL,
        },
        tmp_path / "authd.toml",
    )
    limiter = trio.CapacityLimiter(3)
    passdbs = build_passdbs(config, StateOptions, limiter)
    userdbs = build_userdbs(config, StateOptions, limiter, passdbs)
    passdb, userdb = passdbs.entries[0].driver, userdbs.entries[0].driver
    assert isinstance(passdb, LuaPassdb) and isinstance(userdb, LuaUserdb)
    shape = [(p.size, p.max_size, p.idle_timeout, p.calls_per_state) for p in (passdb.pool, userdb.pool)]
    assert shape == [(3, 7, 9.0, 5), (1, 7, 9.0, 1)]
    # What the authd_lua_* metrics read.
    pools = [(str(tmp_path / "p.lua"), passdb.pool), (str(tmp_path / "u.lua"), userdb.pool)]
    assert lua_pools(passdbs, userdbs) == pools


def test_processes() -> None:
    auto = parse_config(MINIMAL).server
    assert auto.processes == 0  # "auto"
    assert [auto.process_count(cpus) for cpus in (1, 2, 16)] == [1, 2, 8]
    fixed = parse_config({"server": {"processes": 3}, **MINIMAL}).server
    assert fixed.process_count(2) == 3
    assert parse_config({"server": {"processes": "auto"}, **MINIMAL}).server == auto


def test_limits() -> None:
    defaults = parse_config(MINIMAL).limits
    assert (defaults.requests_per_connection, defaults.requests_total) == (128, 4096)
    limits = parse_config({"limits": {"requests_per_connection": 10, "requests_total": 10}, **MINIMAL}).limits
    assert (limits.requests_per_connection, limits.requests_total) == (10, 10)


def test_sizes_take_dovecots_units() -> None:
    sizes = {"2M": 2 << 20, "512 k": 512 << 10, "1G": 1 << 30, "64kB": 64 << 10, "100": 100, 4096: 4096}
    for given, expected in sizes.items():
        config = parse_config({"cache": {"size": given}, "lua": {"max_memory": given}, **MINIMAL})
        assert (config.cache.size, config.lua.max_memory) == (expected, expected), given


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
            {"auth": {"proxy_self": ["192.0.2.1", "mail.example.org"]}, **MINIMAL},
            "auth.proxy_self: not an IP address: 'mail.example.org' (names are not resolved)",
        ),
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
            {"lua": {"workers": 40, "max_states": 39}, **MINIMAL},
            "lua.max_states: expected at least workers (40), got 39",
        ),
        ({"lua": {"max_states": 0}, **MINIMAL}, "lua.max_states: expected an integer >= 1, got 0"),
        ({"lua": {"max_states": "many"}, **MINIMAL}, "lua.max_states: expected an integer, got a string ('many')"),
        (
            {"lua": {"state_idle_timeout": 0}, **MINIMAL},
            "lua.state_idle_timeout: expected a number >= 0.1, got 0",
        ),
        (
            {"passdb": [{"driver": "lua", "file": "x", "calls_per_state": 0}], **MINIMAL},
            "passdb[0].calls_per_state: expected an integer >= 1, got 0",
        ),
        (
            {"userdb": [{"driver": "static", "args": "uid=1", "calls_per_state": 4}], **MINIMAL},
            "userdb[0].calls_per_state: only lua userdbs run in Lua states (this one is static)",
        ),
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
        (
            {"server": {"processes": 0}, **MINIMAL},
            'server.processes: expected "auto" or an integer >= 1, got 0',
        ),
        (
            {"server": {"processes": "all"}, **MINIMAL},
            "server.processes: expected \"auto\" or an integer >= 1, got 'all'",
        ),
        ({"server": {"workers": 2}, **MINIMAL}, "server.workers: unknown setting"),
        (
            {"limits": {"requests_per_connection": 0}, **MINIMAL},
            "limits.requests_per_connection: expected an integer >= 1, got 0",
        ),
        (
            {"limits": {"requests_per_connection": 200, "requests_total": 100}, **MINIMAL},
            "limits.requests_total: expected at least requests_per_connection (200), got 100",
        ),
        ({"limits": {"requests": 5}, **MINIMAL}, "limits.requests: unknown setting"),
        (
            {"cache": {"size": "2 parsecs"}, **MINIMAL},
            'cache.size: expected a size such as "64k", "2M" or "1G", got \'2 parsecs\'',
        ),
        ({"cache": {"size": -1}, **MINIMAL}, "cache.size: expected a size >= 0, got -1"),
        (
            {"lua": {"max_memory": 1.5}, **MINIMAL},
            'lua.max_memory: expected an integer or a size such as "2M", got a number (1.5)',
        ),
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

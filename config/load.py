"""Load and validate the TOML configuration.

Every error names the file, the key (as a dotted path, with list indexes) and what
was expected, because the person reading it is an admin at a terminal. Unknown
keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from config.schema import (
    DEFAULT_MAX_STATES,
    DIALECTS,
    DICT_DRIVERS,
    HANDSHAKES,
    LISTENER_TYPES,
    LOG_FORMATS,
    LOG_LEVELS,
    LUA_VERSIONS,
    MECHANISMS,
    PASSDB_DRIVERS,
    PASSDB_SKIPS,
    RULES,
    STATE_BACKENDS,
    USERDB_DRIVERS,
    USERDB_SKIPS,
    AuthSettings,
    CacheSettings,
    Config,
    DictSettings,
    LimitsSettings,
    ListenerSettings,
    LogSettings,
    LuaSettings,
    MetricsSettings,
    PassdbSettings,
    ReloadSettings,
    ServerSettings,
    StateSettings,
    UserdbSettings,
)

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


#: Dovecot's size units (settings_get_size): a number, then B, k, M, G or T, optionally followed by B.
_SIZE = re.compile(r"([0-9]+)\s*([kmgt]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class _Table:
    """A TOML table being read, remembering its path for error messages."""

    def __init__(self, data: Mapping[str, Any], where: str, source: str) -> None:
        self.data = data
        self.where = where
        self.source = source
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        path = f"{self.where}.{key}" if self.where else key
        return ConfigError(f"{self.source}: {path}: {message}")

    def _get(self, key: str, kind: type | tuple[type, ...], expected: str, default: T) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"expected {expected}, got a boolean")
        if not isinstance(value, kind):
            raise self.error(key, f"expected {expected}, got {_describe(value)}")
        return value

    def string(self, key: str, default: T) -> str | T:
        return self._get(key, str, "a string", default)  # type: ignore[no-any-return]

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, bool, "true or false", default)  # type: ignore[no-any-return]

    def integer(self, key: str, default: T, minimum: int | None = None) -> int | T:
        value = self._get(key, int, "an integer", default)
        if minimum is not None and isinstance(value, int) and value < minimum:
            raise self.error(key, f"expected an integer >= {minimum}, got {value}")
        return value  # type: ignore[no-any-return]

    def size(self, key: str, default: int) -> int:
        """Bytes, as an integer or a string with Dovecot's units: "2M", "512 k", "1G" (powers of 1024)."""
        value = self._get(key, (int, str), 'an integer or a size such as "2M"', default)
        if isinstance(value, str):
            match = _SIZE.fullmatch(value.strip())
            if match is None:
                raise self.error(key, f'expected a size such as "64k", "2M" or "1G", got {value!r}')
            value = int(match[1]) * _SIZE_UNITS[match[2].lower()]
        if value < 0:
            raise self.error(key, f"expected a size >= 0, got {value}")
        return int(value)

    def number(self, key: str, default: float, minimum: float | None = None) -> float:
        value = float(self._get(key, (int, float), "a number", default))
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected a number >= {minimum}, got {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self._get(key, str, "a string", default)
        if value not in choices:
            raise self.error(key, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value  # type: ignore[no-any-return]

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, list, "a list of strings", default)
        if not all(isinstance(item, str) for item in value):
            raise self.error(key, "expected a list of strings")
        return tuple(value)

    def path(self, key: str) -> Path | None:
        value = self.string(key, None)
        return None if value is None else Path(value)

    def table(self, key: str) -> _Table:
        value = self._get(key, dict, "a table", {})
        return _Table(value, f"{self.where}.{key}" if self.where else key, self.source)

    def tables(self, key: str) -> list[_Table]:
        value = self._get(key, list, f"an array of tables ([[{key}]])", [])
        out = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"{key}[{index}]", f"expected a table, got {_describe(item)}")
            out.append(_Table(item, f"{key}[{index}]", self.source))
        return out

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown setting")


def _describe(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__) + f" ({value!r})"


def _auth(t: _Table) -> AuthSettings:
    defaults = AuthSettings()
    mechanisms = tuple(m.lower() for m in t.strings("mechanisms", defaults.mechanisms))
    for mechanism in mechanisms:
        if mechanism not in MECHANISMS:
            raise t.error("mechanisms", f"unknown mechanism {mechanism!r} (known: {', '.join(MECHANISMS)})")
    if not mechanisms:
        raise t.error("mechanisms", "at least one mechanism is needed")
    settings = AuthSettings(
        mechanisms=mechanisms,
        failure_delay=t.number("failure_delay", defaults.failure_delay, minimum=0),
        username_format=t.string("username_format", defaults.username_format),
        username_chars=t.string("username_chars", defaults.username_chars),
        username_translation=t.string("username_translation", defaults.username_translation),
        default_realm=t.string("default_realm", defaults.default_realm),
        anonymous_username=t.string("anonymous_username", defaults.anonymous_username),
        master_user_separator=t.string("master_user_separator", defaults.master_user_separator),
        ssl_username_from_cert=t.boolean("ssl_username_from_cert", defaults.ssl_username_from_cert),
        ssl_require_client_cert=t.boolean("ssl_require_client_cert", defaults.ssl_require_client_cert),
        penalty=t.boolean("penalty", defaults.penalty),
        trusted_networks=t.strings("trusted_networks", defaults.trusted_networks),
        proxy_self=t.strings("proxy_self", defaults.proxy_self),
        debug=t.boolean("debug", defaults.debug),
    )
    for network in settings.trusted_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise t.error("trusted_networks", f"not a network: {network!r}") from None
    for address in settings.proxy_self:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise t.error("proxy_self", f"not an IP address: {address!r} (names are not resolved)") from None
    if "anonymous" in settings.mechanisms and not settings.anonymous_username:
        raise t.error("anonymous_username", "the ANONYMOUS mechanism needs a non-empty anonymous_username")
    if len(settings.master_user_separator) > 1:
        raise t.error("master_user_separator", "expected a single character")
    if len(settings.username_translation) % 2:
        raise t.error("username_translation", "expected pairs of characters (from, to)")
    t.finish()
    return settings


def _listener(t: _Table) -> ListenerSettings:
    kind = t.choice("type", LISTENER_TYPES, "") if "type" in t.data else None
    if kind is None:
        raise t.error("type", f"missing; expected one of {', '.join(LISTENER_TYPES)}")
    path = t.path("path")
    address = t.string("address", None)
    port = t.integer("port", None, minimum=0)
    if path is None and (address is None or port is None):
        raise t.error("path", "a listener needs either path, or address and port")
    if path is not None and (address is not None or port is not None):
        raise t.error("path", "give either path or address/port, not both")
    mode = t.integer("mode", 0o666, minimum=0)
    if mode > 0o7777:
        raise t.error("mode", f"expected a file mode such as 0o660, got {mode:#o}")
    settings = ListenerSettings(
        type=kind,
        path=path,
        mode=mode,
        user=t.string("user", None),
        group=t.string("group", None),
        address=address,
        port=port,
        handshake=t.choice("handshake", HANDSHAKES, "2.3"),
    )
    t.finish()
    return settings


def _settings_table(t: _Table) -> tuple[tuple[str, str], ...]:
    """`settings = { key = "value" }`: the 2.4 lua_settings, strings only."""
    table = t.table("settings")
    pairs = []
    for key, value in table.data.items():
        table.used.add(key)
        if not isinstance(value, str):
            raise table.error(key, f"expected a string, got {_describe(value)}")
        pairs.append((key, value))
    return tuple(pairs)


def _db(t: _Table, kind: str) -> dict[str, Any]:
    """Keys shared by [[passdb]] and [[userdb]]."""
    drivers = USERDB_DRIVERS if kind == "userdb" else PASSDB_DRIVERS
    driver = t.string("driver", None)
    if driver is None:
        raise t.error("driver", f"missing; expected one of {', '.join(drivers)}")
    if driver not in drivers:
        raise t.error("driver", f"unknown driver {driver!r} (known: {', '.join(drivers)})")
    skips = USERDB_SKIPS if kind == "userdb" else PASSDB_SKIPS
    fields: dict[str, Any] = {
        "driver": driver,
        "file": t.path("file"),
        "blocking": t.boolean("blocking", True),
        "dialect": t.choice("dialect", DIALECTS, "2.3"),
        "args": t.string("args", ""),
        "settings": _settings_table(t),
        "name": t.string("name", ""),
        "result_success": t.choice("result_success", RULES, "return-ok"),
        "result_failure": t.choice("result_failure", RULES, "continue"),
        "result_internalfail": t.choice("result_internalfail", RULES, "continue"),
        "skip": t.choice("skip", skips, "never"),
        "cache_key": t.string("cache_key", None),
        "calls_per_state": t.integer("calls_per_state", 1, minimum=1),
    }
    if fields["calls_per_state"] != 1 and driver != "lua":
        raise t.error("calls_per_state", f"only lua {kind}s run in Lua states (this one is {driver})")
    if driver in ("lua", "passwd-file") and fields["file"] is None:
        example = "script.lua" if driver == "lua" else "users"
        raise t.error("file", f'a {driver} {kind} needs file = "/path/to/{example}"')
    return fields


def _passdb(t: _Table) -> PassdbSettings:
    scheme = t.string("scheme", None)
    settings = PassdbSettings(
        scheme=scheme.upper() if scheme is not None else None,
        deny=t.boolean("deny", False),
        master=t.boolean("master", False),
        pass_=t.boolean("pass", False),
        mechanisms=tuple(m.upper() for m in t.strings("mechanisms", ())),
        username_filter=t.strings("username_filter", ()),
        **_db(t, "passdb"),
    )
    t.finish()
    return settings


def _check_passdbs(passdbs: tuple[PassdbSettings, ...], source: str) -> None:
    """The chain rules Dovecot refuses to start with (auth.c)."""
    normal = [(i, p) for i, p in enumerate(passdbs) if not p.master]
    if normal and normal[-1][1].pass_:
        raise ConfigError(f"{source}: passdb[{normal[-1][0]}].pass: the last passdb can't have pass = true")
    for index, passdb in enumerate(passdbs):
        if passdb.master and passdb.deny:
            raise ConfigError(f"{source}: passdb[{index}].deny: a master passdb can't have deny = true")
        if passdb.master and passdb.pass_ and not normal:
            raise ConfigError(
                f"{source}: passdb[{index}].pass: a master passdb can't have pass = true without other passdbs"
            )


def _userdb(t: _Table) -> UserdbSettings:
    settings = UserdbSettings(**_db(t, "userdb"))
    t.finish()
    return settings


def _lua(t: _Table) -> LuaSettings:
    workers = t.integer("workers", 30, minimum=1)
    max_states = t.integer("max_states", None, minimum=1)
    if max_states is not None and max_states < workers:
        raise t.error("max_states", f"expected at least workers ({workers}), got {max_states}")
    settings = LuaSettings(
        version=t.choice("version", LUA_VERSIONS, "5.4"),
        workers=workers,
        max_states=max_states if max_states is not None else max(DEFAULT_MAX_STATES, workers),
        state_idle_timeout=t.number("state_idle_timeout", 60.0, minimum=0.1),
        package_path=t.string("package_path", None),
        package_cpath=t.string("package_cpath", None),
        import_environment=t.strings("import_environment", ()),
        call_timeout=t.number("call_timeout", 30.0, minimum=0.001),
        max_memory=t.size("max_memory", 0),
        log_script_output=t.boolean("log_script_output", False),
    )
    t.finish()
    return settings


def _cache(t: _Table) -> CacheSettings:
    settings = CacheSettings(
        size=t.size("size", 0),
        ttl=t.number("ttl", 3600.0, minimum=0),
        negative_ttl=t.number("negative_ttl", 3600.0, minimum=0),
    )
    t.finish()
    return settings


def _metrics(t: _Table) -> MetricsSettings:
    settings = MetricsSettings(address=t.string("address", None), port=t.integer("port", None, minimum=0))
    if (settings.address is None) != (settings.port is None):
        raise t.error("port" if settings.port is None else "address", "metrics need both address and port")
    t.finish()
    return settings


def _reload(t: _Table) -> ReloadSettings:
    settings = ReloadSettings(
        watch_scripts=t.boolean("watch_scripts", True),
        watch_interval=t.number("watch_interval", 0.5, minimum=0.05),
    )
    t.finish()
    return settings


def _log(t: _Table) -> LogSettings:
    settings = LogSettings(
        format=t.choice("format", LOG_FORMATS, "console"), level=t.choice("level", LOG_LEVELS, "info")
    )
    t.finish()
    return settings


def _server(t: _Table) -> ServerSettings:
    value = t._get("processes", (int, str), '"auto" or an integer', "auto")
    if value == "auto":
        processes = 0
    elif isinstance(value, int) and value >= 1:
        processes = value
    else:
        raise t.error("processes", f'expected "auto" or an integer >= 1, got {value!r}')
    t.finish()
    return ServerSettings(processes=processes)


def _limits(t: _Table) -> LimitsSettings:
    defaults = LimitsSettings()
    per_connection = t.integer("requests_per_connection", defaults.requests_per_connection, minimum=1)
    total = t.integer("requests_total", defaults.requests_total, minimum=1)
    if total < per_connection:
        raise t.error("requests_total", f"expected at least requests_per_connection ({per_connection}), got {total}")
    open_default = max(defaults.open_requests_per_connection, per_connection)
    open_requests = t.integer("open_requests_per_connection", open_default, minimum=1)
    if open_requests < per_connection:
        raise t.error(
            "open_requests_per_connection",
            f"expected at least requests_per_connection ({per_connection}), got {open_requests}",
        )
    timeout = t.number("request_timeout", defaults.request_timeout, minimum=0.001)
    t.finish()
    return LimitsSettings(
        requests_per_connection=per_connection,
        requests_total=total,
        open_requests_per_connection=open_requests,
        request_timeout=timeout,
    )


def _host_ports(t: _Table, key: str) -> tuple[str, ...]:
    """A list of "host:port" strings (Sentinels, Cluster seed nodes)."""
    nodes = t.strings(key, ())
    for node in nodes:
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise t.error(key, f'expected "host:port" items, got {node!r}')
    return nodes


def _state(t: _Table) -> StateSettings:
    defaults = StateSettings()
    settings = StateSettings(
        backend=t.choice("backend", STATE_BACKENDS, defaults.backend),
        url=t.string("url", defaults.url),
        sentinels=_host_ports(t, "sentinels"),
        master_name=t.string("master_name", defaults.master_name),
        cluster=_host_ports(t, "cluster"),
        username=t.string("username", defaults.username),
        password=t.string("password", defaults.password),
        tls=t.boolean("tls", defaults.tls),
        tls_ca_file=t.string("tls_ca_file", defaults.tls_ca_file),
        key_prefix=t.string("key_prefix", defaults.key_prefix),
        timeout=t.number("timeout", defaults.timeout, minimum=0.0001),
        log_interval=t.number("log_interval", defaults.log_interval, minimum=0),
    )
    t.finish()
    if settings.backend == "redis":
        given = [key for key in ("url", "sentinels", "cluster") if getattr(settings, key)]
        if len(given) != 1:
            raise t.error("url", "the redis backend needs exactly one of url, sentinels or cluster")
        if settings.url and not settings.url.startswith(("redis://", "rediss://", "unix://")):
            raise t.error("url", f"expected redis://HOST:PORT/DB, rediss://... or unix://PATH, got {settings.url!r}")
        if settings.sentinels and not settings.master_name:
            raise t.error("master_name", "sentinels need the master_name they watch")
    return settings


def _dict(t: _Table) -> DictSettings:
    name = t.string("name", None)
    if not name:
        raise t.error("name", "every [[dict]] needs a name (scripts open it with authd.dict(name))")
    defaults = DictSettings(name)
    settings = DictSettings(
        name=name,
        driver=t.choice("driver", DICT_DRIVERS, defaults.driver),
        max_keys=t.integer("max_keys", defaults.max_keys, minimum=1),
        url=t.string("url", defaults.url),
        key_prefix=t.string("key_prefix", defaults.key_prefix),
        expire=t.integer("expire", defaults.expire, minimum=0),
        timeout=t.number("timeout", defaults.timeout, minimum=0.001),
        path=t.path("path"),
    )
    t.finish()
    if settings.driver == "file" and settings.path is None:
        raise t.error("path", "a file dict needs the path of its file")
    if settings.driver == "redis" and not settings.url.startswith(("redis://", "rediss://", "unix://")):
        raise t.error("url", f"expected redis://HOST:PORT/DB, rediss://... or unix://PATH, got {settings.url!r}")
    return settings


def _dicts(tables: list[_Table], source: str) -> tuple[DictSettings, ...]:
    dicts = tuple(_dict(t) for t in tables)
    seen: set[str] = set()
    for index, settings in enumerate(dicts):
        if settings.name in seen:
            raise ConfigError(f"{source}: dict[{index}].name: another [[dict]] is named {settings.name!r}")
        seen.add(settings.name)
    return dicts


def _relative(base: Path | None, path: Path | None) -> Path | None:
    if path is None or base is None or path.is_absolute():
        return path
    return base.parent / path


def parse_config(data: Mapping[str, Any], source: Path | None = None, *, require_listeners: bool = True) -> Config:
    """Validate already-parsed TOML data; relative paths are taken from the file's directory."""
    root = _Table(data, "", str(source) if source else "<config>")
    section: Callable[[str], _Table] = root.table
    config = Config(
        source=source,
        auth=_auth(section("auth")),
        listeners=tuple(_listener(t) for t in root.tables("listener")),
        passdbs=tuple(_passdb(t) for t in root.tables("passdb")),
        userdbs=tuple(_userdb(t) for t in root.tables("userdb")),
        lua=_lua(section("lua")),
        cache=_cache(section("cache")),
        metrics=_metrics(section("metrics")),
        reload=_reload(section("reload")),
        log=_log(section("log")),
        server=_server(section("server")),
        limits=_limits(section("limits")),
        state=_state(section("state")),
        dicts=_dicts(root.tables("dict"), root.source),
    )
    root.finish()
    _check_passdbs(config.passdbs, root.source)
    if require_listeners and not config.listeners:
        raise ConfigError(f"{root.source}: listener: at least one [[listener]] is needed")
    return replace(
        config,
        listeners=tuple(replace(x, path=_relative(source, x.path)) for x in config.listeners),
        passdbs=tuple(replace(x, file=_relative(source, x.file)) for x in config.passdbs),
        userdbs=tuple(replace(x, file=_relative(source, x.file)) for x in config.userdbs),
        dicts=tuple(replace(x, path=_relative(source, x.path)) for x in config.dicts),
    )


def load_config(path: Path, *, require_listeners: bool = True) -> Config:
    """Read and validate a configuration file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path, require_listeners=require_listeners)

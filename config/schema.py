"""What a valid configuration looks like, as typed dataclasses with defaults.

Key names are the public interface and follow Dovecot's settings where one
exists (auth_failure_delay -> [auth] failure_delay, passdb args -> [[passdb]]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Dovecot's default auth_username_chars.
DEFAULT_USERNAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"

LISTENER_TYPES = ("client", "login", "master", "userdb")
MECHANISMS = (
    "plain",
    "login",
    "cram-md5",
    "scram-sha-1",
    "scram-sha-256",
    "oauthbearer",
    "xoauth2",
    "external",
    "anonymous",
)
PASSDB_DRIVERS = ("lua", "static", "passwd-file")
USERDB_DRIVERS = ("lua", "prefetch", "static", "passwd-file")
RULES = ("return", "return-ok", "return-fail", "continue", "continue-ok", "continue-fail")
PASSDB_SKIPS = ("never", "authenticated", "unauthenticated")
USERDB_SKIPS = ("never", "found", "notfound")
DIALECTS = ("2.3", "2.4")
LUA_VERSIONS = ("5.4", "5.3", "5.1", "luajit")
LOG_FORMATS = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
HANDSHAKES = ("2.3", "2.4")


@dataclass(frozen=True)
class AuthSettings:
    mechanisms: tuple[str, ...] = ("plain",)
    failure_delay: float = 2.0
    username_format: str = "%Lu"
    username_chars: str = DEFAULT_USERNAME_CHARS
    username_translation: str = ""
    default_realm: str = ""
    anonymous_username: str = "anonymous"
    master_user_separator: str = ""
    ssl_username_from_cert: bool = False
    #: Fail requests whose login process saw no valid client certificate.
    ssl_require_client_cert: bool = False
    #: The per-IP auth penalty (Dovecot's anvil); false turns it off.
    penalty: bool = True
    #: Networks exempt from the penalty (like login_trusted_networks).
    trusted_networks: tuple[str, ...] = ()
    #: Addresses that also count as this server for proxy_maybe (auth_proxy_self).
    proxy_self: tuple[str, ...] = ()
    debug: bool = False


@dataclass(frozen=True)
class ListenerSettings:
    type: str
    path: Path | None = None
    mode: int = 0o666
    user: str | None = None
    group: str | None = None
    address: str | None = None
    port: int | None = None
    #: "2.3": whole greeting at once; "2.4": wait for the client's VERSION first.
    handshake: str = "2.3"

    @property
    def where(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PassdbSettings:
    driver: str
    file: Path | None = None
    blocking: bool = True
    dialect: str = "2.3"
    #: Default scheme of passwords without {SCHEME} (lua: tables only, default PLAIN;
    #: passwd-file: all, default CRYPT; static: PLAIN). None = the driver's default.
    scheme: str | None = None
    #: Driver arguments in Dovecot syntax (static: "password=x allow_nets=...").
    args: str = ""
    #: 2.4 dialect: the lua_settings handed to script_init(tbl).
    settings: tuple[tuple[str, str], ...] = ()
    name: str = ""
    result_success: str = "return-ok"
    result_failure: str = "continue"
    result_internalfail: str = "continue"
    skip: str = "never"
    deny: bool = False
    master: bool = False
    #: A master passdb with pass = true continues to the normal passdbs for the user.
    pass_: bool = False
    mechanisms: tuple[str, ...] = ()
    username_filter: tuple[str, ...] = ()
    cache_key: str | None = None
    #: Calls one Lua state may run at once, interleaved at their I/O waits. 1 is
    #: Dovecot's behaviour; more only for scripts that keep no per-call data in globals.
    calls_per_state: int = 1


@dataclass(frozen=True)
class UserdbSettings:
    driver: str
    file: Path | None = None
    blocking: bool = True
    dialect: str = "2.3"
    args: str = ""
    settings: tuple[tuple[str, str], ...] = ()
    name: str = ""
    result_success: str = "return-ok"
    result_failure: str = "continue"
    result_internalfail: str = "continue"
    skip: str = "never"
    cache_key: str | None = None
    calls_per_state: int = 1


#: [lua] max_states when not set (and workers is lower): enough states for hundreds of
#: calls waiting on HTTP backends at once, at about 190 KB each.
DEFAULT_MAX_STATES = 256


@dataclass(frozen=True)
class LuaSettings:
    version: str = "5.4"
    #: Threads that run Lua for blocking = true scripts, and states each of them starts with.
    workers: int = 30
    #: States a script's pool may grow to while calls wait for one (at least `workers`).
    max_states: int = DEFAULT_MAX_STATES
    #: Seconds a state beyond the ones a pool starts with may stay idle before it is
    #: retired (Dovecot's default idle_kill for auth workers).
    state_idle_timeout: float = 60.0
    package_path: str | None = None
    package_cpath: str | None = None
    import_environment: tuple[str, ...] = ()
    #: Seconds a single entry point call may run (instruction hook and wall clock).
    call_timeout: float = 30.0
    #: Bytes a Lua state may allocate; 0 = unlimited.
    max_memory: int = 0
    #: Log what scripts print (print, io.write, io.stdout/io.stderr) at debug level with
    #: the script's name; off, it is dropped, as Dovecot sends it to /dev/null.
    log_script_output: bool = False


@dataclass(frozen=True)
class CacheSettings:
    """Dovecot's auth cache: off by default (size 0)."""

    size: int = 0
    ttl: float = 3600.0
    negative_ttl: float = 3600.0


@dataclass(frozen=True)
class MetricsSettings:
    address: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class ReloadSettings:
    """Hot reload: SIGHUP always; script edits too while watch_scripts is on."""

    watch_scripts: bool = True
    #: Seconds between looks at the script files; an edit is taken once it held still for one.
    watch_interval: float = 0.5


@dataclass(frozen=True)
class ServerSettings:
    """How many processes serve: 0 = one per CPU the daemon may run on ("auto")."""

    processes: int = 0

    def process_count(self, cpus: int) -> int:
        return self.processes or max(1, min(cpus, MAX_AUTO_PROCESSES))


#: "auto" stops here: past a few processes the main one, which accepts and relays, is the limit.
MAX_AUTO_PROCESSES = 8


@dataclass(frozen=True)
class LimitsSettings:
    """How much work one connection, and one process, may have authd hold at once."""

    #: Requests of one connection waiting for a passdb call, a penalty or a delay; at this
    #: many authd stops reading the connection until one finishes (backpressure).
    requests_per_connection: int = 128
    #: The same over all connections of a process; a request beyond it gets temp_fail at once.
    requests_total: int = 4096
    #: Requests one auth-client connection may have open (waiting for the client's CONT, a
    #: penalty or a passdb call, or kept for REQUEST); an AUTH beyond it gets temp_fail at once.
    open_requests_per_connection: int = 1024
    #: Seconds after its AUTH, last CONT or OK when a request is dropped (Dovecot: 150).
    request_timeout: float = 150.0


STATE_BACKENDS = ("memory", "redis")


@dataclass(frozen=True)
class StateSettings:
    """Where the penalty counters and cache flushes live: this process ("memory") or a
    Redis/Valkey server shared by every authd instance ("redis")."""

    backend: str = "memory"
    #: One server: redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path.
    url: str = ""
    #: Sentinels ("host:port") and the name of the master they watch, instead of url.
    sentinels: tuple[str, ...] = ()
    master_name: str = ""
    #: Cluster seed nodes ("host:port"), instead of url.
    cluster: tuple[str, ...] = ()
    #: ACL user and password (they override the url's).
    username: str = ""
    password: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    key_prefix: str = "authd:"
    #: Seconds one decision may wait for Redis before local state answers.
    timeout: float = 0.005
    #: Seconds between log lines about Redis being unavailable (each fallback is counted).
    log_interval: float = 60.0


DICT_DRIVERS = ("memory", "redis", "file")


@dataclass(frozen=True)
class DictSettings:
    """One `[[dict]]`: a dict scripts open with authd.dict(name), kept in this process
    ("memory"), on a Redis/Valkey server with Dovecot's dict-redis key layout ("redis")
    or in a file of Dovecot's dict-file format ("file")."""

    name: str
    driver: str = "memory"
    #: memory: keys kept at most.
    max_keys: int = 100_000
    #: redis: redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path.
    url: str = ""
    #: redis: Dovecot's redis_key_prefix, put before every key.
    key_prefix: str = ""
    #: redis: Dovecot's redis_expire, seconds (0: keys never expire unless a transaction says so).
    expire: int = 0
    #: redis: Dovecot's redis_request_timeout, seconds one call may wait for the server.
    timeout: float = 30.0
    #: file: the dict file (Dovecot's dict-file format); relative to the config file.
    path: Path | None = None


@dataclass(frozen=True)
class LogSettings:
    format: str = "console"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    source: Path | None = None
    auth: AuthSettings = field(default_factory=AuthSettings)
    listeners: tuple[ListenerSettings, ...] = ()
    passdbs: tuple[PassdbSettings, ...] = ()
    userdbs: tuple[UserdbSettings, ...] = ()
    lua: LuaSettings = field(default_factory=LuaSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    log: LogSettings = field(default_factory=LogSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    state: StateSettings = field(default_factory=StateSettings)
    dicts: tuple[DictSettings, ...] = ()

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
MECHANISMS = ("plain", "login")
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
    #: Dovecot's passdb lua `scheme=`: default scheme of passwords returned in tables.
    scheme: str = "PLAIN"
    name: str = ""


@dataclass(frozen=True)
class UserdbSettings:
    driver: str
    file: Path | None = None
    blocking: bool = True
    dialect: str = "2.3"
    name: str = ""


@dataclass(frozen=True)
class LuaSettings:
    version: str = "5.4"
    workers: int = 30
    package_path: str | None = None
    package_cpath: str | None = None
    import_environment: tuple[str, ...] = ()


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
    log: LogSettings = field(default_factory=LogSettings)

"""The daemon's TOML configuration: dataclasses and a loader with clear errors."""

from config.load import ConfigError, load_config, parse_config
from config.schema import (
    AuthSettings,
    Config,
    ListenerSettings,
    LogSettings,
    LuaSettings,
    PassdbSettings,
    UserdbSettings,
)

__all__ = [
    "AuthSettings",
    "Config",
    "ConfigError",
    "ListenerSettings",
    "LogSettings",
    "LuaSettings",
    "PassdbSettings",
    "UserdbSettings",
    "load_config",
    "parse_config",
]

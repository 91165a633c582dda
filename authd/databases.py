"""Building the passdb and userdb chains from the configuration.

One place maps `[[passdb]]`/`[[userdb]]` sections to drivers and chain rules, so
the daemon and `authd try` cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from authd.cache_glue import parse_cache_key
from authd.lua_db import LuaPassdb, LuaScriptDb, LuaUserdb
from authd.passdb import PassdbChain, PassdbDriver, PassdbEntry, Rule
from authd.passwd_file import PasswdFilePassdb, PasswdFileUserdb
from authd.static_db import StaticPassdb, StaticUserdb
from authd.userdb import PrefetchUserdb, UserdbChain, UserdbDriver, UserdbEntry
from config.schema import Config, PassdbSettings, UserdbSettings
from lua_api.pool import ScriptPool
from lua_api.runtime import StateOptions

#: Drivers whose results Dovecot caches by default, and their default cache_key.
DEFAULT_CACHE_KEYS = {"lua": "%u", "passwd-file": "%u"}
DEFAULT_SCHEMES = {"lua": "PLAIN", "passwd-file": "CRYPT", "static": "PLAIN"}


def _cache_key(configured: str | None, default: str | None) -> bytes | None:
    """`cache_key = ""` turns caching off for a db, as Dovecot's `cache_key=` does."""
    template = default if configured is None else configured
    return parse_cache_key(template) if template else None


def _args(text: str) -> dict[str, str]:
    """Driver arguments in Dovecot's `key=value` syntax (passwd-file: username_format=...)."""
    out = {}
    for token in text.split():
        key, _, value = token.partition("=")
        out[key] = value
    return out


def build_passdbs(
    config: Config, state_options: Callable[[], StateOptions], limiter: trio.CapacityLimiter
) -> PassdbChain:
    return PassdbChain([_passdb(config, index, p, state_options, limiter) for index, p in enumerate(config.passdbs)])


def _passdb(
    config: Config,
    index: int,
    settings: PassdbSettings,
    state_options: Callable[[], StateOptions],
    limiter: trio.CapacityLimiter,
) -> PassdbEntry:
    driver: PassdbDriver
    if settings.driver == "lua":
        assert settings.file is not None
        driver = LuaPassdb(
            settings.file,
            default_scheme=settings.scheme or "PLAIN",
            blocking=settings.blocking,
            options=state_options(),
            workers=config.lua.workers,
            limiter=limiter,
            db_id=index + 1,
            max_states=config.lua.max_states,
            state_idle_timeout=config.lua.state_idle_timeout,
            calls_per_state=settings.calls_per_state,
            debug=config.auth.debug,
            dialect=settings.dialect,
            lua_settings=settings.settings,
            name=settings.name,
        )
    elif settings.driver == "static":
        driver = StaticPassdb(settings.args)
    else:
        assert settings.file is not None
        args = _args(settings.args)
        driver = PasswdFilePassdb(
            str(settings.file),
            scheme=settings.scheme or "CRYPT",
            username_format=args.get("username_format", "%u"),
        )
    return PassdbEntry(
        driver=driver,
        name=settings.name,
        db_id=index + 1,
        cache_key=_cache_key(settings.cache_key, DEFAULT_CACHE_KEYS.get(settings.driver)),
        cache_key_from_script=settings.driver == "lua" and settings.dialect == "2.4",
        default_scheme=settings.scheme or DEFAULT_SCHEMES[settings.driver],
        deny=settings.deny,
        master=settings.master,
        skip=settings.skip,
        # pass = yes is Dovecot's old spelling of result_success = continue
        result_success=Rule.CONTINUE if settings.pass_ else Rule(settings.result_success),
        result_failure=Rule(settings.result_failure),
        result_internalfail=Rule(settings.result_internalfail),
        mechanisms=settings.mechanisms,
        username_filter=settings.username_filter,
    )


def build_userdbs(
    config: Config,
    state_options: Callable[[], StateOptions],
    limiter: trio.CapacityLimiter,
    passdbs: PassdbChain,
) -> UserdbChain:
    return UserdbChain(
        [_userdb(config, index, u, state_options, limiter, passdbs) for index, u in enumerate(config.userdbs)]
    )


def _userdb(
    config: Config,
    index: int,
    settings: UserdbSettings,
    state_options: Callable[[], StateOptions],
    limiter: trio.CapacityLimiter,
    passdbs: PassdbChain,
) -> UserdbEntry:
    driver: UserdbDriver
    if settings.driver == "prefetch":
        driver = PrefetchUserdb(alone=len(config.userdbs) == 1)
    elif settings.driver == "lua":
        assert settings.file is not None
        driver = LuaUserdb(
            settings.file,
            blocking=settings.blocking,
            options=state_options(),
            workers=config.lua.workers,
            limiter=limiter,
            db_id=index + 1,
            max_states=config.lua.max_states,
            state_idle_timeout=config.lua.state_idle_timeout,
            calls_per_state=settings.calls_per_state,
            debug=config.auth.debug,
            dialect=settings.dialect,
            lua_settings=settings.settings,
            name=settings.name,
        )
    elif settings.driver == "static":
        driver = StaticUserdb(settings.args, passdbs)
    else:
        assert settings.file is not None
        driver = PasswdFileUserdb(str(settings.file), username_format=_args(settings.args).get("username_format", "%u"))
    return UserdbEntry(
        driver=driver,
        name=settings.name,
        db_id=index + 1,
        cache_key=_cache_key(settings.cache_key, DEFAULT_CACHE_KEYS.get(settings.driver)),
        cache_key_from_script=settings.driver == "lua" and settings.dialect == "2.4",
        skip=settings.skip,
        result_success=Rule(settings.result_success),
        result_failure=Rule(settings.result_failure),
        result_internalfail=Rule(settings.result_internalfail),
    )


def lua_drivers(passdbs: PassdbChain, userdbs: UserdbChain) -> list[LuaScriptDb]:
    """The Lua passdbs and userdbs of a generation (a script used by both appears twice)."""
    entries: list[PassdbEntry | UserdbEntry] = [*passdbs.entries, *userdbs.entries]
    return [e.driver for e in entries if isinstance(e.driver, LuaScriptDb)]


def lua_pools(passdbs: PassdbChain, userdbs: UserdbChain) -> list[tuple[str, ScriptPool]]:
    """The Lua state pools of a generation, each with its script's path (the metrics' label).

    What the authd_lua_* metrics read: `pool.states` and `pool.busy` (plain ints, free to
    read at scrape time; a passdb and a userdb of one script are two pools, sum them),
    and `pool.on_wait`, called with the seconds a call waited for a state, for each
    call that had to wait (a call that found a free state costs nothing).
    """
    return [(str(driver.path), driver.pool) for driver in lua_drivers(passdbs, userdbs)]

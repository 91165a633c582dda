"""The `[[dict]]` drivers authd opens for authd.dict(name): memory (lua_api.dict), file (dict_file) and redis.
The redis driver lays keys out as Dovecot's dict-redis does, so data either writes reads back the same.

Dovecot's mapping (src/lib-dict/dict-redis.c): `shared/REST` is `PREFIX REST` and
`priv/REST` is `PREFIX USER/REST`, where a username that contains '/' is escaped
('/' as `\\-`, '\\' as `\\\\`; a username without '/' is used as it is). Values are
plain strings (GET, SET, DEL, INCRBY); a transaction's expire_secs (or the dict's
`expire`, Dovecot's redis_expire) sets EXPIRE on every key it writes. Like Dovecot's,
the driver cannot iterate.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import coredis
import structlog
import trio
from coredis.retry import NoRetryPolicy

from authd.state.dict_file import FileDict
from authd.state.redis import CONNECT_TIMEOUT, RETRY_INTERVAL, SHUTDOWN_NOISE, _leaves, _only_cancellation
from config.schema import DictSettings
from lua_api.dict import ChangeOp, DictChange, DictDriver, DictError, DictRow, MemoryDict

log = structlog.get_logger("authd.dict")

#: Dovecot's text for what a driver does not implement (dict-fail.c).
UNSUPPORTED = "Unsupported operation (dict does not support this feature)"

#: KEYS the full keys; ARGV per key: op (set/unset/inc), value or diff, expire secs (0: none).
#: Every INCRBY target is checked first, so a commit applies all of its changes or none.
COMMIT = (
    "for i, key in ipairs(KEYS) do\n"
    "  if ARGV[3 * i - 2] == 'inc' then\n"
    "    local v = redis.call('GET', key)\n"
    "    if v and not string.match(v, '^%-?%d+$') then\n"
    "      return redis.error_reply('ERR value is not an integer or out of range')\n"
    "    end\n"
    "  end\n"
    "end\n"
    "for i, key in ipairs(KEYS) do\n"
    "  local op, arg, expire = ARGV[3 * i - 2], ARGV[3 * i - 1], tonumber(ARGV[3 * i])\n"
    "  if op == 'unset' then redis.call('DEL', key)\n"
    "  else\n"
    "    if op == 'set' then redis.call('SET', key, arg) else redis.call('INCRBY', key, arg) end\n"
    "    if expire > 0 then redis.call('EXPIRE', key, expire) end\n"
    "  end\n"
    "end\n"
    "return 1\n"
)


def redis_key(prefix: bytes, key: bytes, username: bytes | None) -> bytes:
    """Dovecot's redis_dict_get_full_key()."""
    if key.startswith(b"shared/"):
        rest = key[len(b"shared/") :]
    else:
        user = username or b""
        if b"/" in user:
            user = user.replace(b"\\", b"\\\\").replace(b"/", b"\\-")
        rest = user + b"/" + key[len(b"priv/") :]
    return prefix + rest


class RedisDict:
    """A `driver = "redis"` dict. run() keeps one client for calls in the daemon's loop; a call
    from anywhere else (script loading before the loop serves, a private loop) gets its own."""

    def __init__(self, settings: DictSettings) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix.encode()
        self._client: Any = None
        self._token: trio.lowlevel.TrioToken | None = None

    def _new_client(self) -> Any:
        return coredis.Redis.from_url(
            self.settings.url,
            connect_timeout=CONNECT_TIMEOUT,
            retry_policy=NoRetryPolicy(),
            decode_responses=False,
        )

    async def run(self) -> None:
        """Hold the shared client until cancelled (set up again if it fails as a whole)."""
        while True:
            try:
                async with self._new_client() as client:
                    self._client, self._token = client, trio.lowlevel.current_trio_token()
                    await trio.sleep_forever()
            except Exception as exc:
                if not isinstance(exc, SHUTDOWN_NOISE):
                    log.error("dict.client_failed", dict=self.settings.name, message=f"{type(exc).__name__}: {exc}")
            except BaseException as exc:
                if _only_cancellation(exc):  # coredis's cleanup under trio may add anyio errors
                    return
                raise
            finally:
                self._client = None
            await trio.sleep(RETRY_INTERVAL)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        if self._client is not None and self._token is trio.lowlevel.current_trio_token():
            yield self._client
            return
        async with self._new_client() as client:
            yield client

    async def _run(self, command: Any) -> Any:
        """Run one command within the dict's timeout; DictError with what went wrong."""
        timeout = self.settings.timeout
        try:
            with trio.fail_after(timeout):
                async with self._connection() as client:
                    return await command(client)
        except BaseException as exc:  # the one-shot client's exit may group what happened
            leaves = list(_leaves(exc))
            if any(isinstance(leaf, trio.Cancelled) for leaf in leaves):
                raise
            for leaf in leaves:
                if isinstance(leaf, trio.TooSlowError):
                    millis = round(timeout * 1000)
                    raise DictError(f"redis: Commit timed out in {millis // 1000}.{millis % 1000:03d} secs") from None
                if isinstance(leaf, coredis.exceptions.ResponseError):
                    raise DictError(f"redis: {leaf}") from None
                if isinstance(leaf, (OSError, coredis.exceptions.RedisError, *SHUTDOWN_NOISE)):
                    raise DictError(f"redis: {type(leaf).__name__}: {leaf}") from None
            raise

    async def lookup(self, key: bytes, username: bytes | None) -> tuple[bytes, ...] | None:
        full = redis_key(self.prefix, key, username)
        value = await self._run(lambda client: client.get(full))
        return None if value is None else (bytes(value),)

    async def iterate(self, path: bytes, flags: int, username: bytes | None) -> list[DictRow]:
        raise DictError(UNSUPPORTED)

    async def commit(self, changes: Sequence[DictChange], username: bytes | None, expire_secs: int) -> None:
        if not changes:
            return
        keys: list[bytes] = []
        args: list[bytes] = []
        for change in changes:
            keys.append(redis_key(self.prefix, change.key, username))
            secs = change.expire_secs or expire_secs or self.settings.expire
            value = change.value if change.op is ChangeOp.SET else str(change.diff).encode()
            args += [change.op.value.encode(), value, str(secs).encode()]
        await self._run(lambda client: client.eval(COMMIT, keys=keys, args=args))

    async def aclose(self) -> None:
        return None


def open_dicts(dicts: Sequence[DictSettings]) -> dict[str, DictDriver]:
    """A driver for every [[dict]], by name."""
    drivers: dict[str, DictDriver] = {}
    for settings in dicts:
        if settings.driver == "redis":
            drivers[settings.name] = RedisDict(settings)
        elif settings.driver == "file" and settings.path is not None:
            drivers[settings.name] = FileDict(settings.path)
        else:
            drivers[settings.name] = MemoryDict(settings.max_keys)
    return drivers


async def run_dicts(drivers: Mapping[str, DictDriver]) -> None:
    """Keep the redis dicts' clients until cancelled."""
    async with trio.open_nursery() as nursery:
        for driver in drivers.values():
            if isinstance(driver, RedisDict):
                nursery.start_soon(driver.run)

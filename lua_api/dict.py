"""`authd.dict(name)` for auth scripts: configured dicts with Dovecot's Lua dict object API.
The drivers' interface (DictDriver), the memory driver, and the extension that runs their calls in trio.

Dovecot's lib-dict Lua binding (dict-lua.c and friends) gives scripts a dict
object but no way to get one; authd's constructor is `authd.dict("name")`, for
the `[[dict]]` blocks of the config. The object's methods (lookup, iterate,
transaction_begin; set, unset, set_timestamp, set_non_atomic, commit, rollback
on a transaction) keep Dovecot's names, argument counts, return shapes and error
texts (lua_api/dict.lua); authd adds `txn:atomic_inc(key, diff [, expire_secs])`.
Keys start with `shared/` or `priv/` (then with a username). Drivers never block:
every call is awaited in the daemon's event loop.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from lua_api.blocking import wait_for

if TYPE_CHECKING:
    from lua_api.runtime import LuaState

# Dovecot's enum dict_iterate_flags.
ITERATE_FLAG_RECURSE = 0x01
ITERATE_FLAG_SORT_BY_KEY = 0x02
ITERATE_FLAG_SORT_BY_VALUE = 0x04
ITERATE_FLAG_NO_VALUE = 0x08
ITERATE_FLAG_EXACT_KEY = 0x10
ITERATE_FLAG_ASYNC = 0x20

#: Keys a memory dict holds at most (expired ones are dropped first when it is full).
DEFAULT_MAX_KEYS = 100_000


class DictError(Exception):
    """A driver failed; the message is what the script's error says (Dovecot's texts where it has one)."""


class ChangeOp(enum.Enum):
    SET = "set"
    UNSET = "unset"
    INC = "inc"


@dataclass(frozen=True)
class DictChange:
    """One change of a transaction: set to `value`, unset, or add `diff` (expiring after `expire_secs`, 0: never)."""

    op: ChangeOp
    key: bytes
    value: bytes = b""
    diff: int = 0
    expire_secs: int = 0


@dataclass(frozen=True)
class DictRow:
    """One row of an iteration: the key and its values (none with ITERATE_FLAG_NO_VALUE)."""

    key: bytes
    values: tuple[bytes, ...]


class DictDriver(Protocol):
    """Where a `[[dict]]` keeps its data. Keys are full (`shared/...`, `priv/...`); `username`
    is the script's (needed for `priv/`). Every method raises DictError on failure."""

    async def lookup(self, key: bytes, username: bytes | None) -> tuple[bytes, ...] | None:
        """The key's values, or None if it is not there."""

    async def iterate(self, path: bytes, flags: int, username: bytes | None) -> list[DictRow]:
        """The rows under `path`, as Dovecot's dict-file selects them by `flags`."""

    async def commit(self, changes: Sequence[DictChange], username: bytes | None, expire_secs: int) -> None:
        """Apply every change or none; `expire_secs` (0: never) for keys a change has none for."""

    async def aclose(self) -> None:
        """Release connections (the daemon is stopping)."""


def select_rows(items: list[tuple[bytes, bytes]], path: bytes, flags: int) -> list[DictRow]:
    """Dovecot's dict-file iteration over (key, value) pairs: keys under `path` (with RECURSE all
    of them, with EXACT_KEY only `path` itself, otherwise those without a further '/'), sorted as asked."""
    rows: list[tuple[bytes, bytes]] = []
    for key, value in items:
        if not key.startswith(path):
            continue
        rest = key[len(path) :]
        if flags & ITERATE_FLAG_RECURSE:
            pass
        elif flags & ITERATE_FLAG_EXACT_KEY:
            if rest:
                continue
        elif b"/" in rest:
            continue
        rows.append((key, value))
    if flags & ITERATE_FLAG_SORT_BY_KEY:
        rows.sort(key=lambda row: row[0])
    elif flags & ITERATE_FLAG_SORT_BY_VALUE:
        rows.sort(key=lambda row: row[1])
    no_value = bool(flags & ITERATE_FLAG_NO_VALUE)
    return [DictRow(key, () if no_value else (value,)) for key, value in rows]


class MemoryDict:
    """A dict in this process (`driver = "memory"`): gone at restart, not shared with other
    instances. `priv/` keys are kept apart per username; at most `max_keys` keys."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS, clock: Any = time.monotonic) -> None:
        self.max_keys = max_keys
        self._clock = clock
        #: (username or b"", key) -> (value, expiry on the clock or None)
        self._data: dict[tuple[bytes, bytes], tuple[bytes, float | None]] = {}

    @staticmethod
    def _slot(key: bytes, username: bytes | None) -> tuple[bytes, bytes]:
        return (username or b"", key) if key.startswith(b"priv/") else (b"", key)

    def _get(self, slot: tuple[bytes, bytes], now: float) -> bytes | None:
        entry = self._data.get(slot)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= now:
            del self._data[slot]
            return None
        return entry[0]

    async def lookup(self, key: bytes, username: bytes | None) -> tuple[bytes, ...] | None:
        value = self._get(self._slot(key, username), self._clock())
        return None if value is None else (value,)

    async def iterate(self, path: bytes, flags: int, username: bytes | None) -> list[DictRow]:
        now = self._clock()
        user = username or b"" if path.startswith(b"priv/") else b""
        items = []
        for slot in list(self._data):
            if slot[0] == user:
                value = self._get(slot, now)
                if value is not None:
                    items.append((slot[1], value))
        return select_rows(items, path, flags)

    async def commit(self, changes: Sequence[DictChange], username: bytes | None, expire_secs: int) -> None:
        now = self._clock()
        staged: dict[tuple[bytes, bytes], tuple[bytes, float | None] | None] = {}
        for change in changes:
            slot = self._slot(change.key, username)
            secs = change.expire_secs or expire_secs
            expiry = now + secs if secs > 0 else None
            if change.op is ChangeOp.UNSET:
                staged[slot] = None
                continue
            if change.op is ChangeOp.SET:
                staged[slot] = (change.value, expiry)
                continue
            current = staged[slot] if slot in staged else self._entry(slot, now)
            try:
                number = int(current[0]) if current is not None else 0
            except ValueError:
                raise DictError(f"Key {change.key.decode('utf-8', 'replace')} is not a number") from None
            staged[slot] = (str(number + change.diff).encode(), expiry)
        adding = sum(1 for slot, entry in staged.items() if entry is not None and slot not in self._data)
        if adding and len(self._data) + adding > self.max_keys:
            self._expire(now)
            if len(self._data) + adding > self.max_keys:
                raise DictError(f"dict is full (max_keys = {self.max_keys})")
        for slot, entry in staged.items():
            if entry is None:
                self._data.pop(slot, None)
            else:
                self._data[slot] = entry

    def _entry(self, slot: tuple[bytes, bytes], now: float) -> tuple[bytes, float | None] | None:
        value = self._get(slot, now)
        return None if value is None else self._data[slot]

    def _expire(self, now: float) -> None:
        for slot in [s for s, (_, expiry) in self._data.items() if expiry is not None and expiry <= now]:
            del self._data[slot]

    async def aclose(self) -> None:
        return None


class DictExtension:
    """`authd.dict(name)` and `dovecot.dict` in every Lua state, over the named drivers."""

    kind = b"dict"

    def __init__(self, dicts: Mapping[str, DictDriver]) -> None:
        self.dicts = dict(dicts)

    def install(self, state: LuaState) -> None:
        names = state.lua.table_from([name.encode() for name in self.dicts])
        state.lua.execute(_LUA_CODE, state.api[b"yield_io"], self.kind, names, name="=authd-dict")

    async def perform(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        name = payload.get(b"dict")
        driver = self.dicts.get(name.decode("utf-8", "replace")) if isinstance(name, bytes) else None
        if driver is None:
            return {b"error": b"no such dict"}
        op = payload.get(b"op")
        username = payload.get(b"username")
        user = username if isinstance(username, bytes) else None
        try:
            if op == b"lookup":
                values = await driver.lookup(payload[b"key"], user)
                return {} if values is None else {b"values": list(values)}
            if op == b"iterate":
                rows = await driver.iterate(payload[b"path"], int(payload[b"flags"]) | ITERATE_FLAG_ASYNC, user)
                return {b"rows": [[row.key, list(row.values)] for row in rows]}
            changes = payload.get(b"changes") or {}
            await driver.commit(
                [_change(changes[i]) for i in range(1, len(changes) + 1)], user, int(payload.get(b"expire_secs") or 0)
            )
            return {}
        except DictError as exc:
            return {b"error": str(exc).encode()}

    def perform_blocking(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """A call where Lua cannot yield: wait here (lua_api.blocking.wait_for says how)."""
        return wait_for(self.perform, self.perform, payload)

    async def aclose(self) -> None:
        for driver in self.dicts.values():
            await driver.aclose()


def _change(change: Mapping[bytes, Any]) -> DictChange:
    op = ChangeOp(change[b"op"].decode())
    return DictChange(
        op,
        change[b"key"],
        value=change.get(b"value") or b"",
        diff=int(change.get(b"diff") or 0),
        expire_secs=int(change.get(b"expire_secs") or 0),
    )


#: Read once at import: a service that drops privileges later may not read it again.
_LUA_CODE = resources.files("lua_api").joinpath("dict.lua").read_bytes()

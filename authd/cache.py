"""Dovecot's auth cache: passdb and userdb results kept for a while, bounded in size.

Same semantics as auth-cache.c/passdb-cache.c: keys are the passdb/userdb cache_key
template expanded per request (prefixed with P/U and the db id), values are the
stored password plus the fields that lookup set. Negative entries (user unknown)
have their own TTL. A password mismatch against an entry whose last use succeeded
means the password probably changed: the cache is bypassed. When the backend
fails internally, an expired entry is still used. Internal failures are never cached.
The size bound counts what the entries really cost in memory: their Python objects and
the table holding them (a "2M" cache holds 2 MB, not 2 MB of keys and values).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def _cost(obj: object) -> int:
    """The memory one object holds: its size, rounded up to the allocator's 16-byte blocks."""
    return (sys.getsizeof(obj) + 15) & ~15


@dataclass(slots=True)
class CacheNode:
    key: bytes
    value: bytes
    created: float
    last_success: bool

    @property
    def size(self) -> int:
        """The node, its key, value and timestamp objects (the table's slot is counted by
        AuthCache; `last_success` is one of the two shared bools)."""
        return _cost(self) + _cost(self.key) + _cost(self.value) + _cost(self.created)


@dataclass(frozen=True)
class CacheHit:
    node: CacheNode
    expired: bool
    negative_expired: bool

    @property
    def value(self) -> bytes:
        return self.node.value


class AuthCache:
    """An LRU of cache nodes bounded by `max_size` bytes of memory, its table's included."""

    def __init__(self, max_size: int, ttl: float, negative_ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.max_size = max_size
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        self._nodes: OrderedDict[bytes, CacheNode] = OrderedDict()  # last = most recently used
        #: What the nodes cost, without the table (which sys.getsizeof tells as it is).
        self._entries_size = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def size(self) -> int:
        """The bytes of memory the cache holds: its nodes and its table (with the list that
        orders it), which grows in steps as entries are added. An empty cache holds nothing."""
        return self._entries_size + _cost(self._nodes) if self._nodes else 0

    def lookup(self, key: bytes) -> CacheHit | None:
        node = self._nodes.get(key)
        if node is None:
            self.misses += 1
            return None
        now = self.clock()
        ttl = self.negative_ttl if node.value == b"" else self.ttl
        expired = node.created < now - ttl
        if expired:
            self.misses += 1
        else:
            self._nodes.move_to_end(key)
            self.hits += 1
        return CacheHit(node, expired, node.created < now - self.negative_ttl)

    def insert(self, key: bytes, value: bytes, *, last_success: bool) -> None:
        if value == b"" and self.negative_ttl == 0:
            return  # negative entries are not cached
        node = CacheNode(key, value, self.clock(), last_success)
        self.remove(key)
        cost = node.size
        if cost > self.max_size:
            return  # it could never fit: keep the others
        while self._nodes and self.size + cost > self.max_size:
            self._evict_oldest()
        self._nodes[key] = node
        self._entries_size += cost
        # Adding the node may have grown the table; make room for that too.
        while len(self._nodes) > 1 and self.size > self.max_size:
            self._evict_oldest()
        if self.size > self.max_size:  # not even the one node fits with its table
            self.remove(key)

    def _evict_oldest(self) -> None:
        _, evicted = self._nodes.popitem(last=False)
        self._entries_size -= evicted.size

    def remove(self, key: bytes) -> None:
        node = self._nodes.pop(key, None)
        if node is not None:
            self._entries_size -= node.size
            if not self._nodes:
                self._nodes.clear()  # an emptied table keeps its size until cleared

    def clear(self) -> int:
        count = len(self._nodes)
        self._nodes.clear()
        self._entries_size = 0
        return count

    def clear_users(self, users: Iterable[bytes]) -> int:
        """Drop entries whose key starts like one of these users' (auth_cache_clear_users)."""
        names = list(users)
        doomed = [key for key in self._nodes if any(_key_is_user(key, name) for name in names)]
        for key in doomed:
            self.remove(key)
        return len(doomed)


def _key_is_user(key: bytes, user: bytes) -> bool:
    """Keys look like `P<id>[+master]\\t<expanded template>`; match the template's start."""
    if key[:1] not in (b"P", b"U"):
        return False
    rest = key[1:].lstrip(b"0123456789")
    if rest.startswith(b"+"):
        tab = rest.find(b"\t")
        rest = rest[tab:] if tab >= 0 else b""
    if not rest.startswith(b"\t"):
        return False
    data = rest[1:]
    return data.startswith(user) and data[len(user) : len(user) + 1] in (b"", b"\t")

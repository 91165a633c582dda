"""`dovecot.dns_client` for auth scripts: DNS lookups that yield to authd's event loop.

Dovecot's auth scripts have no DNS API. This one follows the shape of Dovecot's
lib-lua dns_client object (lib-dns-client/dns-lua.c): `dns_client:lookup(host)`
returns a table of address strings, or nil, an error text and a getaddrinfo
error code (EAI_NONAME is -2, as glibc defines it). authd adds
`lookup_a(name)` (A records only, for DNSBL checks such as
2.0.0.127.zen.spamhaus.org) and `lookup_txt(name)` (TXT records, each record's
strings joined), with the same failure values.

lookup() resolves like getaddrinfo(): IP literals as they are, then the hosts
file, then A and AAAA records (IPv4 addresses first) with the resolv.conf search
list. Queries go through dnspython's async resolver on trio, with a timeout for
the whole lookup; like every I/O of a call they also count against [lua]
call_timeout.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import trio

from lua_api.blocking import wait_for

if TYPE_CHECKING:
    from lua_api.runtime import LuaState

#: glibc's getaddrinfo() error codes and gai_strerror() texts.
EAI_NONAME = (-2, "Name or service not known")
EAI_AGAIN = (-3, "Temporary failure in name resolution")
EAI_FAIL = (-4, "Non-recoverable failure in name resolution")
EAI_NODATA = (-5, "No address associated with hostname")


class LookupFailed(Exception):
    """A lookup that ends in nil, error, code for the script."""

    def __init__(self, failure: tuple[int, str]) -> None:
        super().__init__(failure[1])
        self.code, self.text = failure


def _failure(exc: Exception) -> tuple[int, str]:
    """The getaddrinfo() error a resolver exception corresponds to."""
    if isinstance(exc, dns.resolver.NXDOMAIN | dns.exception.SyntaxError | dns.name.NameTooLong | UnicodeError):
        return EAI_NONAME  # also names that cannot exist, like "invalid..name"
    if isinstance(exc, dns.resolver.NoAnswer):
        return EAI_NODATA
    if isinstance(exc, dns.exception.Timeout | dns.resolver.NoNameservers):
        return EAI_AGAIN  # no answer in time, or SERVFAIL/REFUSED from every server
    return EAI_FAIL


@dataclass
class _HostsFile:
    """The hosts file, read again when it changes."""

    path: Path
    mtime: float = -1.0
    entries: Mapping[str, tuple[str, ...]] | None = None

    def lookup(self, name: str) -> tuple[str, ...]:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return ()
        if self.entries is None or mtime != self.mtime:
            self.entries, self.mtime = self._read(), mtime
        return self.entries.get(name.lower().rstrip("."), ())

    def _read(self) -> dict[str, tuple[str, ...]]:
        entries: dict[str, list[str]] = {}
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return {}
        for line in text.splitlines():
            fields = line.partition("#")[0].split()
            if len(fields) < 2:
                continue
            try:
                address = ipaddress.ip_address(fields[0].partition("%")[0]).compressed
            except ValueError:
                continue
            for name in fields[1:]:
                known = entries.setdefault(name.lower().rstrip("."), [])
                if address not in known:
                    known.append(address)
        return {name: tuple(addresses) for name, addresses in entries.items()}


class DnsExtension:
    """`dovecot.dns_client` for every Lua state of a daemon, with one shared resolver.

    `nameservers` and `port` replace resolv.conf (tests point them at a local
    server); `timeout` bounds each lookup; `hosts_file` is what lookup() reads
    before asking DNS (None: no hosts file).
    """

    kind = b"dns"

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        hosts_file: Path | None = Path("/etc/hosts"),
    ) -> None:
        self.timeout = timeout
        self._nameservers = list(nameservers) if nameservers is not None else None
        self._port = port
        self._hosts = _HostsFile(hosts_file) if hosts_file is not None else None
        self._resolver: dns.asyncresolver.Resolver | None = None

    def install(self, state: LuaState) -> None:
        state.lua.execute(_LUA_CODE, state.api[b"yield_io"], self.kind, name="=authd-dns")

    def resolver(self) -> dns.asyncresolver.Resolver:
        """The resolver, made on first use (resolv.conf may be missing until then)."""
        if self._resolver is None:
            resolver = dns.asyncresolver.Resolver(configure=self._nameservers is None)
            if self._nameservers is not None:
                resolver.nameservers = self._nameservers
                resolver.port = self._port
                resolver.domain, resolver.search = dns.name.root, []
            resolver.lifetime = self.timeout
            resolver.timeout = min(resolver.timeout, self.timeout)
            resolver.cache = dns.resolver.Cache()
            self._resolver = resolver
        return self._resolver

    async def perform(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        op, name = payload.get(b"op"), payload.get(b"name")
        try:
            if not isinstance(name, bytes) or not name or b"\0" in name:
                raise LookupFailed(EAI_NONAME)
            text = name.decode("utf-8")
            if op == b"lookup":
                values = await self.lookup(text)
            elif op == b"a":
                values = await self._query(text, dns.rdatatype.A, search=False)
            else:
                values = await self._query(text, dns.rdatatype.TXT, search=False)
        except UnicodeError:
            return {b"error": EAI_NONAME[1].encode(), b"code": EAI_NONAME[0]}
        except LookupFailed as exc:
            return {b"error": exc.text.encode(), b"code": exc.code}
        return {b"values": values}

    async def lookup(self, host: str) -> list[bytes]:
        """getaddrinfo()-like: literal, hosts file, then A and AAAA. Raises LookupFailed."""
        try:
            return [ipaddress.ip_address(host).compressed.encode()]
        except ValueError:
            pass
        known = self._hosts.lookup(host) if self._hosts is not None else ()
        if known:
            return [address.encode() for address in known]
        answers: dict[dns.rdatatype.RdataType, list[bytes] | LookupFailed] = {}

        async def query(rdtype: dns.rdatatype.RdataType) -> None:
            try:
                answers[rdtype] = await self._query(host, rdtype, search=True)
            except LookupFailed as exc:
                answers[rdtype] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(query, dns.rdatatype.A)
            nursery.start_soon(query, dns.rdatatype.AAAA)
        found = [a for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for a in _values(answers[rdtype])]
        if found:
            return found
        failures = [answer for answer in answers.values() if isinstance(answer, LookupFailed)]
        codes = {failure.code for failure in failures}
        for failure in (EAI_AGAIN, EAI_FAIL, EAI_NODATA):
            if failure[0] in codes:
                raise LookupFailed(failure)
        raise LookupFailed(EAI_NONAME)

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType, *, search: bool) -> list[bytes]:
        try:
            answer = await self.resolver().resolve(name, rdtype, search=search)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise LookupFailed(_failure(exc)) from None
        if rdtype == dns.rdatatype.TXT:
            return [b"".join(rdata.strings) for rdata in answer]
        return [rdata.address.encode() for rdata in answer]

    def perform_blocking(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """A lookup where Lua cannot yield: wait here (lua_api.blocking.wait_for says how)."""
        return wait_for(self.perform, self.perform, payload)


def _values(answer: list[bytes] | LookupFailed) -> list[bytes]:
    return answer if isinstance(answer, list) else []


#: Read once at import: a service that drops privileges later may not read it again.
_LUA_CODE = resources.files("lua_api").joinpath("dns.lua").read_bytes()

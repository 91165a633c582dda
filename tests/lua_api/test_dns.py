"""dovecot.dns_client against a real DNS server on 127.0.0.1 (lua_api/dns.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from lua_api.dns import DnsExtension
from lua_api.pool import thread_executor
from lua_api.runtime import Executor, LuaState, StateOptions, drive, run_in_loop
from tests.lua_api.conftest import RecordingHost

ZONE: dict[str, dict[str, list[str]]] = {
    "host.test.": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"]},
    "v6only.test.": {"AAAA": ["2001:db8::6"]},
    "txt.test.": {"TXT": ['"v=spf1 -all"', '"part1" "part2"']},
    "2.0.0.127.zen.test.": {"A": ["127.0.0.2"], "TXT": ['"listed, see https://example.org"']},
}
SILENT = {"slow.test."}  # never answered: the lookup times out
SERVFAIL = {"broken.test."}


class DnsServer:
    """A UDP DNS server on 127.0.0.1 answering from ZONE, in a thread of its own.

    A thread rather than a trio task: lookups that block the event loop (the
    blocking fallback) must still get answers.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed
            query = dns.message.from_wire(data)
            question = query.question[0]
            name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if name in SILENT:
                continue
            response = dns.message.make_response(query)
            if name in SERVFAIL:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name not in ZONE:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif rdtype in ZONE[name]:
                response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, ZONE[name][rdtype]))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text(
        "# comment\n127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n"
        "192.0.2.50 Mail.Example.ORG mail  # alias\nnot-an-ip bogus.test\n"
    )
    return path


def state_with(server: DnsServer, hosts_file: Path | None = None, timeout: float = 5.0) -> LuaState:
    ext = DnsExtension(nameservers=["127.0.0.1"], port=server.port, hosts_file=hosts_file, timeout=timeout)
    return LuaState(RecordingHost(), StateOptions(extensions=(ext,)))


def python(state: LuaState, value: Any) -> Any:
    if state.module.lua_type(value) == "table":
        return [python(state, value[i]) for i in range(1, len(value) + 1)]
    return value


async def lua(state: LuaState, expr: str, run: Executor = run_in_loop) -> list[Any]:
    """Evaluate `expr` in a call (a coroutine, as entry points run); all its values."""
    fn = state.lua.eval(f"function() result = table.pack({expr}) end".encode())
    outcome = await drive(state, fn, b"none", run)
    assert outcome.ok, outcome.error
    packed = state.lua.globals()[b"result"]
    return [python(state, packed[i]) for i in range(1, packed[b"n"] + 1)]


HOST_TEST = [b"192.0.2.1", b"192.0.2.2", b"2001:db8::1"]


def in_family_order(addresses: list[bytes]) -> list[bytes]:
    """DNS gives records in any order; lookup() keeps IPv4 before IPv6."""
    v4 = [a for a in addresses if b":" not in a]
    assert addresses == v4 + [a for a in addresses if b":" in a]
    return sorted(v4) + sorted(a for a in addresses if b":" in a)


async def test_lookup_returns_a_then_aaaa(server: DnsServer) -> None:
    state = state_with(server)
    [addresses] = await lua(state, 'dovecot.dns_client:lookup("host.test")')
    assert in_family_order(addresses) == HOST_TEST
    assert await lua(state, 'dovecot.dns_client:lookup("v6only.test")') == [[b"2001:db8::6"]]
    assert {("host.test.", "A"), ("host.test.", "AAAA")} <= set(server.queries)


async def test_lookup_failures_are_getaddrinfo_errors(server: DnsServer) -> None:
    state = state_with(server)
    assert await lua(state, 'dovecot.dns_client:lookup("nosuch.test")') == [
        None,
        b"Name or service not known",
        -2,
    ]
    assert await lua(state, 'dovecot.dns_client:lookup("txt.test")') == [
        None,
        b"No address associated with hostname",
        -5,
    ]
    assert await lua(state, 'dovecot.dns_client:lookup("broken.test")') == [
        None,
        b"Temporary failure in name resolution",
        -3,
    ]
    assert await lua(state, 'dovecot.dns_client:lookup("invalid..name")') == [
        None,
        b"Name or service not known",
        -2,
    ]
    assert await lua(state, 'dovecot.dns_client:lookup("")') == [None, b"Name or service not known", -2]


async def test_lookup_times_out(server: DnsServer) -> None:
    state = state_with(server, timeout=0.5)
    started = time.monotonic()
    assert await lua(state, 'dovecot.dns_client:lookup("slow.test")') == [
        None,
        b"Temporary failure in name resolution",
        -3,
    ]
    assert 0.4 < time.monotonic() - started < 3


async def test_txt_and_a_records(server: DnsServer) -> None:
    state = state_with(server)
    [records] = await lua(state, 'dovecot.dns_client:lookup_txt("txt.test")')
    assert sorted(records) == [b"part1part2", b"v=spf1 -all"]
    # a DNSBL check: listed, with its reason
    assert await lua(state, 'dovecot.dns_client:lookup_a("2.0.0.127.zen.test")') == [[b"127.0.0.2"]]
    assert await lua(state, 'dovecot.dns_client:lookup_txt("2.0.0.127.zen.test")') == [
        [b"listed, see https://example.org"]
    ]
    # not listed
    assert await lua(state, 'dovecot.dns_client:lookup_a("3.0.0.127.zen.test")') == [
        None,
        b"Name or service not known",
        -2,
    ]
    assert await lua(state, 'dovecot.dns_client:lookup_a("v6only.test")') == [
        None,
        b"No address associated with hostname",
        -5,
    ]


async def test_literals_and_hosts_file(server: DnsServer, hosts_file: Path) -> None:
    state = state_with(server, hosts_file)
    server.queries.clear()
    assert await lua(state, 'dovecot.dns_client:lookup("localhost")') == [[b"127.0.0.1", b"::1"]]
    assert await lua(state, 'dovecot.dns_client:lookup("MAIL.example.org.")') == [[b"192.0.2.50"]]
    assert await lua(state, 'dovecot.dns_client:lookup("192.0.2.9")') == [[b"192.0.2.9"]]
    assert await lua(state, 'dovecot.dns_client:lookup("2001:DB8:0::9")') == [[b"2001:db8::9"]]
    assert server.queries == []  # none of these asked DNS
    assert await lua(state, 'dovecot.dns_client:lookup("bogus.test")') == [
        None,
        b"Name or service not known",
        -2,
    ]


async def test_system_hosts_file_has_localhost() -> None:
    state = LuaState(RecordingHost(), StateOptions(extensions=(DnsExtension(),)))
    [addresses] = await lua(state, 'dovecot.dns_client:lookup("localhost")')
    assert b"127.0.0.1" in addresses or b"::1" in addresses


async def test_blocking_fallback(server: DnsServer) -> None:
    # A table.sort comparator cannot yield: the lookup blocks, in the loop's thread
    # (blocking = no) and in a worker thread (blocking = yes).
    expr = """(function()
      local out
      table.sort({2, 1}, function(a, b) out = {dovecot.dns_client:lookup("host.test")}; return a < b end)
      return out[1]
    end)()"""
    state = state_with(server)
    [addresses] = await lua(state, expr)
    assert in_family_order(addresses) == HOST_TEST
    [addresses] = await lua(state, expr, thread_executor(trio.CapacityLimiter(1)))
    assert in_family_order(addresses) == HOST_TEST


async def test_lookups_yield(server: DnsServer) -> None:
    # Two states wait for slow lookups at the same time: neither holds the loop.
    states = [state_with(server, timeout=0.5) for _ in range(2)]
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for state in states:
            nursery.start_soon(lua, state, 'dovecot.dns_client:lookup("slow.test")')
    assert time.monotonic() - started < 0.9


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("dovecot.dns_client.lookup()", "expected 2 to 3 arguments, got 0"),
        ('dovecot.dns_client:lookup("a", nil, nil)', "expected 2 to 3 arguments, got 4"),
        (
            'dovecot.dns_client.lookup({}, "x")',
            "script.lua:1: bad argument #1 to 'lookup' (dns_client expected, got table)",
        ),
        ("dovecot.dns_client:lookup_a({})", "script.lua:1: bad argument #1 to 'lookup_a' (string expected, got table)"),
    ],
)
async def test_argument_errors(server: DnsServer, expr: str, message: str) -> None:
    state = state_with(server)
    fn = state.lua.compile(expr.encode(), name="@script.lua")
    outcome = await drive(state, fn, b"none", run_in_loop)
    assert not outcome.ok and outcome.error.startswith(message + "\nstack traceback:")


async def test_object_shape(server: DnsServer) -> None:
    state = state_with(server)
    assert await lua(
        state, "type(dovecot.dns_client), next(dovecot.dns_client), type(dovecot.dns_client.lookup_txt)"
    ) == [b"table", None, b"function"]

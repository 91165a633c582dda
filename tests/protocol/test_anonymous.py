"""protocol.mechanisms.anonymous: ANONYMOUS as Dovecot 2.3 (protocol.md §2.4)."""

from __future__ import annotations

import pytest

from protocol.events import AnonymousLoggedIn, Field
from protocol.mechanisms import Anonymous
from protocol.mechanisms.base import AnonymousLogin, Environment
from tests.protocol.replay import connect, replay


@pytest.mark.parametrize("name", ["doc-anonymous", "anonymous"])
def test_transcripts(name: str) -> None:
    assert replay(name) > 0


@pytest.mark.parametrize("trace", [b"", b"trace-info@example", b"a\x00b\x01c\tx"])
def test_any_trace_logs_in(trace: bytes) -> None:
    assert Anonymous(Environment()).step(trace) == AnonymousLogin(trace)


def test_through_the_connection() -> None:
    conn = connect("ANONYMOUS")
    conn.receive_data(b"AUTH\t1\tANONYMOUS\tservice=imap\tresp=YQBi\n")
    assert conn.begin(1) == [AnonymousLoggedIn(1, b"a\x00b")]
    conn.succeed(1, b"anonymous", trailer=[Field(b"anonymous")])
    assert conn.data_to_send() == b"OK\t1\tuser=anonymous\tanonymous\n"

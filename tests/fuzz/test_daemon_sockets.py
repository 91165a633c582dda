"""A bounded socket fuzz of a running authd: mutated transcripts on every listener type.

The transcripts of tests/fixtures/transcripts (and a few HTTP requests for the metrics
endpoint) are the seeds; a fixed-seed random.Random mutates them (bytes flipped, inserted or
cut, lines dropped, repeated, swapped or spliced from another seed, fields replaced by edge
values) into PER_LISTENER payloads per listener, each sent on its own connection. Afterwards
the daemon (one process, then two) must still run under the same PID, answer a good login on every socket, and its
log must have no traceback and no internal_error. The payloads are written to the test's
tmp_path (payloads-LISTENER.txt, one Python bytes literal a line) to replay a failure.
"""

from __future__ import annotations

import base64
import codecs
import os
import random
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.authd.conftest import FIXTURES, REFERENCE_BACKENDS, reference_files
from tests.authd_process import AuthdProcess

SEED = 20261208
PER_LISTENER = 3000
CONCURRENCY = 8
#: A payload that neither gets an answer nor a close this long after its EOF counts as hanging.
RECEIVE_TIMEOUT = 5.0

CONFIG = (
    """
[auth]
mechanisms = ["plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256", "oauthbearer", "xoauth2",
              "external", "anonymous"]
failure_delay = 0
penalty = false

[metrics]
address = "127.0.0.1"
port = 0

[cache]
size = 1000
ttl = 60
"""
    + REFERENCE_BACKENDS
)

SOCKETS = {"client": "auth-client", "login": "auth-login", "master": "auth-master", "userdb": "auth-userdb"}

#: Seeds beyond the transcripts: the other mechanisms' first steps, and the metrics endpoint's requests.
EXTRA_SEEDS = {
    "client": [
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tCRAM-MD5\tservice=imap\nCONT\t1\tYWxpY2UgMDAwMDAwMDAwMDAwMDAwMA==\n",
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tSCRAM-SHA-256\tservice=imap\tresp="
        + base64.b64encode(b"n,,n=alice,r=abcdefgh")
        + b"\nCONT\t1\t"
        + base64.b64encode(b"c=biws,r=abcdefghxyz,p=AAAA")
        + b"\n",
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tOAUTHBEARER\tservice=imap\tresp="
        + base64.b64encode(b"n,a=alice,\x01auth=Bearer alicepass\x01\x01")
        + b"\n",
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tXOAUTH2\tservice=imap\tresp="
        + base64.b64encode(b"user=alice\x01auth=Bearer alicepass\x01\x01")
        + b"\n",
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tEXTERNAL\tservice=imap\tcert_username=alice\tresp=\n",
        b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tANONYMOUS\tservice=imap\tresp=dHJhY2U=\nCANCEL\t1\n",
    ],
    "metrics": [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ],
}

EDGE_VALUES = [
    b"",
    b"0",
    b"-1",
    b"4294967295",
    b"4294967296",
    b"99999999999999999999",
    b"\x01",
    b"\x01n",
    b"\x010",
    b"\x00",
    b"=",
    b"resp=",
    b"resp==",
    b"service=",
    b"user=*",
    b"%u%{",
    b"\xff\xfe\x80",
    b"\r",
    b"A" * 1100,
    b"B" * 17000,
    b"CPID\t1",
    b"VERSION\t1\t2",
]


def seeds() -> dict[str, list[bytes]]:
    """What each transcript connection sends, concatenated, by listener type."""
    found: dict[str, list[bytes]] = {kind: [] for kind in [*SOCKETS, "metrics"]}
    by_socket = {path: kind for kind, path in SOCKETS.items()}
    for path in sorted((FIXTURES / "transcripts").glob("*.txt")):
        kinds: dict[str, str] = {}
        sent: dict[str, bytes] = {}
        for raw in path.read_text().splitlines():
            if raw.startswith("@connect "):
                _, name, socket_name = raw.split()
                kinds[name] = by_socket[socket_name]
                sent[name] = b""
            elif match := re.match(r"(\w+)> (.*)", raw):
                payload = codecs.escape_decode(match.group(2).encode())[0]  # type: ignore[attr-defined]
                sent[match.group(1)] += substitute(payload)
        for name, data in sent.items():
            found[kinds[name]].append(data)
    for kind, extra in EXTRA_SEEDS.items():
        found[kind] += extra
    return found


def substitute(payload: bytes) -> bytes:
    payload = payload.replace(b"{PID}", str(os.getpid()).encode())
    return re.sub(rb"\{COOKIE:\w+\}", b"0123456789abcdef0123456789abcdef", payload)


class Mutator:
    """Turns seeds into broken variants, reproducibly (one random.Random for the whole run)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def lines(self, data: bytes) -> list[bytes]:
        return data.split(b"\n")

    def mutate(self, data: bytes, pool: list[bytes]) -> bytes:
        for _ in range(self.rng.randint(1, 4)):
            data = self.rng.choice(self.MUTATIONS)(self, data, pool)
        return data

    def flip(self, data: bytes, pool: list[bytes]) -> bytes:
        if not data:
            return bytes([self.rng.randrange(256)])
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 3)):
            out[self.rng.randrange(len(out))] = self.rng.randrange(256)
        return bytes(out)

    def insert(self, data: bytes, pool: list[bytes]) -> bytes:
        at = self.rng.randint(0, len(data))
        junk = self.rng.choice(
            [b"\t", b"\n", b"\x00", b"\x01", b"=", b"\r\n", self.rng.randbytes(self.rng.randint(1, 8))]
        )
        return data[:at] + junk + data[at:]

    def cut(self, data: bytes, pool: list[bytes]) -> bytes:
        if not data:
            return data
        start = self.rng.randrange(len(data))
        return data[:start] + data[start + self.rng.randint(1, 16) :]

    def truncate(self, data: bytes, pool: list[bytes]) -> bytes:
        return data[: self.rng.randint(0, len(data))]

    def drop_line(self, data: bytes, pool: list[bytes]) -> bytes:
        lines = self.lines(data)
        del lines[self.rng.randrange(len(lines))]
        return b"\n".join(lines)

    def repeat_line(self, data: bytes, pool: list[bytes]) -> bytes:
        lines = self.lines(data)
        at = self.rng.randrange(len(lines))
        lines[at:at] = [lines[at]] * self.rng.choice([1, 2, 50])
        return b"\n".join(lines)

    def swap_lines(self, data: bytes, pool: list[bytes]) -> bytes:
        lines = self.lines(data)
        a, b = self.rng.randrange(len(lines)), self.rng.randrange(len(lines))
        lines[a], lines[b] = lines[b], lines[a]
        return b"\n".join(lines)

    def splice(self, data: bytes, pool: list[bytes]) -> bytes:
        other = self.lines(self.rng.choice(pool))
        start = self.rng.randrange(len(other))
        return data + b"\n".join(other[start : start + self.rng.randint(1, 3)]) + b"\n"

    def edge_field(self, data: bytes, pool: list[bytes]) -> bytes:
        lines = self.lines(data)
        at = self.rng.randrange(len(lines))
        fields = lines[at].split(b"\t")
        fields[self.rng.randrange(len(fields))] = self.rng.choice(EDGE_VALUES)
        lines[at] = b"\t".join(fields)
        return b"\n".join(lines)

    def crlf(self, data: bytes, pool: list[bytes]) -> bytes:
        return data.replace(b"\n", b"\r\n") if b"\r\n" not in data else data.replace(b"\r\n", b"\n")

    MUTATIONS = [flip, insert, cut, truncate, drop_line, repeat_line, swap_lines, splice, edge_field, edge_field, crlf]


@dataclass
class Outcome:
    """How the daemon ended the connections of one listener type."""

    closed: int = 0
    hung: int = 0
    reset: int = 0


def payloads(kind: str, pool: list[bytes], mutator: Mutator) -> list[bytes]:
    return [mutator.mutate(mutator.rng.choice(pool), pool) for _ in range(PER_LISTENER)]


async def connect(authd: AuthdProcess, kind: str, port: int) -> trio.SocketStream:
    if kind == "metrics":
        return await trio.open_tcp_stream("127.0.0.1", port)
    return await trio.open_unix_socket(str(authd.socket(SOCKETS[kind])))


async def exchange(authd: AuthdProcess, kind: str, port: int, payload: bytes, outcome: Outcome) -> None:
    """Send PAYLOAD and EOF on a new connection, read until the daemon closes it."""
    try:
        stream = await connect(authd, kind, port)
    except OSError as exc:
        raise AssertionError(f"{kind}: authd stopped accepting ({exc}) at payload {payload!r}") from None
    async with stream:
        try:
            await stream.send_all(payload)
            await stream.send_eof()
            with trio.move_on_after(RECEIVE_TIMEOUT) as scope:
                while await stream.receive_some(65536):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            outcome.reset += 1  # the daemon dropped the connection before it read everything
            return
        if scope.cancelled_caught:
            outcome.hung += 1
        else:
            outcome.closed += 1


async def fuzz(authd: AuthdProcess, kind: str, port: int, sends: list[bytes]) -> Outcome:
    outcome = Outcome()
    queue = iter(sends)

    async def worker() -> None:
        for payload in queue:
            await exchange(authd, kind, port, payload, outcome)

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)
    return outcome


def lines_until(sock: socket.socket, request: bytes, last: tuple[bytes, ...]) -> bytes:
    """Send REQUEST, return the first line starting with one of LAST."""
    sock.settimeout(10)
    sock.sendall(request)
    buffer = b""
    while True:
        data = sock.recv(65536)
        assert data, f"closed after {buffer!r}"
        buffer += data
        for line in buffer.split(b"\n")[:-1]:
            if line.startswith(last):
                return line


def good_logins(authd: AuthdProcess, port: int) -> None:
    """A valid request on every listener still gets its normal answer."""
    resp = base64.b64encode(b"\0alice\0alicepass")
    for name in ("auth-client", "auth-login"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(authd.socket(name)))
            request = b"VERSION\t1\t2\nCPID\t%d\nAUTH\t1\tPLAIN\tservice=imap\tresp=%s\n" % (os.getpid(), resp)
            assert lines_until(sock, request, (b"OK\t1", b"FAIL\t1")).startswith(b"OK\t1\tuser=alice\t")
    for name in ("auth-master", "auth-userdb"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(authd.socket(name)))
            request = b"VERSION\t1\t0\nUSER\t1\talice\tservice=imap\n"
            assert lines_until(sock, request, (b"USER\t1", b"NOTFOUND\t1", b"FAIL\t1")).startswith(
                b"USER\t1\talice\tuid=65534"
            )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        status = lines_until(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", (b"HTTP/1.1",))
        assert status == b"HTTP/1.1 200 OK\r", status


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def fuzzed_authd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    """One process, and two (the main one relays client and userdb connections to a worker)."""
    workdir = tmp_path_factory.mktemp("fuzz")
    config = CONFIG + f"\n[server]\nprocesses = {request.param}\n"
    proc = AuthdProcess(workdir, config, reference_files())
    proc.start(wait_for=tuple(SOCKETS.values()))
    try:
        yield proc
    finally:
        proc.stop()


def metrics_port(authd: AuthdProcess) -> int:
    return int(authd.wait_for_log(lambda e: e.get("event") == "metrics.ready")["port"])


def test_seeds_cover_every_listener() -> None:
    assert {kind: len(found) > 0 for kind, found in seeds().items()} == dict.fromkeys([*SOCKETS, "metrics"], True)


@pytest.mark.parametrize("kind", [*SOCKETS, "metrics"])
async def test_mutated_transcripts(fuzzed_authd: AuthdProcess, kind: str, tmp_path: Path) -> None:
    port = metrics_port(fuzzed_authd)
    pool = seeds()[kind]
    sends = payloads(kind, pool, Mutator(SEED + sorted([*SOCKETS, "metrics"]).index(kind)))
    (tmp_path / f"payloads-{kind}.txt").write_text("".join(f"{payload!r}\n" for payload in sends))
    outcome = await fuzz(fuzzed_authd, kind, port, sends)
    assert fuzzed_authd.alive, fuzzed_authd.log_text()[-5000:]
    os.kill(fuzzed_authd.pid, 0)  # the same process: it was not restarted
    await trio.to_thread.run_sync(good_logins, fuzzed_authd, port)
    log = fuzzed_authd.log_text()
    # an exception logged with exc_info carries an "exception" field (its traceback) in JSON logs
    bad = [line for line in log.splitlines() if re.search(r'Traceback|internal_error|"exc_info"|"exception"', line)]
    assert bad == [], "\n".join(bad[:20])
    assert outcome.closed + outcome.reset + outcome.hung == PER_LISTENER
    assert outcome.hung == 0, f"{kind}: {outcome.hung} connections neither answered nor closed: {outcome}"


# --- inputs the fuzz found ---------------------------------------------------------------------------

#: SCRAM's credentials lookup is still running when a CONT drops request 1 ("Unexpected
#: continuation") and a new AUTH reuses the id: the old lookup must not answer the new request.
STALE_LOOKUP = (
    b"VERSION\t1\t2\nCPID\t1\nAUTH\t1\tSCRAM-SHA-256\tservice=imap\tresp="
    + base64.b64encode(b"n,,n=alice,r=abcdefgh")
    + b"\nCONT\t1\t"
    + base64.b64encode(b"c=biws,r=abcdefghxyz,p=AAAA")
    + b"\nAUTH\t1\tPLAIN\tservice=imap\tresp="
    + base64.b64encode(b"\0alice\0alicepass")
    + b"\n"
)


def test_a_dropped_requests_lookup_does_not_answer_a_reused_id(tmp_path: Path) -> None:
    fresh = AuthdProcess(tmp_path, CONFIG, reference_files())
    with fresh, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(fresh.socket("auth-client")))
        sock.settimeout(10)
        sock.sendall(STALE_LOOKUP)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        replies = [line for line in data.split(b"\n") if line.startswith((b"OK\t", b"FAIL\t"))]
        log = fresh.log_text()
    assert replies == [b"FAIL\t1\treason=Unexpected continuation", b"OK\t1\tuser=alice\t"], log
    assert "internal_error" not in log

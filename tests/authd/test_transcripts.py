"""Replay the protocol.md §6 transcripts against a real authd, byte for byte."""

from __future__ import annotations

import codecs
import os
import re
import socket
from pathlib import Path
from typing import NoReturn

import pytest

from tests.authd_process import AuthdProcess

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "fixtures" / "transcripts"
HANDSHAKE = re.compile(
    rb"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t(\d+)\nCUID\t\d+\n"
    rb"COOKIE\t([0-9a-f]{32})\nDONE\n"
)
GREETING = re.compile(rb"VERSION\t1\t1\nSPID\t(\d+)\n")


class Conversation:
    """The connections of one transcript and everything they saw."""

    def __init__(self, authd: AuthdProcess) -> None:
        self.authd = authd
        self.socks: dict[str, socket.socket] = {}
        self.buffers: dict[str, bytes] = {}
        self.cookies: dict[str, str] = {}
        self.log: list[str] = []
        self.unordered: list[tuple[str, bytes]] = []

    def fail(self, problem: str) -> NoReturn:
        pytest.fail(problem + "\n--- conversation ---\n" + "\n".join(self.log), pytrace=False)

    def connect(self, name: str, socket_name: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(self.authd.socket(socket_name)))
        self.socks[name] = sock
        self.buffers[name] = b""

    def substitute(self, text: bytes) -> bytes:
        text = text.replace(b"{PID}", str(os.getpid()).encode())
        text = text.replace(b"{SPID}", str(self.authd.pid).encode())
        for name, cookie in self.cookies.items():
            text = text.replace(b"{COOKIE:%s}" % name.encode(), cookie.encode())
        return text

    def send(self, name: str, data: bytes) -> None:
        self.log.append(f"{name} C>S {data!r}")
        self.socks[name].sendall(data)

    def expect(self, name: str, expected: bytes) -> None:
        if expected == b"HANDSHAKE":
            data = self._read_block(name, b"DONE\n")
            match = HANDSHAKE.fullmatch(data)
            if match is None or int(match.group(1)) != self.authd.pid:
                self.fail(f"{name}: bad handshake {data!r}")
            self.cookies[name] = match.group(2).decode()
        elif expected == b"GREETING":
            data = self._read_block(name, b"SPID\t")
            data += self._read_block(name, b"\n")
            match = GREETING.fullmatch(data)
            if match is None or int(match.group(1)) != self.authd.pid:
                self.fail(f"{name}: bad greeting {data!r}")
        elif expected == b"EOF":
            sock = self.socks[name]
            try:
                rest = sock.recv(65536)
            except ConnectionResetError:
                rest = b""
            if rest or self.buffers[name]:
                self.fail(f"{name}: expected the server to close, got {self.buffers[name] + rest!r}")
            self.log.append(f"{name} S>C <EOF>")
        else:
            pattern = re.escape(self.substitute(expected)).replace(rb"\{HEX40\}", rb"[0-9a-f]{40}")
            data = self._read_block(name, b"\n", count=expected.count(b"\n"))
            if re.fullmatch(pattern, data) is None:
                self.fail(f"{name}: expected {self.substitute(expected)!r}, got {data!r}")

    def _read_block(self, name: str, end: bytes, count: int = 1) -> bytes:
        out = b""
        for _ in range(count):
            while end not in self.buffers[name]:
                sock = self.socks[name]
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    self.fail(f"{name}: timed out waiting for {end!r}, have {self.buffers[name]!r}")
                if not chunk:
                    self.fail(f"{name}: connection closed, have {self.buffers[name]!r}")
                self.buffers[name] += chunk
            index = self.buffers[name].index(end) + len(end)
            part, self.buffers[name] = self.buffers[name][:index], self.buffers[name][index:]
            out += part
        self.log.append(f"{name} S>C {out!r}")
        return out

    def flush_unordered(self) -> None:
        """Read a group of `NAME<* LINE` replies, which may arrive in any order."""
        if not self.unordered:
            return
        name = self.unordered[0][0]
        wanted = sorted(line for _, line in self.unordered)
        self.unordered = []
        got = sorted(self._read_block(name, b"\n") for _ in wanted)
        if got != wanted:
            self.fail(f"{name}: expected {wanted!r} in any order, got {got!r}")

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


def _unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode())[0]  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("path", sorted(TRANSCRIPTS.glob("*.txt")), ids=lambda p: p.stem)
def test_transcript(reference_authd: AuthdProcess, path: Path) -> None:
    conversation = Conversation(reference_authd)
    try:
        for raw in path.read_text().splitlines():
            if not raw or raw.startswith("#"):
                continue
            if raw.startswith("@connect "):
                _, name, socket_name = raw.split()
                conversation.connect(name, socket_name)
                continue
            match = re.match(r"(\w+)([<>]\*?) (.*)", raw)
            assert match, f"bad transcript line: {raw!r}"
            name, direction, payload = match.groups()
            if direction == "<*":
                conversation.unordered.append((name, _unescape(payload)))
                continue
            conversation.flush_unordered()
            if direction == ">":
                conversation.send(name, conversation.substitute(_unescape(payload)))
            else:
                conversation.expect(name, _unescape(payload))
            conversation.flush_unordered()
    finally:
        conversation.close()

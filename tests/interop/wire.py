r"""A tiny synchronous client for Dovecot's auth-client and auth-master line protocols.

Interop tests use it to assert exact bytes. Every byte sent and received is kept in a transcript,
and every error (timeout, unexpected EOF) carries that transcript, so a failing test prints the
conversation it saw, in the `C>S` / `S>C` notation of the research notes:

    with Wire.auth_client(ref.socket("auth-client")) as w:   # greeting read up to DONE
        assert w.greeting[0] == "VERSION\t1\t2"
        w.send("VERSION\t1\t2", "CPID\t4242")
        w.send("AUTH\t1\tPLAIN\tservice=smtp\tresp=AGFsaWNlAGFsaWNlcGFzcw==")
        assert w.read_line().startswith("OK\t1\tuser=alice")

    with Wire.auth_master(ref.socket("auth-userdb")) as w:   # greeting read up to SPID
        w.send("VERSION\t1\t0", "USER\t1\talice\tservice=lmtp")
        assert w.read_line().startswith("USER\t1\talice\t")

Lines are returned without their LF, decoded as UTF-8 with surrogateescape (so any byte
round-trips); `send` appends the LF. `send_raw` writes bytes as they are, for malformed input.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self


class WireError(AssertionError):
    """A read did not get what it needed; the message ends with the whole conversation."""

    def __init__(self, problem: str, transcript: str) -> None:
        super().__init__(f"{problem}\n--- conversation ---\n{transcript}")
        self.problem = problem
        self.transcript = transcript


class WireTimeout(WireError):
    """Nothing (or not enough) arrived within the timeout."""


class WireClosed(WireError):
    """The peer closed the connection before a complete line arrived."""


def _decode(line: bytes) -> str:
    return line.decode("utf-8", "surrogateescape")


def _encode(line: str) -> bytes:
    return line.encode("utf-8", "surrogateescape")


class Wire:
    """One unix-socket connection with a line buffer and a transcript."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.greeting: list[str] = []
        self._buffer = b""
        self._eof = False
        self._log: list[tuple[float, str, bytes]] = []
        self._start = time.monotonic()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(self.path)
        except OSError:
            self._sock.close()
            raise

    @classmethod
    def auth_client(cls, path: Path | str, timeout: float = 5.0, *, hello: bool = False) -> Wire:
        """Connect to an auth-client/login socket and read the server greeting through DONE.

        HELLO sends the client's VERSION and CPID first: Dovecot 2.4 greets only after them.
        """
        wire = cls(path, timeout)
        if hello:
            wire.send("VERSION\t1\t2", f"CPID\t{os.getpid()}")
        wire.greeting = wire._read_greeting("DONE")
        return wire

    @classmethod
    def auth_master(cls, path: Path | str, timeout: float = 5.0) -> Wire:
        """Connect to an auth-master/userdb socket and read the server greeting through SPID."""
        wire = cls(path, timeout)
        wire.greeting = wire._read_greeting("SPID")
        return wire

    def _read_greeting(self, last: str) -> list[str]:
        try:
            return self.read_until(last)
        except BaseException:
            self.close()
            raise

    def greeting_value(self, command: str) -> str:
        """The first value of greeting line COMMAND (e.g. "SPID" -> "1234", "COOKIE" -> hex)."""
        for line in self.greeting:
            fields = line.split("\t")
            if fields[0] == command:
                return fields[1]
        raise WireError(f"no {command} line in the greeting", self.transcript())

    def send(self, *lines: str) -> None:
        """Send each line with a trailing LF, all in one write."""
        self.send_raw(b"".join(_encode(line) + b"\n" for line in lines))

    def send_raw(self, data: bytes) -> None:
        self._log.append((time.monotonic(), "C>S", data))
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise WireError(f"send failed: {exc!r}", self.transcript()) from exc

    def _fill(self, deadline: float, waiting_for: str) -> None:
        """Receive one chunk into the buffer or raise with the conversation so far."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WireTimeout(f"timed out waiting for {waiting_for}", self.transcript())
        self._sock.settimeout(remaining)
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            raise WireTimeout(f"timed out waiting for {waiting_for}", self.transcript()) from None
        except OSError as exc:
            # A reset is how Dovecot's close looks when it did not read all we sent.
            chunk = b""
            self._log.append((time.monotonic(), "S>C", f"<{exc!r}>".encode()))
        if not chunk:
            self._eof = True
            self._log.append((time.monotonic(), "S>C", b"<EOF>"))
            return
        self._log.append((time.monotonic(), "S>C", chunk))
        self._buffer += chunk

    def read_line(self, timeout: float | None = None) -> str:
        """The next line without its LF."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buffer:
            if self._eof:
                raise WireClosed("connection closed while waiting for a line", self.transcript())
            self._fill(deadline, "a line")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return _decode(line)

    def read_until(self, command: str, timeout: float | None = None) -> list[str]:
        """Lines up to and including the first whose first field is COMMAND."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while True:
            line = self.read_line(max(deadline - time.monotonic(), 0.0))
            lines.append(line)
            if line.split("\t", 1)[0] == command:
                return lines

    def read_until_eof(self, timeout: float | None = None) -> list[str]:
        """All remaining lines until the peer closes; a trailing partial line is returned as is."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._eof:
            self._fill(deadline, "the server to close the connection")
        lines = self._buffer.split(b"\n")
        self._buffer = b""
        if lines[-1] == b"":
            lines.pop()
        return [_decode(line) for line in lines]

    def transcript(self) -> str:
        """The conversation so far, one chunk per line: `[seconds] C>S b'...'`."""
        return "\n".join(f"[{at - self._start:7.3f}] {way} {data!r}" for at, way, data in self._log)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

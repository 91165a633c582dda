"""A bare HTTP/1.1 test server's parts: a thread per connection, and one request read off the socket.

Tests that control each response byte (segments, closes) build their backends from these.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Received:
    """One request's head (without its blank line), what followed its body, and the recv() calls it took."""

    head: bytes
    rest: bytes
    reads: int


def accept_each(listener: socket.socket, answer: Callable[[socket.socket], None]) -> None:
    """Serve every connection of LISTENER with ANSWER on a thread of its own, until it is closed."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def read_request(conn: socket.socket, buffer: bytes) -> Received | None:
    """The next request on CONN (BUFFER holds what was read beyond the last); None at EOF."""
    reads = 0
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
        reads += 1
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    size = int(length[1]) if length else 0
    while len(buffer) < size:
        buffer += conn.recv(65536)
        reads += 1
    return Received(head, buffer[size:], reads)

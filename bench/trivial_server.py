"""A server that answers auth-client and auth-userdb requests without doing anything.

It exists only to measure the load generator: OK for every PLAIN AUTH and LOGIN password, the
LOGIN password prompt, a fixed USER reply. One process, one selector loop, one write per read.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import selectors
import socket
from pathlib import Path

from bench.procs import as_child

_CTX = multiprocessing.get_context("fork")
_CLIENT_GREETING = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t%d\nCUID\t1\n"
    b"COOKIE\t00000000000000000000000000000000\nDONE\n"
)
_MASTER_GREETING = b"VERSION\t1\t1\nSPID\t%d\n"


def _answer(line: bytes) -> bytes:
    command, rid, rest = [*line.split(b"\t", 2), b"", b""][:3]
    if command == b"AUTH":
        if rest.startswith(b"LOGIN\t"):
            return b"CONT\t" + rid + b"\tUGFzc3dvcmQ6\n"
        return b"OK\t" + rid + b"\tuser=bench\n"
    if command == b"CONT":
        return b"OK\t" + rid + b"\tuser=bench\n"
    if command == b"USER":
        return b"USER\t" + rid + b"\tbench\tuid=65534\tgid=65534\n"
    return b""  # VERSION, CPID


def _serve(listeners: list[tuple[socket.socket, bytes]]) -> None:
    as_child()
    selector = selectors.DefaultSelector()
    for listener, greeting in listeners:
        selector.register(listener, selectors.EVENT_READ, greeting)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)  # only sockets are registered
            if key.data is not None:  # a listener; connections stay blocking: recv only when readable
                conn, _ = sock.accept()
                conn.sendall(key.data % os.getpid())
                buffers[conn] = b""
                selector.register(conn, selectors.EVENT_READ, None)
                continue
            try:
                data = sock.recv(1 << 18)
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                del buffers[sock]
                sock.close()
                continue
            lines = (buffers[sock] + data).split(b"\n")
            buffers[sock] = lines.pop()
            with contextlib.suppress(OSError):  # a client that went away is noticed at its EOF
                sock.sendall(b"".join(map(_answer, lines)))


class TrivialServer:
    """auth-client and auth-userdb sockets in DIRECTORY, served by one process until exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        listeners = []
        for name, greeting in (("auth-client", _CLIENT_GREETING), ("auth-userdb", _MASTER_GREETING)):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(directory / name))
            sock.listen(1024)
            listeners.append((sock, greeting))
        self._listeners = listeners
        self._process = _CTX.Process(target=_serve, args=(listeners,), daemon=True)

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def socket(self, name: str) -> Path:
        return self.directory / name

    def __enter__(self) -> TrivialServer:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        for sock, _ in self._listeners:
            sock.close()

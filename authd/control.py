"""The control socket between the main process and a worker: JSON messages, a socket riding along.

A SOCK_SEQPACKET socketpair keeps message boundaries, so one recvmsg() is one message,
and SCM_RIGHTS carries a client connection's descriptor from the main process, which
accepts it, to the worker that serves it. Sending never waits: messages queue and one
task writes them in order.
"""

from __future__ import annotations

import array
import json
import math
import socket
from typing import Any, Protocol

import trio

#: Room for the largest message (a worker's metrics page) in one datagram.
BUFFER_SIZE = 4 * 1024 * 1024


class Closable(Protocol):
    def fileno(self) -> int: ...

    def close(self) -> None: ...


Message = dict[str, Any]


def socketpair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a new control socket; the second is for the child (inheritable)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (ours, theirs):
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_SIZE)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_SIZE)
    theirs.set_inheritable(True)
    return ours, theirs


class ControlChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._outgoing, self._queue = trio.open_memory_channel[tuple[Message, Closable | None]](math.inf)
        self.closed = False

    def send(self, message: Message, attached: Closable | None = None) -> None:
        """Queue a message; `attached` (a socket) is closed here once the peer has its copy."""
        if self.closed:
            if attached is not None:
                attached.close()
            return
        self._outgoing.send_nowait((message, attached))

    async def run_sender(self) -> None:
        """Write queued messages until cancelled; a gone peer drops them."""
        async for message, attached in self._queue:
            data = json.dumps(message, separators=(",", ":")).encode()
            try:
                if attached is None:
                    await self._sock.send(data)
                else:
                    fds = array.array("i", [attached.fileno()])
                    await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError:
                self.closed = True
            finally:
                if attached is not None:
                    attached.close()

    async def receive(self) -> tuple[Message, socket.socket | None] | None:
        """The next message and the socket it carried, or None when the peer is gone."""
        try:
            # MSG_CMSG_CLOEXEC: a script's os.execute() must not inherit client connections.
            data, ancillary, _flags, _address = await self._sock.recvmsg(
                BUFFER_SIZE, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
            )
        except OSError:
            data, ancillary = b"", []
        attached = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    if attached is None:
                        attached = socket.socket(fileno=fd)
                    else:
                        socket.socket(fileno=fd).close()
        if not data:
            self.closed = True
            if attached is not None:
                attached.close()
            return None
        return json.loads(data), attached

    def close(self) -> None:
        self.closed = True
        self._sock.close()

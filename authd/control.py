"""The control socket between the main process and a worker: JSON messages, a socket riding along.

A SOCK_SEQPACKET socketpair keeps message boundaries, so one recvmsg() is one message,
and SCM_RIGHTS carries a client connection's descriptor from the main process, which
accepts it, to the worker that serves it. Sending never waits: messages queue and one
task writes them in order.
"""

from __future__ import annotations

import array
import errno
import json
import math
import os
import socket
from typing import Any, Protocol

import structlog
import trio

log = structlog.get_logger("authd.control")

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
    def __init__(self, sock: socket.socket, peer: str = "main process") -> None:
        """`peer`: who is at the other end, for the log ("worker 2", "main process")."""
        sock.setblocking(False)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._outgoing, self._queue = trio.open_memory_channel[tuple[Message, Closable | None]](math.inf)
        self.peer = peer
        self.closed = False

    def send(self, message: Message, attached: Closable | None = None) -> None:
        """Queue a message; `attached` (a socket) is closed here once the peer has its copy."""
        if self.closed:
            if attached is not None:
                attached.close()
            return
        self._outgoing.send_nowait((message, attached))

    async def run_sender(self) -> None:
        """Write queued messages until cancelled; a gone peer drops them (logged once)."""
        async for message, attached in self._queue:
            try:
                if not self.closed:
                    await self._send(message, attached)
            finally:
                if attached is not None:
                    attached.close()

    async def _send(self, message: Message, attached: Closable | None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > BUFFER_SIZE:  # the peer could not receive it whole: this message only fails
            log.error(
                "control.send_failed",
                peer=self.peer,
                op=message.get("op"),
                bytes=len(data),
                message=os.strerror(errno.EMSGSIZE),
            )
            return
        try:
            if attached is None:
                await self._sock.send(data)
            else:
                fds = array.array("i", [attached.fileno()])
                await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            cause = exc.strerror or str(exc)
            if exc.errno == errno.EMSGSIZE:  # this message only: the channel still works
                log.error("control.send_failed", peer=self.peer, op=message.get("op"), bytes=len(data), message=cause)
                return
            log.error("control.send_failed", peer=self.peer, op=message.get("op"), message=f"{cause}: channel closed")
            self.closed = True

    async def receive(self) -> tuple[Message, socket.socket | None] | None:
        """The next message and the socket it carried, or None when the peer is gone."""
        while True:
            try:
                # MSG_CMSG_CLOEXEC: a script's os.execute() must not inherit client connections.
                data, ancillary, flags, _address = await self._sock.recvmsg(
                    BUFFER_SIZE, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC
                )
            except OSError as exc:
                if not self.closed:
                    log.error("control.receive_failed", peer=self.peer, message=exc.strerror or str(exc))
                data, ancillary, flags = b"", [], 0
            attached = _attached_socket(ancillary)
            if not data:
                self.closed = True
                if attached is not None:
                    attached.close()
                return None
            try:
                if flags & socket.MSG_TRUNC:
                    raise ValueError(f"longer than {BUFFER_SIZE} bytes")
                message = json.loads(data)
            except ValueError as exc:
                log.error("control.receive_failed", peer=self.peer, message=f"message dropped: {exc}")
                if attached is not None:
                    attached.close()
                continue
            return message, attached

    def close(self) -> None:
        self.closed = True
        self._sock.close()


def _attached_socket(ancillary: list[tuple[int, int, bytes]]) -> socket.socket | None:
    """The first descriptor SCM_RIGHTS carried, as a socket; any others are closed."""
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
    return attached

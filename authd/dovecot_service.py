"""Running as Dovecot's own `service auth` (route B): the master-service contract.

Dovecot's master starts the auth executable with its listening sockets already
bound, as fds 7, 8, ... (SOCKET_COUNT of them, named by SOCKETn_SETTINGS), its
stderr connected to the master's log pipe, and the service user in
RESTRICT_SETUID/SETGID. Dovecot 2.3 picks each socket's type from the listener
name's last `-`/`/` component; we do the same, so no client needs re-pointing.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import trio

from authd.listeners import adopt

#: MASTER_DEAD_FD and MASTER_LISTEN_FD_FIRST in Dovecot's master-interface.h.
MASTER_DEAD_FD = 6
FIRST_LISTENER_FD = 7

SOCKET_TYPES = {
    "login": "login",
    "master": "master",
    "userdb": "userdb",
    "token": "token",
    "tokenlogin": "token",
}


def socket_type(name: str) -> str:
    """auth_socket_type_get: the part after the last '/', then after the last '-'."""
    base = name.rsplit("/", 1)[-1].rsplit("-", 1)[-1]
    return SOCKET_TYPES.get(base, "client")


@dataclass
class InheritedListener:
    name: str
    type: str
    path: str | None
    listener: trio.SocketListener


def inherited_listeners(environ: Mapping[str, str] = os.environ) -> list[InheritedListener]:
    """The listening sockets Dovecot's master passed us (token ones too: the server refuses
    their connections, as authd does not implement DOVECOT-TOKEN)."""
    count = int(environ.get("SOCKET_COUNT", "0"))
    if count == 0:
        raise RuntimeError("SOCKET_COUNT is not set: --dovecot-service must be started by Dovecot's master")
    found = []
    for index in range(count):
        name = environ.get(f"SOCKET{index}_SETTINGS", "")
        fd = FIRST_LISTENER_FD + index
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        adopt(sock, f"Dovecot socket {name.split(chr(9), 1)[0]!r} (fd {fd})")
        try:
            bound = sock.getsockname()
        except OSError:
            bound = None
        path = bound if isinstance(bound, str) and bound else None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        found.append(InheritedListener(name, socket_type(name), path, listener))
    return found


async def watch_master(on_death: Any, fd: int = MASTER_DEAD_FD) -> None:
    """Call `on_death()` when Dovecot's master goes away (its dead-pipe fd errors)."""
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    while True:
        if poller.poll(0):
            on_death()
            return
        await trio.sleep(1)


def drop_privileges(environ: Mapping[str, str] = os.environ) -> None:
    """Become the service user Dovecot configured (RESTRICT_SETGID/SETUID), if any."""
    gid = environ.get("RESTRICT_SETGID")
    uid = environ.get("RESTRICT_SETUID")
    if gid:
        os.setgroups([int(gid)])
        os.setgid(int(gid))
    if uid and int(uid) != os.getuid():
        os.setuid(int(uid))


class DovecotLogRenderer:
    """structlog renderer for Dovecot's log pipe: `\\x01`, log type + 1, `PID text`."""

    _TYPES = {"debug": 0, "info": 1, "warning": 2, "error": 3, "critical": 4}

    def __call__(self, _logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = self._TYPES.get(method, 1)
        name = event.pop("event", "")
        event.pop("timestamp", None)
        event.pop("level", None)
        message = event.pop("message", None)
        parts = [f"{name}:" if message is not None else str(name)]
        if message is not None:
            parts.append(str(message))
        parts += [f"{key}={value}" for key, value in event.items()]
        text = " ".join(parts).replace("\n", "\\n")[:3900]
        return f"\x01{chr(level + 1)}{os.getpid()} {text}"

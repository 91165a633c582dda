"""systemd integration without libsystemd: sd_notify and socket activation.

`notify()` speaks the sd_notify datagram protocol on $NOTIFY_SOCKET (READY=1,
RELOADING=1, STOPPING=1, WATCHDOG=1). `activated_sockets()` takes the sockets a
.socket unit passed (LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, starting at fd 3);
each unit's FileDescriptorName= names the listener type (client, login, master,
userdb, or a Dovecot-style name such as auth-userdb); token sockets are refused.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
import trio

from authd.dovecot_service import socket_type
from authd.listeners import ListenerError, adopt

SD_LISTEN_FDS_START = 3

log = structlog.get_logger("authd.systemd")


#: NOTIFY_SOCKET addresses whose failure was logged (until a message gets through again).
_failing: set[str] = set()


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send one sd_notify message; False when not running under systemd or it failed
    (logged once, with the cause, however many messages fail after it)."""
    name = environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = "\0" + name[1:] if name.startswith("@") else name  # @: the abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            if name not in _failing:
                _failing.add(name)
                log.error("systemd.notify_failed", address=name, message=exc.strerror or str(exc))
            return False
    _failing.discard(name)
    return True


def reloading_message() -> str:
    """RELOADING=1 with the timestamp systemd 253+ wants for Type=notify-reload."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


@dataclass
class ActivatedSocket:
    name: str
    type: str
    path: str | None
    #: (host, port) of a TCP socket.
    address: tuple[str, int] | None
    sock: socket.socket


def activated_sockets(environ: Mapping[str, str] = os.environ) -> list[ActivatedSocket]:
    """The listening sockets systemd handed this process (none if not socket-activated)."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(environ.get("LISTEN_FDS", "0"))
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    found = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        name = names[index] if index < len(names) else "unknown"
        what = f"systemd socket {name!r} (fd {fd})"
        adopt(sock, what)
        try:
            bound = sock.getsockname()
        except OSError:
            bound = None
        path = bound if isinstance(bound, str) and bound else None
        address = (str(bound[0]), int(bound[1])) if isinstance(bound, tuple) else None
        kind = name if name in ("client", "login", "master", "userdb") else socket_type(name)
        if kind == "token" or name.rsplit("/", 1)[-1] == "token-login":
            raise ListenerError(
                f"{what}: authd does not serve DOVECOT-TOKEN (imap-urlauth) sockets;"
                " remove the socket unit or name it client, login, master or userdb"
            )
        found.append(ActivatedSocket(name, kind, path, address, sock))
    return found


async def watchdog(environ: Mapping[str, str] = os.environ) -> None:
    """Ping systemd's watchdog at half the configured interval (WATCHDOG_USEC)."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec or environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    try:
        interval = int(usec) / 1_000_000 / 2
    except ValueError:
        log.error("systemd.watchdog_invalid", value=usec, message="WATCHDOG_USEC is not a number of microseconds")
        return
    while True:
        notify("WATCHDOG=1", environ)
        await trio.sleep(interval)

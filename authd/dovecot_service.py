"""Running as Dovecot's own `service auth` (route B): the master-service contract.

Dovecot's master starts the auth executable with its listening sockets already
bound (SOCKET_COUNT of them, described by SOCKETn_SETTINGS), its stderr connected
to the master's log pipe, and the service user in RESTRICT_SETUID/SETGID.
Dovecot 2.3 passes them from fd 7 and names them `NAME`; the socket type is the
name's last `-`/`/` component. Dovecot 2.4 passes them from fd 8 (7 is its config
fd) as `NAME<TAB>type=TYPE`, the type falling back to 2.3's rule when absent.
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

#: MASTER_DEAD_FD and MASTER_LISTEN_FD_FIRST in Dovecot's master-interface.h (2.3: 7, 2.4: 8).
MASTER_DEAD_FD = 6
FIRST_LISTENER_FD = 7
FIRST_LISTENER_FD_24 = 8
#: More inherited listeners than this is not a Dovecot master talking.
MAX_LISTENERS = 1000

SOCKET_TYPES = {
    "login": "login",
    "master": "master",
    "userdb": "userdb",
    "token": "token",
    "tokenlogin": "token",
    # 2.4's `type=` values (auth_socket_type_names in src/auth/main.c)
    "auth": "client",
    "auth-legacy": "client",
    "token-login": "token",
}


def socket_type(name: str) -> str:
    """auth_socket_type_get: the part after the last '/', then after the last '-'."""
    base = name.rsplit("/", 1)[-1].rsplit("-", 1)[-1]
    return SOCKET_TYPES.get(base, "client")


_TAB_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\x00"}


def _tab_unescape(text: str) -> str:
    """Undo Dovecot's str_append_tabescaped (\\x01 followed by 1, t, r, n or 0)."""
    if "\x01" not in text:
        return text
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        out.append(_TAB_UNESCAPES.get(next(chars, ""), "") if char == "\x01" else char)
    return "".join(out)


@dataclass(frozen=True)
class ListenerSpec:
    """One inherited listener as Dovecot's environment describes it."""

    index: int
    fd: int
    name: str
    type: str


def first_listener_fd(environ: Mapping[str, str], settings: list[str]) -> int:
    """Where the listeners start: fd 7 for Dovecot 2.2/2.3, fd 8 for 2.4 and later.

    DOVECOT_VERSION decides (the master sets it unless `version_ignore = yes`); without it,
    a `type=` field in any SOCKETn_SETTINGS means 2.4 (2.3 never sends one)."""
    version = environ.get("DOVECOT_VERSION", "")
    if version:
        return FIRST_LISTENER_FD if version.startswith(("2.2.", "2.3.")) else FIRST_LISTENER_FD_24
    has_type = any(field.startswith("type=") for text in settings for field in text.split("\t")[1:])
    return FIRST_LISTENER_FD_24 if has_type else FIRST_LISTENER_FD


def listener_specs(environ: Mapping[str, str] = os.environ) -> list[ListenerSpec]:
    """Parse SOCKET_COUNT / SOCKETn_SETTINGS (/ DOVECOT_VERSION) into fds, names and types."""
    text = environ.get("SOCKET_COUNT", "")
    if text in ("", "0"):
        raise RuntimeError("SOCKET_COUNT is not set: --dovecot-service must be started by Dovecot's master")
    if not text.isdigit() or int(text) > MAX_LISTENERS:
        raise RuntimeError(f"SOCKET_COUNT={text!r} is not a number up to {MAX_LISTENERS}")
    settings = [environ.get(f"SOCKET{index}_SETTINGS", "") for index in range(int(text))]
    first = first_listener_fd(environ, settings)
    specs = []
    for index, value in enumerate(settings):
        fields = value.split("\t")
        name = _tab_unescape(fields[0])
        kind = socket_type(name)
        for field in fields[1:]:
            if field.startswith("type="):
                declared = _tab_unescape(field.removeprefix("type="))
                kind = SOCKET_TYPES.get(declared, "client") if declared else kind
        specs.append(ListenerSpec(index, first + index, name, kind))
    return specs


@dataclass
class InheritedListener:
    name: str
    type: str
    path: str | None
    listener: trio.SocketListener


def inherited_listeners(environ: Mapping[str, str] = os.environ) -> list[InheritedListener]:
    """The listening sockets Dovecot's master passed us (token ones too: the server refuses
    their connections, as authd does not implement DOVECOT-TOKEN)."""
    found = []
    for spec in listener_specs(environ):
        fd = spec.fd
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        adopt(sock, f"Dovecot socket {spec.name!r} (fd {fd})")
        try:
            bound = sock.getsockname()
        except OSError:
            bound = None
        path = bound if isinstance(bound, str) and bound else None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        found.append(InheritedListener(spec.name, spec.type, path, listener))
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

"""Opening the configured sockets: unix sockets with mode/owner, TCP, inherited fds."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from pathlib import Path

import structlog
import trio

from config.schema import ListenerSettings

log = structlog.get_logger("authd.listeners")


class ListenerError(Exception):
    """A socket could not be opened; the message says which and why."""


SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def backlog() -> int:
    """The system's largest listen queue (net.core.somaxconn): after an auth restart every
    login and LMTP process of a busy Dovecot reconnects at the same moment."""
    try:
        return int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def adopt(sock: socket.socket, what: str) -> None:
    """Make an inherited socket (systemd's, Dovecot's) ours: it must be a listening stream
    socket; its listen queue gets the system's maximum too."""
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ListenerError(f"{what}: {exc.strerror}") from None
    if kind != socket.SOCK_STREAM or not listening:
        raise ListenerError(f"{what}: not a listening stream socket")
    try:
        sock.listen(backlog())
    except OSError as exc:
        raise ListenerError(f"{what}: {exc.strerror}") from None


def _unlink_stale(path: Path) -> None:
    """Remove a leftover socket file, but refuse to steal one a live daemon uses."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ListenerError(f"{path}: another process is already listening on this socket")


def open_unix(settings: ListenerSettings) -> socket.socket:
    assert settings.path is not None
    path = settings.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _unlink_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenerError(f"{path}: {exc.strerror}") from None
    try:
        sock.bind(str(path))
        set_permissions(settings)
        sock.listen(backlog())
    except (OSError, ListenerError) as exc:
        sock.close()
        path.unlink(missing_ok=True)
        if isinstance(exc, ListenerError):
            raise
        raise ListenerError(f"{path}: {exc.strerror}") from None
    return sock


def set_permissions(settings: ListenerSettings) -> None:
    """Give a unix socket file its configured mode, owner and group."""
    assert settings.path is not None
    path = settings.path
    try:
        uid = pwd.getpwnam(settings.user).pw_uid if settings.user else -1
        gid = grp.getgrnam(settings.group).gr_gid if settings.group else -1
    except KeyError as exc:
        raise ListenerError(f"{path}: unknown user or group {exc.args[0]}") from None
    try:
        os.chmod(path, settings.mode)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
    except OSError as exc:
        raise ListenerError(f"{path}: {exc.strerror}") from None


def open_tcp(settings: ListenerSettings) -> socket.socket:
    assert settings.address is not None and settings.port is not None
    try:
        infos = socket.getaddrinfo(settings.address, settings.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog())
    except OSError as exc:
        raise ListenerError(f"{settings.where}: {exc.strerror}") from None
    return sock


def open_listener(settings: ListenerSettings) -> trio.SocketListener:
    sock = open_unix(settings) if settings.path is not None else open_tcp(settings)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

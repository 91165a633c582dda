"""Deciding a login's proxy fields, as Dovecot's auth_request_proxy_finish does.

A passdb asks a login process to proxy with `proxy` (always) or `proxy_maybe` (unless
the destination is this very server: `host` is our local IP, or one of [auth]
proxy_self, and `port`, if given, is the port the client connected to). A `host` that
is a name is resolved first and its first address added as `hostip`. Failed requests
lose every proxy field.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import structlog
import trio

from authd.auth_request import AuthRequest

log = structlog.get_logger("authd.proxy")

#: AUTH_DNS_DEFAULT_TIMEOUT_MSECS.
DNS_TIMEOUT = 10.0
#: AUTH_DNS_WARN_MSECS.
DNS_WARN = 0.5

PROXY_FIELDS = (b"proxy", b"proxy_maybe", b"proxy_always", b"host", b"port", b"destuser")


def wants_proxy(req: AuthRequest) -> bool:
    """Whether the passdb asked for proxying, so proxy_finish has something to settle."""
    return b"proxy" in req.extra_fields or b"proxy_maybe" in req.extra_fields


def drop_proxy_fields(req: AuthRequest) -> None:
    """auth_request_proxy_finish_failure."""
    for name in PROXY_FIELDS:
        req.extra_fields.remove(name)


async def proxy_finish(req: AuthRequest, proxy_self: Sequence[str] = ()) -> bool:
    """Settle proxy/proxy_maybe before a login succeeds; False: the request fails instead.

    A DNS failure is an internal failure (temp_fail); an invalid `hostip` a plain one.
    """
    if not wants_proxy(req):
        return True
    extra = req.extra_fields
    host = extra.find(b"host")
    if host is None:
        # A director fills in the host; give it what it needs for its own proxy_maybe.
        is_self = False
        if req.local_ip is not None:
            extra.add(b"lip", req.local_ip.encode())
        if req.local_port:
            extra.add(b"lport", b"%d" % req.local_port)
    elif (address := _ip(host)) is not None:
        is_self = _is_self(req, [address], proxy_self)
    else:
        hostip = extra.find(b"hostip")
        if hostip is not None:
            address = _ip(hostip)
            if address is None:
                log.error("auth.proxy", message=f"Invalid hostip in passdb: {_text(hostip)}", **req.log_context())
                return False
            is_self = _is_self(req, [address], proxy_self)
        else:
            addresses = await _resolve(req, host)
            if addresses is None:
                req.internal_failure = True
                drop_proxy_fields(req)
                return False
            extra.add(b"hostip", str(addresses[0]).encode())
            is_self = _is_self(req, addresses, proxy_self)
    _finish(req, is_self)
    return True


def _finish(req: AuthRequest, host_is_self: bool) -> None:
    """auth_request_proxy_finish_ip."""
    extra = req.extra_fields
    if b"proxy_maybe" not in extra:
        return
    port = extra.find(b"port")
    port_is_self = port is None or (port.isdigit() and int(port) == req.local_port)
    if not host_is_self or not port_is_self:
        extra.remove(b"proxy_maybe")
        extra.add(b"proxy", None)
        return
    # Proxying to ourselves: log in here instead.
    always = b"proxy_always" in extra
    drop_proxy_fields(req)
    if always:
        extra.add(b"proxy", None)  # a director cluster: "self" means the local cluster


def _is_self(
    req: AuthRequest, addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address], proxy_self: Sequence[str]
) -> bool:
    mine = [_ip(ip.encode()) for ip in (req.real_local_ip, *proxy_self) if ip]
    return any(address in mine for address in addresses)


async def _resolve(req: AuthRequest, host: bytes) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The host's addresses; None (and an error logged) if the lookup fails."""
    timeout = DNS_TIMEOUT
    value = req.extra_fields.find(b"proxy_timeout")
    if value is not None:
        if value.isdigit():
            timeout = float(int(value))
        else:
            log.error("auth.proxy", message=f"Invalid proxy_timeout value: {_text(value)}", **req.log_context())
    name = _text(host)
    started = trio.current_time()
    error = "Timed out"
    with trio.move_on_after(timeout):
        try:
            infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            error = getattr(exc, "strerror", None) or str(exc)
        else:
            took = trio.current_time() - started
            if took > DNS_WARN:
                log.warning("auth.proxy", message=f"DNS lookup for {name} took {took:.3f} s", **req.log_context())
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
            return list(dict.fromkeys(addresses))
    log.error("auth.proxy", message=f"DNS lookup for {name} failed: {error}", **req.log_context())
    return None


def _ip(value: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")

"""One auth-master or auth-userdb connection: USER, PASS, LIST, REQUEST, CACHE-FLUSH.

USER, PASS and LIST run concurrently (replies go out as they finish, as in Dovecot;
a LIST goes on as its reader reads it). REQUEST hands a finished login-socket request
over to the post-login process. [limits] holds them as on auth-client connections: at
requests_per_connection the connection is not read, beyond requests_total a request gets
FAIL (LIST DONE fail) at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio

from authd.auth_request import AuthRequest, UsernameError
from authd.conn_reader import ConnectionReader
from authd.login_request import LoginRequestArgs
from authd.outbox import Outbox
from authd.proxy import drop_proxy_fields, proxy_finish
from lua_api.results import PassdbResult, UserdbResult
from protocol.errors import PeerError
from protocol.master import (
    AuthMasterServer,
    CacheFlush,
    ListUsers,
    LoginRequest,
    MasterEvent,
    PassLookup,
    UserLookup,
)

if TYPE_CHECKING:
    from authd.server import Server

log = structlog.get_logger("authd.master")


def peer_credentials(stream: trio.SocketStream) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket peer, via SO_PEERCRED."""
    sock = stream.socket
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def restricted_uid(path: str | None, creds: tuple[int, int, int] | None) -> int | None:
    """Dovecot's rule for a 0666 auth-userdb socket: a peer that is not root and has neither
    the socket's uid nor its gid may only look up users whose userdb uid is its own (no PASS,
    no LIST). Any other mode already limits who connects, so it means no check."""
    if path is None or creds is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_IMODE(st.st_mode) & 0o777 != 0o666:
        return None
    _, uid, gid = creds
    if uid == 0 or uid == st.st_uid or gid == st.st_gid:
        return None
    return uid


def _restricted_reason(path: str, uid: int) -> str:
    try:
        name = f"({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        name = ""
    return f"{path} mode=0666, but not owned by UID {uid}{name}"


class MasterConnection:
    def __init__(
        self, server: Server, stream: trio.SocketStream, *, userdb_only: bool, where: str, path: str | None
    ) -> None:
        self.server = server
        self.stream = stream
        self.where = where
        self.path = path
        self.proto = AuthMasterServer(server.spid, userdb_only=userdb_only)
        self.creds = peer_credentials(stream)
        # Only userdb sockets are checked; a master socket's mode is all there is.
        self.restricted_uid = restricted_uid(path, self.creds) if userdb_only else None
        self._outbox = Outbox(stream, self.proto.data_to_send)
        #: Counts USER/PASS/REQUEST lookups running as tasks; at requests_per_connection it waits.
        self._reader = ConnectionReader(stream, self._outbox, self.proto, self._cap, lambda: self._outbox.broken)
        #: The reader is done (EOF, protocol error): a LIST stops, as Dovecot's does.
        self._ended = False

    async def run(self) -> None:
        self.proto.initiate()
        gauge = self.server.metrics.connections.labels("userdb" if self.proto.userdb_only else "master")
        gauge.inc()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._outbox.run)
                await self._read_loop(nursery)
                self._ended = True
                await self._outbox.drain()
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("master.internal_error", listener=self.where)
        finally:
            gauge.dec()
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.stream.aclose()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                events = await self._reader.next_events()
            except PeerError as exc:
                log.error("master.protocol_error", message=str(exc), listener=self.where)
                return
            if events is None:
                return
            for event in events:
                await self._handle(event, nursery)
            if self._outbox.broken:
                return

    def _cap(self) -> int:
        return self.server.config.limits.requests_per_connection

    def _admit(self) -> bool:
        """Take a place in the process's [limits] requests_total; False (counted and logged
        as auth.queue_full) if there is none."""
        in_flight = self.server.in_flight
        limit = self.server.config.limits.requests_total
        if in_flight.count >= limit:
            in_flight.refused(limit)
            return False
        in_flight.count += 1
        return True

    def _spawn(
        self,
        nursery: trio.Nursery,
        request_id: int,
        handler: Callable[[Any], Awaitable[None]],
        arg: Any,
        fail: Callable[[int], None] | None = None,
    ) -> None:
        """Run a lookup as a task, or answer Dovecot's internal-failure reply (`fail`, by
        default a bare FAIL) at once if the process has requests_total requests in flight."""
        fail = fail or self.proto.failed
        if not self._admit():
            fail(request_id)
            return
        self._reader.step_started()
        nursery.start_soon(self._guarded, request_id, handler, arg, fail)

    async def _handle(self, event: MasterEvent, nursery: trio.Nursery) -> None:
        # User name checks answer at once, in order, as Dovecot does; lookups run as tasks.
        if isinstance(event, UserLookup):
            req = self._prepare(event, userdb=True)
            if req is not None:
                self._spawn(nursery, event.request_id, self._user, req)
        elif isinstance(event, PassLookup):
            req = self._prepare(event, userdb=False)
            if req is not None:
                self._spawn(nursery, event.request_id, self._pass, req)
        elif isinstance(event, LoginRequest):
            self._spawn(nursery, event.request_id, self._login_request, event)
        elif isinstance(event, ListUsers):
            self._spawn(nursery, event.request_id, self._list, event, self._list_failed)
        elif isinstance(event, CacheFlush):
            count = await self.server.cache_flush(event.users)
            self.proto.cache_flushed(event.request_id, count)

    async def _guarded(
        self, request_id: int, handler: Callable[[Any], Awaitable[None]], event: Any, fail: Callable[[int], None]
    ) -> None:
        try:
            await handler(event)
        except Exception:
            log.exception("master.internal_error", request_id=request_id)
            fail(request_id)
        finally:
            self._reader.step_ended()
            self.server.in_flight.count -= 1
        self._outbox.wake()

    # --- USER -----------------------------------------------------------------------

    def _prepare(self, event: UserLookup | PassLookup, *, userdb: bool) -> AuthRequest | None:
        """master_input_auth_request: a request with the user name set, or NOTFOUND now."""
        req = self.server.new_request(event.request_id)
        req.import_params(event.params, auth=False)
        req.userdb_lookup = userdb
        try:
            req.set_username(event.username)
        except UsernameError as exc:
            log.info(
                "userdb.invalid_username" if userdb else "passdb.invalid_username",
                message=str(exc),
                **req.log_context(),
            )
            self.proto.not_found(req.id)
            return None
        return req

    async def _user(self, req: AuthRequest) -> None:
        with self.server.generation.use() as generation:
            result = await generation.userdbs.lookup(req)
        self._reply_user(req, result)

    def _reply_user(self, req: AuthRequest, result: int) -> None:
        """user_callback: USER / NOTFOUND / FAIL, honouring the restricted-socket rule."""
        if req.userdb_lookup_tempfailed:
            result = UserdbResult.INTERNAL_FAILURE
        reply = req.userdb_reply
        if result == UserdbResult.OK and self.restricted_uid is not None:
            uid = reply.find(b"uid") if reply is not None else None
            if uid is None:
                problem = "userdb reply doesn't contain uid"
            elif not uid.isdigit() or int(uid) > 0xFFFFFFFF:
                problem = "userdb reply contains invalid uid"
            elif int(uid) != self.restricted_uid:
                problem = f"userdb uid ({int(uid)}) doesn't match peer uid ({self.restricted_uid})"
            else:
                problem = None
            if problem is not None:
                log.error(
                    "userdb.restricted",
                    message=f"client doesn't have lookup permissions for this user: {problem} "
                    f"(to bypass this check, set mode = 0o777 on {self.where})",
                    **req.log_context(),
                )
                result = UserdbResult.INTERNAL_FAILURE
        if result == UserdbResult.OK:
            self.proto.user_found(req.id, req.user or b"", list(reply) if reply is not None else [])
        elif result == UserdbResult.USER_UNKNOWN:
            self.proto.not_found(req.id)
        else:
            reason = reply.find(b"reason") if req.userdb_lookup_tempfailed and reply is not None else None
            self.proto.failed(req.id, reason)
        self.server.log_result(req, {1: "ok", -2: "notfound"}.get(result, "temp_fail"), command="USER")

    # --- PASS -----------------------------------------------------------------------

    async def _pass(self, req: AuthRequest) -> None:
        if self.restricted_uid is not None:
            log.error(
                "passdb.restricted",
                message="Auth client doesn't have permissions to do a PASS lookup: "
                + _restricted_reason(self.where, self.restricted_uid),
                **req.log_context(),
            )
            self.proto.failed(req.id)
            return
        with self.server.generation.use() as generation:
            result, _ = await generation.passdbs.lookup_credentials(req, "")
        if result != PassdbResult.OK:
            drop_proxy_fields(req)
        elif not await proxy_finish(req, self.server.config.auth.proxy_self):
            result = PassdbResult.INTERNAL_FAILURE
        if result == PassdbResult.OK:
            if req.failed or not req.passdb_success:
                self.proto.failed(req.id)
            else:
                self.proto.pass_found(req.id, req.user or b"", list(req.extra_fields))
        elif result in (PassdbResult.USER_UNKNOWN, PassdbResult.USER_DISABLED, PassdbResult.PASS_EXPIRED):
            self.proto.not_found(req.id)
        elif result == PassdbResult.SCHEME_NOT_AVAILABLE:
            self.proto.failed(req.id, b"Configured passdbs don't support credentials lookups")
        else:
            self.proto.failed(req.id)

    # --- LIST -----------------------------------------------------------------------

    def _list_failed(self, request_id: int) -> None:
        self.proto.list_done(request_id, failed=True)

    async def _list(self, event: ListUsers) -> None:
        if self.restricted_uid is not None:
            log.error(
                "userdb.restricted",
                message="Auth client doesn't have permissions to list users: "
                + _restricted_reason(self.where, self.restricted_uid),
            )
            self.proto.list_done(event.request_id, failed=True)
            return
        with self.server.generation.use() as generation:
            results = await generation.userdbs.iterate()
        if not results:
            log.error("userdb.iterate", message="Trying to iterate users, but userdbs don't support it")
            self.proto.list_done(event.request_id, failed=True)
            return
        failed = False
        for result in results:
            failed = failed or result.failed
            for user in result.users:
                self.proto.list_user(event.request_id, user)
                # Dovecot's MAX_OUTBUF_SIZE: the listing goes on as the peer reads it
                self._outbox.wake()
                await self._outbox.throttle()
                if self._outbox.broken or self._ended:
                    return  # the peer is gone: no DONE
        self.proto.list_done(event.request_id, failed=failed)

    # --- REQUEST ----------------------------------------------------------------------

    async def _login_request(self, event: LoginRequest) -> None:
        """master_input_request: answered by whichever process served the login."""
        args = LoginRequestArgs(
            request_id=event.request_id,
            client_pid=event.client_pid,
            client_request_id=event.client_request_id,
            cookie=event.cookie,
            session_pid=event.params.get(b"session_pid"),
            auth_token=event.params.has(b"request_auth_token"),
            peer_pid=self.creds[0] if self.creds else None,
        )
        reply = await self.server.login_request(args)
        if reply.kind == "user":
            self.proto.user_found(event.request_id, reply.user, reply.fields)
        elif reply.kind == "notfound":
            self.proto.not_found(event.request_id)
        else:
            self.proto.failed(event.request_id, reply.reason)


def auth_token(secret: bytes, service: bytes, session_pid: int, user: bytes, session: bytes | None) -> bytes:
    """auth_token_get: HMAC-SHA1 keyed with the user name, for imap-urlauth."""
    mac = hmac.new(user, b"%d" % session_pid, hashlib.sha1)
    if session:
        mac.update(session)
    mac.update(service)
    mac.update(secret)
    return mac.hexdigest().encode()

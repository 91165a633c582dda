"""One auth-client connection (client or login listener): protocol events to passdb calls.

The reader task feeds bytes to protocol.client.AuthClientServer and starts a task
for every event that needs the passdb; replies go out through one lock so tasks
never interleave bytes. Failures wait in the daemon's FailureDelay queue.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio

from authd.auth_request import AuthRequest, UsernameError
from authd.penalty import penalty_to_secs
from lua_api.results import PassdbResult
from protocol.client import AuthClientServer, HandshakeSettings, TakenRequest
from protocol.errors import PeerError
from protocol.events import (
    AnonymousLoggedIn,
    Authenticated,
    AuthFailed,
    AuthStarted,
    CertUsernameWanted,
    ClientConnected,
    ClientEvent,
    CredentialsWanted,
    PassdbVerdict,
    PasswordReceived,
    RequestDropped,
    UsernameReceived,
)

if TYPE_CHECKING:
    from authd.server import Server

log = structlog.get_logger("authd.client")

RECEIVE_SIZE = 65536


class ClientConnection:
    """Serves one connected auth client until it disconnects or breaks the protocol."""

    def __init__(self, server: Server, stream: trio.abc.Stream, *, login: bool, handshake: str, where: str) -> None:
        self.server = server
        self.stream = stream
        self.login = login
        self.where = where
        self.proto = AuthClientServer(
            HandshakeSettings(
                mechanisms=server.mechanisms,
                spid=server.spid,
                cuid=server.next_cuid(),
                cookie=secrets.token_bytes(16),
                wait_for_client_version=handshake == "2.4",
            ),
            login=login,
        )
        self.requests: dict[int, AuthRequest] = {}
        self._send_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.closed = False

    # --- I/O ----------------------------------------------------------------------

    async def run(self) -> None:
        self.server.add_client(self)
        gauge = self.server.metrics.connections.labels("login" if self.login else "client")
        gauge.inc()
        self.proto.initiate()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.flush()
                await self._read_loop()
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug of ours must cost one connection, never the daemon.
            log.exception("client.internal_error", listener=self.where, pid=self.proto.pid)
        finally:
            gauge.dec()
            self.closed = True
            self.server.forget_client(self)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.stream.aclose()

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                events = self.proto.receive_data(data)
            except PeerError as exc:
                log.error("client.protocol_error", message=str(exc), pid=self.proto.pid, listener=self.where)
                await self.flush()
                return
            self.dispatch(events)
            await self.flush()
            if self.closed:
                return

    async def flush(self) -> None:
        async with self._send_lock:
            data = self.proto.data_to_send()
            if data and not self.closed:
                await self._send(data)

    async def send_line(self, line: bytes) -> None:
        """Send a reply produced outside the protocol's queue (delayed FAILs)."""
        async with self._send_lock:
            if not self.closed:
                await self._send(line)

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True

    # --- events -------------------------------------------------------------------

    def dispatch(self, events: list[ClientEvent]) -> None:
        assert self._nursery is not None
        for event in events:
            if isinstance(event, ClientConnected):
                if not self.server.register_client(self, event.pid):
                    log.error(
                        "client.duplicate_pid",
                        message=f"BUG: Authentication client gave a PID {event.pid} of existing connection",
                    )
                    self.closed = True
                    self._nursery.cancel_scope.cancel()
                    return
            elif isinstance(event, AuthStarted):
                self._nursery.start_soon(self._guarded, event.request_id, self._start, event)
            elif isinstance(event, UsernameReceived):
                self._username(event)
            elif isinstance(event, PasswordReceived):
                self._nursery.start_soon(self._guarded, event.request_id, self._verify, event)
            elif isinstance(event, CredentialsWanted):
                self._nursery.start_soon(self._guarded, event.request_id, self._credentials, event)
            elif isinstance(event, CertUsernameWanted):
                req = self.requests.get(event.request_id)
                if req is not None:
                    self.dispatch(self.proto.cert_username_result(req.id, req.user is not None))
            elif isinstance(event, AnonymousLoggedIn):
                self._anonymous(event)
            elif isinstance(event, Authenticated):
                self._nursery.start_soon(self._guarded, event.request_id, self._succeed, event.request_id)
            elif isinstance(event, AuthFailed):
                req = self.requests.get(event.request_id)
                if req is not None:
                    if event.internal:
                        req.internal_failure = True
                    log.info(
                        "auth.mechanism_failed",
                        message=event.reason,
                        mech=_text(req.mech),
                        **req.log_context(),
                    )
                    self._nursery.start_soon(self._fail, req)
            elif isinstance(event, RequestDropped):
                self.requests.pop(event.request_id, None)

    async def _guarded(self, request_id: int, handler: Callable[[Any], Awaitable[None]], arg: Any) -> None:
        """Run a request step; an unexpected error fails that request with temp_fail."""
        try:
            await handler(arg)
        except Exception:
            log.exception("auth.internal_error", request_id=request_id)
            req = self.requests.get(request_id)
            if req is not None:
                req.internal_failure = True
                await self._fail(req)

    def take_request(self, request_id: int) -> TakenRequest | None:
        """Hand a finished login request to an auth-master REQUEST (one-shot)."""
        taken = self.proto.take_request(request_id)
        self.requests.pop(request_id, None)
        return taken

    def _current(self, req: AuthRequest) -> bool:
        """Is `req` still the live request for its id (not cancelled or replaced)?"""
        return self.requests.get(req.id) is req and not self.closed

    async def _start(self, event: AuthStarted) -> None:
        req = self.server.new_request(event.request_id)
        req.mech = event.mechanism.encode()
        req.client_pid = self.proto.pid if self.login and self.proto.pid else 0
        req.import_params(event.params, auth=True)
        self.requests[req.id] = req
        auth = self.server.config.auth
        refusal = None
        if auth.ssl_require_client_cert and not req.valid_client_cert:
            refusal = "Client didn't present valid SSL certificate"
        elif auth.ssl_require_client_cert and auth.ssl_username_from_cert and not req.cert_username:
            refusal = "SSL certificate didn't contain username"
        if refusal is not None:
            log.info("auth.refused", message=refusal, **req.log_context())
            self.dispatch(self.proto.refuse(req.id, refusal.encode()))
            self.server.log_result(req, "refused")
            await self.flush()
            return
        # Dovecot waits out the per-IP penalty before running the mechanism; a CONT
        # arriving meanwhile is an "Unexpected continuation".
        ident = self.server.penalty.ident(req.remote_ip, no_penalty=req.no_penalty)
        if ident is not None:
            req.last_penalty = self.server.penalty.lookup(ident)
            if req.last_penalty:
                self.server.metrics.penalty_waits.inc()
                await trio.sleep(penalty_to_secs(req.last_penalty))
                if not self._current(req):
                    return
        self.dispatch(self.proto.begin(req.id))
        await self.flush()

    def _username(self, event: UsernameReceived) -> None:
        req = self.requests.get(event.request_id)
        if req is None:
            return
        try:
            req.set_username(event.username)
        except UsernameError as exc:
            log.info("auth.invalid_username", message=str(exc), **req.log_context())
            self.dispatch(self.proto.username_result(req.id, False))
            return
        self.dispatch(self.proto.username_result(req.id, True))

    def _anonymous(self, event: AnonymousLoggedIn) -> None:
        """mech-anonymous: the user becomes anonymous_username, no passdb asked."""
        req = self.requests.get(event.request_id)
        if req is None:
            return
        trace = event.trace.decode("utf-8", "replace")[:256]
        log.info("auth.anonymous", message="login", trace=trace, **req.log_context())
        req.user = self.server.rules.anonymous_username.encode()
        req.passdb_success = True
        assert self._nursery is not None
        self._nursery.start_soon(self._guarded, req.id, self._succeed, req.id)

    async def _verify(self, event: PasswordReceived) -> None:
        req = self.requests.get(event.request_id)
        if req is None:
            return
        try:
            req.set_username(event.username)
            if event.authzid:
                req.set_login_username(event.authzid)
        except UsernameError as exc:
            log.info("auth.invalid_username", message=str(exc), **req.log_context())
            await self._fail(req)
            return
        with self.server.generation.use() as generation:
            result = await generation.passdbs.verify_plain(req, event.password)
        if not self._current(req):
            return
        self.dispatch(self.proto.password_result(req.id, _verdict(result)))
        await self.flush()

    async def _credentials(self, event: CredentialsWanted) -> None:
        req = self.requests.get(event.request_id)
        if req is None:
            return
        try:
            req.set_username(event.username)
            if event.authzid:
                req.set_login_username(event.authzid)
        except UsernameError as exc:
            log.info("auth.invalid_username", message=str(exc), **req.log_context())
            await self._fail(req)
            return
        with self.server.generation.use() as generation:
            result, credentials = await generation.passdbs.lookup_credentials(req, event.scheme)
        if not self._current(req):
            return
        self.dispatch(self.proto.credentials_result(req.id, _verdict(result), credentials or b""))
        await self.flush()

    async def _succeed(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.failed or not req.passdb_success:
            await self._fail(req)
            return
        req.successful = True
        if req.delay_until > 0:
            wait = req.delay_until - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            if not self._current(req):
                return
        extra = req.extra_fields
        extra.booleanize(b"nologin")
        extra.booleanize(b"proxy")
        if req.last_penalty:
            self._penalize(req, 0)  # a success resets the address's penalty
        keep = req if self.login and b"nologin" not in extra and b"proxy" not in extra else None
        self.proto.succeed(req.id, req.user or b"", list(extra), req.reply_trailer(login=self.login), keep=keep)
        if keep is None:
            self.requests.pop(req.id, None)
        self.server.log_result(req, "ok")
        await self.flush()

    async def _fail(self, req: AuthRequest) -> None:
        """auth_request_handler_reply_failure_finish + the failure delay."""
        if not self._current(req):
            return
        extra = req.extra_fields
        extra.remove(b"nologin")
        code = b""
        if req.internal_failure:
            code = b"temp_fail"
        elif req.master_user is not None:
            code = b"authz_fail"
        elif req.passdb_result == PassdbResult.USER_DISABLED:
            code = b"user_disabled"
        elif req.passdb_result == PassdbResult.PASS_EXPIRED:
            code = b"pass_expired"
        nodelay = b"nodelay" in extra
        line = self.proto.fail(
            req.id,
            req.user if req.user is not None else req.original_user,
            code=code,
            nodelay=nodelay,
            fields=list(extra),
            trailer=req.reply_trailer(login=self.login),
        )
        self.requests.pop(req.id, None)
        self.server.log_result(req, code.decode() or "failed")
        if line is None:
            return
        if nodelay:
            await self.send_line(line)
            return
        self._penalize(req, req.last_penalty + 1)
        if self.server.failure_delay.delay <= 0:
            await self.send_line(line)
        else:
            self.server.failure_delay.add(lambda: self.send_line(line))

    def _penalize(self, req: AuthRequest, value: int) -> None:
        ident = self.server.penalty.ident(req.remote_ip, no_penalty=req.no_penalty)
        if ident is not None:
            self.server.penalty.update(ident, value, user=req.user or b"", password=req.mech_password)
            if value:
                self.server.metrics.penalties.inc()
                log.info("auth.penalty", penalty=value, **req.log_context())


def _verdict(result: int) -> PassdbVerdict:
    """What a mechanism needs to know of a passdb result."""
    if result == PassdbResult.OK:
        return PassdbVerdict.OK
    if result == PassdbResult.INTERNAL_FAILURE:
        return PassdbVerdict.INTERNAL_FAILURE
    return PassdbVerdict.FAILED


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")

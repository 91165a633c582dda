"""One auth-client connection (client or login listener): protocol events to passdb calls.

The reader feeds bytes to protocol.client.AuthClientServer and handles its events
right away, in order; only a passdb call, a penalty wait or a delay_until wait runs
as a task of its own. Replies go out through the connection's Outbox, which sends
what several requests produced together. Failures wait in the daemon's FailureDelay
queue.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from authd.auth_request import AuthRequest, UsernameError
from authd.conn_reader import ConnectionReader
from authd.log_throttle import ThrottledWarning
from authd.outbox import Outbox
from authd.penalty import penalty_to_secs
from authd.proxy import drop_proxy_fields, proxy_finish, wants_proxy
from lua_api.results import PassdbResult
from protocol.client import (
    AuthClientServer,
    HandshakeSettings,
    RequestHandle,
    RequestState,
    RequestTimedOut,
    TakenRequest,
)
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
    from authd.metrics import Metrics
    from authd.server import Server

log = structlog.get_logger("authd.client")

#: A full [limits] requests_total is logged at most once in this many seconds.
QUEUE_FULL_LOG_SECS = 10.0


class InFlight:
    """Request steps that wait in this process (passdb calls, penalties, delays), for [limits].

    The count is what `authd_requests_in_flight` shows; a request refused because the count
    reached requests_total is counted in `authd_requests_refused_total` and logged as
    `auth.queue_full` once per QUEUE_FULL_LOG_SECS, with the refusals since the last line.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.count = 0
        self._refused = metrics.requests_refused
        self._queue_full = ThrottledWarning(log, "auth.queue_full", QUEUE_FULL_LOG_SECS, "refused")
        self._connection_full = ThrottledWarning(log, "auth.connection_full", QUEUE_FULL_LOG_SECS, "refused")
        metrics.requests_in_flight.set_function(lambda: self.count)

    def connection_full(self, limit: int) -> None:
        """An AUTH refused at [limits] open_requests_per_connection: logged as
        `auth.connection_full` once per QUEUE_FULL_LOG_SECS, with the refusals since."""
        self._connection_full.hit(
            message=f"{limit} requests open on one connection: new ones get temp_fail "
            "([limits] open_requests_per_connection)",
            limit=limit,
        )

    def refused(self, limit: int) -> None:
        self._refused.inc()
        self._queue_full.hit(
            message=f"{limit} requests in progress: new ones get temp_fail ([limits] requests_total)",
            limit=limit,
        )


def log_duplicate_pid(pid: int, **context: object) -> None:
    """Dovecot's error for a login client pid that another live connection has."""
    log.error(
        "client.duplicate_pid", message=f"BUG: Authentication client gave a PID {pid} of existing connection", **context
    )


@dataclass(eq=False)
class _Tracked:
    """What the connection keeps of one live request besides its AuthRequest: the protocol's
    handle (answers go to this request, never to a later one reusing the id) and the cancel
    scopes of its running steps (cancelled when the request is dropped)."""

    handle: RequestHandle
    scopes: set[trio.CancelScope] = field(default_factory=set)


def _gone(req: AuthRequest) -> RequestHandle:
    """A handle the protocol ignores answers through: serial 0 (live requests start at 1)."""
    return RequestHandle(req.id, 0)


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
            clock=trio.current_time,
            request_timeout=server.config.limits.request_timeout,
        )
        self.requests: dict[int, AuthRequest] = {}
        #: Keyed by the AuthRequest object (eq=False: by identity), as long as it is in `requests`.
        self._tracked: dict[AuthRequest, _Tracked] = {}
        self._outbox = Outbox(stream, self.proto.data_to_send)
        self._nursery: trio.Nursery | None = None
        self._closed = False
        #: Counts the request steps running as tasks; at [limits] requests_per_connection it waits.
        self._reader = ConnectionReader(stream, self._outbox, self.proto, self._cap, lambda: self.closed)

    @property
    def closed(self) -> bool:
        """The connection ended, or its peer stopped reading: replies go nowhere."""
        return self._closed or self._outbox.broken

    # --- I/O ----------------------------------------------------------------------

    async def run(self) -> None:
        self.server.add_client(self)
        gauge = self.server.metrics.connections.labels("login" if self.login else "client")
        gauge.inc()
        self.proto.initiate()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._outbox.run)
                nursery.start_soon(self._expire)
                await self._read_loop()
                await self._outbox.drain()
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug of ours must cost one connection, never the daemon.
            log.exception("client.internal_error", listener=self.where, pid=self.proto.pid)
        finally:
            gauge.dec()
            self._closed = True
            self.server.forget_client(self)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self.stream.aclose()

    async def _read_loop(self) -> None:
        while True:
            try:
                events = await self._reader.next_events()
            except PeerError as exc:
                log.error("client.protocol_error", message=str(exc), pid=self.proto.pid, listener=self.where)
                return
            if events is None:
                return
            self.dispatch(events)
            if self.closed:
                return

    def _cap(self) -> int:
        return self.server.config.limits.requests_per_connection

    async def _expire(self) -> None:
        """Dovecot's per-request timeout: wake when the oldest request is due (a request
        that does not exist yet is due a whole timeout from now at the earliest)."""
        while True:
            due = self.proto.next_expiry()
            await trio.sleep_until(due if due is not None else trio.current_time() + self.proto.request_timeout)
            events = self.proto.expire()
            if events:
                self.dispatch(events)

    async def send_line(self, line: bytes) -> None:
        """Send a reply produced outside the protocol's queue (delayed FAILs)."""
        if not self.closed:
            self._outbox.send(line)

    # --- events -------------------------------------------------------------------

    def dispatch(self, events: list[ClientEvent]) -> None:
        """Handle protocol events in order; whatever they answer at once goes out together."""
        for event in events:
            if isinstance(event, ClientConnected):
                if not self._connected(event):
                    return
                continue
            req = self.requests.get(event.request_id)
            try:
                self._handle(event)
            except Exception:
                self._internal_error(event.request_id, req)
        self._outbox.wake()

    def _connected(self, event: ClientConnected) -> bool:
        if self.server.register_client(self, event.pid):
            return True
        log_duplicate_pid(event.pid)
        self._closed = True
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return False

    def _handle(self, event: ClientEvent) -> None:
        if isinstance(event, AuthStarted):
            self._start(event)
        elif isinstance(event, PasswordReceived):
            if (req := self.requests.get(event.request_id)) is not None:
                self._spawn(req, partial(self._verify, req, event), queue=True)
        elif isinstance(event, Authenticated):
            self._succeed(event.request_id)
        elif isinstance(event, UsernameReceived):
            self._username(event)
        elif isinstance(event, CredentialsWanted):
            if (req := self.requests.get(event.request_id)) is not None:
                self._spawn(req, partial(self._credentials, req, event), queue=True)
        elif isinstance(event, CertUsernameWanted):
            req = self.requests.get(event.request_id)
            if req is not None:
                self.dispatch(self.proto.cert_username_result(self._ref(req), req.user is not None))
        elif isinstance(event, AnonymousLoggedIn):
            self._anonymous(event)
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
                self._fail(req)
        elif isinstance(event, RequestTimedOut):
            self._timed_out(event)
        elif isinstance(event, RequestDropped):
            self._drop(event.request_id)

    def _timed_out(self, event: RequestTimedOut) -> None:
        """auth_request_timeout: the request is gone, nothing is sent; Dovecot's log line."""
        req = self._drop(event.request_id)
        context = {"mech": _text(req.mech), **req.log_context()} if req is not None else {}
        if event.state is RequestState.MECH_CONTINUE:
            message = f"Request timed out waiting for client to continue authentication ({event.secs} secs)"
            log.info("auth.timeout", message=message, **context)
        else:
            pid = self.proto.pid if self.login and self.proto.pid else 0  # the handler's client_pid
            message = f"Request {pid}.{event.request_id} timed out after {event.secs} secs, state={int(event.state)}"
            log.error("auth.timeout", message=message, **context)

    def _spawn(self, req: AuthRequest, step: Callable[[], Awaitable[None]], *, queue: bool = False) -> None:
        """Run a step of `req` that waits (passdb call, penalty, delay_until) as a task.

        A `queue` step (a request's first wait) is refused with temp_fail at once while
        [limits] requests_total steps wait in this process. The step runs only while `req`
        is live: dropping the request (CANCEL, a FAIL, a timeout) cancels it."""
        assert self._nursery is not None
        in_flight = self.server.in_flight
        if queue and in_flight.count >= self.server.config.limits.requests_total:
            self._refuse_busy(req)
            return
        self._reader.step_started()
        in_flight.count += 1
        self._nursery.start_soon(self._guarded, req, step)

    async def _guarded(self, req: AuthRequest, step: Callable[[], Awaitable[None]]) -> None:
        tracked = self._tracked.get(req) if self._current(req) else None
        scope = trio.CancelScope()
        try:
            if tracked is not None:  # else dropped before the task started: nothing to do
                tracked.scopes.add(scope)
                with scope:
                    await step()
        except Exception:
            self._internal_error(req.id, req)
        finally:
            if tracked is not None:
                tracked.scopes.discard(scope)
            self._reader.step_ended()
            self.server.in_flight.count -= 1
        self._outbox.wake()

    def _refuse_busy(self, req: AuthRequest) -> None:
        """The process has requests_total steps waiting: temp_fail now, no failure delay."""
        handle = self._ref(req)
        self._forget(req)
        line = self.proto.fail(handle, code=b"temp_fail")
        if line is not None:
            self._outbox.send(line)
        self.server.in_flight.refused(self.server.config.limits.requests_total)

    def _internal_error(self, request_id: int, req: AuthRequest | None) -> None:
        """An unexpected error in a step of `req` fails that request with temp_fail."""
        log.exception("auth.internal_error", request_id=request_id)
        if req is not None:
            req.internal_failure = True
            self._fail(req)

    def take_request(self, request_id: int) -> TakenRequest | None:
        """Hand a finished login request to an auth-master REQUEST (one-shot)."""
        taken = self.proto.take_request(request_id)
        self._drop(request_id)
        return taken

    def _current(self, req: AuthRequest) -> bool:
        """Is `req` still the live request for its id (not cancelled or replaced)?"""
        return self.requests.get(req.id) is req and not self.closed

    def _ref(self, req: AuthRequest) -> RequestHandle:
        """How to answer the protocol about `req`: its handle, refused once `req` is gone."""
        tracked = self._tracked.get(req)
        return tracked.handle if tracked is not None else _gone(req)

    def _drop(self, request_id: int) -> AuthRequest | None:
        """Forget the request of `request_id` (the protocol dropped it) and cancel its steps."""
        req = self.requests.get(request_id)
        if req is not None:
            self._forget(req)
        return req

    def _forget(self, req: AuthRequest) -> None:
        """Forget `req` (never a later request that reuses its id) and cancel its running steps."""
        if self.requests.get(req.id) is req:
            del self.requests[req.id]
        tracked = self._tracked.pop(req, None)
        if tracked is not None:
            for scope in tracked.scopes:
                scope.cancel()

    def _start(self, event: AuthStarted) -> None:
        limit = self.server.config.limits.open_requests_per_connection
        if self.proto.open_requests > limit:  # the new request is one of them
            line = self.proto.fail(event.request_id, code=b"temp_fail")
            if line is not None:
                self._outbox.send(line)
            self.server.in_flight.connection_full(limit)
            return
        req = self.server.new_request(event.request_id)
        req.mech = event.mechanism.encode()
        req.client_pid = self.proto.pid if self.login and self.proto.pid else 0
        req.import_params(event.params, auth=True)
        handle = self.proto.handle(event.request_id)
        assert handle is not None  # the AUTH line's request, just added
        self.requests[req.id] = req
        self._tracked[req] = _Tracked(handle)
        auth = self.server.config.auth
        refusal = None
        if auth.ssl_require_client_cert and not req.valid_client_cert:
            refusal = "Client didn't present valid SSL certificate"
        elif auth.ssl_require_client_cert and auth.ssl_username_from_cert and not req.cert_username:
            refusal = "SSL certificate didn't contain username"
        if refusal is not None:
            log.info("auth.refused", message=refusal, **req.log_context())
            self.dispatch(self.proto.refuse(handle, refusal.encode()))
            self.server.log_result(req, "refused")
            return
        # Dovecot waits out the per-IP penalty before running the mechanism; a CONT
        # arriving meanwhile is an "Unexpected continuation".
        ident = self.server.penalty.ident(req.remote_ip, no_penalty=req.no_penalty)
        if ident is not None:
            if self.server.penalty.shared:  # [state] redis: ask the shared penalty first, as Dovecot asks anvil
                self._spawn(req, partial(self._begin_after_penalty, req), queue=True)
                return
            req.last_penalty = self.server.penalty.lookup(ident)
            if req.last_penalty:
                self.server.metrics.penalty_waits.inc()
                self._spawn(req, partial(self._begin_after_penalty, req), queue=True)
                return
        self.dispatch(self.proto.begin(handle))

    async def _begin_after_penalty(self, req: AuthRequest) -> None:
        penalty = self.server.penalty
        if penalty.shared:
            ident = penalty.ident(req.remote_ip, no_penalty=req.no_penalty)
            req.last_penalty = await penalty.decide(ident) if ident is not None else 0
            if req.last_penalty:
                self.server.metrics.penalty_waits.inc()
        if req.last_penalty:
            await trio.sleep(penalty_to_secs(req.last_penalty))
        if self._current(req):
            self.dispatch(self.proto.begin(self._ref(req)))

    def _username(self, event: UsernameReceived) -> None:
        req = self.requests.get(event.request_id)
        if req is None:
            return
        try:
            req.set_username(event.username)
        except UsernameError as exc:
            log.info("auth.invalid_username", message=str(exc), **req.log_context())
            self.dispatch(self.proto.username_result(self._ref(req), False))
            return
        self.dispatch(self.proto.username_result(self._ref(req), True))

    def _anonymous(self, event: AnonymousLoggedIn) -> None:
        """mech-anonymous: the user becomes anonymous_username, no passdb asked."""
        req = self.requests.get(event.request_id)
        if req is None:
            return
        trace = event.trace.decode("utf-8", "replace")[:256]
        log.info("auth.anonymous", message="login", trace=trace, **req.log_context())
        req.user = self.server.rules.anonymous_username.encode()
        req.passdb_success = True
        self._succeed(req.id)

    async def _verify(self, req: AuthRequest, event: PasswordReceived) -> None:
        try:
            req.set_username(event.username)
            if event.authzid:
                req.set_login_username(event.authzid)
        except UsernameError as exc:
            log.info("auth.invalid_username", message=str(exc), **req.log_context())
            self._fail(req)
            return
        with self.server.generation.use() as generation:
            result = await generation.passdbs.verify_plain(req, event.password)
        if self._current(req):
            self.dispatch(self.proto.password_result(self._ref(req), _verdict(result)))

    async def _credentials(self, req: AuthRequest, event: CredentialsWanted) -> None:
        try:
            req.set_username(event.username)
            if event.authzid:
                req.set_login_username(event.authzid)
        except UsernameError as exc:
            log.info("auth.invalid_username", message=str(exc), **req.log_context())
            self._fail(req)
            return
        with self.server.generation.use() as generation:
            result, credentials = await generation.passdbs.lookup_credentials(req, event.scheme)
        if self._current(req):
            self.dispatch(self.proto.credentials_result(self._ref(req), _verdict(result), credentials or b""))

    def _succeed(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.failed or not req.passdb_success:
            self._fail(req)
            return
        req.successful = True
        if self.login and wants_proxy(req):
            self._spawn(req, partial(self._settle_proxy, req))
            return
        self._succeed_now_or_later(req)

    async def _settle_proxy(self, req: AuthRequest) -> None:
        """proxy/proxy_maybe may need a DNS lookup before the login can succeed."""
        proceed = await proxy_finish(req, self.server.config.auth.proxy_self)
        if not self._current(req):
            return
        if proceed:
            self._succeed_now_or_later(req)
        else:
            self._fail(req)

    def _succeed_now_or_later(self, req: AuthRequest) -> None:
        # delay_until is a wall-clock time, as in Dovecot (compared with ioloop_time).
        if req.delay_until > time.time():
            self._spawn(req, partial(self._succeed_after_delay, req))
            return
        self._reply_ok(req)

    async def _succeed_after_delay(self, req: AuthRequest) -> None:
        await trio.sleep(req.delay_until - time.time())
        if self._current(req):
            self._reply_ok(req)

    def _reply_ok(self, req: AuthRequest) -> None:
        extra = req.extra_fields
        extra.booleanize(b"nologin")
        extra.booleanize(b"proxy")
        if req.last_penalty:
            self._penalize(req, 0)  # a success resets the address's penalty
        keep = req if self.login and b"nologin" not in extra and b"proxy" not in extra else None
        self.proto.succeed(self._ref(req), req.user or b"", list(extra), req.reply_trailer(login=self.login), keep=keep)
        if keep is None:
            self._forget(req)
        self.server.log_result(req, "ok")

    def _fail(self, req: AuthRequest) -> None:
        """auth_request_handler_reply_failure_finish + the failure delay."""
        if not self._current(req):
            return
        drop_proxy_fields(req)
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
            self._ref(req),
            req.user if req.user is not None else req.original_user,
            code=code,
            nodelay=nodelay,
            fields=list(extra),
            trailer=req.reply_trailer(login=self.login),
        )
        self._forget(req)
        self.server.log_result(req, code.decode() or "failed")
        if line is None:
            return
        if nodelay:
            self._outbox.send(line)
            return
        self._penalize(req, req.last_penalty + 1)
        if self.server.failure_delay.delay <= 0:
            self._outbox.send(line)
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

"""The daemon: builds passdbs from the config, opens listeners, serves connections.

Everything runs under one trio nursery. SIGTERM/SIGINT stop accepting, let the
connection tasks end, and run script_deinit() on every Lua state.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from authd import systemd
from authd.auth_request import AuthRequest, UsernameRules
from authd.cache import AuthCache
from authd.cache_glue import PassdbCache, UserdbCache
from authd.client_conn import ClientConnection
from authd.databases import build_passdbs, build_userdbs
from authd.failure_delay import FailureDelay
from authd.listeners import open_listener
from authd.lua_bridge import expand_context
from authd.master_conn import MasterConnection, auth_token
from authd.penalty import PenaltyTracker
from config.schema import Config, ListenerSettings
from lua_api.http import HttpExtension
from lua_api.runtime import StateOptions
from protocol.mechanisms import MECHANISMS, Mechanism

log = structlog.get_logger("authd.server")


@dataclass
class ListenerInfo:
    settings: ListenerSettings
    listener: trio.SocketListener
    #: Sockets we created (and remove at exit), as opposed to inherited ones.
    owned: bool = True


class Server:
    """One authd instance: shared state for every connection it serves."""

    def __init__(self, config: Config, *, listeners: list[ListenerInfo] | None = None) -> None:
        self.config = config
        self._given_listeners = listeners
        self._shutdown = trio.Event()
        #: Dovecot's master sends SIGINT for idle kills; a service must ignore it.
        self.stop_on_sigint = listeners is None
        self.spid = os.getpid()
        self._cuid = itertools.count(1)
        auth = config.auth
        self.rules = UsernameRules(
            chars=auth.username_chars,
            translation=auth.username_translation,
            format=auth.username_format,
            default_realm=auth.default_realm,
            anonymous_username=auth.anonymous_username,
            master_user_separator=auth.master_user_separator,
            master_passdbs=any(p.master for p in config.passdbs),
            expand_context=expand_context(self._environment()),
        )
        self.mechanisms: list[type[Mechanism]] = [MECHANISMS[m.upper()] for m in auth.mechanisms]
        self.failure_delay = FailureDelay(auth.failure_delay)
        self.penalty = PenaltyTracker(auth.trusted_networks, enabled=auth.penalty)
        self.limiter = trio.CapacityLimiter(config.lua.workers)
        self.passdbs = build_passdbs(config, self._state_options, self.limiter)
        self.userdbs = build_userdbs(config, self._state_options, self.limiter, self.passdbs)
        self.cache: AuthCache | None = None
        if config.cache.size > 0 and config.cache.ttl > 0:
            self.cache = AuthCache(config.cache.size, config.cache.ttl, config.cache.negative_ttl)
            self.passdbs.cache = PassdbCache(self.cache)
            self.userdbs.cache = UserdbCache(self.cache)
        self.token_secret = secrets.token_bytes(32)
        self.login_clients: dict[int, ClientConnection] = {}
        self.clients: set[ClientConnection] = set()
        self.listeners: list[ListenerInfo] = []
        self.ready = trio.Event()

    def _environment(self) -> dict[str, str]:
        """What scripts see of the environment: only [lua] import_environment, like Dovecot."""
        names = self.config.lua.import_environment
        return {name: os.environ[name] for name in names if name in os.environ}

    def _state_options(self) -> StateOptions:
        lua = self.config.lua
        environment = self._environment()
        return StateOptions(
            version=lua.version,
            package_path=lua.package_path,
            package_cpath=lua.package_cpath,
            environment=environment,
            extensions=self._extensions(),
        )

    def _extensions(self) -> tuple[object, ...]:
        if not hasattr(self, "_http"):
            self._http = HttpExtension()
        return (self._http,)

    # --- shared state ------------------------------------------------------------

    def next_cuid(self) -> int:
        return next(self._cuid)

    def new_request(self, request_id: int) -> AuthRequest:
        return AuthRequest(self.rules, id=request_id)

    def add_client(self, conn: ClientConnection) -> None:
        self.clients.add(conn)

    def register_client(self, conn: ClientConnection, pid: int) -> bool:
        """CPID uniqueness on login sockets (the old connection must be gone)."""
        if not conn.login:
            return True
        old = self.login_clients.get(pid)
        if old is not None and old is not conn and not old.closed:
            return False
        self.login_clients[pid] = conn
        return True

    def forget_client(self, conn: ClientConnection) -> None:
        self.clients.discard(conn)
        pid = conn.proto.pid
        if pid is not None and self.login_clients.get(pid) is conn:
            del self.login_clients[pid]

    def cache_flush(self, users: tuple[bytes, ...]) -> int:
        """CACHE-FLUSH: drop everything, or the listed users' entries; returns how many."""
        if self.cache is None:
            return 0
        count = self.cache.clear_users(users) if users else self.cache.clear()
        log.info("cache.flush", entries=count, users=[u.decode("utf-8", "replace") for u in users])
        return count

    def auth_token(self, req: AuthRequest) -> bytes:
        assert req.session_pid is not None
        return auth_token(
            self.token_secret, req.service or b"", req.session_pid, req.user or b"", req.session
        )

    def log_result(self, req: AuthRequest, result: str) -> None:
        log.info(
            "auth.request",
            result=result,
            mech=(req.mech or b"").decode("latin-1"),
            duration_ms=round((time.monotonic() - req.started) * 1000, 1),
            **req.log_context(),
        )

    # --- running --------------------------------------------------------------------

    async def load(self) -> None:
        """Load every script into its states (raises ScriptLoadError)."""
        await self.passdbs.start()
        await self.userdbs.start()

    async def close(self) -> None:
        await self.passdbs.close()
        await self.userdbs.close()
        if hasattr(self, "_http"):
            await self._http.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Load scripts, open listeners and serve until cancelled or signalled."""
        await self.load()
        try:
            self.listeners = self._open_listeners()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.failure_delay.serve)
                nursery.start_soon(self._expire_requests)
                nursery.start_soon(systemd.watchdog)
                for info in self.listeners:
                    nursery.start_soon(self._accept_loop, info, nursery)
                    log.info("listener.ready", type=info.settings.type, where=info.settings.where)
                self.ready.set()
                systemd.notify("READY=1\nSTATUS=serving")
                task_status.started(self)
                nursery.start_soon(self._wait_for_signal)
                await self._shutdown.wait()
                systemd.notify("STOPPING=1")
                nursery.cancel_scope.cancel()
        finally:
            for info in self.listeners:
                with trio.CancelScope(shield=True):
                    await info.listener.aclose()
                if info.owned and info.settings.path is not None:
                    info.settings.path.unlink(missing_ok=True)
            with trio.CancelScope(shield=True):
                await self.close()
            log.info("server.stopped")

    def _open_listeners(self) -> list[ListenerInfo]:
        """Inherited sockets (Dovecot service, systemd socket units) win over the config's."""
        if self._given_listeners is not None:
            return self._given_listeners
        activated = systemd.activated_sockets()
        if activated:
            return [
                ListenerInfo(
                    ListenerSettings(
                        type=a.type,
                        path=Path(a.path) if a.path else None,
                        address=a.address[0] if a.address else None,
                        port=a.address[1] if a.address else None,
                    ),
                    trio.SocketListener(trio.socket.from_stdlib_socket(a.sock)),
                    owned=False,
                )
                for a in activated
            ]
        return [ListenerInfo(s, open_listener(s)) for s in self.config.listeners]

    def shutdown(self, reason: str) -> None:
        """Stop serving: close listeners, end connections, deinit scripts."""
        log.info("server.stopping", reason=reason)
        self._shutdown.set()

    async def _wait_for_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGINT and not self.stop_on_sigint:
                    log.info("server.ignoring_sigint", message="ignoring idle SIGINT from Dovecot's master")
                    continue
                self.shutdown(signal.Signals(signum).name)
                return

    async def _expire_requests(self) -> None:
        """Drop requests older than Dovecot's 150 s request timeout."""
        while True:
            await trio.sleep(10)
            for conn in list(self.clients):
                conn.dispatch(conn.proto.expire())

    async def _accept_loop(self, info: ListenerInfo, nursery: trio.Nursery) -> None:
        kind = info.settings.type
        while True:
            try:
                stream = await info.listener.accept()
            except OSError as exc:
                log.error("listener.accept_failed", where=info.settings.where, message=str(exc))
                await trio.sleep(0.1)
                continue
            if kind in ("client", "login"):
                conn = ClientConnection(
                    self,
                    stream,
                    login=kind == "login",
                    handshake=info.settings.handshake,
                    where=info.settings.where,
                )
                nursery.start_soon(conn.run)
            else:
                path = str(info.settings.path) if info.settings.path is not None else None
                master = MasterConnection(
                    self, stream, userdb_only=kind == "userdb", where=info.settings.where, path=path
                )
                nursery.start_soon(master.run)

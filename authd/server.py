"""The daemon: builds passdbs from the config, opens listeners, serves connections.

Everything runs under one trio nursery. SIGTERM/SIGINT stop accepting, let the
connection tasks end, and run script_deinit() on every Lua state. SIGHUP, a script
edit or `authd reload` reload the config and scripts without dropping anything
(authd.reload). With [server] processes above 1 the same class also runs in each
worker process, without listeners, fed connections by the main one (authd.workers).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import structlog
import trio

from authd import systemd
from authd.auth_request import AuthRequest, UsernameRules
from authd.cache import AuthCache
from authd.cache_glue import PassdbCache, UserdbCache
from authd.client_conn import ClientConnection, InFlight, log_duplicate_pid
from authd.databases import build_passdbs, build_userdbs, lua_drivers, lua_pools
from authd.failure_delay import FailureDelay
from authd.listeners import ListenerError, open_listener, set_permissions
from authd.login_request import LoginReply, LoginRequestArgs, finish_login
from authd.lua_bridge import expand_context
from authd.master_conn import MasterConnection, auth_token
from authd.metrics import Metrics, merge_pages, serve_metrics
from authd.passdb import PassdbChain
from authd.penalty import PenaltyTracker
from authd.reload import Generation, ScriptWatcher, script_files
from authd.state import open_backend
from authd.state.dict_redis import open_dicts, run_dicts
from authd.userdb import UserdbChain
from authd.workers import SHARED_TYPES, Hooks, WorkerPool, worker_command
from config import ConfigError, load_config
from config.schema import CacheSettings, Config, ListenerSettings, MetricsSettings
from lua_api.dict import DictExtension
from lua_api.dns import DnsExtension
from lua_api.http import HttpExtension
from lua_api.runtime import LuaExtension, StateOptions
from lua_api.script import ScriptLoadError
from protocol.mechanisms import MECHANISMS, Mechanism

log = structlog.get_logger("authd.server")

#: Dovecot's master hands every auth service its token-login/tokenlogin socket: authd takes
#: it, and closes each connection at once, so imap-urlauth-login is refused, not left waiting.
TOKEN_REFUSED = "DOVECOT-TOKEN (imap-urlauth) is not implemented: each connection is closed"


@dataclass
class ListenerInfo:
    settings: ListenerSettings
    listener: trio.SocketListener
    #: Sockets we created (and remove at exit), as opposed to inherited ones.
    owned: bool = True
    #: Cancelled to stop accepting on this listener (a reload removed it).
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class MetricsEndpoint:
    """A metrics endpoint: `stop()` it; `done` is set once its socket is closed (none: no port)."""

    port: int | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    def stop(self) -> None:
        self.scope.cancel()


class Server:
    """One authd instance: shared state for every connection it serves."""

    def __init__(
        self,
        config: Config,
        *,
        listeners: list[ListenerInfo] | None = None,
        worker: tuple[int, int] | None = None,
        log_options: tuple[str | None, str | None] = (None, None),
    ) -> None:
        """`worker`: (index, processes) when this is a worker process (authd.worker);
        `log_options`: the command line's log format and level, for the workers."""
        self.worker_index, processes = worker if worker is not None else (0, _process_count(config, listeners))
        self._processes = processes
        config = self._share_of(config)
        self.config = config
        self._given_listeners = listeners
        self._log_options = log_options
        #: The worker processes, when this main process has any (started by serve()).
        self.workers: WorkerPool | None = None
        self.token_secret = secrets.token_bytes(32)  # a worker gets the main process's (authd.worker)
        self.login_clients: dict[int, ClientConnection] = {}
        if worker is None and processes > 1:
            hooks = Hooks(self._apply_penalty, self._reload_soon, self.login_clients.__contains__, self.token_secret)
            self.workers = WorkerPool(processes, self._worker_command(), hooks)
        #: How a SIGHUP (or a worker's) asks for a reload; a worker asks its main process instead.
        self.request_reload: Callable[[str], None] = self._reload_soon
        #: Listeners came from systemd socket units (so not from the config).
        self._activated = False
        self._shutdown = trio.Event()
        #: Dovecot's master sends SIGINT for idle kills; a service must ignore it.
        self.stop_on_sigint = listeners is None
        # To its clients authd is one server: workers greet with the main process's pid.
        # (A post-login process drops a login whose SPID is not its auth-master server's:
        # master-login-auth.c, "Auth server restarted".)
        self.spid = os.getppid() if worker is not None else os.getpid()
        # Connection ids unique over all processes: process i hands out i+1, i+1+n, ...
        self._cuid = itertools.count(self.worker_index + 1, processes)
        self.metrics = Metrics()
        self.failure_delay = FailureDelay(config.auth.failure_delay)
        self.in_flight = InFlight(self.metrics)
        self.penalty = PenaltyTracker(config.auth.trusted_networks, enabled=config.auth.penalty)
        if self.workers is not None:
            self.penalty.on_update = self._share_penalty
        #: [state]: penalties and cache flushes shared with other authd instances (or not).
        origin = f"{socket.gethostname()}:{self.spid}"
        self.state = open_backend(config.state, self._flush_from_peer, origin, self.metrics.registry)
        if self.state.shared:
            self.penalty.backend = self.state
        self.limiter = trio.CapacityLimiter(config.lua.workers)
        self.cache = _new_cache(config.cache)
        self.metrics.watch_cache(self._cache_stats)
        self.metrics.watch_pools(self._pool_stats)
        #: dovecot.http and dns_client, shared by every Lua state (they pool connections).
        self._http = HttpExtension()
        self._http.on_response = self._observe_http
        self._dns = DnsExtension()
        #: authd.dict(name): the [[dict]]s of the config at start-up (a reload keeps them).
        self._dict = DictExtension(open_dicts(config.dicts))
        self._generation_numbers = itertools.count(1)
        self.generation = self._build_generation(config, self.cache)
        self._reload_lock = trio.Lock()
        #: Old generations waiting for their last calls (closed at shutdown if still waiting).
        self._retiring: set[Generation] = set()
        self.watcher = ScriptWatcher(
            lambda: script_files(self.config), self._scripts_changed, config.reload.watch_interval
        )
        self._watch_scope = trio.CancelScope()
        self._metrics = MetricsEndpoint()
        self._metrics.done.set()
        #: Told when a login client's pid starts or stops being served here (a worker tells its main process).
        self.on_login_client: Callable[[int, bool], None] | None = None
        self.clients: set[ClientConnection] = set()
        self.listeners: list[ListenerInfo] = []
        self.ready = trio.Event()

    # What the current generation (config version) answers with.

    @property
    def rules(self) -> UsernameRules:
        return self.generation.rules

    @property
    def mechanisms(self) -> list[type[Mechanism]]:
        return self.generation.mechanisms

    @property
    def passdbs(self) -> PassdbChain:
        return self.generation.passdbs

    @property
    def userdbs(self) -> UserdbChain:
        return self.generation.userdbs

    def _build_generation(self, config: Config, cache: AuthCache | None) -> Generation:
        """A generation of `config`, its passdbs and userdbs using `cache`; nothing of the
        server changes (a reload that fails drops it)."""
        auth = config.auth
        rules = UsernameRules(
            chars=auth.username_chars,
            translation=auth.username_translation,
            format=auth.username_format,
            default_realm=auth.default_realm,
            anonymous_username=auth.anonymous_username,
            ssl_username_from_cert=auth.ssl_username_from_cert,
            master_user_separator=auth.master_user_separator,
            master_passdbs=any(p.master for p in config.passdbs),
            expand_context=expand_context(_environment(config)),
        )
        mechanisms: list[type[Mechanism]] = [MECHANISMS[m.upper()] for m in auth.mechanisms]
        options = lambda: self._state_options(config)  # noqa: E731
        passdbs = build_passdbs(config, options, self.limiter)
        userdbs = build_userdbs(config, options, self.limiter, passdbs)
        passdbs.observe = userdbs.observe = self.observe_db
        for driver in lua_drivers(passdbs, userdbs):
            driver.pool.on_wait = self.metrics.pool_wait.labels(str(driver.path)).observe
            driver.on_failure = partial(self._count_lua_failure, str(driver.path))
        if cache is not None:
            passdbs.cache = PassdbCache(cache)
            userdbs.cache = UserdbCache(cache)
        return Generation(next(self._generation_numbers), config, rules, mechanisms, passdbs, userdbs)

    def _count_lua_failure(self, script: str, kind: str) -> None:
        self.metrics.count_lua_failure(script, kind)

    def _pool_stats(self) -> Iterator[tuple[str, int, int]]:
        """(script, states, busy) of every pool, retiring generations' included."""
        for generation in (*self._retiring, self.generation):
            for script, pool in lua_pools(generation.passdbs, generation.userdbs):
                yield script, pool.states, pool.busy

    def _observe_http(self, status: int, seconds: float) -> None:
        status_class = f"{status // 100}xx" if 100 <= status <= 599 else "failed"
        self.metrics.http_requests.labels(status_class).inc()
        self.metrics.http_duration.observe(seconds)

    def _cache_stats(self) -> tuple[int, int, int, int]:
        cache = self.cache
        return (cache.hits, cache.misses, len(cache), cache.size) if cache is not None else (0, 0, 0, 0)

    def _state_options(self, config: Config) -> StateOptions:
        lua = config.lua
        environment = _environment(config)
        return StateOptions(
            version=lua.version,
            package_path=lua.package_path,
            package_cpath=lua.package_cpath,
            environment=environment,
            extensions=self._extensions(),
            call_timeout=lua.call_timeout,
            max_memory=lua.max_memory,
            log_script_output=lua.log_script_output,
        )

    def _extensions(self) -> tuple[LuaExtension, ...]:
        return (self._http, self._dns, self._dict)

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
        if self.workers is not None and self.workers.serves_login(pid):
            log_duplicate_pid(pid)  # served by a worker too: REQUESTs find this one
        self.login_clients[pid] = conn
        if self.on_login_client is not None:
            self.on_login_client(pid, True)
        return True

    def forget_client(self, conn: ClientConnection) -> None:
        self.clients.discard(conn)
        pid = conn.proto.pid
        if pid is not None and self.login_clients.get(pid) is conn:
            del self.login_clients[pid]
            if self.on_login_client is not None:
                self.on_login_client(pid, False)

    async def login_request(self, args: LoginRequestArgs) -> LoginReply:
        """REQUEST, answered by the process that served the login."""
        if args.client_pid not in self.login_clients and self.workers is not None:
            # The userdb lookup may take a whole Lua call (and its HTTP), plus the hand-over.
            timeout = self.config.lua.call_timeout + 5
            answer = await self.workers.login_request(args.client_pid, {"op": "request", **args.to_message()}, timeout)
            if answer is not None:
                return LoginReply.from_message(answer)
        return await finish_login(self, args)

    async def cache_flush(self, users: tuple[bytes, ...]) -> int:
        """CACHE-FLUSH: drop everything, or the listed users' entries, in every process; how many."""
        count = self.flush_local_cache(users)
        if self.workers is not None:
            counts = await self.workers.ask({"op": "cache-flush", "users": [u.decode("latin-1") for u in users]})
            count += sum(counts)
        if self.state.shared and not await self.state.publish_flush(users):
            log.error("cache.flush_not_shared", message="other authd instances were not told of this flush")
        return count

    def _flush_from_peer(self, users: tuple[bytes, ...]) -> None:
        """Another authd instance flushed (or our subscription to flushes began again)."""
        self.flush_local_cache(users)

    def flush_local_cache(self, users: tuple[bytes, ...]) -> int:
        """This process's part of CACHE-FLUSH."""
        if self.cache is None:
            return 0
        count = self.cache.clear_users(users) if users else self.cache.clear()
        log.info("cache.flush", entries=count, users=[u.decode("utf-8", "replace") for u in users])
        return count

    def auth_token(self, req: AuthRequest) -> bytes:
        assert req.session_pid is not None
        return auth_token(self.token_secret, req.service or b"", req.session_pid, req.user or b"", req.session)

    def log_result(self, req: AuthRequest, result: str, *, command: str = "AUTH") -> None:
        """One log event and the metrics for every finished request (never the password)."""
        duration = time.monotonic() - req.started
        mech = (req.mech or b"").decode("latin-1")
        if log.is_enabled_for(logging.INFO):  # with [log] level above info, skip building the event
            log.info(
                "auth.request",
                command=command,
                result=result,
                mech=mech,
                duration_ms=round(duration * 1000, 1),
                **req.log_context(),
            )
        if command == "AUTH":  # the metrics bound what the client sent to known values
            self.metrics.count_auth(mech, (req.service or b"").decode("utf-8", "replace"), result, duration)
        else:
            self.metrics.count_lookup(command, result)

    def observe_db(self, db: str, kind: str, seconds: float) -> None:
        self.metrics.db_duration_for(db, kind).observe(seconds)

    # --- running --------------------------------------------------------------------

    async def load(self) -> None:
        """Load every script into its states (raises ScriptLoadError)."""
        await self.generation.start()

    async def close(self) -> None:
        for generation in (*self._retiring, self.generation):
            await generation.close()
        await self._http.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Load scripts, open listeners and serve until cancelled or signalled."""
        self.watcher.reset()
        await self.load()
        try:
            self.listeners = self._open_listeners()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.state.run)
                nursery.start_soon(run_dicts, self._dict.dicts)
                nursery.start_soon(self.failure_delay.serve)
                nursery.start_soon(self._expire_requests)
                nursery.start_soon(systemd.watchdog)
                if self.workers is not None:
                    await nursery.start(self.workers.run)
                try:
                    self._metrics = await self._start_metrics(self.config.metrics)
                except OSError as exc:  # never fatal at start-up
                    log.error(
                        "metrics.failed",
                        address=self.config.metrics.address,
                        port=self.config.metrics.port,
                        message=str(exc),
                    )
                for info in self.listeners:
                    self._start_accepting(info)
                self._start_watching()
                # What start-up built lives as long as the daemon: keep Python's full
                # collections from scanning it again and again (each one stalls every request).
                gc.freeze()
                self.ready.set()
                systemd.notify("READY=1\nSTATUS=serving")
                task_status.started(self)
                nursery.start_soon(self._wait_for_signal)
                await self._shutdown.wait()
                systemd.notify("STOPPING=1")
                for info in self.listeners:
                    info.scope.cancel()  # accept no more while the workers finish
                if self.workers is not None:
                    await self.workers.stop()
                nursery.cancel_scope.cancel()
        finally:
            for info in self.listeners:
                with trio.CancelScope(shield=True):
                    await self._close_listener(info, unlink=True)
            with trio.CancelScope(shield=True):
                await self.close()
            log.info("server.stopped")

    def _start_accepting(self, info: ListenerInfo) -> None:
        self._nursery.start_soon(self._accept_loop, info)
        if info.settings.type == "token":
            log.warning("listener.refused", message=TOKEN_REFUSED, type="token", where=info.settings.where)
        else:
            log.info("listener.ready", type=info.settings.type, where=info.settings.where)

    async def _close_listener(self, info: ListenerInfo, *, unlink: bool) -> None:
        info.scope.cancel()
        await info.listener.aclose()
        if unlink and info.owned and info.settings.path is not None:
            info.settings.path.unlink(missing_ok=True)

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port

    async def _start_metrics(self, settings: MetricsSettings) -> MetricsEndpoint:
        """Start an endpoint for `settings` (none without an address, or in a worker); raises OSError."""
        endpoint = MetricsEndpoint()
        if settings.address is None or settings.port is None or self.worker_index:
            endpoint.done.set()
            return endpoint
        endpoint.port = await self._nursery.start(self._serve_metrics, settings, endpoint)
        return endpoint

    async def _serve_metrics(
        self, settings: MetricsSettings, endpoint: MetricsEndpoint, *, task_status: trio.TaskStatus[int]
    ) -> None:
        assert settings.address is not None and settings.port is not None
        try:
            with endpoint.scope:
                await serve_metrics(
                    self.render_metrics, settings.address, settings.port, self._healthy, task_status=task_status
                )
        finally:
            endpoint.done.set()

    async def _replace_metrics(self, settings: MetricsSettings) -> MetricsEndpoint:
        """Start the endpoint a reload's [metrics] asks for beside the serving one, which the
        switch stops; raises ListenerError, with the serving one still serving."""
        try:
            return await self._start_metrics(settings)
        except OSError as exc:
            if self._metrics.port is None or settings.port != self.config.metrics.port:
                raise ListenerError(f"metrics {settings.address}:{settings.port}: {exc.strerror}") from None
        # The serving endpoint holds this port (on another address): it has to close first.
        self._metrics.stop()
        await self._metrics.done.wait()
        try:
            return await self._start_metrics(settings)
        except OSError as exc:
            error = ListenerError(f"metrics {settings.address}:{settings.port}: {exc.strerror}")
        try:
            self._metrics = await self._start_metrics(self.config.metrics)  # the one that served
        except OSError as exc:
            log.error(
                "metrics.failed", address=self.config.metrics.address, port=self.config.metrics.port, message=str(exc)
            )
        raise error

    async def render_metrics(self) -> bytes:
        """The metrics page: this process's, with every worker's samples added in."""
        page = self.metrics.render()
        if self.workers is None:
            return page
        pages = await self.workers.ask({"op": "metrics"})
        return merge_pages([page, *(p.encode() for p in pages)])

    def _start_watching(self) -> None:
        self._watch_scope.cancel()
        self._watch_scope = trio.CancelScope()
        if self.config.reload.watch_scripts and not self.worker_index:
            self.watcher.interval = self.config.reload.watch_interval
            self._nursery.start_soon(self._watch, self._watch_scope)

    async def _watch(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.watcher.run()

    async def _scripts_changed(self, changed: list[Path]) -> None:
        await self.reload("script changed: " + ", ".join(str(p) for p in changed), reread_config=False)

    # --- reload -----------------------------------------------------------------------

    async def reload(self, reason: str, *, reread_config: bool = True) -> bool:
        """Load the config (if asked) and every script anew; switch only if all of it works.

        One reload runs at a time. Requests never wait for one: until the switch they are
        served by the old scripts, and calls running at the switch finish on them.
        """
        async with self._reload_lock:
            log.info("reload.started", reason=reason)
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading")
            try:
                ok = await self._reload(reason, reread_config)
            finally:
                systemd.notify("READY=1\nSTATUS=serving")
            self.metrics.reloads.labels("ok" if ok else "failed").inc()
            return ok

    async def _reload(self, reason: str, reread_config: bool) -> bool:
        config = self.config
        if reread_config and config.source is not None:
            try:
                config = load_config(config.source, require_listeners=self._listeners_from_config)
            except ConfigError as exc:
                log.error("reload.failed", reason=reason, message=str(exc))
                return False
            config = self._share_of(config)
        # Everything the new config needs is built and opened beside the serving one; the
        # server itself changes only at the switch, so a reload that fails changes nothing.
        cache = _new_cache(config.cache) if config.cache != self.config.cache else self.cache
        new = self._build_generation(config, cache)
        baseline = self.watcher.snapshot(script_files(config))  # before loading: see edits made meanwhile
        opened: list[ListenerInfo] = []
        permissions = False
        metrics: MetricsEndpoint | None = None
        try:
            await new.start()
            if self._listeners_from_config:
                opened = self._open_added_listeners(config)
                self._update_permissions(config)
                permissions = True
            if config.metrics != self.config.metrics:
                metrics = await self._replace_metrics(config.metrics)  # the last step that can fail
        except (ScriptLoadError, ListenerError) as exc:
            log.error("reload.failed", reason=reason, message=str(exc))
            for info in opened:
                _discard_listener(info)
            if permissions:
                _put_back_permissions(old for old, _ in self._changed_sockets(config))
            with trio.CancelScope(shield=True):
                await new.close()
            return False
        # The switch: nothing below awaits until every request sees the new generation.
        old, old_config, old_cache = self.generation, self.config, self.cache
        self.generation, self.config, self.cache = new, config, cache
        self.failure_delay.delay = config.auth.failure_delay
        self.penalty.configure(config.auth.trusted_networks, enabled=config.auth.penalty)
        self.limiter.total_tokens = config.lua.workers
        flushed = old_cache.clear() if old_cache is not None else 0  # the old scripts' answers
        self._retiring.add(old)
        self._nursery.start_soon(self._retire, old)
        if self._listeners_from_config:
            await self._switch_listeners(config, opened)
        if metrics is not None:
            self._metrics.stop()
            self._metrics = metrics
        self.watcher.seen = baseline
        if config.reload != old_config.reload:
            self._start_watching()
        if config.server != old_config.server:
            log.warning("reload.processes", message="[server] processes takes effect at the next start")
        if config.state != old_config.state:
            log.warning("reload.state", message="[state] takes effect at the next start")
        if self.workers is not None:
            self.workers.broadcast({"op": "reload", "reason": reason, "reread": reread_config})
        log.info(
            "reload.done",
            reason=reason,
            generation=new.number,
            scripts=[str(p) for p in script_files(config)],
            cache_flushed=flushed,
        )
        return True

    async def _retire(self, generation: Generation) -> None:
        await generation.retire()
        self._retiring.discard(generation)

    @property
    def _listeners_from_config(self) -> bool:
        return self._given_listeners is None and not self._activated

    def _open_added_listeners(self, config: Config) -> list[ListenerInfo]:
        """Open the listeners a new config adds; on any failure close those and raise."""
        current = {info.settings.where for info in self.listeners}
        opened: list[ListenerInfo] = []
        try:
            for settings in config.listeners:
                if settings.where not in current:
                    opened.append(ListenerInfo(settings, open_listener(settings)))
        except ListenerError:
            for info in opened:
                _discard_listener(info)
            raise
        return opened

    def _changed_sockets(self, config: Config) -> list[tuple[ListenerSettings, ListenerSettings]]:
        """(old, new) settings of the unix sockets kept with other settings."""
        wanted = {settings.where: settings for settings in config.listeners}
        changed = []
        for info in self.listeners:
            settings = wanted.get(info.settings.where)
            if settings is not None and settings.path is not None and settings != info.settings:
                changed.append((info.settings, settings))
        return changed

    def _update_permissions(self, config: Config) -> None:
        """Give kept unix sockets the new config's mode and owner; if one cannot have them,
        put back the old ones and raise ListenerError."""
        done: list[ListenerSettings] = []
        try:
            for old, settings in self._changed_sockets(config):
                done.append(old)
                set_permissions(settings)
        except ListenerError:
            _put_back_permissions(done)
            raise

    async def _switch_listeners(self, config: Config, opened: list[ListenerInfo]) -> None:
        """Keep listeners the new config still has (their sockets and connections), update
        their type and permissions, start the added ones, stop accepting on removed ones."""
        wanted = {settings.where: settings for settings in config.listeners}
        kept: list[ListenerInfo] = []
        for info in self.listeners:
            settings = wanted.get(info.settings.where)
            if settings is None:
                await self._close_listener(info, unlink=True)
                log.info("listener.closed", type=info.settings.type, where=info.settings.where)
                continue
            if settings != info.settings:  # its permissions were set before the switch
                info.settings = settings
                log.info("listener.updated", type=settings.type, where=settings.where)
            kept.append(info)
        self.listeners = kept + opened
        for info in opened:
            self._start_accepting(info)

    def _open_listeners(self) -> list[ListenerInfo]:
        """Inherited sockets (Dovecot service, systemd socket units) win over the config's."""
        if self._given_listeners is not None:
            return self._given_listeners
        activated = systemd.activated_sockets()
        self._activated = bool(activated)
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

    # --- worker processes ---------------------------------------------------------------

    def _share_of(self, config: Config) -> Config:
        """This process's part of [lua] workers and [cache] size: the states and threads
        the setting gives a script are spread over the processes (at least one each), and
        so is the memory of the auth caches (each process has its own)."""
        if self._processes == 1:
            return config
        workers = -(-config.lua.workers // self._processes)
        cache = replace(config.cache, size=config.cache.size // self._processes)
        return replace(config, lua=replace(config.lua, workers=workers), cache=cache)

    def _worker_command(self) -> list[str]:
        assert self.config.source is not None
        log_format, log_level = self._log_options
        return worker_command(str(self.config.source), log_format, log_level)

    def _share_penalty(self, ident: str, value: int, checksum: int) -> None:
        assert self.workers is not None
        self.workers.broadcast({"op": "penalty", "ident": ident, "value": value, "checksum": checksum})

    def _apply_penalty(self, ident: str, value: int, checksum: int) -> None:
        """A worker's penalty update: ours too (the pool relays it to the other workers)."""
        self.penalty.apply(ident, value, checksum)

    def _reload_soon(self, reason: str) -> None:
        self._nursery.start_soon(partial(self.reload, reason))

    @property
    def stopping(self) -> bool:
        return self._shutdown.is_set()

    def _healthy(self) -> bool:
        return self.ready.is_set() and not self._shutdown.is_set()

    def shutdown(self, reason: str) -> None:
        """Stop serving: close listeners, end connections, deinit scripts."""
        log.info("server.stopping", reason=reason)
        self._shutdown.set()

    async def _wait_for_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.request_reload("SIGHUP")
                    continue
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

    async def _accept_loop(self, info: ListenerInfo) -> None:
        with info.scope:
            while True:
                try:
                    stream = await info.listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    log.error("listener.accept_failed", where=info.settings.where, message=str(exc))
                    await trio.sleep(0.1)
                    continue
                if info.settings.type == "token":
                    stream.socket.close()  # refused: see TOKEN_REFUSED
                    continue
                try:
                    if (
                        self.workers is not None
                        and info.settings.type in SHARED_TYPES
                        and self.workers.hand_off(info.settings, stream.socket)
                    ):
                        continue
                    self.serve_connection(info.settings, stream)
                except Exception:
                    # A connection that cannot be set up costs itself, never the listener.
                    log.exception("listener.connection_failed", where=info.settings.where)
                    stream.socket.close()

    def serve_connection(self, settings: ListenerSettings, stream: trio.SocketStream) -> None:
        """Start a connection task; it belongs to the server, not to the listener."""
        kind = settings.type
        nursery = self._nursery
        if kind in ("client", "login"):
            conn = ClientConnection(
                self,
                stream,
                login=kind == "login",
                handshake=settings.handshake,
                where=settings.where,
            )
            nursery.start_soon(conn.run)
        elif kind in ("master", "userdb"):
            path = str(settings.path) if settings.path is not None else None
            master = MasterConnection(self, stream, userdb_only=kind == "userdb", where=settings.where, path=path)
            nursery.start_soon(master.run)
        else:
            # Never served as something else (and more powerful): open_listeners refuses these.
            raise ListenerError(f"{settings.where}: authd does not serve {kind!r} sockets")


def _process_count(config: Config, listeners: list[ListenerInfo] | None) -> int:
    """[server] processes, for a daemon that opens its own sockets from a config file.

    Under Dovecot's master (inherited listeners) one process serves, as Dovecot's auth
    service does; so does a Server built in-process without a config file (tests).
    """
    if listeners is not None or config.source is None:
        return 1
    return config.server.process_count(len(os.sched_getaffinity(0)))


def _environment(config: Config) -> dict[str, str]:
    """What scripts see of the environment: only [lua] import_environment, like Dovecot."""
    return {name: os.environ[name] for name in config.lua.import_environment if name in os.environ}


def _put_back_permissions(settings: Iterable[ListenerSettings]) -> None:
    """Undo _update_permissions (as far as it goes)."""
    for old in settings:
        with contextlib.suppress(ListenerError):
            set_permissions(old)


def _discard_listener(info: ListenerInfo) -> None:
    """Close a listener a failed reload opened, before anything accepted on it."""
    info.listener.socket.close()
    if info.settings.path is not None:
        info.settings.path.unlink(missing_ok=True)


def _new_cache(settings: CacheSettings) -> AuthCache | None:
    if settings.size > 0 and settings.ttl > 0:
        return AuthCache(settings.size, settings.ttl, settings.negative_ttl)
    return None

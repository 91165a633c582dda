"""Worker processes: the CPUs beyond the first one for authd's connections.

One Python process spends one core. The main process accepts every connection; client
(auth_only, e.g. Postfix), login and userdb connections go in turn to itself and to
workers, each a full authd with its own scripts, Lua states, HTTP pools and auth cache,
started as `python -m authd.worker` with a control socket (authd.control). Master
connections stay in the main process, and every process greets with the main process's
pid as SPID: to its clients authd is one auth server (Dovecot's post-login step checks
that the login's server is the one it asks).

What is shared goes through the main process: penalty updates (relayed to every other
process), reloads (the main process reloads first, workers follow), CACHE-FLUSH (every
process flushes; the reply counts all), REQUEST for a login a worker served (that worker
answers it; workers report the login clients they serve), the secret of auth tokens, the
metrics page (the processes' samples summed) and a SIGHUP a worker gets (it asks the main
process to reload). A worker that dies is started again; the connections it held are
lost, as with a crashed Dovecot auth process.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from authd.client_conn import log_duplicate_pid
from authd.control import Closable, ControlChannel, Message, socketpair
from config.schema import ListenerSettings

log = structlog.get_logger("authd.workers")

#: Environment a worker must not inherit: systemd's handles belong to the main process.
PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: Seconds workers get to finish their connections and deinit their scripts at shutdown.
STOP_GRACE = 15.0
#: Seconds a worker may take to load its scripts; longer at start-up fails authd.
START_TIMEOUT = 120.0
#: Seconds the main process waits for a worker's answer (metrics, cache flush).
ANSWER_TIMEOUT = 2.0
RESTART_DELAY = 1.0

#: Listener types whose connections may be served by any process.
SHARED_TYPES = ("client", "login", "userdb")


class WorkerStartError(Exception):
    """A worker exited before it was ready at start-up (its log lines say why)."""


@dataclass
class _Worker:
    index: int
    channel: ControlChannel | None = None
    pid: int | None = None
    ready: bool = False
    started: trio.Event = field(default_factory=trio.Event)
    #: Set when the worker exits before its first `ready`.
    failed: int | None = None


@dataclass
class Hooks:
    """What the pool needs from the main process's server."""

    apply_penalty: Callable[[str, int, int], None]
    reload: Callable[[str], None]
    #: Whether the main process itself serves a login client with this pid.
    main_serves_login: Callable[[int], bool]
    token_secret: bytes


class WorkerPool:
    def __init__(self, count: int, command: list[str], hooks: Hooks) -> None:
        self._workers = [_Worker(index) for index in range(1, count)]
        self._command = command
        self._hooks = hooks
        self._turn = itertools.cycle(range(count))
        self._stopping = False
        self._answers: dict[int, tuple[trio.Event, list[Any], int]] = {}
        #: Which worker serves the login client with a given pid.
        self._logins: dict[int, _Worker] = {}
        self._answer_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None

    @property
    def size(self) -> int:
        """Processes serving, the main one included."""
        return len(self._workers) + 1

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker, report once all are ready, then keep them running until stop()."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for worker in self._workers:
                nursery.start_soon(self._keep_running, worker)
            with trio.move_on_after(START_TIMEOUT) as waiting:
                for worker in self._workers:
                    await worker.started.wait()
                    if worker.failed is not None:
                        raise WorkerStartError(f"worker {worker.index} exited with status {worker.failed} at start-up")
            if waiting.cancelled_caught:
                raise WorkerStartError(f"the workers did not load their scripts within {START_TIMEOUT:.0f} s")
            log.info("workers.ready", processes=self.size, pids=self.pids)
            task_status.started()

    async def _keep_running(self, worker: _Worker) -> None:
        while not self._stopping:
            ours, theirs = socketpair()
            env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENVIRONMENT}
            args = [*self._command, "--index", str(worker.index), "--processes", str(self.size)]
            args += ["--control-fd", str(theirs.fileno())]
            try:
                process = await trio.lowlevel.open_process(args, pass_fds=[theirs.fileno()], env=env)
            finally:
                theirs.close()
            worker.pid = process.pid
            worker.channel = channel = ControlChannel(ours, f"worker {worker.index}")
            channel.send({"op": "secret", "value": self._hooks.token_secret.hex()})
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(channel.run_sender)
                    await self._listen(worker, channel)
                    nursery.cancel_scope.cancel()
            finally:
                worker.ready = False
                channel.close()
                for pid in [pid for pid, owner in self._logins.items() if owner is worker]:
                    del self._logins[pid]
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
            status = await process.wait()
            worker.pid = None
            if not worker.started.is_set():
                worker.failed = status
                worker.started.set()
                return
            if self._stopping:
                return
            log.error("worker.exited", worker=worker.index, pid=process.pid, status=status, message="starting it again")
            await trio.sleep(RESTART_DELAY)

    async def _listen(self, worker: _Worker, channel: ControlChannel) -> None:
        while True:
            received = await channel.receive()
            if received is None:
                return
            message, attached = received
            if attached is not None:
                attached.close()  # workers never send sockets
            op = message.get("op")
            if op == "ready":
                worker.ready = True
                worker.started.set()
                log.info("worker.ready", worker=worker.index, pid=worker.pid)
            elif op == "penalty":
                self._hooks.apply_penalty(message["ident"], message["value"], message["checksum"])
                self.broadcast(message, skip=worker)
            elif op == "answer":
                waiting = self._answers.get(message["id"])
                if waiting is not None:
                    waiting[1].append(message["value"])
                    if len(waiting[1]) >= waiting[2]:
                        waiting[0].set()
            elif op == "reload":
                self._hooks.reload(f"worker {worker.index}: {message.get('reason', 'asked')}")
            elif op == "login":
                self._login_client(worker, message["pid"])
            elif op == "logout" and self._logins.get(message["pid"]) is worker:
                del self._logins[message["pid"]]

    def hand_off(self, settings: ListenerSettings, connection: Closable) -> bool:
        """Give a newly accepted shared connection to the next process in turn.

        False when it is the main process's turn (or that worker is not ready): serve it here.
        """
        turn = next(self._turn)
        if turn == 0:
            return False
        worker = self._workers[turn - 1]
        if not worker.ready or worker.channel is None or worker.channel.closed:
            return False
        message = {
            "op": "connection",
            "type": settings.type,
            "handshake": settings.handshake,
            "path": str(settings.path) if settings.path is not None else None,
            "address": settings.address,
            "port": settings.port,
        }
        worker.channel.send(message, connection)
        return True

    def _login_client(self, worker: _Worker, pid: int) -> None:
        owner = self._logins.get(pid)
        if self._hooks.main_serves_login(pid) or (owner is not None and owner is not worker):
            # Each process refuses a second connection with the pid as Dovecot does; across
            # processes both stay, and REQUEST goes to the main process's, else the newest.
            log_duplicate_pid(pid, worker=worker.index)
        self._logins[pid] = worker

    def serves_login(self, pid: int) -> bool:
        """Does a worker serve a login client with this pid?"""
        return pid in self._logins

    async def login_request(self, pid: int, message: Message, timeout: float) -> Any | None:
        """REQUEST for a login a worker served: that worker's answer, or None if no worker
        serves `pid` (or it did not answer within `timeout`)."""
        worker = self._logins.get(pid)
        if worker is None or not worker.ready:
            return None
        answers = await self.ask(message, [worker], timeout)
        return answers[0] if answers else None

    def broadcast(self, message: Message, *, skip: _Worker | None = None) -> None:
        for worker in self._workers:
            if worker is not skip and worker.ready and worker.channel is not None:
                worker.channel.send(message)

    async def ask(
        self, message: Message, workers: list[_Worker] | None = None, timeout: float = ANSWER_TIMEOUT
    ) -> list[Any]:
        """Send a question to every ready worker (or those given); their answers (those in time)."""
        ready = [w for w in (workers or self._workers) if w.ready and w.channel is not None]
        if not ready:
            return []
        ident = next(self._answer_ids)
        event, answers = trio.Event(), list[Any]()
        self._answers[ident] = (event, answers, len(ready))
        try:
            for worker in ready:
                assert worker.channel is not None
                worker.channel.send({**message, "id": ident})
            with trio.move_on_after(timeout):
                await event.wait()
        finally:
            del self._answers[ident]
        if len(answers) < len(ready):
            log.warning("workers.slow_answer", op=message.get("op"), expected=len(ready), got=len(answers))
        return answers

    async def stop(self) -> None:
        """Ask every worker to finish; wait for them (killing any that take too long)."""
        self._stopping = True
        self.broadcast({"op": "stop"})
        if self._nursery is not None:
            with trio.move_on_after(STOP_GRACE + 1):
                while any(w.pid is not None for w in self._workers):
                    await trio.sleep(0.05)
            self._nursery.cancel_scope.cancel()


def worker_command(config_path: str, log_format: str | None, log_level: str | None) -> list[str]:
    command = [sys.executable, "-m", "authd.worker", "--config", config_path]
    if log_format is not None:
        command += ["--log-format", log_format]
    if log_level is not None:
        command += ["--log-level", log_level]
    return command

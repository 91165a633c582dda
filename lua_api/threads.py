"""Worker threads for Lua slices that take one job after another.

`trio.to_thread.run_sync` per slice costs a thread hand-off of ~70-90 µs of CPU (a
context copy, a limiter checkpoint, a cancel scope, waking a cached thread,
reporting back), more than a trivial script's whole call. Here a worker thread,
started with `trio.to_thread.run_sync` under the daemon's CapacityLimiter like any
other, runs jobs from a shared queue until none comes for LINGER seconds, so a busy
daemon hands a slice over with a queue append (and a wake-up if the worker sleeps),
and gets results back with one wake-up of the event loop for all that finished
meanwhile.

Threads are added only when the workers stop making progress: while jobs wait and
no worker took any job for SPAWN_DELAY (they are blocked in C, or run long Lua),
another thread is started. Workers that keep taking jobs would not go faster with
more threads, which only fight over the GIL. The limiter still bounds the threads:
a worker holds its token while it lives, and jobs wait when every token is taken.

One watchdog task per runner does the timing while jobs are outstanding, instead of
a cancel scope per job: it starts threads as above, and gives up on jobs that are
still unfinished at their `give_up_at` (lua_api.runtime then decides what a thread
stuck in a Lua state costs the state).
"""

from __future__ import annotations

import collections
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import outcome
import trio

#: Seconds an idle worker waits for the next job before it returns its thread.
LINGER = 0.05

#: Seconds jobs wait behind busy workers that take no job at all before another
#: thread is started.
SPAWN_DELAY = 0.002

#: Seconds between the watchdog's looks at unfinished jobs when none is queued.
WATCH_INTERVAL = 0.05

#: What `ThreadRunner.run` returns for a job it gave up on: one that never ran (and
#: never will), or one whose thread is still running it.
GAVE_UP: Any = object()
STILL_RUNNING: Any = object()


class _Job:
    __slots__ = ("finished", "fn", "give_up_at", "started", "task", "token")

    def __init__(
        self, fn: Callable[[], Any], token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task, give_up_at: float
    ) -> None:
        self.fn = fn
        self.token = token
        #: The task waiting for the result, None once it has it (or was given up on).
        self.task: trio.lowlevel.Task | None = task
        self.give_up_at = give_up_at
        self.started = False
        self.finished = False


class ThreadRunner:
    """Runs synchronous jobs in up to `limiter.total_tokens` reused worker threads.

    A runner serves one trio run at a time (the daemon's): results go back through the
    token of the run that submitted them.
    """

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        #: Workers started (some may still wait for a limiter token), and those waiting for a job.
        self._workers = 0
        self._sleeping = 0
        #: Jobs taken by workers so far: whether busy workers make progress.
        self._taken = 0
        #: Finished jobs whose results the event loop has not picked up yet, and whether
        #: it has been asked to (one wake-up of the loop serves every result until then).
        self._done: list[tuple[_Job, outcome.Outcome[Any]]] = []
        self._delivering = False
        #: Jobs submitted and not answered yet (the watchdog runs while there are any).
        self._live: set[_Job] = set()
        self._watching = False

    async def __call__(self, fn: Callable[[], Any]) -> Any:
        """An Executor (lua_api.runtime): run `fn` in a worker thread, however long it takes."""
        return await self.run(fn, math.inf)

    async def run(self, fn: Callable[[], Any], give_up_at: float) -> Any:
        """Run `fn` in a worker thread: its result (or exception), or GAVE_UP / STILL_RUNNING.

        Those come at `give_up_at` (trio time) for a job that has not finished by then:
        GAVE_UP if it has not started (it never will), STILL_RUNNING if its thread is
        in it. The wait cannot be cancelled from outside: a thread running Lua cannot be
        interrupted, only given up on.
        """
        job = _Job(fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task(), give_up_at)
        with self._cond:
            self._jobs.append(job)
            if len(self._jobs) <= self._sleeping:
                self._cond.notify()
            elif self._workers == 0:
                self._workers = 1
                trio.lowlevel.spawn_system_task(self._worker)
        self._live.add(job)
        if not self._watching:
            self._watching = True
            trio.lowlevel.spawn_system_task(self._watchdog)
        return await trio.lowlevel.wait_task_rescheduled(_shielded)

    async def _watchdog(self) -> None:
        """While jobs are outstanding: add threads when workers stall, give up on overdue jobs."""
        taken = -1
        try:
            while self._live:
                now = trio.current_time()
                for job in [job for job in self._live if job.give_up_at <= now]:
                    self._give_up(job)
                with self._cond:
                    stalled = bool(self._jobs) and not self._sleeping
                    if stalled and self._taken == taken and self._workers < self.limiter.total_tokens:
                        self._workers += 1
                        trio.lowlevel.spawn_system_task(self._worker)
                    taken = self._taken
                await trio.sleep(SPAWN_DELAY if stalled else WATCH_INTERVAL)
        finally:
            self._watching = False

    def _give_up(self, job: _Job) -> None:
        with self._cond:
            if job.finished:
                return  # its result is on the way
            if not job.started:
                self._jobs.remove(job)
        self._live.discard(job)
        task, job.task = job.task, None
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(STILL_RUNNING if job.started else GAVE_UP))

    async def _worker(self) -> None:
        """A system task that lends its thread to _work; cancelled only when the run ends."""
        counted = [False]  # whoever sets it first takes the worker out of the count

        def work() -> None:
            with self._cond:
                if counted[0]:
                    return  # the run ended before this thread started
                counted[0] = True
            self._work()

        try:
            await trio.to_thread.run_sync(work, limiter=self.limiter, abandon_on_cancel=True)
        finally:
            with self._cond:
                if not counted[0]:
                    counted[0] = True
                    self._workers -= 1

    def _work(self) -> None:
        """A worker thread: run jobs until none comes for LINGER seconds."""
        cond, jobs = self._cond, self._jobs
        while True:
            with cond:
                if not jobs:
                    self._sleeping += 1
                    cond.wait(LINGER)
                    self._sleeping -= 1
                    if not jobs:
                        self._workers -= 1
                        return
                job = jobs.popleft()
                job.started = True
                self._taken += 1
            result = outcome.capture(job.fn)
            with cond:
                job.finished = True
                self._done.append((job, result))
                if self._delivering:
                    continue
                self._delivering = True
            try:
                job.token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:
                with cond:
                    self._workers -= 1
                return

    def _deliver(self) -> None:
        """In the event loop: hand every finished job's result to its task."""
        with self._cond:
            done, self._done = self._done, []
            self._delivering = False
        for job, result in done:
            self._live.discard(job)
            task, job.task = job.task, None
            if task is not None:
                trio.lowlevel.reschedule(task, result)


def _shielded(raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED  # the cancellation is delivered once the job is answered


_runners: weakref.WeakKeyDictionary[trio.CapacityLimiter, ThreadRunner] = weakref.WeakKeyDictionary()


def runner_for(limiter: trio.CapacityLimiter) -> ThreadRunner:
    """The one runner of a limiter: pools sharing a limiter share its idle threads."""
    runner = _runners.get(limiter)
    if runner is None:
        runner = _runners[limiter] = ThreadRunner(limiter)
    return runner

"""The scenarios, how one run is measured, and how runs are summarised.

A comparison scenario starts authd and (when installed) a reference Dovecot on the same script
and alternates runs between them, A B A B ..., so drift on the machine hits both alike. One run:
fresh connections, `warmup` seconds not counted, `duration` seconds measured, in-flight requests
drained. Per run we keep the completions in the window, p50/p99 latency, every error, the
server's CPU (its whole process session, from /proc) in the window, its peak RSS sampled every
0.2 s, the load generator's own CPU, and the CPU everything else on the machine used meanwhile
(other sessions on a shared machine make absolute numbers meaningless; the report says so).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.backend import Backend
from bench.loadgen import Kind, LoadGenerator, Workload, idle_connections, run_load
from bench.procs import Meter, machine_busy_seconds, prioritise
from bench.servers import Authd, Dovecot, Server, Setup, prepare_script
from bench.trivial_server import TrivialServer

SCRIPTS = Path(__file__).resolve().parent / "scripts"
MB = 1_000_000
#: Seconds after the window for in-flight replies; later ones count as errors.
DRAIN = 15.0
#: Longest warm-up: a server this slow to answer every request slot once gets measured anyway.
MAX_WARMUP = 60.0


@dataclass(frozen=True)
class Options:
    runs: int = 5
    duration: float = 5.0
    warmup: float = 1.0
    mech: Literal["plain", "login"] = "plain"
    loadgen_procs: int = 2
    backend_procs: int = 2
    backend_delay: float = 0.020
    dovecot: bool = True
    idle_connections: int = 1000
    nice: int = 0
    #: Where to put py-spy profiles of authd (one extra, unmeasured run per scenario), or None.
    profile: Path | None = None


@dataclass(frozen=True)
class Target:
    """One check of the issue: authd÷Dovecot METRIC at least/at most LIMIT, or authd errors == 0."""

    label: str
    metric: Literal["rate", "p99_ms", "errors"]
    limit: float
    at_least: bool = True

    def check(self, authd: Summary, dovecot: Summary | None) -> tuple[str, bool | None]:
        """(what was measured, met?); met is None when there is nothing to compare with."""
        if self.metric == "errors":
            return f"{authd.errors} errors", authd.errors == 0
        if dovecot is None:
            return "no Dovecot", None
        ratio = getattr(authd, self.metric) / getattr(dovecot, self.metric)
        return f"{ratio:.2f}x", ratio >= self.limit if self.at_least else ratio <= self.limit


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    script: str
    blocking: bool
    connections: int
    depth: int
    #: The issue's Dovecot 2.3.19 figure for this row, to compare with our Dovecot numbers.
    reference: str
    userdb: bool = False
    authd_defaults: bool = False
    http: bool = False
    #: The backend writes each response's head and body in two segments (bench.backend `split`).
    split_backend: bool = False
    targets: tuple[Target, ...] = ()


SCENARIOS = (
    Scenario(
        "trivial-inprocess",
        "trivial Lua passdb, in-process (blocking=no)",
        "trivial.lua",
        blocking=False,
        connections=4,
        depth=16,
        reference="~48 000/s, p99 2.6 ms",
        targets=(Target("trivial in-process: throughput ≥ 0.6x Dovecot", "rate", 0.6),),
    ),
    Scenario(
        "trivial-pool",
        "trivial Lua passdb, worker pool (blocking=yes, 30 workers)",
        "trivial.lua",
        blocking=True,
        connections=4,
        depth=16,
        reference="~14 300/s, p99 8.4 ms",
        targets=(Target("trivial through the blocking pool: throughput ≥ 1.2x Dovecot", "rate", 1.2),),
    ),
    Scenario(
        "http-pool",
        "HTTP passdb, {delay} ms backend, blocking=yes, 30 workers",
        "http_passdb.lua",
        blocking=True,
        connections=16,
        depth=64,
        reference="~1 380/s, p99 775 ms",
        http=True,
    ),
    Scenario(
        "http-default",
        "HTTP passdb, {delay} ms backend, authd default settings (Dovecot blocking=yes, 30 workers)",
        "http_passdb.lua",
        blocking=True,
        connections=16,
        depth=64,
        reference="~1 380/s, p99 775 ms",
        authd_defaults=True,
        http=True,
        targets=(
            Target("HTTP {delay} ms, authd defaults: throughput ≥ 3x Dovecot", "rate", 3.0),
            Target("HTTP {delay} ms, authd defaults: p99 ≤ 0.4x Dovecot", "p99_ms", 0.4, at_least=False),
            Target("HTTP {delay} ms, authd defaults: no request failing", "errors", 0),
        ),
    ),
    Scenario(
        "http-split",
        "HTTP passdb, {delay} ms backend sending head and body in two segments, authd default settings",
        "http_passdb.lua",
        blocking=True,
        connections=16,
        depth=64,
        reference="none (Python's http.server answers this way: ~45 ms a request for a client delaying its ACKs)",
        authd_defaults=True,
        http=True,
        split_backend=True,
        targets=(Target("HTTP {delay} ms, two-segment backend: no request failing", "errors", 0),),
    ),
    Scenario(
        "userdb-user",
        "auth-userdb USER lookups, trivial script, in-process (blocking=no)",
        "trivial.lua",
        blocking=False,
        connections=4,
        depth=16,
        reference="~97 000/s",
        userdb=True,
        targets=(Target("USER lookups: throughput ≥ 0.5x Dovecot", "rate", 0.5),),
    ),
    Scenario(
        "sequential-inprocess",
        "sequential trivial passdb, in-process (blocking=no)",
        "trivial.lua",
        blocking=False,
        connections=1,
        depth=1,
        reference="~6 800/s, p50 0.13 ms",
    ),
)
RSS_SCENARIO = "rss-idle"
RSS_LIMIT_MB = 120
CALIBRATIONS = ("loadgen-capacity", "backend-capacity")
CAPACITY_WORKLOADS: tuple[tuple[Kind, str, int, int], ...] = (
    ("plain", "auth-client", 4, 16),
    ("plain", "auth-client", 16, 64),
    ("login", "auth-client", 4, 16),
    ("user", "auth-userdb", 4, 16),
    ("plain", "auth-client", 1, 1),
)
#: bench.flood: one connection floods authd while its backend hangs (issue 13's bounds).
FLOOD_SCENARIO = "flood"
ALL = (*CALIBRATIONS, *(s.name for s in SCENARIOS), RSS_SCENARIO, FLOOD_SCENARIO)


@dataclass
class Run:
    """One measured run of one server."""

    rate: float
    p50_ms: float
    p99_ms: float
    completed: int
    errors: int
    error_samples: list[str]
    server_cpu_s: float
    peak_rss_mb: float
    loadgen_cpu_s: float
    #: CPU of the machine used by neither the server, the load generator nor our HTTP backend:
    #: other sessions on a shared machine. Near 0 when the numbers can be trusted.
    other_cpu_s: float
    window_s: float
    #: Seconds of warm-up this run needed (at least Options.warmup; see LoadGenerator.begin).
    warmup_s: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / self.completed * 1e6 if self.completed else float("nan")


@dataclass
class Summary:
    """Medians over a server's runs (peak RSS: the highest; errors: the sum)."""

    runs: list[Run] = field(default_factory=list)

    def _median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def rate(self) -> float:
        return self._median([r.rate for r in self.runs])

    @property
    def p50_ms(self) -> float:
        return self._median([r.p50_ms for r in self.runs])

    @property
    def p99_ms(self) -> float:
        return self._median([r.p99_ms for r in self.runs])

    @property
    def cpu_us_per_request(self) -> float:
        return self._median([r.cpu_us_per_request for r in self.runs])

    @property
    def cpu_percent(self) -> float:
        return self._median([100 * r.server_cpu_s / r.window_s for r in self.runs])

    @property
    def loadgen_cpu_percent(self) -> float:
        return self._median([100 * r.loadgen_cpu_s / r.window_s for r in self.runs])

    @property
    def other_cpu_percent(self) -> float:
        return self._median([100 * r.other_cpu_s / r.window_s for r in self.runs])

    @property
    def peak_rss_mb(self) -> float:
        return max((r.peak_rss_mb for r in self.runs), default=float("nan"))

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        names = (
            "rate",
            "p50_ms",
            "p99_ms",
            "cpu_us_per_request",
            "cpu_percent",
            "loadgen_cpu_percent",
            "other_cpu_percent",
        )
        medians = {name: getattr(self, name) for name in names}
        runs = [asdict(r) | {"cpu_us_per_request": r.cpu_us_per_request} for r in self.runs]
        return {"median": medians, "peak_rss_mb": self.peak_rss_mb, "errors": self.errors, "runs": runs}


@dataclass
class ScenarioResult:
    scenario: Scenario
    authd: Summary
    dovecot: Summary | None


@dataclass
class RssResult:
    authd_mb: float
    dovecot_mb: float | None
    states: int
    connections: int


@dataclass
class Calibration:
    """A measurement of the instrument itself (load generator, HTTP backend)."""

    label: str
    run: Run

    def as_dict(self) -> dict[str, Any]:
        run = self.run
        return {"label": self.label, **asdict(run), "loadgen_cpu_us_per_request": loadgen_us(run)}


def loadgen_us(run: Run) -> float:
    """The load generator's CPU per request, in microseconds."""
    return run.loadgen_cpu_s / run.completed * 1e6 if run.completed else float("nan")


def _make_dir(path: Path) -> None:
    """A directory Dovecot's unprivileged auth processes can enter (the scripts live there)."""
    path.mkdir()
    path.chmod(0o755)


def progress(message: str) -> None:
    """Progress goes to stderr so that stdout is only the report."""
    print(message, file=sys.stderr, flush=True)


def measure(meter: Meter, workload: Workload, options: Options, duration: float, helper: Meter | None = None) -> Run:
    """One run: connect, warm up, measure DURATION seconds while METER samples the server, drain.

    HELPER meters our own processes that serve the server (the HTTP backend): not "other" CPU.
    """
    with LoadGenerator(workload, options.loadgen_procs) as generator:
        window = generator.begin(options.warmup, duration, DRAIN, MAX_WARMUP)
        meter.start()
        if helper is not None:
            helper.start()
        machine = machine_busy_seconds()
        sampled_from = time.monotonic()
        while (left := window.t1 - time.monotonic()) > 0:
            time.sleep(min(0.2, left))
            meter.sample()
        cpu = meter.cpu_since_start()
        ours = cpu + (helper.cpu_since_start() if helper is not None else 0.0)
        machine = machine_busy_seconds() - machine
        # the sampler's window is a few ms longer than the generator's: scale to the latter
        scale = duration / (time.monotonic() - sampled_from)
        result = generator.collect(timeout=60)
    return Run(
        rate=result.rate,
        p50_ms=result.percentile_ms(0.5),
        p99_ms=result.percentile_ms(0.99),
        completed=result.completed,
        errors=result.errors,
        error_samples=result.error_samples,
        server_cpu_s=cpu * scale,
        peak_rss_mb=meter.peak_rss / MB,
        loadgen_cpu_s=result.cpu_seconds,
        other_cpu_s=max(0.0, (machine - ours) * scale - result.cpu_seconds),
        window_s=result.window,
        warmup_s=window.warmup,
    )


def _prioritise(server: Server, options: Options) -> None:
    """A server has a session (and scheduling group) of its own: give it our niceness too."""
    if options.nice:
        prioritise(server.pid, options.nice)


def _workload(scenario: Scenario, server: Server, options: Options) -> Workload:
    if scenario.userdb:
        return Workload("user", str(server.socket("auth-userdb")), scenario.connections, scenario.depth)
    return Workload(options.mech, str(server.socket("auth-client")), scenario.connections, scenario.depth)


def run_scenario(scenario: Scenario, options: Options, workdir: Path) -> ScenarioResult:
    """Start both servers, prime each once, then alternate OPTIONS.runs measured runs."""
    _make_dir(workdir)
    with ExitStack() as stack:
        backend_url, helper = None, None
        if scenario.http:
            backend = stack.enter_context(
                Backend(options.backend_delay, options.backend_procs, split=scenario.split_backend)
            )
            backend_url, helper = backend.url, Meter(lambda: backend.pids)
        script = prepare_script(SCRIPTS / scenario.script, workdir, backend_url)
        setup = Setup(script, scenario.blocking, authd_defaults=scenario.authd_defaults)
        servers: list[Server] = [stack.enter_context(Authd(workdir / "authd", setup))]
        if options.dovecot:
            servers.append(stack.enter_context(Dovecot(workdir / "dovecot", setup)))
        for server in servers:
            _prioritise(server, options)
        summaries = {server.name: Summary() for server in servers}
        for server in servers:
            progress(f"[{scenario.name}] priming {server.name}")
            measure(server.meter, _workload(scenario, server, options), options, 1.0, helper)
        for index in range(options.runs):
            for server in servers:
                workload = _workload(scenario, server, options)
                run = measure(server.meter, workload, options, options.duration, helper)
                summaries[server.name].runs.append(run)
                progress(
                    f"[{scenario.name}] run {index + 1}/{options.runs} {server.name}: {run.rate:,.0f}/s "
                    f"p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms, {run.errors} errors, "
                    f"other CPU {100 * run.other_cpu_s / run.window_s:.0f} %"
                    + (f" e.g. {run.error_samples[0]!r}" if run.error_samples else "")
                )
        if options.profile is not None:
            authd = servers[0]
            progress(f"[{scenario.name}] profiling authd with py-spy (not measured)")
            profile(authd, _workload(scenario, authd, options), options, options.profile / scenario.name)
    return ScenarioResult(scenario, summaries["authd"], summaries.get("dovecot"))


def py_spy() -> str | None:
    """The py-spy executable: on PATH or next to this Python (the bench extra installs it)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def profile(server: Server, workload: Workload, options: Options, stem: Path) -> None:
    """Sample SERVER with py-spy under WORKLOAD: STEM.folded (collapsed stacks, all threads) and
    STEM.top.txt (the functions with the most samples, own and inclusive)."""
    seconds = max(1, round(options.duration))
    folded = stem.with_suffix(".folded")
    with LoadGenerator(workload, options.loadgen_procs) as generator:
        generator.begin(options.warmup, seconds, DRAIN, MAX_WARMUP)
        command = [str(py_spy()), "record", "--pid", str(server.pid), "--duration", str(seconds), "--rate", "200"]
        # --subprocesses: authd's worker processes too
        command += ["--format", "raw", "--threads", "--subprocesses", "--nonblocking", "--output", str(folded)]
        spy = subprocess.run(command, capture_output=True, text=True, check=False, timeout=seconds + 60)
        generator.collect(timeout=60)
    if spy.returncode != 0 or not folded.exists():
        progress(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}")
        return
    stem.with_suffix(".top.txt").write_text(top_functions(folded.read_text()))


def top_functions(folded: str, count: int = 30) -> str:
    """The most sampled functions of collapsed stacks, by own samples and by inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            inclusive[frame] += int(samples)
    lines = [f"{total} samples (idle threads waiting on a lock may still show as busy)", "", "own:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(count)]
    lines += ["", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(count)]
    return "\n".join(lines) + "\n"


def _rss_with_idle_connections(server: Server, options: Options) -> float:
    """Prime both pools, hold OPTIONS.idle_connections auth-client connections, return peak RSS in MB."""
    priming: tuple[tuple[Kind, str], ...] = (("plain", "auth-client"), ("user", "auth-userdb"))
    for kind, listener in priming:
        workload = Workload(kind, str(server.socket(listener)), 4, 16)
        run_load(workload, options.loadgen_procs, 0, options.warmup)
    with ExitStack() as stack:
        for sock in idle_connections(str(server.socket("auth-client")), options.idle_connections):
            stack.callback(sock.close)
        server.meter.start()
        for _ in range(10):
            time.sleep(0.1)
            server.meter.sample()
        return server.meter.peak_rss / MB


def run_rss(options: Options, workdir: Path) -> RssResult:
    """authd with 30 states per pool (passdb + userdb) and idle connections; Dovecot alike."""
    _make_dir(workdir)
    script = prepare_script(SCRIPTS / "trivial.lua", workdir, None)
    setup = Setup(script, blocking=True, workers=30, client_limit=options.idle_connections + 100)
    results: dict[str, float] = {}
    servers: list[Callable[[], Server]] = [lambda: Authd(workdir / "authd", setup)]
    if options.dovecot:
        servers.append(lambda: Dovecot(workdir / "dovecot", setup))
    for make in servers:
        with make() as server:
            _prioritise(server, options)
            progress(f"[{RSS_SCENARIO}] {server.name}: {options.idle_connections} idle connections")
            results[server.name] = _rss_with_idle_connections(server, options)
    return RssResult(results["authd"], results.get("dovecot"), setup.workers, options.idle_connections)


def run_calibrations(names: tuple[str, ...], options: Options, workdir: Path) -> list[Calibration]:
    """The instrument itself: the load generator against a do-nothing server, the HTTP backend alone."""
    calibrations = []
    if "loadgen-capacity" in names:
        directory = workdir / "trivial"
        directory.mkdir()
        with TrivialServer(directory) as trivial:
            meter = Meter(lambda: [trivial.pid])
            for kind, listener, connections, depth in CAPACITY_WORKLOADS:
                label = f"load generator → trivial server, {kind.upper()} {connections}x{depth}"
                progress(f"[loadgen-capacity] {label}")
                workload = Workload(kind, str(trivial.socket(listener)), connections, depth)
                run = measure(meter, workload, options, options.duration)
                calibrations.append(Calibration(label, run))
    if "backend-capacity" in names:
        with Backend(options.backend_delay, options.backend_procs) as backend:
            connections = 512
            label = (
                f"HTTP backend alone, {options.backend_delay * 1000:.0f} ms delay, "
                f"{options.backend_procs} processes, {connections} connections x 1"
            )
            progress(f"[backend-capacity] {label}")
            workload = Workload("http", f"127.0.0.1:{backend.port}", connections, 1)
            run = measure(Meter(lambda: backend.pids), workload, options, options.duration)
            calibrations.append(Calibration(label, run))
    return calibrations

"""The Markdown report (what README.md's performance section reproduces) and the raw JSON."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import flood
from bench.backend import LOOP as BACKEND_LOOP
from bench.scenarios import (
    RSS_LIMIT_MB,
    Calibration,
    Options,
    RssResult,
    ScenarioResult,
    Summary,
    loadgen_us,
)
from bench.servers import REPO

#: Median "other CPU %" (of one core) above which the report warns that the machine was not quiet.
OTHER_CPU_WARNING = 10


@dataclass
class Report:
    options: Options
    dovecot_version: str | None
    calibrations: list[Calibration] = field(default_factory=list)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    rss: RssResult | None = None
    flood: flood.FloodResult | None = None
    interrupted: bool = False
    date: str = field(default_factory=lambda: datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    #: Taken when the benchmark starts: others may change the work tree while it runs.
    revision: str = field(default_factory=lambda: authd_revision())


def machine() -> str:
    """CPU model, cores, memory, OS, Python: enough to tell two result tables apart."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    debian = Path("/etc/debian_version")
    system = f"Debian {debian.read_text().strip()}" if debian.exists() else platform.system()
    return (
        f"{model}, {os.cpu_count()} cores, {memory_kb / 1024**2:.0f} GB, {system}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def authd_revision() -> str:
    """The commit under test (read-only git), '+ changes' if the work tree differs from it."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}".replace(",", " ")


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def _rate(summary: Summary) -> str:
    rates = [run.rate for run in summary.runs]
    return f"{_num(summary.rate)} ({_num(min(rates))}-{_num(max(rates))})" if rates else "-"


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "**NOT met**"


def _server_row(label: str, cxk: str, server: str, s: Summary) -> str:
    return (
        f"| {label} | {cxk} | {server} | {_rate(s)} | {_ms(s.p50_ms)} | {_ms(s.p99_ms)} | "
        f"{_num(s.cpu_us_per_request)} | {_num(s.cpu_percent)} | {_num(s.peak_rss_mb)} | {s.errors} | "
        f"{_num(s.loadgen_cpu_percent)} | {_num(s.other_cpu_percent)} |"
    )


def markdown(report: Report) -> str:
    o = report.options
    lines = [
        f"## authd vs Dovecot {report.dovecot_version or '(not installed)'}",
        "",
        f"{report.date}; {machine()}; authd {report.revision}.",
        f"{o.runs} runs x {o.duration:g} s per server and scenario, each after a warm-up of at least "
        f"{o.warmup:g} s and until every request slot was answered once, "
        f"interleaved authd, Dovecot, authd, ...; SASL {o.mech.upper()}; load generator: "
        f"{o.loadgen_procs} processes; HTTP backend: {o.backend_delay * 1000:g} ms, "
        f"{o.backend_procs} processes ({BACKEND_LOOP})" + (f"; niceness {o.nice}." if o.nice else "."),
    ]
    if report.dovecot_version is None or not o.dovecot:
        lines.append("**Dovecot is not installed (or --no-dovecot was given): authd alone, no ratios.**")
    busy = max((s.other_cpu_percent for s in _summaries(report)), default=0.0)
    if busy > OTHER_CPU_WARNING:
        lines.append(
            f"**Other processes used up to {busy:.0f} % CPU (median of a scenario's runs) while we "
            "measured: the machine was shared, so absolute numbers may be low and noisy; ratios suffer "
            "less (runs alternate). `--nice -10` gives the benchmark priority.**"
        )
    if report.interrupted:
        lines.append("**Interrupted: only the scenarios that finished are shown.**")
    if report.scenarios:
        lines += [
            "",
            "| scenario | c x k | server | req/s median (min-max) | p50 ms | p99 ms | server CPU µs/req "
            "| server CPU % | peak RSS MB | errors | load gen CPU % | other CPU % |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for result in report.scenarios:
            sc = result.scenario
            cxk = f"{sc.connections}x{sc.depth}"
            title = _with_delay(sc.title, o)
            lines.append(_server_row(f"**{sc.name}**: {title}", cxk, "authd", result.authd))
            if result.dovecot is not None:
                d, a = result.dovecot, result.authd
                lines.append(_server_row(f"issue's Dovecot figure: {sc.reference}", "", "Dovecot", d))
                lines.append(
                    f"| | | authd÷Dovecot | {_ratio(a.rate, d.rate)} | {_ratio(a.p50_ms, d.p50_ms)} | "
                    f"{_ratio(a.p99_ms, d.p99_ms)} | {_ratio(a.cpu_us_per_request, d.cpu_us_per_request)} | "
                    f"{_ratio(a.cpu_percent, d.cpu_percent)} | {_ratio(a.peak_rss_mb, d.peak_rss_mb)} | | | |"
                )
    targets = _targets(report)
    if targets:
        lines += ["", "| target (issue 5) | measured | result |", "|---|---|---|", *targets]
    if report.flood is not None:
        lines += ["", *flood.markdown(report.flood)]
    if report.calibrations:
        lines += [
            "",
            "| the instrument | req/s | p50 ms | p99 ms | load gen CPU µs/req | load gen CPU % "
            "| server CPU % | other CPU % | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in report.calibrations:
            r = c.run
            lines.append(
                f"| {c.label} | {_num(r.rate)} | {_ms(r.p50_ms)} | {_ms(r.p99_ms)} | "
                f"{_num(loadgen_us(r), 1)} | {_num(100 * r.loadgen_cpu_s / r.window_s)} | "
                f"{_num(100 * r.server_cpu_s / r.window_s)} | {_num(100 * r.other_cpu_s / r.window_s)} | "
                f"{r.errors} |"
            )
    return "\n".join(lines) + "\n"


def _with_delay(text: str, options: Options) -> str:
    """Scenario titles and target labels name the backend delay of the run."""
    return text.replace("{delay}", f"{options.backend_delay * 1000:g}")


def _summaries(report: Report) -> list[Summary]:
    return [s for r in report.scenarios for s in (r.authd, r.dovecot) if s is not None]


def _targets(report: Report) -> list[str]:
    rows = []
    for result in report.scenarios:
        for target in result.scenario.targets:
            measured, met = target.check(result.authd, result.dovecot)
            rows.append(f"| {_with_delay(target.label, report.options)} | {measured} | {_verdict(met)} |")
    if report.rss is not None:
        rss = report.rss
        dovecot = f" (Dovecot: {_num(rss.dovecot_mb)} MB)" if rss.dovecot_mb is not None else ""
        rows.append(
            f"| RSS ≤ {RSS_LIMIT_MB} MB with {rss.states} Lua states per script (passdb + userdb) and "
            f"{_num(rss.connections)} idle client connections | {_num(rss.authd_mb)} MB{dovecot} | "
            f"{_verdict(rss.authd_mb <= RSS_LIMIT_MB)} |"
        )
    return rows


def as_json(report: Report) -> dict[str, Any]:
    """Everything measured, per run, for later analysis."""
    scenarios = []
    for result in report.scenarios:
        sc = result.scenario
        entry: dict[str, Any] = {
            "name": sc.name,
            "title": _with_delay(sc.title, report.options),
            "connections": sc.connections,
            "depth": sc.depth,
            "reference": sc.reference,
            "authd": result.authd.as_dict(),
            "dovecot": result.dovecot.as_dict() if result.dovecot else None,
            "targets": [],
        }
        for target in sc.targets:
            measured, met = target.check(result.authd, result.dovecot)
            label = _with_delay(target.label, report.options)
            entry["targets"].append({"label": label, "measured": measured, "met": met})
        scenarios.append(entry)
    return {
        "date": report.date,
        "machine": machine(),
        "authd": report.revision,
        "dovecot": report.dovecot_version,
        "options": asdict(report.options),
        "interrupted": report.interrupted,
        "calibrations": [c.as_dict() for c in report.calibrations],
        "scenarios": scenarios,
        "rss": asdict(report.rss) if report.rss else None,
        "flood": asdict(report.flood) if report.flood else None,
    }

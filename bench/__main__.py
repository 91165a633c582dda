"""`python -m bench`: run the benchmark and print the Markdown report (see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from bench.flood import run_flood
from bench.procs import prioritise
from bench.report import Report, as_json, markdown
from bench.scenarios import (
    ALL,
    CALIBRATIONS,
    FLOOD_SCENARIO,
    RSS_SCENARIO,
    SCENARIOS,
    Options,
    progress,
    py_spy,
    run_calibrations,
    run_rss,
    run_scenario,
)
from bench.servers import dovecot_version


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="authd vs Debian's Dovecot 2.3, side by side, interleaved."
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=ALL,
        metavar="NAME",
        help=f"run only this (repeatable): {', '.join(ALL)}",
    )
    parser.add_argument("--runs", type=int, default=5, help="measured runs per server and scenario (default 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run (default 5)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="least seconds of warm-up per run, not counted (default 1)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 runs of 1 s, 0.3 s warm-up")
    parser.add_argument("--mech", choices=("plain", "login"), default="plain", help="SASL mechanism (default plain)")
    parser.add_argument("--loadgen-procs", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--backend-procs", type=int, default=2, help="HTTP backend processes (default 2)")
    parser.add_argument("--backend-delay", type=float, default=20.0, help="HTTP backend delay in ms (default 20)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run everything at this niceness, e.g. -10 on a machine shared with other work (default 0)",
    )
    parser.add_argument("--no-dovecot", action="store_true", help="measure authd alone")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run's raw numbers here")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after each scenario's runs, profile authd with py-spy for one more run (not measured)",
    )
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the benchmark like Ctrl-C: everything started is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile is not None and py_spy() is None:
        progress("--profile needs py-spy: pip install -e '.[bench]'")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    if args.nice:
        prioritise(os.getpid(), args.nice)  # inherited by everything we start
    version = dovecot_version()
    if version is None and not args.no_dovecot:
        progress("Dovecot with the Lua auth plugin is not installed: measuring authd alone")
    quick = {"runs": 2, "duration": 1.0, "warmup": 0.3} if args.quick else {}
    options = Options(
        runs=quick.get("runs", args.runs),
        duration=quick.get("duration", args.duration),
        warmup=quick.get("warmup", args.warmup),
        mech=args.mech,
        loadgen_procs=args.loadgen_procs,
        backend_procs=args.backend_procs,
        backend_delay=args.backend_delay / 1000,
        dovecot=version is not None and not args.no_dovecot,
        nice=args.nice,
        profile=args.profile,
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    selected = tuple(args.scenario or ALL)
    report = Report(options, version)
    workdir = Path(tempfile.mkdtemp(prefix="authd-bench-", dir="/tmp"))
    workdir.chmod(0o755)  # Dovecot's unprivileged auth processes read the scripts in here
    failed = True
    try:
        report.calibrations = run_calibrations(tuple(n for n in selected if n in CALIBRATIONS), options, workdir)
        for scenario in SCENARIOS:
            if scenario.name in selected:
                report.scenarios.append(run_scenario(scenario, options, workdir / scenario.name))
        if RSS_SCENARIO in selected:
            report.rss = run_rss(options, workdir / RSS_SCENARIO)
        if FLOOD_SCENARIO in selected:
            report.flood = run_flood(options.dovecot, workdir / FLOOD_SCENARIO, progress)
        failed = False
    except KeyboardInterrupt:
        report.interrupted = True
        failed = False
    finally:
        if failed:
            progress(f"failed; logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(report), indent=2, default=str) + "\n")
    return 130 if report.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

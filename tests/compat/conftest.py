"""Session fixtures for the compat suites: the HTTP backends, the rendered scripts, and one
authd per fixture script (all started in parallel, stopped by PID at the end).

    def test_x(compat: Deployment[CompatAuthd]) -> None:
        reply = Auth("alice", "alicepass").run(compat.servers["users_file.lua"])

A failing test gets the log tails of the instances serving its script (matched by the
script's stem in the test id) appended to its report.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.interop.procs import live_logs, make_workdir

from .harness import CompatAuthd, Deployment, deployment, make_authd

LOG_TAIL_LINES = 40


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        for label, log_text in live_logs.items():
            if Path(label.split(" ", 1)[-1]).stem in item.nodeid:
                lines = [line for line in log_text().splitlines() if "Raw backtrace:" not in line]
                tail = "\n".join(lines[-LOG_TAIL_LINES:])
                report.sections.append((f"{label} log (last {LOG_TAIL_LINES} lines)", tail))
    return report


@pytest.fixture(scope="session")
def compat_dir() -> Iterator[Path]:
    path = make_workdir("compat")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def compat(compat_dir: Path) -> Iterator[Deployment[CompatAuthd]]:
    """One authd per fixture script, with its own HTTP backends."""
    with deployment(compat_dir, "authd", make_authd) as deployed:
        yield deployed

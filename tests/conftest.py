"""Tests that need a real component (Dovecot, Postfix, Exim, Lua C modules, ...) say so with
`@pytest.mark.requires(NAME, ...)`; with AUTHD_REQUIRE_INTEROP=1 a skipped test fails instead.

A test marked `requires` is skipped, with the reason, when a component it names is missing, and
is counted as an interop test: the terminal summary says how many of them ran. The names are
the keys of COMPONENTS. AUTHD_REQUIRE_INTEROP=1 (.ci/run sets it) turns every skip, whatever
raised it, into a failure that gives the skip's reason: nothing may be left out silently there.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Generator
from pathlib import Path

import pytest

REQUIRE_INTEROP = "AUTHD_REQUIRE_INTEROP"
INTEROP_DIR = Path(__file__).resolve().parent / "interop"
LUA_C_MODULES = Path("/usr/lib/x86_64-linux-gnu/lua/5.4")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _program(name: str, package: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        if shutil.which(name) or shutil.which(name, path=SYSTEM_PATH):
            return None
        return f"{name} is not installed (Debian's {package})"

    return missing


def _file(path: Path, package: str) -> Callable[[], str | None]:
    return lambda: None if path.exists() else f"{path} is missing (Debian's {package})"


def _root() -> str | None:
    return None if os.geteuid() == 0 else "it must run as root"


def _user(name: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return f"there is no system user {name}"
        return None

    return missing


def _apt_lists() -> str | None:
    if list(Path("/var/lib/apt/lists").glob("*_Packages*")):
        return None
    return "apt has no package lists (apt-get update never ran), so only installed packages are known"


def _exim() -> str | None:
    from tests.interop.exim import unavailable

    return unavailable()


COMPONENTS: dict[str, Callable[[], str | None]] = {
    "dovecot": _program("dovecot", "dovecot-core"),
    "doveadm": _program("doveadm", "dovecot-core"),
    "doveconf": _program("doveconf", "dovecot-core"),
    "dovecot-lua": _file(Path("/usr/lib/dovecot/modules/auth/libauthdb_lua.so"), "dovecot-auth-lua"),
    "dovecot-user": _user("dovecot"),
    "postfix": _program("postfix", "postfix"),
    "swaks": _program("swaks", "swaks"),
    "exim": _exim,
    "lua-cjson": _file(LUA_C_MODULES / "cjson.so", "lua-cjson"),
    "lua-socket": _file(LUA_C_MODULES / "socket" / "core.so", "lua-socket"),
    "lua-sec": _file(LUA_C_MODULES / "ssl.so", "lua-sec"),
    "openssl": _program("openssl", "openssl"),
    "systemd-analyze": _program("systemd-analyze", "systemd"),
    "apt-cache": _program("apt-cache", "apt"),
    "apt-lists": _apt_lists,
    "root": _root,
}


def interop_required() -> bool:
    return os.environ.get(REQUIRE_INTEROP) == "1"


def missing_components(item: pytest.Item) -> list[str]:
    """Why ITEM cannot run here: one reason per missing component its `requires` marks name."""
    reasons = []
    for mark in item.iter_markers("requires"):
        for name in mark.args:
            if name not in COMPONENTS:
                raise pytest.UsageError(f"{item.nodeid}: unknown component {name!r} in requires()")
            reason = COMPONENTS[name]()
            if reason is not None:
                reasons.append(f"{name}: {reason}")
    return reasons


class InteropCount:
    """How many `requires` tests ran (their call phase, passed or failed) and how many were skipped."""

    def __init__(self) -> None:
        self.ran = 0
        self.skipped = 0


COUNT = pytest.StashKey[InteropCount]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(*components): the test runs against these real components (tests/conftest.py)"
    )
    config.stash[COUNT] = InteropCount()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/interop drives a real Dovecot, marked or not."""
    for item in items:
        if INTEROP_DIR in item.path.parents and item.get_closest_marker("requires") is None:
            item.add_marker(pytest.mark.requires("dovecot", "doveadm"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    reasons = missing_components(item)
    if reasons:
        pytest.skip("; ".join(reasons))


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if "requires" in item.keywords:
        count = item.config.stash[COUNT]
        if report.skipped:
            count.skipped += 1
        elif report.when == "call":
            count.ran += 1
    if report.skipped and not hasattr(report, "wasxfail") and interop_required():
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_INTEROP}=1, but this test was skipped: {_skip_reason(report)}"
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    count = config.stash[COUNT]
    terminalreporter.write_line(
        f"interop: {count.ran} tests ran against real components ({count.skipped} skipped)", bold=True
    )

"""Fixtures that run real Dovecot and Postfix instances for the interop tests.

Slow-starting instances are session/module scoped; each is started inside `running()`, which
stops it by PID in teardown whatever happened, and attaches the tail of its log to the report
of every test that fails while it runs. Everything lives in one session directory under /tmp
(`interop_dir`), removed at the end.

The shared user database (`users_file`): alice / alicepass, uid/gid of nobody/nogroup, no home
(each DovecotImap supplies its own mail_home). `fresh_ip` hands out a loopback address nobody
used before, for tests that fail on purpose (Dovecot's auth penalty is per client IP).
"""

from __future__ import annotations

import itertools
import shutil
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from .dovecot import (
    AuthCommand,
    DovecotImap,
    ExternalSockets,
    ReferenceDovecot,
    builds_used,
    db_block,
    host_build,
    mail_ids,
)
from .postfix import ThrowawayPostfix
from .procs import live_logs, make_workdir, running, subdir

LOG_TAIL_LINES = 60
RELAY_AUTH = Path(__file__).with_name("relay_auth.py")

LUA_PASSDB = """\
function auth_passdb_lookup(req)
  if req.user == "alice" then
    return dovecot.auth.PASSDB_RESULT_OK, "password=alicepass"
  end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
end
"""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed:
        for label, log_text in live_logs.items():
            tail = "\n".join(log_text().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"{label} log (last {LOG_TAIL_LINES} lines)", tail))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Which Dovecot(s) the suite ran, e.g. `dovecot: Dovecot 2.3.19.1 (host) x41, Dovecot 2.4.1-4 (chroot ...) x9`."""
    if builds_used:
        ran = ", ".join(f"{label} x{count}" for label, count in builds_used.items())
        terminalreporter.write_line(f"dovecot: ran {ran}", bold=True)


@pytest.fixture(scope="session")
def interop_dir() -> Iterator[Path]:
    path = make_workdir("interop")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def users_file(interop_dir: Path) -> Path:
    uid, gid = mail_ids()
    path = interop_dir / "users"
    path.write_text(f"alice:{{PLAIN}}alicepass:{uid}:{gid}::::\n")
    path.chmod(0o644)
    return path


@pytest.fixture(scope="session")
def fresh_ip() -> Callable[[], str]:
    """Returns a function giving a new 127.0.x.y address on each call."""
    counter = itertools.count()

    def next_ip() -> str:
        n = next(counter)
        return f"127.0.{n // 250}.{n % 250 + 2}"

    return next_ip


@pytest.fixture(scope="session")
def ref_dovecot(interop_dir: Path, users_file: Path) -> Iterator[ReferenceDovecot]:
    databases = db_block("passdb", "passwd-file", str(users_file)) + db_block("userdb", "passwd-file", str(users_file))
    ref = ReferenceDovecot(subdir(interop_dir, "ref"), databases)
    with running("reference dovecot", ref):
        yield ref


@pytest.fixture(scope="module")
def lua_dovecot(interop_dir: Path) -> Iterator[ReferenceDovecot]:
    workdir = subdir(interop_dir, "ref-lua")
    script = workdir / "passdb.lua"
    script.write_text(LUA_PASSDB)
    script.chmod(0o644)
    databases = db_block("passdb", "lua", f"file={script} blocking=no") + db_block(
        "userdb", "static", "uid=nobody gid=nogroup"
    )
    ref = ReferenceDovecot(workdir, databases)
    with running("lua dovecot", ref):
        yield ref


@pytest.fixture(scope="module")
def postfix(interop_dir: Path, ref_dovecot: ReferenceDovecot) -> Iterator[ThrowawayPostfix]:
    with running("postfix", ThrowawayPostfix(subdir(interop_dir, "postfix"), ref_dovecot.socket("auth-client"))) as pf:
        yield pf


@pytest.fixture(scope="module")
def imap_route_a(interop_dir: Path, ref_dovecot: ReferenceDovecot) -> Iterator[DovecotImap]:
    imap = DovecotImap(subdir(interop_dir, "imap-a"), ExternalSockets.in_dir(ref_dovecot.base_dir))
    with running("imap route A", imap):
        yield imap


@pytest.fixture(scope="module")
def route_b_reference(interop_dir: Path, users_file: Path) -> Iterator[ReferenceDovecot]:
    """ref_dovecot of the host's Dovecot: imap_route_b's clients speak its dialect (a 2.4 login
    sends protocol=, which 2.3's auth refuses: `didn't specify service in request`)."""
    build = host_build()
    dialect = None if build is None else build.dialect
    databases = db_block("passdb", "passwd-file", str(users_file), dialect=dialect) + db_block(
        "userdb", "passwd-file", str(users_file), dialect=dialect
    )
    ref = ReferenceDovecot(subdir(interop_dir, "ref-b"), databases, build=build)
    with running("route B reference dovecot", ref):
        yield ref


@pytest.fixture(scope="module")
def imap_route_b(interop_dir: Path, route_b_reference: ReferenceDovecot) -> Iterator[DovecotImap]:
    ref_dovecot = route_b_reference
    # The relay cannot carry REQUEST (session_pid vs peer credentials), so imap keeps asking the
    # reference's master socket directly; everything else goes through the route-B service. The
    # host's Dovecot: its master runs this host's Python.
    imap = DovecotImap(
        subdir(interop_dir, "imap-b"),
        AuthCommand(f"{sys.executable} {RELAY_AUTH} {ref_dovecot.base_dir}"),
        extra_config=f"service imap {{\n  executable = imap -a {ref_dovecot.socket('auth-master')}\n}}\n",
        build=host_build(),
    )
    with running("imap route B", imap):
        yield imap

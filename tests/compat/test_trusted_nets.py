"""Compat: scripts/trusted_nets.lua (accounts tied to networks with allow_real_nets / allow_nets) in authd.

A PASS lookup whose network check fails is answered `FAIL` by a blocking (auth worker) Lua
passdb, as in Dovecot 2.3.19, and `NOTFOUND` by a `blocking = false` one (Dovecot's main
process turns the OK into "user unknown" there); both verified against Dovecot.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.dovecot import ReferenceDovecot, db_block
from tests.interop.procs import make_workdir, running, subdir

from .harness import (
    SCRIPTS_DIR,
    Auth,
    CompatAuthd,
    Deployment,
    Exchange,
    LoginRequest,
    PassLookup,
    UserLookup,
    authd_config,
    expect,
    wait_logged,
)

SCRIPT = "trusted_nets.lua"
INSIDE, OUTSIDE = "real_rip=10.1.2.3", "real_rip=192.0.2.10"

REPLIES: list[tuple[str, Exchange, list[str]]] = [
    ("pass-lookup-no-ip", PassLookup("webmail"), ["FAIL\t1"]),
    ("pass-lookup-outside", PassLookup("webmail", fields=(OUTSIDE,)), ["FAIL\t1"]),
    ("pass-lookup-inside", PassLookup("webmail", fields=(INSIDE,)), ["PASS\t1\tuser=webmail\t"]),
    ("pass-lookup-rip-inside-real-outside", PassLookup("webmail", fields=("rip=10.1.2.3", OUTSIDE)), ["FAIL\t1"]),
    (
        "pass-lookup-real-inside-rip-outside",
        PassLookup("webmail", fields=("rip=192.0.2.10", INSIDE)),
        ["PASS\t1\tuser=webmail\t"],
    ),
    ("pass-lookup-table-outside", PassLookup("tbl", fields=(OUTSIDE,)), ["FAIL\t1"]),
    ("pass-lookup-allow-nets-outside", PassLookup("clients", fields=("rip=198.51.100.1",)), ["FAIL\t1"]),
    ("pass-lookup-allow-nets-inside", PassLookup("clients", fields=("rip=192.0.2.77",)), ["PASS\t1\tuser=clients\t"]),
    ("pass-lookup-local", PassLookup("localonly"), ["PASS\t1\tuser=localonly\t"]),
    ("pass-lookup-local-with-ip", PassLookup("localonly", fields=(INSIDE,)), ["FAIL\t1"]),
    ("pass-lookup-nopassword-outside", PassLookup("token", fields=(OUTSIDE,)), ["FAIL\t1"]),
    ("pass-lookup-nopassword-inside", PassLookup("token", fields=(INSIDE,)), ["PASS\t1\tuser=token\t"]),
    ("pass-lookup-unrestricted", PassLookup("anyone"), ["PASS\t1\tuser=anyone"]),
    ("pass-lookup-unknown", PassLookup("nobody"), ["NOTFOUND\t1"]),
    ("outside", Auth("webmail", "webpass", fields=(OUTSIDE,)), ["FAIL\t1\tuser=webmail"]),
    ("inside", Auth("webmail", "webpass", fields=(INSIDE,)), ["OK\t1\tuser=webmail\t"]),
    ("outside-wrong-password", Auth("webmail", "wrong", fields=(OUTSIDE,)), ["FAIL\t1\tuser=webmail"]),
    ("table-outside", Auth("tbl", "tblpass", fields=(OUTSIDE,)), ["FAIL\t1\tuser=tbl"]),
    ("allow-nets-outside", Auth("clients", "clientpass", fields=("rip=198.51.100.1",)), ["FAIL\t1\tuser=clients"]),
    ("nopassword-outside", Auth("token", "x", fields=(OUTSIDE,)), ["FAIL\t1\tuser=token"]),
    (
        "request-outside",
        LoginRequest(Auth("webmail", "webpass", fields=(OUTSIDE,))),
        ["FAIL\t1\tuser=webmail", "FAIL\t77", "FAIL\t78"],
    ),
    ("user-lookup", UserLookup("webmail"), ["USER\t1\twebmail\tuid=5000\tgid=5000\thome=/srv/mail/webmail"]),
]


@pytest.mark.parametrize(("exchange", "expected"), [r[1:] for r in REPLIES], ids=[r[0] for r in REPLIES])
def test_reply(compat: Deployment[CompatAuthd], exchange: Exchange, expected: list[str]) -> None:
    expect(compat.servers[SCRIPT], exchange, expected)


def test_failed_check_is_logged(compat: Deployment[CompatAuthd]) -> None:
    proc = compat.servers[SCRIPT]
    expect(proc, PassLookup("tbl"), ["FAIL\t1"])
    wait_logged(proc, "tbl", "allow_real_nets check failed: Remote IP not known and 'local' missing", "info")


# --- blocking = false: the check fails in the main process ---------------------------------------

NONBLOCKING: list[tuple[Exchange, list[str]]] = [
    (PassLookup("webmail", fields=(OUTSIDE,)), ["NOTFOUND\t1"]),
    (PassLookup("webmail"), ["NOTFOUND\t1"]),
    (PassLookup("webmail", fields=(INSIDE,)), ["PASS\t1\tuser=webmail\t"]),
    (Auth("webmail", "webpass", fields=(OUTSIDE,)), ["FAIL\t1\tuser=webmail"]),
]


@pytest.fixture(scope="module")
def nonblocking_dir() -> Iterator[Path]:
    path = make_workdir("trusted-nets")
    script = path / SCRIPT
    shutil.copyfile(SCRIPTS_DIR / SCRIPT, script)
    script.chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def nonblocking_authd(nonblocking_dir: Path) -> Iterator[CompatAuthd]:
    config = authd_config(nonblocking_dir / SCRIPT, environment=()).replace("blocking = true", "blocking = false")
    with running("authd nonblocking", CompatAuthd(subdir(nonblocking_dir, "authd"), config)) as proc:
        yield proc


@pytest.mark.parametrize(("exchange", "expected"), NONBLOCKING)
def test_nonblocking_reply(nonblocking_authd: CompatAuthd, exchange: Exchange, expected: list[str]) -> None:
    expect(nonblocking_authd, exchange, expected)


@pytest.mark.requires("dovecot", "dovecot-lua")
def test_nonblocking_replies_are_dovecots(nonblocking_dir: Path) -> None:
    args = f"file={nonblocking_dir / SCRIPT} blocking=no"
    databases = db_block("passdb", "lua", args) + db_block("userdb", "lua", args)
    with running("dovecot nonblocking", ReferenceDovecot(subdir(nonblocking_dir, "ref"), databases)) as ref:
        for exchange, expected in NONBLOCKING:
            assert exchange.run(ref).lines == expected

"""Exim's `dovecot` authenticator authenticates SMTP AUTH through authd (real Exim 4.96, real swaks)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.authd_process import LISTENERS, AuthdProcess

from .exim import ThrowawayExim
from .postfix import SWAKS_AUTH_OK, SWAKS_AUTH_REJECTED, swaks
from .procs import make_workdir, running

pytestmark = pytest.mark.requires("exim", "swaks")

USERS_LUA = """\
function auth_passdb_lookup(req)
  if req.user == "alice" then return dovecot.auth.PASSDB_RESULT_OK, "password=alicepass" end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
end
"""

CONFIG = (
    '[auth]\nmechanisms = ["plain", "login"]\nfailure_delay = 0\npenalty = false\n'
    '[[passdb]]\ndriver = "lua"\nfile = "users.lua"\n[server]\nprocesses = 2\n' + LISTENERS
)


@pytest.fixture(scope="module")
def authd() -> Iterator[AuthdProcess]:
    workdir = make_workdir("authd-exim")
    try:
        with running("authd", AuthdProcess(workdir, CONFIG, {"users.lua": USERS_LUA})) as proc:
            yield proc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def exim(authd: AuthdProcess) -> Iterator[ThrowawayExim]:
    workdir = make_workdir("exim")
    try:
        with running("exim", ThrowawayExim(workdir, authd.socket("auth-client"), mechanisms=("PLAIN", "LOGIN"))) as ex:
            yield ex
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_exim_good_password(exim: ThrowawayExim, authd: AuthdProcess, mech: str) -> None:
    before = len(authd.log_events())
    code, transcript = swaks(exim.port, mech=mech, user="alice", password="alicepass")
    assert code == SWAKS_AUTH_OK, transcript
    assert "235 Authentication succeeded" in transcript
    served = [e for e in authd.log_events()[before:] if e.get("event") == "auth.request"]
    assert [(e["mech"], e["result"], e["service"], e["user"], e["rip"]) for e in served] == [
        (mech, "ok", "smtp", "alice", "127.0.0.1")
    ]


@pytest.mark.parametrize(("mech", "user"), [("PLAIN", "alice"), ("LOGIN", "alice"), ("PLAIN", "mallory")])
def test_exim_rejects_what_authd_fails(exim: ThrowawayExim, mech: str, user: str) -> None:
    code, transcript = swaks(exim.port, mech=mech, user=user, password="wrong")
    assert code == SWAKS_AUTH_REJECTED, transcript
    assert "535 Incorrect authentication data" in transcript

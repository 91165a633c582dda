"""Pipelined requests over real sockets: every reply comes back byte for byte, and the
replies authd gives at once (CONT prompts, protocol FAILs, user name checks) keep the
order of the requests, as Dovecot's do."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_pipelined_plain_requests_all_answered(reference_authd: AuthdProcess) -> None:
    users = ["alice", "erin", "frank", "nosuch"] * 8
    with Wire.auth_client(reference_authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t31")
        # each user's reply once on its own, as id 1000
        alone = {}
        for user in dict.fromkeys(users):
            w.send(f"AUTH\t1000\tPLAIN\tservice=smtp\tresp={plain(user, user + 'pass')}")
            alone[user] = w.read_line()
        w.send(*(f"AUTH\t{n}\tPLAIN\tservice=smtp\tresp={plain(u, u + 'pass')}" for n, u in enumerate(users, 1)))
        replies = sorted(w.read_line() for _ in users)
    assert alone["alice"] == "OK\t1000\tuser=alice\t"
    assert alone["nosuch"] == "FAIL\t1000\tuser=nosuch"
    assert replies == sorted(alone[u].replace("\t1000\t", f"\t{n}\t") for n, u in enumerate(users, 1))


def test_immediate_replies_keep_the_request_order(reference_authd: AuthdProcess) -> None:
    """LOGIN prompts, a bad initial response and a rejected user name, all sent in one write."""
    with Wire.auth_client(reference_authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t32")
        lines = []
        for n in range(1, 9):
            lines.append(f"AUTH\t{n}\tLOGIN\tservice=smtp\tno-penalty")
        lines.append("AUTH\t9\tPLAIN\tservice=smtp\tresp=!!!")
        lines.append("AUTH\t10\tLOGIN\tservice=smtp\tno-penalty\tresp=" + base64.b64encode(b"bad\x01name").decode())
        for n in range(11, 15):
            lines.append(f"AUTH\t{n}\tLOGIN\tservice=smtp\tno-penalty\tresp=" + base64.b64encode(b"alice").decode())
        w.send(*lines)
        got = [w.read_line() for _ in range(14)]
    assert got == (
        [f"CONT\t{n}\tVXNlcm5hbWU6" for n in range(1, 9)]
        + ["FAIL\t9\tcode=invalid_base64\treason=Invalid base64 data in initial response"]
        # the user name check fails at once; failure_delay = 0 sends the FAIL at once too
        + ["FAIL\t10\tuser=bad\x011name\toriginal_user=bad\x011name"]
        + [f"CONT\t{n}\tUGFzc3dvcmQ6" for n in range(11, 15)]
    )


def test_pipelined_user_lookups_all_answered(reference_authd: AuthdProcess) -> None:
    users = ["alice", "erin", "nosuch", "frank"] * 5
    with Wire.auth_master(reference_authd.socket("auth-userdb")) as w:
        w.send("VERSION\t1\t0", *(f"USER\t{n}\t{u}\tservice=lmtp" for n, u in enumerate(users, 1)))
        replies = sorted(w.read_line() for _ in users)
    expected = [
        f"NOTFOUND\t{n}" if u == "nosuch" else f"USER\t{n}\t{u}\tuid=65534\tgid=65534\thome=/srv/example/home/{u}"
        for n, u in enumerate(users, 1)
    ]
    expected = [e + "\tquota_rule=*:storage=1G" if "\talice\t" in e else e for e in expected]
    assert replies == sorted(expected)


DELAY_SCRIPT = """
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw delay_until=" .. (os.time() + 2)
end
"""


def test_delay_until_is_a_wall_clock_time(tmp_path: Path) -> None:
    """delay_until=<unix time> holds the OK until then (Dovecot compares it with the wall clock)."""
    config = '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "lua"\nfile = "d.lua"\n' + LISTENERS
    proc = AuthdProcess(tmp_path, config, {"d.lua": DELAY_SCRIPT})
    proc.start()
    try:
        with Wire.auth_client(proc.socket("auth-client"), timeout=20) as w:
            w.send("VERSION\t1\t2", "CPID\t33")
            started = time.time()
            w.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('u', 'pw')}")
            assert w.read_line() == "OK\t1\tuser=u\t"
            waited = time.time() - started
    finally:
        proc.stop()
    # the script's timestamp is whole seconds: 1 to 2 s from now
    assert 0.5 <= waited <= 15

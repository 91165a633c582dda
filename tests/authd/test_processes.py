"""[server] processes: client and userdb connections spread over worker processes, the rest shared.

Each test runs a real authd with two processes (the main one and one worker). Both greet
with the main process's pid as SPID; they tell themselves apart by their connection ids
(CUID): process i of n hands out i+1, i+1+n, ..., so an odd CUID is the main process's.
"""

from __future__ import annotations

import base64
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire

SCRIPT = """
function auth_passdb_lookup(req)
  dovecot.i_info("passdb lookup " .. req.user)
  return dovecot.auth.PASSDB_RESULT_OK, "password=right quota=@QUOTA@"
end
function auth_userdb_lookup(req)
  return dovecot.auth.USERDB_RESULT_OK, "uid=1000 home=/home/" .. req.user
end
"""


def config(extra: str = "") -> str:
    return (
        '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n'
        '[[userdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 4\n'
        '[server]\nprocesses = 2\n[metrics]\naddress = "127.0.0.1"\nport = 0\n' + extra + LISTENERS
    )


def start(tmp_path: Path, extra: str = "", quota: str = "1") -> AuthdProcess:
    proc = AuthdProcess(tmp_path, config(extra), {"s.lua": SCRIPT.replace("@QUOTA@", quota)})
    proc.start(wait_for=("auth-client", "auth-login", "auth-master", "auth-userdb"))
    return proc


@pytest.fixture
def authd(tmp_path: Path) -> Iterator[AuthdProcess]:
    proc = start(tmp_path, "[cache]\nsize = 100000\n")
    yield proc
    proc.stop()


def worker_pid(authd: AuthdProcess) -> int:
    ready = authd.wait_for_log(lambda e: e.get("event") == "worker.ready")
    return int(ready["pid"])


MAIN, WORKER = 0, 1


def process(wire: Wire) -> int:
    """Which process serves an auth-client connection: MAIN or WORKER."""
    return (int(wire.greeting_value("CUID")) - 1) % 2


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def auth(wire: Wire, request_id: int, password: str = "right", extra: str = "") -> str:
    wire.send(f"AUTH\t{request_id}\tPLAIN\tservice=smtp{extra}\tresp={plain('alice', password)}")
    return wire.read_line()


def one_per_process(authd: AuthdProcess, socket_name: str = "auth-client") -> dict[int, Wire]:
    """Open connections until both processes serve one (by MAIN / WORKER); close the spare ones."""
    served: dict[int, Wire] = {}
    for cpid in range(100, 104):
        wire = Wire.auth_client(authd.socket(socket_name), timeout=20)
        if process(wire) in served:
            wire.close()
            continue
        wire.send("VERSION\t1\t2", f"CPID\t{cpid}")
        served[process(wire)] = wire
    assert set(served) == {MAIN, WORKER}
    return served


def scrape(authd: AuthdProcess) -> str:
    port = authd.wait_for_log(lambda e: e.get("event") == "metrics.ready")["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_client_connections_take_turns_between_the_processes(authd: AuthdProcess) -> None:
    wires = [Wire.auth_client(authd.socket("auth-client")) for _ in range(4)]
    try:
        assert [int(w.greeting_value("SPID")) for w in wires] == [authd.pid] * 4  # one server to clients
        processes = [process(w) for w in wires]
        assert sorted(processes) == [MAIN, MAIN, WORKER, WORKER]
        assert processes[0] != processes[1] and processes[1] != processes[2]  # in turn
        cuids = [int(w.greeting_value("CUID")) for w in wires]
        assert len(set(cuids)) == 4  # unique over both processes
        for cpid, wire in enumerate(wires, 200):
            wire.send("VERSION\t1\t2", f"CPID\t{cpid}")
            assert auth(wire, 1) == "OK\t1\tuser=alice\tquota=1"
    finally:
        for wire in wires:
            wire.close()
    served = [e for e in authd.log_events() if e.get("event") == "auth.request"]
    assert sorted(e.get("worker", 0) for e in served) == [0, 0, 1, 1]


def test_userdb_connections_are_shared_and_master_ones_stay(authd: AuthdProcess) -> None:
    for request_id in range(4):
        with Wire.auth_master(authd.socket("auth-userdb")) as w:
            assert int(w.greeting_value("SPID")) == authd.pid
            w.send("VERSION\t1\t0", f"USER\t{request_id}\tbob\tservice=lmtp")
            assert w.read_line() == f"USER\t{request_id}\tbob\tuid=1000\thome=/home/bob"
    for request_id in range(4, 7):
        with Wire.auth_master(authd.socket("auth-master")) as w:
            w.send("VERSION\t1\t0", f"USER\t{request_id}\tbob\tservice=lmtp")
            assert w.read_line() == f"USER\t{request_id}\tbob\tuid=1000\thome=/home/bob"
    lookups = [e for e in authd.log_events() if e.get("event") == "auth.request" and e.get("command") == "USER"]
    assert [e.get("worker", MAIN) for e in lookups[:4]].count(WORKER) == 2  # userdb: in turn
    assert [e.get("worker", MAIN) for e in lookups[4:]] == [MAIN] * 3  # master: the main process


def test_logins_in_either_process_meet_their_request(authd: AuthdProcess) -> None:
    served = []
    for cpid in (300, 301, 302, 303):
        with Wire.auth_client(authd.socket("auth-login")) as login:
            assert int(login.greeting_value("SPID")) == authd.pid
            served.append(process(login))
            cookie = login.greeting_value("COOKIE")
            login.send(
                "VERSION\t1\t2", f"CPID\t{cpid}", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('carol', 'right')}"
            )
            assert login.read_line() == "OK\t1\tuser=carol\tquota=1"
            with Wire.auth_master(authd.socket("auth-master")) as master:
                master.send("VERSION\t1\t0", f"REQUEST\t7\t{cpid}\t1\t{cookie}")
                assert master.read_line() == "USER\t7\tcarol\tuid=1000\thome=/home/carol\tauth_mech=PLAIN"
                # one-shot, as in Dovecot; a wrong cookie fails too
                master.send(f"REQUEST\t8\t{cpid}\t1\t{cookie}", f"REQUEST\t9\t{cpid}\t1\t{'0' * 32}")
                assert [master.read_line(), master.read_line()] == ["FAIL\t8", "FAIL\t9"]
    assert sorted(served) == [MAIN, MAIN, WORKER, WORKER]
    # the process that served the login checked its REQUESTs
    errors = [(e.get("worker", MAIN), e["message"]) for e in authd.log_events() if e.get("event") == "master.request"]
    expected = []
    for cpid, by in zip((300, 301, 302, 303), served, strict=True):
        expected += [
            (by, f"Master request {cpid}.1 not found"),
            (by, f"Master requested auth for client {cpid} with invalid cookie"),
        ]
    assert errors == expected


def test_request_for_an_unknown_login_client_fails(authd: AuthdProcess) -> None:
    with Wire.auth_master(authd.socket("auth-master")) as master:
        master.send("VERSION\t1\t0", f"REQUEST\t3\t4242\t1\t{'0' * 32}")
        assert master.read_line() == "FAIL\t3"
    authd.wait_for_log(lambda e: e.get("message") == "Master requested auth for nonexistent client 4242")


def test_a_failure_in_one_process_costs_a_penalty_in_the_other(authd: AuthdProcess) -> None:
    wires = one_per_process(authd)
    try:
        first, second = wires[WORKER], wires[MAIN]
        assert auth(first, 1, "wrong", "\trip=192.0.2.10") == "FAIL\t1\tuser=alice"
        time.sleep(0.3)  # the update travels through the main process
        started = time.monotonic()
        assert auth(second, 2, extra="\trip=192.0.2.10") == "OK\t2\tuser=alice\tquota=1"
        assert 3.8 <= time.monotonic() - started < 6  # penalty 1: 4 s, as in one process
        # and the main process's success reset travels the other way
        time.sleep(0.3)
        started = time.monotonic()
        assert auth(first, 3, extra="\trip=192.0.2.10") == "OK\t3\tuser=alice\tquota=1"
        assert time.monotonic() - started < 1
    finally:
        for wire in wires.values():
            wire.close()


def test_cache_flush_and_metrics_count_every_process(authd: AuthdProcess) -> None:
    wires = one_per_process(authd)
    try:
        for wire in wires.values():
            assert auth(wire, 1, extra="\tno-penalty") == "OK\t1\tuser=alice\tquota=1"
            assert auth(wire, 2, extra="\tno-penalty") == "OK\t2\tuser=alice\tquota=1"  # a cache hit
        lookups = [e for e in authd.log_events() if e.get("message") == "passdb lookup alice"]
        assert sorted(e.get("worker", 0) for e in lookups) == [0, 1]  # one cache per process
        samples = scrape(authd).splitlines()
        assert 'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="smtp"} 4.0' in samples
        assert 'authd_connections{listener="client"} 2.0' in samples
        assert "authd_cache_entries 2.0" in samples
        assert not [line for line in samples if "_created" in line]
        with Wire.auth_master(authd.socket("auth-master")) as master:
            master.send("VERSION\t1\t0", "CACHE-FLUSH\t5")
            assert master.read_line() == "OK\t5\t2"
        assert "authd_cache_entries 0.0" in scrape(authd).splitlines()
    finally:
        for wire in wires.values():
            wire.close()


def test_lua_workers_are_spread_over_the_processes(authd: AuthdProcess) -> None:
    samples = scrape(authd).splitlines()
    script = str(authd.workdir / "s.lua")
    # [lua] workers = 4: two states per process for each of the passdb and userdb pools
    assert f'authd_lua_states{{script="{script}"}} 8.0' in samples


def test_sighup_to_a_worker_reloads_every_process(tmp_path: Path) -> None:
    authd = start(tmp_path, "[reload]\nwatch_scripts = false\n")
    try:
        (tmp_path / "s.lua").write_text(SCRIPT.replace("@QUOTA@", "2"))
        os.kill(worker_pid(authd), signal.SIGHUP)
        authd.wait_for_log(lambda e: e.get("event") == "reload.done" and e.get("worker") == 1)
        authd.wait_for_log(lambda e: e.get("event") == "reload.done" and "worker" not in e)
        wires = one_per_process(authd)
        try:
            for wire in wires.values():
                assert auth(wire, 1) == "OK\t1\tuser=alice\tquota=2"
        finally:
            for wire in wires.values():
                wire.close()
    finally:
        authd.stop()


def test_a_worker_that_dies_is_started_again(authd: AuthdProcess) -> None:
    old = worker_pid(authd)
    os.kill(old, signal.SIGKILL)
    exited = authd.wait_for_log(lambda e: e.get("event") == "worker.exited")
    assert exited["pid"] == old and exited["status"] == -signal.SIGKILL
    authd.wait_for_log(lambda e: e.get("event") == "worker.ready" and e["pid"] != old, timeout=30)
    before = len(authd.log_events())
    served = set()
    for cpid in range(400, 404):
        with Wire.auth_client(authd.socket("auth-client")) as wire:
            served.add(process(wire))
            wire.send("VERSION\t1\t2", f"CPID\t{cpid}")
            assert auth(wire, 1) == "OK\t1\tuser=alice\tquota=1"
    assert served == {MAIN, WORKER}
    requests = [e for e in authd.log_events()[before:] if e.get("event") == "auth.request"]
    assert sorted(e.get("worker", MAIN) for e in requests) == [MAIN, MAIN, WORKER, WORKER]


def test_sigterm_stops_every_process(authd: AuthdProcess) -> None:
    worker = worker_pid(authd)
    assert authd.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    stopped = [e for e in authd.log_events() if e.get("event") == "server.stopped"]
    assert sorted(e.get("worker", 0) for e in stopped) == [0, 1]
    assert not (authd.workdir / "auth-client").exists()


def test_a_worker_that_cannot_load_its_scripts_stops_authd_at_start(tmp_path: Path) -> None:
    script = (
        'local marker = io.open("loaded-once", "r")\n'
        'if marker then marker:close() error("loaded a second time") end\n'
        'io.open("loaded-once", "w"):close()\n'
        "function auth_passdb_lookup(req) return dovecot.auth.PASSDB_RESULT_OK, 'password=right' end\n"
    )
    config = '[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 1\n[server]\nprocesses = 2\n' + LISTENERS
    proc = AuthdProcess(tmp_path, config, {"s.lua": script})
    try:
        proc.start()  # the sockets exist (and queue connections) while the worker loads
    except RuntimeError as exc:
        assert "authd exited with 1" in str(exc)
    else:
        assert proc.popen is not None and proc.popen.wait(30) == 1
        proc.stop()
    assert "authd: worker 1 exited with status 1 at start-up" in proc.log_text()
    assert "loaded a second time" in proc.log_text()
    assert not (tmp_path / "auth-client").exists()


def test_commands_a_script_runs_inherit_no_connection(tmp_path: Path) -> None:
    """Sockets handed to a worker, and its control socket, are close-on-exec."""
    script = (
        "function auth_passdb_lookup(req)\n"
        '  os.execute("ls -l /proc/self/fd | grep -c socket: > sockets-" .. req.user)\n'
        "  return dovecot.auth.PASSDB_RESULT_OK, 'password=right'\n"
        "end\n"
    )
    config = '[auth]\nfailure_delay = 0\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[server]\nprocesses = 2\n'
    authd = AuthdProcess(tmp_path, config + LISTENERS, {"s.lua": script})
    authd.start()
    try:
        wires = one_per_process(authd)
        try:
            for pid, wire in wires.items():
                user = "worker" if pid == WORKER else "main"
                wire.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain(user, 'right')}")
                assert wire.read_line() == f"OK\t1\tuser={user}"
        finally:
            for wire in wires.values():
                wire.close()
        for user in ("worker", "main"):
            assert (user, (tmp_path / f"sockets-{user}").read_text()) == (user, "0\n")
    finally:
        authd.stop()


def test_a_login_pid_seen_in_two_processes_is_logged(authd: AuthdProcess) -> None:
    """Dovecot refuses a second connection with a live client's pid; across processes authd
    notices it after the fact, logs Dovecot's error, and keeps both."""
    first = Wire.auth_client(authd.socket("auth-login"))
    second = Wire.auth_client(authd.socket("auth-login"))
    try:
        assert process(first) != process(second)
        for request_id, wire in enumerate((first, second), 1):
            wire.send(
                "VERSION\t1\t2", "CPID\t600", f"AUTH\t{request_id}\tPLAIN\tservice=imap\tresp={plain('dave', 'right')}"
            )
            assert wire.read_line() == f"OK\t{request_id}\tuser=dave\tquota=1"
        duplicate = authd.wait_for_log(lambda e: e.get("event") == "client.duplicate_pid")
        assert duplicate["message"] == "BUG: Authentication client gave a PID 600 of existing connection"
    finally:
        first.close()
        second.close()

"""[state] redis: three real authd instances on one real redis-server share penalties and flushes.

Also the server going away and coming back under load: answers stay what local state gives.
"""

from __future__ import annotations

import base64
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.tools import cache_flush
from config import ConfigError, parse_config
from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire
from tests.state.conftest import ClusterNode, RedisServer, Sentinel, free_port

SCRIPT = """\
function auth_passdb_lookup(req)
  local f = io.open("password")
  local password = f:read("*l")
  f:close()
  return dovecot.auth.PASSDB_RESULT_OK, "password=" .. password
end
"""


def test_state_section() -> None:
    default = parse_config({}, require_listeners=False)
    assert default.state.backend == "memory"
    state = parse_config(
        {"state": {"backend": "redis", "url": "redis://127.0.0.1:6379/2", "timeout": 0.01}}, require_listeners=False
    ).state
    assert (state.backend, state.url, state.timeout, state.key_prefix) == (
        "redis",
        "redis://127.0.0.1:6379/2",
        0.01,
        "authd:",
    )
    sentinel = {"backend": "redis", "sentinels": ["10.0.0.1:26379"], "master_name": "auth"}
    assert parse_config({"state": sentinel}, require_listeners=False).state.sentinels == ("10.0.0.1:26379",)
    with pytest.raises(
        ConfigError, match=r"state\.url: the redis backend needs exactly one of url, sentinels or cluster"
    ):
        parse_config({"state": {"backend": "redis"}}, require_listeners=False)
    with pytest.raises(ConfigError, match=r"state\.master_name: sentinels need the master_name they watch"):
        parse_config({"state": {"backend": "redis", "sentinels": ["10.0.0.1:26379"]}}, require_listeners=False)
    with pytest.raises(ConfigError, match=r'state\.cluster: expected "host:port" items'):
        parse_config({"state": {"backend": "redis", "cluster": ["nohost"]}}, require_listeners=False)
    with pytest.raises(ConfigError, match=r"state\.backend: expected one of 'memory', 'redis'"):
        parse_config({"state": {"backend": "etcd"}}, require_listeners=False)


def config(
    redis: RedisServer,
    *,
    cache: bool = False,
    timeout: float = 0.5,
    processes: int = 1,
    metrics: int = 0,
    where: str = "",
) -> str:
    # A FAIL waits failure_delay, as in production; the penalty update reaches Redis meanwhile.
    text = "[auth]\nfailure_delay = 0.1\n" + '[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 1\n'
    text += f"[server]\nprocesses = {processes}\n"
    if metrics:
        text += f'[metrics]\naddress = "127.0.0.1"\nport = {metrics}\n'
    if cache:
        text += "[cache]\nsize = 1000000\nttl = 3600\nnegative_ttl = 3600\n"
    where = where or f'url = "{redis.url}"'
    text += f'[state]\nbackend = "redis"\n{where}\ntimeout = {timeout}\nlog_interval = 0\n'
    return text + LISTENERS


def start_instances(tmp_path: Path, redis: RedisServer, count: int, **options: object) -> list[AuthdProcess]:
    instances = []
    for index in range(count):
        workdir = tmp_path / f"authd{index}"
        workdir.mkdir()
        (workdir / "password").write_text("secret1\n")
        instances.append(AuthdProcess(workdir, config(redis, **options), {"s.lua": SCRIPT}))  # type: ignore[arg-type]
    for proc in instances:
        proc.start(wait_for=("auth-client", "auth-master"))
    for proc in instances:
        subscribed = [e for e in proc.log_events() if e.get("event") == "state.subscribed"]
        deadline = time.monotonic() + 10
        while len(subscribed) < int(options.get("processes", 1)):  # type: ignore[call-overload]
            assert time.monotonic() < deadline, proc.log_text()
            time.sleep(0.05)
            subscribed = [e for e in proc.log_events() if e.get("event") == "state.subscribed"]
    return instances


@pytest.fixture
def three(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[AuthdProcess]]:
    instances = start_instances(tmp_path, redis_server, 3, cache=True)
    try:
        yield instances
    finally:
        for proc in instances:
            proc.stop()


def auth(authd: AuthdProcess, password: str, rip: str = "192.0.2.10", user: str = "alice") -> tuple[str, float]:
    resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with Wire.auth_client(authd.socket("auth-client"), timeout=20) as w:
        started = time.monotonic()
        w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\trip={rip}\tresp={resp}")
        return w.read_line(), time.monotonic() - started


def test_attacker_over_three_instances_is_limited_as_by_one(three: list[AuthdProcess]) -> None:
    a, b, c = three
    assert auth(a, "guess1") == ("FAIL\t1\tuser=alice", pytest.approx(0, abs=1))
    reply, waited = auth(b, "secret1")  # B knows A's failure: penalty 1, a 4 s wait
    assert reply == "OK\t1\tuser=alice" and 3.8 <= waited < 6, waited
    reply, waited = auth(c, "secret1")  # B's success reset it for everyone
    assert reply == "OK\t1\tuser=alice" and waited < 1, waited
    auth(c, "guess2")
    reply, waited = auth(a, "guess3")  # C's failure slows A down, and A's failure escalates it
    assert reply == "FAIL\t1\tuser=alice" and 3.8 <= waited < 6, waited
    reply, waited = auth(b, "secret1", rip="198.51.100.7")  # other addresses are not affected
    assert reply == "OK\t1\tuser=alice" and waited < 1, waited


def test_flush_on_one_instance_reaches_the_others(three: list[AuthdProcess]) -> None:
    for proc in three:
        assert auth(proc, "secret1", rip="203.0.113.5")[0] == "OK\t1\tuser=alice"
    for proc in three:  # the password changes in the backend; each cache still has the old one
        (proc.workdir / "password").write_text("secret2\n")
    assert auth(three[1], "secret1", rip="203.0.113.5")[0] == "OK\t1\tuser=alice"
    assert cache_flush(str(three[0].socket("auth-master")), ["alice"]) == 1
    time.sleep(0.1)
    for proc in three:
        assert auth(proc, "secret1", rip="203.0.113.6")[0] == "FAIL\t1\tuser=alice"
    flushes = [e for e in three[2].log_events() if e.get("event") == "cache.flush" and e.get("users") == ["alice"]]
    assert [e["entries"] for e in flushes] == [1]


def test_redis_killed_and_restarted_under_load(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    (proc,) = instances = start_instances(tmp_path, redis_server, 1, timeout=0.05, metrics=port)
    answers: list[tuple[str, float]] = []
    done = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not done.is_set():
            n += 1
            answers.append(auth(proc, "secret1", rip=f"10.{worker}.{n // 250}.{n % 250}"))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1)
        assert redis_server.popen is not None
        redis_server.popen.send_signal(signal.SIGSTOP)  # slow: connected, but no answers
        time.sleep(2)
        redis_server.popen.send_signal(signal.SIGCONT)
        time.sleep(1)
        redis_server.stop()  # down: connections refused
        time.sleep(2)
        redis_server.start()
        proc.wait_for_log(lambda e: e.get("event") == "state.reconnected", timeout=10)
        time.sleep(1)
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
        if redis_server.popen is not None:
            redis_server.popen.send_signal(signal.SIGCONT)
    try:
        check_load(proc, answers, port)
    finally:
        for instance in instances:
            instance.stop()


def check_load(proc: AuthdProcess, answers: list[tuple[str, float]], port: int) -> None:
    assert len(answers) > 100
    assert {reply for reply, _ in answers} == {"OK\t1\tuser=alice"}
    assert max(seconds for _, seconds in answers) < 2
    fallbacks = [e for e in proc.log_events() if e.get("event") == "state.fallback"]
    assert fallbacks and fallbacks[0]["message"] == "Redis unavailable: local state answers"
    assert "secret1" not in proc.log_text()
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    counted = {op: 0.0 for op in ("penalty_lookup", "penalty_update")}
    for line in page.splitlines():
        for op in counted:
            if line.startswith(f'authd_state_fallbacks_total{{op="{op}"}}'):
                counted[op] = float(line.split()[-1])
    assert counted["penalty_lookup"] > 0, page
    print(f"{len(answers)} requests, slowest {max(s for _, s in answers) * 1000:.0f} ms, fallbacks {counted}")


def test_penalty_is_shared_again_after_a_restart(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = instances = start_instances(tmp_path, redis_server, 2)
    try:
        redis_server.stop()
        assert auth(a, "guess1")[0] == "FAIL\t1\tuser=alice"  # A remembers it locally
        reply, waited = auth(a, "guess2")
        assert reply == "FAIL\t1\tuser=alice" and 3.8 <= waited < 6, waited  # local state: as a lone authd
        reply, waited = auth(b, "secret1")
        assert reply == "OK\t1\tuser=alice" and waited < 1, waited  # B never heard of it
        redis_server.start()
        for attempt in range(100, 150):  # authd reconnects by itself: the next failures reach Redis
            rip = f"192.0.2.{attempt}"
            assert auth(a, "guess3", rip=rip)[0] == "FAIL\t1\tuser=alice"
            time.sleep(0.1)
            if redis_server.command(b"EXISTS", f"authd:penalty:{rip}".encode()) == b":1":
                break
        else:
            raise AssertionError("authd did not reconnect to Redis")
        reply, waited = auth(b, "secret1", rip=rip)
        assert reply == "OK\t1\tuser=alice" and 3.8 <= waited < 6, waited
    finally:
        for proc in instances:
            proc.stop()


def test_worker_processes_share_through_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    """Each process of an instance talks to Redis: a flush reaches another instance's workers,
    and failures a worker served count for the other instance."""
    a, b = instances = start_instances(tmp_path, redis_server, 2, cache=True, processes=2)
    try:
        for _ in range(4):  # connections go to each process in turn: fill both caches of B
            assert auth(b, "secret1", rip="203.0.113.9")[0] == "OK\t1\tuser=alice"
        (b.workdir / "password").write_text("secret2\n")
        answers = {auth(b, "secret1", rip="203.0.113.9")[0] for _ in range(4)}
        assert answers == {"OK\t1\tuser=alice"}  # both processes still answer from their caches
        assert cache_flush(str(a.socket("auth-master")), ["alice"]) == 0  # A had nothing cached
        time.sleep(0.1)
        answers = {auth(b, "secret1", rip="203.0.113.10")[0] for _ in range(4)}
        assert answers == {"FAIL\t1\tuser=alice"}
        for attempt in range(2):  # one of the two lands in A's worker
            auth(a, f"guess{attempt}", rip="192.0.2.77")
        assert redis_server.command(b"HGET", b"authd:penalty:192.0.2.77", b"p") is not None
        reply, waited = auth(b, "secret2", rip="192.0.2.77")
        assert reply == "OK\t1\tuser=alice" and 7.8 <= waited < 10, waited  # penalty 2: 8 s
    finally:
        for proc in instances:
            proc.stop()


def test_starts_with_redis_down_and_stops_cleanly(tmp_path: Path, redis_server: RedisServer) -> None:
    redis_server.stop()
    workdir = tmp_path / "authd"
    workdir.mkdir()
    (workdir / "password").write_text("secret1\n")
    proc = AuthdProcess(workdir, config(redis_server), {"s.lua": SCRIPT})
    proc.start()
    try:
        assert auth(proc, "secret1")[0] == "OK\t1\tuser=alice"  # local state answers
        redis_server.start()
        proc.wait_for_log(lambda e: e.get("event") == "state.subscribed", timeout=15)
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.log_text()
    assert [e["event"] for e in proc.log_events()][-1] == "server.stopped"


def shared_by_two(tmp_path: Path, redis: RedisServer, where: str) -> None:
    instances = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "password").write_text("secret1\n")
        instances.append(AuthdProcess(workdir, config(redis, cache=True, where=where), {"s.lua": SCRIPT}))
    a, b = instances
    try:
        for proc in instances:
            proc.start()
            proc.wait_for_log(lambda e: e.get("event") == "state.subscribed", timeout=15)
        assert auth(a, "guess1")[0] == "FAIL\t1\tuser=alice"
        reply, waited = auth(b, "secret1")
        assert reply == "OK\t1\tuser=alice" and 3.8 <= waited < 6, waited
        assert cache_flush(str(a.socket("auth-master")), ["alice"]) == 1  # A cached the lookup of the failed attempt
        b.wait_for_log(lambda e: e.get("event") == "cache.flush" and e.get("users") == ["alice"])
    finally:
        for proc in instances:
            assert proc.stop() == 0
    assert all("Traceback" not in proc.log_text() for proc in instances)


def test_sentinel(tmp_path: Path, sentinel: Sentinel) -> None:
    shared_by_two(tmp_path, sentinel.master, f'sentinels = ["127.0.0.1:{sentinel.port}"]\nmaster_name = "authd-master"')


def test_cluster(tmp_path: Path, cluster: list[ClusterNode]) -> None:
    shared_by_two(tmp_path, cluster[0], f'cluster = ["127.0.0.1:{cluster[0].port}"]')

"""Hot reload through a real authd: script edits under load, SIGHUP config reloads, `authd reload`."""

from __future__ import annotations

import base64
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.authd.test_cli import authd as authd_cli
from tests.authd_process import AuthdProcess
from tests.http_backend import Backend, HttpBackend
from tests.interop.wire import Wire

VERSIONED = """\
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw version=%d"
end
"""

CONFIG = """\
[auth]
failure_delay = 0
penalty = false

[[listener]]
type = "client"
path = "auth-client"

[[passdb]]
driver = "lua"
file = "s.lua"

[lua]
workers = 4
"""


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as exits:
        yield exits


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Client(threading.Thread):
    """Authenticates over one connection, again and again, keeping every reply with its time."""

    def __init__(self, socket_path: Path, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.socket_path = socket_path
        self.stop = stop
        self.replies: list[tuple[float, str]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Wire.auth_client(self.socket_path) as w:
                w.send("VERSION\t1\t2", f"CPID\t{threading.get_ident() % 100000}")
                request_id = 0
                while not self.stop.is_set():
                    request_id += 1
                    w.send(f"AUTH\t{request_id}\tPLAIN\tservice=imap\tresp={plain('alice', 'pw')}")
                    self.replies.append((time.monotonic(), w.read_line()))
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("processes", [1, 2])
def test_script_edit_under_load(tmp_path: Path, processes: int) -> None:
    """With two processes the worker's clients switch too: the main process tells it to reload."""
    config = CONFIG + f"[server]\nprocesses = {processes}\n"
    proc = AuthdProcess(tmp_path, config, {"s.lua": VERSIONED % 1})
    with proc:
        stop = threading.Event()
        clients = [Client(proc.socket("auth-client"), stop) for _ in range(4)]
        for client in clients:
            client.start()
        time.sleep(0.5)
        edited = time.monotonic()
        (tmp_path / "s.lua").write_text(VERSIONED % 2)
        time.sleep(2.5)
        broken = time.monotonic()
        (tmp_path / "s.lua").write_text("function auth_passdb_lookup(req)\n  return 1, \n")  # syntax error
        failure = proc.wait_for_log(lambda e: e.get("event") == "reload.failed", timeout=5)
        time.sleep(0.5)
        stop.set()
        for client in clients:
            client.join(10)
        assert not proc.wait_for_log(lambda e: e.get("event") == "reload.done").get("cache_flushed")

    replies = [reply for client in clients for reply in client.replies]
    assert all(client.error is None for client in clients), [c.error for c in clients]
    assert len(replies) > 100
    ok_v1 = "OK\t1\tuser=alice\tversion=1"
    assert {reply.split("\t", 2)[0] + "\t" + reply.split("\t", 2)[2] for _, reply in replies} == {
        ok_v1.replace("OK\t1", "OK"),
        ok_v1.replace("OK\t1", "OK").replace("version=1", "version=2"),
    }  # zero failed requests, only the two versions
    last_old = max(at for at, reply in replies if reply.endswith("version=1"))
    assert last_old - edited < 2.0  # the new script serves within 2 s of the write
    assert all(reply.endswith("version=2") for at, reply in replies if at > last_old)
    assert all(reply.endswith("version=2") for at, reply in replies if at > broken)
    served_by = {e.get("worker", 0) for e in proc.log_events() if e.get("event") == "auth.request"}
    assert served_by == set(range(processes))
    assert failure["message"].startswith("passdb-lua: initialization failed: lua_load(")
    assert failure["message"].endswith("s.lua:3: unexpected symbol near <eof>")
    assert failure["reason"] == f"script changed: {tmp_path / 's.lua'}"


SLOW = """\
local http = dovecot.http.client({})

function auth_passdb_lookup(req)
  if req.user == "slow" then  -- the backend takes 1.5 s to answer
    http:request({url = BACKEND .. "/slow"}):submit()
  end
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw version=%d"
end

function script_deinit()
  dovecot.i_info("deinit version %d")
end
"""


def test_calls_in_flight_finish_on_the_old_script_then_it_is_deinitialised(tmp_path: Path, stack: ExitStack) -> None:
    config = CONFIG + "[reload]\nwatch_scripts = false\n"
    backend = stack.enter_context(HttpBackend(Backend(delay=1.5)))
    prologue = f'BACKEND = "{backend.url}"\n'
    with AuthdProcess(tmp_path, config, {"s.lua": prologue + SLOW % (1, 1)}) as proc:
        slow: list[str] = []

        def authenticate_slowly() -> None:
            with Wire.auth_client(proc.socket("auth-client")) as w:
                w.send("VERSION\t1\t2", "CPID\t7", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('slow', 'pw')}")
                slow.append(w.read_line())

        thread = threading.Thread(target=authenticate_slowly)
        thread.start()
        time.sleep(0.3)  # the slow call is running on version 1
        (tmp_path / "s.lua").write_text(prologue + SLOW % (2, 2))
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_for_log(lambda e: e.get("event") == "reload.done")
        with Wire.auth_client(proc.socket("auth-client")) as w:
            w.send("VERSION\t1\t2", "CPID\t8", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('alice', 'pw')}")
            assert w.read_line() == "OK\t1\tuser=alice\tversion=2"
        thread.join(10)
        assert slow == ["OK\t1\tuser=slow\tversion=1"]
        proc.wait_for_log(lambda e: e.get("message") == "deinit version 1")
    events = [e.get("event") if e.get("event") != "lua.log" else e.get("message") for e in proc.log_events()]
    slow_done = max(i for i, e in enumerate(proc.log_events()) if e.get("user") == "slow")
    assert events.index("deinit version 1") > slow_done  # deinit waited for the call in flight
    assert events.count("deinit version 1") == 4  # every state of the old generation
    assert events.index("deinit version 2") > events.index("deinit version 1")  # at shutdown


def wait_accepting(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sighup_reloads_the_config_and_keeps_unchanged_listeners(tmp_path: Path) -> None:
    first = (
        '[auth]\nfailure_delay = 0\npenalty = false\n[[passdb]]\ndriver = "static"\nargs = "password=one"\n'
        '[[listener]]\ntype = "client"\npath = "auth-client"\nmode = 0o666\n'
        '[[listener]]\ntype = "userdb"\npath = "auth-userdb"\n'
    )
    second = (
        '[auth]\nfailure_delay = 0\npenalty = false\n[[passdb]]\ndriver = "static"\nargs = "password=two"\n'
        '[[listener]]\ntype = "client"\npath = "auth-client"\nmode = 0o600\n'
        '[[listener]]\ntype = "client"\npath = "auth-client-2"\n'
    )
    with AuthdProcess(tmp_path, first) as proc, Wire.auth_client(proc.socket("auth-client")) as kept:
        kept.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('alice', 'one')}")
        assert kept.read_line() == "OK\t1\tuser=alice"

        proc.config_path.write_text("this is [not toml\n")
        os.kill(proc.pid, signal.SIGHUP)
        failed = proc.wait_for_log(lambda e: e.get("event") == "reload.failed")
        assert failed["reason"] == "SIGHUP" and str(proc.config_path) in failed["message"]

        proc.config_path.write_text(second)
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_for_log(lambda e: e.get("event") == "reload.done")
        # the connection made before the reload is still served, by the new passdb
        kept.send(f"AUTH\t2\tPLAIN\tservice=smtp\tresp={plain('alice', 'two')}")
        assert kept.read_line() == "OK\t2\tuser=alice"
        kept.send(f"AUTH\t3\tPLAIN\tservice=smtp\tresp={plain('alice', 'one')}")
        assert kept.read_line() == "FAIL\t3\tuser=alice"
        assert stat.S_IMODE(proc.socket("auth-client").stat().st_mode) == 0o600
        assert not proc.socket("auth-userdb").exists()
        wait_accepting(proc.socket("auth-client-2"))
        with Wire.auth_client(proc.socket("auth-client-2")) as added:
            added.send("VERSION\t1\t2", "CPID\t2", f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('bob', 'two')}")
            assert added.read_line() == "OK\t1\tuser=bob"
        assert proc.alive


def test_authd_reload_checks_first(tmp_path: Path) -> None:
    config = CONFIG + "[reload]\nwatch_scripts = false\n"
    with AuthdProcess(tmp_path, config, {"s.lua": VERSIONED % 1}) as proc:
        (tmp_path / "s.lua").write_text("function auth_passdb_lookup(req) return 1, 'password=pw' end\nerror('boom')\n")
        refused = authd_cli("reload", "--config", str(proc.config_path))
        assert refused.returncode == 1
        assert "boom" in refused.stderr
        assert not any(e.get("event") == "reload.started" for e in proc.log_events())

        (tmp_path / "s.lua").write_text(VERSIONED % 3)
        done = authd_cli("reload", "--config", str(proc.config_path))
        assert done.returncode == 0, done.stderr
        assert done.stdout == (
            f"{proc.config_path}: OK; reloading authd (pid {proc.pid}): its log says reload.done or reload.failed\n"
        )
        proc.wait_for_log(lambda e: e.get("event") == "reload.done")
        with Wire.auth_client(proc.socket("auth-client")) as w:
            w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('alice', 'pw')}")
            assert w.read_line() == "OK\t1\tuser=alice\tversion=3"


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("function script_init() return -1 end\n", "initialization failed: Script init failed"),
        ("error('init exploded')\n", "init exploded"),
    ],
)
def test_a_failing_reload_keeps_the_old_script(tmp_path: Path, broken: str, expected: str) -> None:
    with AuthdProcess(tmp_path, CONFIG, {"s.lua": VERSIONED % 1}) as proc:
        (tmp_path / "s.lua").write_text(VERSIONED % 2 + broken)
        failure = proc.wait_for_log(lambda e: e.get("event") == "reload.failed")
        assert expected in failure["message"]
        with Wire.auth_client(proc.socket("auth-client")) as w:
            w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('alice', 'pw')}")
            assert w.read_line() == "OK\t1\tuser=alice\tversion=1"


def test_an_edit_made_while_the_scripts_load_at_start_is_picked_up(tmp_path: Path) -> None:
    # script_init takes a second; the edit lands in the middle of it. It says when it
    # has begun: a fixed wait would race authd's own start (imports take 0.3 to 1 s on a
    # busy machine), and an edit made before authd reads the script is no reload at all.
    loading = tmp_path / "loading"
    slow = f'function script_init() io.open("{loading}", "w"):close() os.execute("sleep 1") return 0 end\n'
    proc = AuthdProcess(tmp_path, CONFIG, {"s.lua": slow + VERSIONED % 1})
    starting = threading.Thread(target=proc.start)
    starting.start()
    try:
        deadline = time.monotonic() + 60
        while not loading.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loading.exists(), proc.log_text()
        (tmp_path / "s.lua").write_text(VERSIONED % 2)
        starting.join(60)
        proc.wait_for_log(lambda e: e.get("event") == "reload.done", timeout=10)
        with Wire.auth_client(proc.socket("auth-client")) as w:
            w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('alice', 'pw')}")
            assert w.read_line() == "OK\t1\tuser=alice\tversion=2"
    finally:
        starting.join(60)
        proc.stop()

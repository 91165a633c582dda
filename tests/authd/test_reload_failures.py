"""A reload that fails changes nothing: a real authd keeps its cache, listeners and settings.

Each test changes [cache] (and more) together with a section that fails to load, then checks over the real sockets.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import stat
import urllib.request
from pathlib import Path

import pytest

from tests.authd.test_cli import authd as authd_cli
from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire

SCRIPT = """\
function auth_passdb_lookup(req)
  dovecot.i_info("passdb lookup " .. req.user)
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw"
end
"""

BASE = """\
[auth]
failure_delay = 0
penalty = false
{auth}
[cache]
size = {size}
ttl = 3600
negative_ttl = 3600

[[passdb]]
driver = "lua"
file = "s.lua"
{extra}
[lua]
workers = 1

[reload]
watch_scripts = false

[server]
processes = 1

[[listener]]
type = "client"
path = "auth-client"
mode = 0o666
{client}
[[listener]]
type = "master"
path = "auth-master"
{listener}
"""

GOOD = BASE.format(auth="", size=1_000_000, extra="", client="", listener="")

#: Sections that load as a config but fail when the reload starts them.
BROKEN = {
    "passdb": {"extra": '[[passdb]]\ndriver = "lua"\nfile = "broken.lua"\n', "client": "", "listener": ""},
    "listener": {
        "extra": "",
        "client": "",
        "listener": '[[listener]]\ntype = "client"\npath = "blocker/auth-client"\n',
    },
    "permissions": {"extra": "", "client": 'user = "no-such-user-authd"\n', "listener": ""},
}


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def auth(proc: AuthdProcess, user: str, password: str = "pw") -> str:
    with Wire.auth_client(proc.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain(user, password)}")
        return w.read_line()


def lookups(proc: AuthdProcess, user: str) -> int:
    return sum(1 for e in proc.log_events() if e.get("message") == f"passdb lookup {user}")


def flush(proc: AuthdProcess) -> str:
    """`doveadm auth cache flush` through the real doveadm when installed, else authd's own."""
    master = str(proc.socket("auth-master"))
    if shutil.which("doveadm") is not None:
        from tests.interop.dovecot import doveadm

        done = doveadm(None, "auth", "cache", "flush", "-a", master)
    else:
        done = authd_cli("cache", "flush", "--socket", master)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sighup(proc: AuthdProcess, event: str) -> dict[str, object]:
    before = sum(1 for e in proc.log_events() if e.get("event") == event)
    os.kill(proc.pid, signal.SIGHUP)
    return proc.wait_for_log(
        lambda e: e.get("event") == event and sum(1 for x in proc.log_events() if x.get("event") == event) > before,
        timeout=20,
    )


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_failed_reload_that_touched_cache_keeps_the_cache_flush_reaches(tmp_path: Path, broken: str) -> None:
    scripts = {"s.lua": SCRIPT, "broken.lua": "error('broken on purpose')\n"}
    (tmp_path / "blocker").write_text("a file where a directory would have to be\n")
    with AuthdProcess(tmp_path, GOOD, scripts) as proc:
        assert auth(proc, "alice") == "OK\t1\tuser=alice"
        assert auth(proc, "bob") == "OK\t1\tuser=bob"
        assert (lookups(proc, "alice"), lookups(proc, "bob")) == (1, 1)

        # [cache] and [auth] change, and one other section cannot be started
        changed = BASE.format(auth='default_realm = "example.com"', size=2_000_000, **BROKEN[broken])
        proc.config_path.write_text(changed)
        failed = sighup(proc, "reload.failed")
        assert failed["reason"] == "SIGHUP"

        # the cache the server answers from is the one the flush command reaches
        assert auth(proc, "alice") == "OK\t1\tuser=alice"
        assert lookups(proc, "alice") == 1  # still cached
        assert flush(proc) == "2 cache entries flushed\n"
        assert auth(proc, "alice") == "OK\t1\tuser=alice"
        assert lookups(proc, "alice") == 2  # the flush emptied the real cache
        assert flush(proc) == "1 cache entries flushed\n"
        # [auth] did not change either: no default realm
        assert auth(proc, "carol") == "OK\t1\tuser=carol"
        assert stat.S_IMODE(proc.socket("auth-client").stat().st_mode) == 0o666

        # a reload that works afterwards takes the new [cache] and clears it
        proc.config_path.write_text(
            BASE.format(auth='default_realm = "example.com"', size=2_000_000, extra="", client="", listener="")
        )
        done = sighup(proc, "reload.done")
        assert done["cache_flushed"] == 1
        assert auth(proc, "dave") == "OK\t1\tuser=dave@example.com\toriginal_user=dave"
        assert flush(proc) == "1 cache entries flushed\n"
        assert proc.alive


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def with_metrics(config: str, address: str, port: int) -> str:
    return config.replace("[reload]\n", f'[metrics]\naddress = "{address}"\nport = {port}\n\n[reload]\n')


def test_a_metrics_port_that_cannot_be_bound_fails_the_reload(tmp_path: Path) -> None:
    old_port = free_port()
    with (
        socket.create_server(("127.0.0.1", 0)) as taken,
        AuthdProcess(tmp_path, with_metrics(GOOD, "127.0.0.1", old_port), {"s.lua": SCRIPT}) as proc,
    ):
        assert auth(proc, "alice") == "OK\t1\tuser=alice"
        assert "authd_cache_entries 1.0\n" in scrape(old_port)

        changed = BASE.format(auth="", size=2_000_000, extra="", client="", listener="")
        proc.config_path.write_text(with_metrics(changed, "127.0.0.1", taken.getsockname()[1]))
        failed = sighup(proc, "reload.failed")
        assert str(taken.getsockname()[1]) in str(failed["message"])

        page = scrape(old_port)  # the old endpoint still serves, with the old cache's figures
        assert "authd_cache_entries 1.0\n" in page
        assert 'authd_reloads_total{result="failed"} 1.0\n' in page
        assert flush(proc) == "1 cache entries flushed\n"


def test_metrics_move_to_another_address_of_the_same_port(tmp_path: Path) -> None:
    port = free_port()
    with AuthdProcess(tmp_path, with_metrics(GOOD, "127.0.0.1", port), {"s.lua": SCRIPT}) as proc:
        assert "authd_auth_requests_total" in scrape(port)
        proc.config_path.write_text(with_metrics(GOOD, "0.0.0.0", port))
        sighup(proc, "reload.done")
        assert 'authd_reloads_total{result="ok"} 1.0\n' in scrape(port)
        assert proc.wait_for_log(lambda e: e.get("event") == "metrics.ready" and e.get("address") == "0.0.0.0")

"""Prometheus metrics and /healthz, scraped over real HTTP after real auth traffic."""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd.flood_helpers import metrics_url, scrape
from tests.authd_process import LISTENERS, AuthdProcess
from tests.http_backend import Account, Backend, HttpBackend
from tests.interop.wire import Wire

SCRIPT = """\
function auth_passdb_lookup(req)
  if req.user == "broken" then error("backend exploded") end
  if req.user ~= "alice" then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no" end
  return dovecot.auth.PASSDB_RESULT_OK, "password=secret"
end

function auth_userdb_lookup(req)
  if req.user ~= "alice" then return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no" end
  return dovecot.auth.USERDB_RESULT_OK, "uid=1000"
end
"""


@pytest.fixture
def authd(tmp_path: Path) -> Iterator[AuthdProcess]:
    config = (
        "[auth]\nfailure_delay = 0\n"
        '[metrics]\naddress = "127.0.0.1"\nport = 0\n'
        "[cache]\nsize = 100000\nttl = 60\n"
        '[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[[userdb]]\ndriver = "lua"\nfile = "s.lua"\n' + LISTENERS
    )
    proc = AuthdProcess(tmp_path, config, {"s.lua": SCRIPT})
    proc.start(wait_for=("auth-client", "auth-master"))
    yield proc
    proc.stop()


def auth(authd: AuthdProcess, user: str, password: str, rip: str) -> str:
    resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with Wire.auth_client(authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\trip={rip}\tresp={resp}")
        return w.read_line()


def test_counters_follow_real_traffic(authd: AuthdProcess) -> None:
    assert auth(authd, "alice", "secret", "192.0.2.1") == "OK\t1\tuser=alice"
    assert auth(authd, "alice", "secret", "192.0.2.1") == "OK\t1\tuser=alice"  # from the cache
    assert auth(authd, "alice", "wrong", "192.0.2.2") == "FAIL\t1\tuser=alice"
    assert auth(authd, "broken", "x", "192.0.2.3") == "FAIL\t1\tuser=broken\tcode=temp_fail"
    with Wire.auth_master(authd.socket("auth-master")) as w:
        w.send("VERSION\t1\t0", "USER\t1\talice\tservice=lmtp", "USER\t2\tnobody\tservice=lmtp")
        assert {w.read_line(), w.read_line()} == {"USER\t1\talice\tuid=1000", "NOTFOUND\t2"}

    samples = scrape(authd)
    auth_requests = {key: value for key, value in samples.items() if key.startswith("authd_auth_requests_total{")}
    assert auth_requests == {
        'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="imap"}': 2.0,
        'authd_auth_requests_total{mechanism="PLAIN",result="failed",service="imap"}': 1.0,
        'authd_auth_requests_total{mechanism="PLAIN",result="temp_fail",service="imap"}': 1.0,
    }
    assert samples["authd_auth_duration_seconds_count"] == 4.0
    assert samples['authd_userdb_requests_total{command="USER",result="ok"}'] == 1.0
    assert samples['authd_userdb_requests_total{command="USER",result="notfound"}'] == 1.0
    # the second alice login was a cache hit, so the passdb ran three times
    assert samples['authd_db_duration_seconds_count{db="passdb1",kind="passdb"}'] == 3.0
    assert samples['authd_db_duration_seconds_count{db="userdb1",kind="userdb"}'] == 2.0
    assert samples["authd_cache_hits"] >= 1.0
    assert samples["authd_cache_entries"] >= 1.0
    assert samples["authd_penalties_total"] == 2.0  # as in Dovecot, a temp_fail raises it like a mismatch
    assert samples['authd_connections{listener="client"}'] == 0.0


def test_healthz_and_unknown_paths(authd: AuthdProcess) -> None:
    with urllib.request.urlopen(metrics_url(authd, "/healthz"), timeout=5) as response:
        assert (response.status, response.read()) == (200, b"ok\n")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(metrics_url(authd, "/nope"), timeout=5)
    assert missing.value.code == 404
    post = urllib.request.Request(metrics_url(authd, "/metrics"), data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=5)
    assert refused.value.code == 405


def test_no_endpoint_without_metrics_section(tmp_path: Path) -> None:
    config = '[[passdb]]\ndriver = "static"\nargs = "password=x"\n' + LISTENERS
    with AuthdProcess(tmp_path, config) as proc:
        assert auth(proc, "alice", "x", "192.0.2.9").startswith("OK\t1\tuser=alice")
        assert not any(e.get("event") == "metrics.ready" for e in proc.log_events())
        assert re.search(r"listener\.ready", proc.log_text())


def test_children_are_the_labelled_metrics() -> None:
    """The cached children are prometheus_client's own: same objects, same exposition."""
    from authd.metrics import Metrics

    metrics = Metrics()
    child = metrics.auth_requests_for("PLAIN", "imap", "ok")
    assert metrics.auth_requests_for("PLAIN", "imap", "ok") is child
    assert child is metrics.auth_requests.labels("PLAIN", "imap", "ok")
    child.inc()
    metrics.auth_requests_for("PLAIN", "smtp", "failed").inc(2)
    text = metrics.render().decode()
    assert 'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="imap"} 1.0' in text
    assert 'authd_auth_requests_total{mechanism="PLAIN",result="failed",service="smtp"} 2.0' in text


HTTP_SCRIPT = """\
local client = dovecot.http.client({timeout = 5000})

function auth_passdb_lookup(req)
  if req.user == "loop" then while true do end end
  if req.user == "broken" then error("backend exploded") end
  local response = client:request({url = "%s/api/user/" .. req.user}):submit()
  if response:status() == 200 then return dovecot.auth.PASSDB_RESULT_OK, "password=secret" end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "status " .. response:status()
end
"""


def test_lua_and_http_metrics(tmp_path: Path) -> None:
    with HttpBackend(Backend(accounts={"alice": Account("secret")})) as backend:
        script = tmp_path / "h.lua"
        config = (
            '[auth]\nfailure_delay = 0\npenalty = false\n[metrics]\naddress = "127.0.0.1"\nport = 0\n'
            "[lua]\nworkers = 2\ncall_timeout = 0.5\n"
            '[[passdb]]\ndriver = "lua"\nfile = "h.lua"\n[[userdb]]\ndriver = "prefetch"\n' + LISTENERS
        )
        with AuthdProcess(tmp_path, config, {"h.lua": HTTP_SCRIPT % backend.url}) as proc:
            assert auth(proc, "alice", "secret", "192.0.2.1") == "OK\t1\tuser=alice"
            assert auth(proc, "alice", "secret", "192.0.2.1") == "OK\t1\tuser=alice"
            assert auth(proc, "nobody", "secret", "192.0.2.1") == "FAIL\t1\tuser=nobody"
            assert auth(proc, "loop", "x", "192.0.2.1") == "FAIL\t1\tuser=loop\tcode=temp_fail"
            assert auth(proc, "broken", "x", "192.0.2.1") == "FAIL\t1\tuser=broken\tcode=temp_fail"
            samples = scrape(proc)
    label = f'script="{script}"'
    assert samples['authd_http_requests_total{status_class="2xx"}'] == 2.0
    assert samples['authd_http_requests_total{status_class="4xx"}'] == 1.0
    assert samples["authd_http_duration_seconds_count"] == 3.0
    assert samples[f'authd_lua_errors_total{{kind="timeout",{label}}}'] == 1.0
    assert samples[f'authd_lua_errors_total{{kind="error",{label}}}'] == 1.0
    # a pool starts with [lua] workers states; sequential calls never made it grow
    assert samples[f"authd_lua_states{{{label}}}"] == 2.0
    assert samples[f"authd_lua_states_busy{{{label}}}"] == 0.0
    assert samples[f"authd_lua_state_wait_seconds_count{{{label}}}"] == 0.0  # no call had to wait


def test_pages_of_several_processes_add_up() -> None:
    from authd.metrics import Metrics, merge_pages

    first, second = Metrics(), Metrics()
    first.auth_requests_for("PLAIN", "smtp", "ok").inc(2)
    second.auth_requests_for("PLAIN", "smtp", "ok").inc(3)
    second.auth_requests_for("LOGIN", "smtp", "failed").inc()
    first.auth_duration.observe(0.002)
    second.auth_duration.observe(0.2)
    samples = merge_pages([first.render(), second.render()]).decode().splitlines()
    assert 'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="smtp"} 5.0' in samples
    assert 'authd_auth_requests_total{mechanism="LOGIN",result="failed",service="smtp"} 1.0' in samples
    assert 'authd_auth_duration_seconds_bucket{le="0.0025"} 1.0' in samples
    assert 'authd_auth_duration_seconds_bucket{le="+Inf"} 2.0' in samples
    assert "authd_auth_duration_seconds_count 2.0" in samples
    assert "# TYPE authd_auth_requests_total counter" in samples
    assert not [line for line in samples if "_created" in line]

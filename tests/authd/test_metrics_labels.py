"""Metric labels take known values only: what clients send beyond them counts as `other`.

Thousands of distinct service names over a real authd's socket leave its metrics page small.
"""

from __future__ import annotations

from pathlib import Path

from authd.metrics import Metrics
from tests.authd.flood_helpers import metrics_page, plain
from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire

CONFIG = """\
[auth]
failure_delay = 0
penalty = false

[metrics]
address = "127.0.0.1"
port = 0

[[passdb]]
driver = "static"
args = "password=pw"

[[listener]]
type = "client"
path = "auth-client"
"""

REQUESTS = 5_000
BATCH = 100


def test_distinct_service_names_over_the_socket_count_as_other(tmp_path: Path) -> None:
    with AuthdProcess(tmp_path, CONFIG) as proc, Wire.auth_client(proc.socket("auth-client"), timeout=30) as w:
        w.send("VERSION\t1\t2", "CPID\t1")
        for start in range(1, REQUESTS + 1, BATCH):
            ids = range(start, start + BATCH)
            w.send(*(f"AUTH\t{i}\tPLAIN\tservice=flood{i}\tresp={plain('alice', 'pw')}" for i in ids))
            assert sorted(w.read_line() for _ in ids) == sorted(f"OK\t{i}\tuser=alice" for i in ids)
        w.send(f"AUTH\t{REQUESTS + 1}\tPLAIN\tservice=imap\tresp={plain('alice', 'pw')}")
        assert w.read_line() == f"OK\t{REQUESTS + 1}\tuser=alice"
        text = metrics_page(proc)
    assert 'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="other"} 5000.0\n' in text
    assert 'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="imap"} 1.0\n' in text
    assert "flood" not in text
    assert len(text) < 20_000


def test_every_client_sent_label_is_bounded() -> None:
    metrics = Metrics(services=("webmail",))
    for number in range(50_000):
        metrics.count_auth(f"MECH{number}", f"service{number}", f"result{number}", 0.001)
        metrics.count_lookup(f"COMMAND{number}", f"result{number}")
        metrics.count_lua_failure("/etc/authd/s.lua", f"kind{number}")
    metrics.count_auth("PLAIN", "webmail", "ok", 0.001)
    metrics.count_auth("LOGIN", "submission", "temp_fail", 0.001)
    metrics.count_lookup("USER", "notfound")
    text = metrics.render().decode()
    assert 'authd_auth_requests_total{mechanism="other",result="other",service="other"} 50000.0\n' in text
    assert 'authd_auth_requests_total{mechanism="PLAIN",result="ok",service="webmail"} 1.0\n' in text
    assert 'authd_auth_requests_total{mechanism="LOGIN",result="temp_fail",service="submission"} 1.0\n' in text
    assert 'authd_userdb_requests_total{command="other",result="other"} 50000.0\n' in text
    assert 'authd_userdb_requests_total{command="USER",result="notfound"} 1.0\n' in text
    assert 'authd_lua_errors_total{kind="other",script="/etc/authd/s.lua"} 50000.0\n' in text
    assert len(text) < 20_000

"""Smoke test of the instrument (a few seconds): `python -m pytest bench/test_smoke.py`.

Not part of the main test run (testpaths is tests/). It checks that the load generator counts
replies and errors right, against the do-nothing server and the HTTP backend.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.backend import Backend
from bench.loadgen import Kind, Workload, run_load
from bench.trivial_server import TrivialServer


@pytest.mark.parametrize(
    ("kind", "listener"), [("plain", "auth-client"), ("login", "auth-client"), ("user", "auth-userdb")]
)
def test_generator_against_trivial_server(tmp_path: Path, kind: Kind, listener: str) -> None:
    with TrivialServer(tmp_path) as server:
        result = run_load(Workload(kind, str(server.socket(listener)), 3, 4), procs=2, warmup=0.1, duration=0.3)
    assert result.errors == 0, result.error_samples
    assert result.completed > 100
    assert len(result.latencies_us) == result.completed
    assert 0 < result.percentile_ms(0.5) <= result.percentile_ms(0.99)


def test_backend_delays_and_checks_credentials() -> None:
    with Backend(delay=0.02, procs=1) as backend:
        good = run_load(Workload("http", f"127.0.0.1:{backend.port}", 4, 1), procs=1, warmup=0.1, duration=0.3)
        bad = Workload("http", f"127.0.0.1:{backend.port}", 2, 1, password="wrong")
        rejected = run_load(bad, procs=1, warmup=0.1, duration=0.3)
    assert good.errors == 0, good.error_samples
    assert good.percentile_ms(0.5) >= 20
    assert rejected.completed == 0
    assert rejected.errors > 0
    assert rejected.error_samples[0].startswith("HTTP/1.1 401")

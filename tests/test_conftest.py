"""tests/conftest.py's `requires` marker and AUTHD_REQUIRE_INTEROP, run on a small suite
of their own in a separate pytest process: skips become failures, the summary counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

SUITE = """\
import pytest

@pytest.mark.requires("here")
def test_present() -> None:
    pass

@pytest.mark.requires("here", "absent")
def test_absent() -> None:
    raise AssertionError("never runs")

def test_plain_skip() -> None:
    pytest.skip("no reason to run")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail() -> None:
    raise AssertionError

def test_unrelated() -> None:
    pass
"""


def run_suite(tmp_path: Path, required: str | None) -> subprocess.CompletedProcess[str]:
    extra = '\nCOMPONENTS["here"] = lambda: None\nCOMPONENTS["absent"] = lambda: "absent is not installed"\n'
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text() + extra)
    (tmp_path / "test_suite.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "AUTHD_REQUIRE_INTEROP"}
    env["COLUMNS"] = "300"  # whole lines in the short summary
    if required is not None:
        env["AUTHD_REQUIRE_INTEROP"] = required
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_suite.py"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_component_skips_with_its_reason(tmp_path: Path) -> None:
    done = run_suite(tmp_path, None)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert any(line.endswith(": absent: absent is not installed") for line in lines if line.startswith("SKIPPED"))
    assert "interop: 1 tests ran against real components (1 skipped)" in lines
    assert lines[-1].startswith("2 passed, 2 skipped, 1 xfailed")


def test_required_interop_turns_every_skip_into_a_failure(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "1")
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    reason = "AUTHD_REQUIRE_INTEROP=1, but this test was skipped:"
    assert f"ERROR test_suite.py::test_absent - {reason} absent: absent is not installed" in lines
    assert f"FAILED test_suite.py::test_plain_skip - {reason} no reason to run" in lines
    assert "interop: 1 tests ran against real components (1 skipped)" in lines
    assert lines[-1].startswith("1 failed, 2 passed, 1 xfailed, 1 error")


def test_other_values_do_not_require_interop(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "0")
    assert done.returncode == 0, done.stdout

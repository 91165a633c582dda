"""Run a real authd process for tests: write config and scripts, start, wait, stop by PID.

Tests talk to it over its real unix sockets. Logs are JSON lines in `log_path`, so
tests can assert on log events; `stop()` always ends the process, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

LISTENERS = """
[[listener]]
type = "client"
path = "auth-client"
mode = 0o666

[[listener]]
type = "login"
path = "auth-login"
mode = 0o666

[[listener]]
type = "master"
path = "auth-master"
mode = 0o600

[[listener]]
type = "userdb"
path = "auth-userdb"
mode = 0o600
"""


#: Tests of everything but the worker processes get one process, so that every connection
#: meets the same cache, penalty table and log order; tests/authd/test_processes.py runs several.
SINGLE_PROCESS = "\n[server]\nprocesses = 1\n"


class AuthdProcess:
    """One authd serving `config` (TOML text) from `workdir`, scripts written next to it."""

    def __init__(self, workdir: Path, config: str, scripts: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.config = config
        self.scripts = scripts or {}
        self.log_path = workdir / "authd.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "authd.toml"

    def socket(self, name: str) -> Path:
        return self.workdir / name

    def start(self, timeout: float = 60.0, wait_for: tuple[str, ...] = ("auth-client",)) -> None:
        if self.popen is not None:
            raise RuntimeError("authd is already started: stop it first (a second start would leak the first)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config if "[server]" in self.config else self.config + SINGLE_PROCESS)
        for name, text in self.scripts.items():
            (self.workdir / name).write_text(text)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "authd.cli",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--json-logs",
                ],
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"authd exited with {self.popen.returncode}:\n{self.log_text()}")
            if all(accepts(self.socket(name)) for name in wait_for):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"authd did not open its sockets in {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        code = self.popen.returncode
        self.popen = None
        return code

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def wait_for_log(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.log_events():
                if predicate(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no matching log event within {timeout}s:\n{self.log_text()}")

    def __enter__(self) -> AuthdProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def accepts(path: Path) -> bool:
    """Does a unix socket at `path` accept connections?"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()

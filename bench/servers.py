"""The two servers under test, started from the same Lua script with equivalent settings.

`Authd` runs `python -m authd.cli serve` on a generated TOML config; `Dovecot` runs Debian's
`dovecot -F` whose own auth process serves the sockets (passdb/userdb lua, blocking=yes/no).
Both listen on `auth-client` and `auth-userdb` in their work directory, run in a session of
their own (so Ctrl-C in the terminal reaches only the benchmark, which then stops them) and are
stopped by PID. Their logs stay in the work directory.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Meter, stop_session

REPO = Path(__file__).resolve().parent.parent
DOVECOT = "/usr/sbin/dovecot"
DOVECOT_LUA = "/usr/lib/dovecot/modules/auth/libauthdb_lua.so"
LISTENERS = ("auth-client", "auth-userdb")


def dovecot_version() -> str | None:
    """Dovecot's version if Debian's Dovecot with the Lua auth plugin is installed, else None."""
    if not (Path(DOVECOT).exists() and Path(DOVECOT_LUA).exists()):
        return None
    try:
        pwd.getpwnam("dovecot")
        pwd.getpwnam("dovenull")
    except KeyError:
        return None
    run = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, check=False)
    return run.stdout.strip() or None


@dataclass(frozen=True)
class Setup:
    """What both servers are told: the script, blocking or not, and the pool size.

    `authd_defaults` leaves blocking and workers out of authd's config (its defaults apply);
    Dovecot still gets blocking=yes and auth_worker_max_count = workers.
    """

    script: Path
    blocking: bool
    workers: int = 30
    authd_defaults: bool = False
    #: Dovecot's auth client_limit (its default of 1000 connections is too few for the RSS test).
    client_limit: int = 1000


def _greets(path: Path, hello: bytes, last: bytes) -> bool:
    """True if PATH accepts a connection and sends a greeting that contains LAST."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(path))
            sock.sendall(hello)
            data = b""
            while last not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    return True


class Server:
    """One server process session in WORKDIR; `meter` reads its CPU and RSS."""

    name = "server"

    def __init__(self, workdir: Path, setup: Setup) -> None:
        self.workdir = workdir
        self.setup = setup
        self.log_path = workdir / f"{self.name}.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self.meter: Meter

    @property
    def pid(self) -> int:
        assert self._popen is not None, "not running"
        return self._popen.pid

    def socket(self, name: str) -> Path:
        raise NotImplementedError

    def _command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def _startup_error(self) -> str | None:
        return None

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(mode=0o755, exist_ok=True)
        self.workdir.chmod(0o755)  # Dovecot's unprivileged processes must reach the script
        command, env = self._command()
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.meter = Meter.session(self._popen.pid)
        deadline = time.monotonic() + timeout
        while not (
            _greets(self.socket("auth-client"), b"VERSION\t1\t2\nCPID\t1\n", b"DONE\n")
            and _greets(self.socket("auth-userdb"), b"VERSION\t1\t1\n", b"SPID\t")
        ):
            problem = self._startup_error()
            if self._popen.poll() is not None:
                problem = f"exited with {self._popen.returncode}"
            elif problem is None and time.monotonic() > deadline:
                problem = f"not ready after {timeout} s"
            if problem is not None:
                self.stop()
                raise RuntimeError(f"{self.name} {problem}; see {self.log_path}:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._popen is not None:
            popen, self._popen = self._popen, None
            stop_session(popen)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Authd(Server):
    name = "authd"

    def socket(self, name: str) -> Path:
        return self.workdir / name

    def config_text(self) -> str:
        setup = self.setup
        blocking = "" if setup.authd_defaults else f"blocking = {str(setup.blocking).lower()}\n"
        lua = "" if setup.authd_defaults else f"\n[lua]\nworkers = {setup.workers}\n"
        listeners = "".join(
            f'\n[[listener]]\ntype = "{name.removeprefix("auth-")}"\npath = "{name}"\nmode = 0o666\n'
            for name in LISTENERS
        )
        return (
            '[auth]\nmechanisms = ["plain", "login"]\n'
            f"{listeners}\n"
            f'[[passdb]]\ndriver = "lua"\nfile = "{setup.script}"\n{blocking}\n'
            f'[[userdb]]\ndriver = "lua"\nfile = "{setup.script}"\n{blocking}'
            f"{lua}"
        )

    def _command(self) -> tuple[list[str], dict[str, str]]:
        config = self.workdir / "authd.toml"
        config.write_text(self.config_text())
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return [sys.executable, "-m", "authd.cli", "serve", "--config", str(config)], env


class Dovecot(Server):
    name = "dovecot"

    def socket(self, name: str) -> Path:
        return self.workdir / "run" / name

    def config_text(self) -> str:
        setup = self.setup
        args = f"file={setup.script} blocking={'yes' if setup.blocking else 'no'}"
        listeners = "".join(f"  unix_listener {name} {{\n    mode = 0666\n  }}\n" for name in LISTENERS)
        return (
            f"base_dir = {self.workdir / 'run'}\n"
            f"state_dir = {self.workdir / 'state'}\n"
            f"instance_name = authd-bench-{self.workdir.name}\n"
            f"log_path = {self.workdir / 'dovecot-server.log'}\n"
            "protocols =\n"
            "ssl = no\n"
            "default_login_user = dovenull\n"
            "default_internal_user = dovecot\n"
            "default_internal_group = dovecot\n"
            "auth_mechanisms = plain login\n"
            f"auth_worker_max_count = {setup.workers}\n"
            f"passdb {{\n  driver = lua\n  args = {args}\n}}\n"
            f"userdb {{\n  driver = lua\n  args = {args}\n}}\n"
            f"service auth {{\n  client_limit = {setup.client_limit}\n{listeners}}}\n"
        )

    def _command(self) -> tuple[list[str], dict[str, str]]:
        config = self.workdir / "dovecot.conf"
        config.write_text(self.config_text())
        config.chmod(0o644)
        return [DOVECOT, "-F", "-c", str(config)], dict(os.environ)

    def _startup_error(self) -> str | None:
        server_log = self.workdir / "dovecot-server.log"
        if server_log.exists() and "Fatal:" in server_log.read_text(errors="replace"):
            return f"logged a fatal error:\n{server_log.read_text(errors='replace')[-3000:]}"
        return None


def prepare_script(template: Path, workdir: Path, backend_url: str | None) -> Path:
    """Copy a bench script into WORKDIR (readable by Dovecot's users), filling in the backend URL."""
    target = workdir / template.name
    text = template.read_text()
    if backend_url is not None:
        text = text.replace("@BACKEND_URL@", backend_url)
    target.write_text(text)
    target.chmod(0o644)
    return target

"""A throwaway Postfix 3.7 smtpd that authenticates SMTP AUTH through a Dovecot-protocol socket.

    workdir = make_workdir("postfix")
    with ThrowawayPostfix(workdir, sasl_path=ref.socket("auth-client")) as pf:
        code, transcript = swaks(pf.port, mech="PLAIN", user="alice", password="alicepass")
        assert code == SWAKS_AUTH_OK, transcript

Everything lives in WORKDIR (config_directory etc/, queue/, data/, maillog), smtpd listens on
127.0.0.1:`port`, runs unchrooted (so an absolute `smtpd_sasl_path` anywhere works) and
connects to the socket as user postfix (the socket must be reachable for that uid: mode 0666
or owned by postfix). No system Postfix configuration is read or touched. The master is
started with `postfix -c etc start` and stopped by the PID in queue/pid/master.pid; stop()
verifies that no process of its session is left.

master.cf carries only what smtpd needs for EHLO/AUTH/MAIL/RCPT (smtpd, proxymap, anvil,
trivial-rewrite, cleanup, postlogd): there is no queue manager, so accepted mail is never
delivered. Postfix's own fatal errors only go to the maillog (they are printed to stderr
only when it is a terminal); `log_text()` returns it.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

from .procs import free_port, greets, is_running, stop_session, wait_until

POSTFIX = "/usr/sbin/postfix"
SWAKS = "/usr/bin/swaks"
MAIL_OWNER = "postfix"
SWAKS_AUTH_OK = 0
SWAKS_AUTH_REJECTED = 28

_SERVICES = """\
# service type  private unpriv  chroot  wakeup  maxproc command
proxymap  unix  -       -       n       -       -       proxymap
anvil     unix  -       -       n       -       1       anvil
rewrite   unix  -       -       n       -       -       trivial-rewrite
cleanup   unix  n       -       n       -       0       cleanup
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class ThrowawayPostfix:
    """Postfix master + smtpd with `smtpd_sasl_type = dovecot` pointed at SASL_PATH."""

    def __init__(self, workdir: Path, sasl_path: Path | str, *, extra_main: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.sasl_path = str(sasl_path)
        self.extra_main = dict(extra_main or {})
        self.config_dir = workdir / "etc"
        self.queue_dir = workdir / "queue"
        self.data_dir = workdir / "data"
        self.maillog = workdir / "maillog"
        self.port = free_port()
        self.master_pid: int | None = None

    def main_cf(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "myhostname": "localhost.localdomain",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "alias_maps": "",
            "alias_database": "",
            # maillog_file must start with one of these prefixes (default /var, /dev/stdout).
            "maillog_file_prefixes": str(self.workdir),
            "maillog_file": str(self.maillog),
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": self.sasl_path,
            "smtpd_sasl_auth_enable": "yes",
        }
        settings.update(self.extra_main)
        return settings

    def master_cf(self) -> str:
        return f"127.0.0.1:{self.port} inet n - n - - smtpd\n{_SERVICES}"

    def log_text(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def _failure(self, problem: str, output: str = "") -> RuntimeError:
        return RuntimeError(f"{problem}\n--- postfix output ---\n{output}\n--- {self.maillog} ---\n{self.log_text()}")

    def start(self, timeout: float = 15.0) -> None:
        """Write the configuration, `postfix start`, and wait for smtpd's 220 greeting."""
        if self.master_pid is not None:
            raise RuntimeError("already started")
        self.config_dir.mkdir(exist_ok=True)
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(self.master_cf())
        self.queue_dir.mkdir(exist_ok=True)  # root-owned; `postfix start` creates the subdirectories
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        owner = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)  # master.lock is created as mail_owner

        started = subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), "start"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = started.stdout + started.stderr
        pid_file = self.queue_dir / "pid" / "master.pid"
        if pid_file.exists():
            self.master_pid = int(pid_file.read_text().strip())
        if started.returncode != 0:
            self.stop()
            raise self._failure(f"postfix start exited with {started.returncode}", output)
        if self.master_pid is None or not is_running(self.master_pid):
            self.master_pid = None
            raise self._failure("postfix master is not running after start", output)
        # smtpd connects to the auth socket before it greets, so this also proves SASL_PATH works.
        if not wait_until(lambda: "fatal:" in self.log_text() or greets(self.port, b"220 "), timeout):
            self.stop()
            raise self._failure(f"smtpd on port {self.port} did not greet within {timeout} s", output)
        if "fatal:" in self.log_text():
            self.stop()
            raise self._failure("postfix logged a fatal error during startup", output)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master by PID (SIGKILL after TIMEOUT); fail if any of its processes survive."""
        if self.master_pid is None:
            return
        pid, self.master_pid = self.master_pid, None
        stop_session(pid, None, timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SwaksResult(NamedTuple):
    returncode: int  # SWAKS_AUTH_OK, SWAKS_AUTH_REJECTED, ...
    transcript: str


def swaks(
    port: int,
    *,
    mech: str,
    user: str,
    password: str,
    source_ip: str = "127.0.0.1",
    timeout: float = 30.0,
) -> SwaksResult:
    """Run real swaks up to AUTH against 127.0.0.1:PORT, connecting from SOURCE_IP.

    Postfix passes the client address to the auth server as `rip`, and Dovecot's auth penalty
    is per `rip`: a test that fails on purpose should use a source address of its own.
    """
    done = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{port}",
            "--local-interface",
            source_ip,
            "--auth",
            mech,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--quit-after",
            "AUTH",
            "--timeout",
            str(int(timeout)),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=False,
    )
    return SwaksResult(done.returncode, done.stdout + done.stderr)

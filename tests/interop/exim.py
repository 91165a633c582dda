"""A throwaway Exim 4.96 daemon whose SMTP AUTH goes through the `dovecot` authenticator.

    workdir = make_workdir("exim")
    with running("exim", ThrowawayExim(workdir, ref.socket("auth-client"), mechanisms=("PLAIN", "LOGIN"))) as exim:
        code, transcript = swaks(exim.port, mech="PLAIN", user="alice", password="alicepass")

Debian's Exim and Postfix conflict as packages, so scripts/bootstrap unpacks
exim4-daemon-heavy (the build with the `dovecot` authenticator) and the libraries it needs
into .cache/exim4 instead of installing it. The daemon reads only WORKDIR/exim.conf (-C),
keeps spool, logs and pid file in WORKDIR, listens on 127.0.0.1:`port`, and runs as
Debian-exim (it gives up root for a configuration it was not built to trust), so the auth
socket must be reachable for that user. Mail is never accepted: the tests quit after AUTH.
It is stopped by the PID in its pid file (-oP).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from .procs import free_port, greets, is_running, stop_session, wait_until

UNPACKED = Path(__file__).resolve().parents[2] / ".cache" / "exim4"
EXIM = UNPACKED / "usr" / "sbin" / "exim4"
EXIM_USER = "Debian-exim"


def unavailable() -> str | None:
    """Why Exim cannot run here, or None."""
    if not EXIM.exists():
        return f"Exim is not unpacked in {UNPACKED} (scripts/bootstrap does it when run as root)"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return f"user {EXIM_USER}, whom the Debian build of Exim runs as, does not exist"
    if os.geteuid() != 0:
        return "Exim's daemon must be started as root"
    return None


class ThrowawayExim:
    def __init__(self, workdir: Path, auth_socket: Path | str, *, mechanisms: tuple[str, ...]) -> None:
        self.workdir = workdir
        self.auth_socket = str(auth_socket)
        self.mechanisms = mechanisms
        self.config = workdir / "exim.conf"
        self.spool = workdir / "spool"
        self.logs = workdir / "log"
        self.pid_file = workdir / "exim.pid"
        self.port = free_port()
        self.pid: int | None = None

    def exim_conf(self) -> str:
        authenticators = "".join(
            f"dovecot_{mech.lower()}:\n"
            "  driver = dovecot\n"
            f"  public_name = {mech}\n"
            f"  server_socket = {self.auth_socket}\n"
            "  server_set_id = $auth1\n"
            for mech in self.mechanisms
        )
        return (
            "primary_hostname = exim.authd-test.example\n"
            "keep_environment =\n"
            f"spool_directory = {self.spool}\n"
            f"log_file_path = {self.logs}/%slog\n"
            f"pid_file_path = {self.pid_file}\n"
            "local_interfaces = 127.0.0.1\n"
            "auth_advertise_hosts = *\n"
            "tls_advertise_hosts =\n"
            "acl_smtp_rcpt = deny\n"
            "begin authenticators\n" + authenticators
        )

    def log_text(self) -> str:
        path = self.logs / "mainlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def _environment(self) -> dict[str, str]:
        libraries = f"{UNPACKED}/usr/lib/x86_64-linux-gnu:{UNPACKED}/usr/lib"
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LD_LIBRARY_PATH": libraries}

    def start(self, timeout: float = 15.0) -> None:
        """Write exim.conf, start `exim -bd`, and wait for its 220 greeting."""
        if self.pid is not None:
            raise RuntimeError("already started")
        self.config.write_text(self.exim_conf())
        self.config.chmod(0o644)
        user = pwd.getpwnam(EXIM_USER)
        for directory in (self.spool, self.logs):
            directory.mkdir(exist_ok=True)
            os.chown(directory, user.pw_uid, user.pw_gid)
        started = subprocess.run(
            [str(EXIM), "-C", str(self.config), "-bd", "-oX", str(self.port), "-oP", str(self.pid_file)],
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = started.stdout + started.stderr
        if wait_until(self.pid_file.exists, timeout):
            self.pid = int(self.pid_file.read_text().split()[0])
        if started.returncode != 0 or self.pid is None or not is_running(self.pid):
            self.stop()
            raise RuntimeError(f"exim -bd failed ({started.returncode}):\n{output}\n{self.log_text()}")
        if not wait_until(lambda: greets(self.port, b"220 "), timeout):
            self.stop()
            raise RuntimeError(f"exim on port {self.port} did not greet within {timeout} s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        stop_session(pid, None, timeout)

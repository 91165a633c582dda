"""Throwaway Dovecot 2.3 and 2.4 instances for interop tests, and wrappers around Dovecot's own tools.

`ReferenceDovecot` is a Dovecot whose *own* auth process serves the auth sockets: the stand-in
for authd in differential tests, configured from Python (passdb/userdb blocks as config text):

    workdir = make_workdir("ref")
    ref = ReferenceDovecot(workdir, databases=db_block("passdb", "passwd-file", f"{workdir}/users")
                           + db_block("userdb", "passwd-file", f"{workdir}/users"))
    with ref:                                   # start() ... stop()
        doveadm(None, "auth", "test", "-a", str(ref.socket("auth-client")), "alice", "alicepass")

`DovecotImap` is a Dovecot IMAP + LMTP server whose logins and userdb lookups go to an auth server
elsewhere, either by pointing its clients at external sockets (route A, protocol.md §4.A):

    imap = DovecotImap(make_workdir("imap"), ExternalSockets.in_dir(ref.base_dir))

or by letting Dovecot start a foreign program as its auth service on the usual listeners
(route B, §4.B; the program gets the listening sockets as fds 7.. and SOCKET_COUNT/SOCKETn_SETTINGS):

    imap = DovecotImap(make_workdir("imap"), AuthCommand("/usr/local/bin/authd --inherit-fds"))

Both listen on 127.0.0.1 (`imap_port`, `lmtp_port`), store mail in maildirs under `home_root`
and run mail processes as nobody/nogroup unless the userdb says otherwise. Use `imap_connect()`
for IMAP (it can pick the client's source address: Dovecot's auth penalty is per client IP),
`smtplib.LMTP("127.0.0.1", imap.lmtp_port)` for LMTP, `dovecot_lda(imap.conf_path, ...)` for LDA.

`doveadm(conf, ...)` runs the real doveadm against any socket without a running Dovecot
(`conf=None` means `-c /dev/null`): `auth test -a SOCK user pass`, `auth login -a LOGIN -m MASTER
user pass`, `auth lookup -a SOCK user`, `user -a SOCK user`, `auth cache flush -a MASTER`, each
taking `-x key=value` for request fields. Exit codes: 0 ok, 77 auth failed, 67 user unknown,
75 temporary failure (e.g. cannot connect).

Which Dovecot runs is a `DovecotBuild`: the host's (`host_build()`, Debian 12: 2.3.19, Debian 13:
2.4.1) or the other release's from the root filesystem scripts/bootstrap builds in
.cache/dovecot-<codename>/ (`dovecot_build("2.4")`, None if absent). Every instance, db_block,
doveadm and dovecot_lda take `build=` (default: `default_build()`, the 2.3.19 reference unless
AUTHD_TEST_DOVECOT=2.4) and write that build's config dialect
(dovecot_config_version = 2.4.0, passwd_file_path, mail_driver, `listen` ...). A chroot build
runs in a private mount namespace (`unshare --mount`) with the host's /tmp bind-mounted over its
/tmp, so every workdir, socket and log has the same path inside and out and the sockets are on
the host; the master's PID is still the Popen's.

Every instance is stopped by PID (`stop()`, also on `__exit__`); see procs.stop_session.
"""

from __future__ import annotations

import functools
import grp
import imaplib
import os
import pwd
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from .procs import free_port, greets, stop_session
from .wire import Wire, WireError

ROUTE_A_CONF = Path(__file__).resolve().parents[2] / "deploy" / "dovecot" / "99-authd-route-a.conf"
CACHE = Path(__file__).resolve().parents[2] / ".cache"
DIALECT_VARIABLE = "AUTHD_TEST_DOVECOT"
DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
DOVECOT_LDA = "/usr/lib/dovecot/dovecot-lda"
LOGIN_USER = "dovenull"
INTERNAL_USER = "dovecot"
MAIL_USER = "nobody"
MAIL_GROUP = "nogroup"


Dialect = Literal["2.3", "2.4"]


@dataclass(frozen=True)
class DovecotBuild:
    """One Dovecot installation: the host's (ROOT None) or the one in the root filesystem ROOT."""

    root: Path | None
    version: str
    """`dovecot --version`, e.g. "2.4.1-4 (7d8c0e5759)"."""

    @property
    def dialect(self) -> Dialect:
        return "2.3" if self.version.startswith(("2.2.", "2.3.")) else "2.4"

    @property
    def label(self) -> str:
        return f"Dovecot {self.version.split()[0]} ({'host' if self.root is None else f'chroot {self.root}'})"

    def argv(self, command: list[str]) -> list[str]:
        """COMMAND (absolute paths of this build) as the host runs it; it execs, so the PID stays."""
        if self.root is None:
            return command
        # The host's passwd/group too: dovecot, dovenull, nobody get the host's uids (the chroot's
        # own differ), so socket owners and peer credentials mean the same on both sides.
        script = (
            'mount --bind /tmp "$0/tmp" && mount -t proc proc "$0/proc" && mount --bind /etc/passwd "$0/etc/passwd"'
            ' && mount --bind /etc/group "$0/etc/group" && exec chroot "$0" "$@"'
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(self.root), *command]

    def has_user(self, name: str) -> bool:
        """Whether NAME exists for this build's processes (a chroot sees the host's users)."""
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    @property
    def empty_config(self) -> list[str]:
        """doveadm/doveconf arguments for "no config file": 2.4 refuses `-c /dev/null` (no storage version)."""
        return ["-O"] if self.dialect == "2.4" else ["-c", os.devnull]


@functools.cache
def host_build() -> DovecotBuild | None:
    """The host's Dovecot, None if dovecot-core is not installed."""
    if not Path(DOVECOT).exists():
        return None
    done = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True, check=True)
    return DovecotBuild(None, done.stdout.strip())


def chroot_builds() -> list[DovecotBuild]:
    """The root filesystems scripts/bootstrap completed (their .complete holds the version)."""
    marks = sorted(CACHE.glob("dovecot-*/.complete"))
    return [DovecotBuild(mark.parent, mark.read_text().strip()) for mark in marks]


def dovecot_build(dialect: Dialect) -> DovecotBuild | None:
    """A Dovecot speaking DIALECT: the host's if it does, else a chroot's; None if there is none."""
    host = host_build()
    if host is not None and host.dialect == dialect:
        return host
    return next((build for build in chroot_builds() if build.dialect == dialect), None)


builds_used: dict[str, int] = {}
"""How many Dovecot processes (servers and tools) each build's label ran; the interop summary line."""


@functools.cache
def default_build() -> DovecotBuild:
    """What `build=None` means: the 2.3.19 reference (the host's on Debian 12, the chroot's on 13),
    or the dialect AUTHD_TEST_DOVECOT names ("2.3" or "2.4"); the host's if there is no such build."""
    wanted = os.environ.get(DIALECT_VARIABLE, "2.3")
    if wanted not in ("2.3", "2.4"):
        raise RuntimeError(f"{DIALECT_VARIABLE}={wanted!r}: expected 2.3 or 2.4")
    build = dovecot_build("2.4" if wanted == "2.4" else "2.3") or host_build()
    if build is None:
        raise RuntimeError("Debian's dovecot-core is not installed")
    return build


def _build(build: DovecotBuild | None) -> DovecotBuild:
    return default_build() if build is None else build


def _used(build: DovecotBuild) -> DovecotBuild:
    builds_used[build.label] = builds_used.get(build.label, 0) + 1
    return build


def mail_ids() -> tuple[int, int]:
    """uid and gid the mail processes run as unless the userdb returns others."""
    return pwd.getpwnam(MAIL_USER).pw_uid, grp.getgrnam(MAIL_GROUP).gr_gid


def db_block(
    kind: Literal["passdb", "userdb"],
    driver: str,
    args: str = "",
    *,
    dialect: Dialect | None = None,
    **settings: str,
) -> str:
    """Config text for one passdb/userdb block, e.g. db_block("passdb", "lua", "file=/x.lua blocking=no").

    ARGS and SETTINGS are given as in 2.3; DIALECT (default: default_build()'s) "2.4" turns the
    args of the drivers the tests use into 2.4 settings: passwd-file PATH (passwd_file_path),
    lua `file=X blocking=no` (lua_file, use_worker), static `uid=U gid=G` (a fields block).
    """
    if (dialect or default_build().dialect) == "2.3":
        lines = [f"{kind} {{", f"  driver = {driver}"]
        if args:
            lines.append(f"  args = {args}")
        lines += [f"  {key} = {value}" for key, value in settings.items()]
        return "\n".join([*lines, "}", ""])
    lines = [f"{kind} {driver} {{"]
    words = dict(word.partition("=")[::2] if "=" in word else ("", word) for word in args.split())
    if driver == "passwd-file" and set(words) <= {""}:
        lines += [f"  passwd_file_path = {words['']}"] if words else []
    elif driver == "lua" and set(words) <= {"file", "blocking"}:
        lines.append(f"  lua_file = {words['file']}")
        lines.append(f"  use_worker = {_yes(words.get('blocking', 'yes') == 'yes')}")
    elif driver == "static" and "" not in words:
        lines += ["  fields {", *(f"    {key} = {value}" for key, value in words.items()), "  }"]
    elif args:
        raise ValueError(f"no 2.4 form for {kind} {driver} args {args!r}")
    lines += [f"  {key} = {value}" for key, value in settings.items()]
    return "\n".join([*lines, "}", ""])


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


class _Dovecot:
    """Lifecycle shared by both instance kinds: write the config, `dovecot -F`, probe, stop by PID."""

    def __init__(self, workdir: Path, debug: bool, extra_config: str, build: DovecotBuild | None) -> None:
        self.build = _build(build)
        for user in (LOGIN_USER, INTERNAL_USER, MAIL_USER):
            if not self.build.has_user(user):  # now beats an obscure Dovecot start failure
                raise KeyError(f"{self.build.label} has no user {user}")
        self.workdir = workdir
        self.debug = debug
        self.extra_config = extra_config
        self.base_dir = workdir / "run"
        self.conf_path = workdir / "dovecot.conf"
        self.log_path = workdir / "dovecot.log"
        self._output_path = workdir / "dovecot.out"
        self._popen: subprocess.Popen[bytes] | None = None

    def _specific_config(self) -> str:
        raise NotImplementedError

    def _probe(self) -> bool:
        """One readiness check; True once the instance serves what tests need."""
        raise NotImplementedError

    @property
    def dialect(self) -> Dialect:
        return self.build.dialect

    def config_text(self) -> str:
        versions = "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n" if self.dialect == "2.4" else ""
        return (
            f"{versions}"
            f"base_dir = {self.base_dir}\n"
            f"state_dir = {self.workdir / 'state'}\n"
            f"instance_name = authd-{self.workdir.name}\n"
            f"log_path = {self.log_path}\n"
            "ssl = no\n"
            f"default_login_user = {LOGIN_USER}\n"
            f"default_internal_user = {INTERNAL_USER}\n"
            f"default_internal_group = {INTERNAL_USER}\n"
            f"auth_debug = {_yes(self.debug)}\n"
            f"auth_verbose = {_yes(self.debug)}\n"
            f"{self._specific_config()}"
            f"{self.extra_config}\n"
        )

    @property
    def pid(self) -> int | None:
        """The master's PID while running."""
        return None if self._popen is None else self._popen.pid

    def socket(self, name: str) -> Path:
        """Path of a listener in base_dir, e.g. socket("auth-client")."""
        return self.base_dir / name

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _failure(self, problem: str) -> RuntimeError:
        output = self._output_path.read_text(errors="replace") if self._output_path.exists() else ""
        return RuntimeError(f"{problem}\n--- dovecot output ---\n{output}\n--- {self.log_path} ---\n{self.log_text()}")

    def start(self, timeout: float = 15.0) -> None:
        """Start `dovecot -F` in its own session and wait until `_probe` succeeds."""
        if self._popen is not None:
            raise RuntimeError("already started")
        self.conf_path.write_text(self.config_text())
        self.conf_path.chmod(0o644)
        with self._output_path.open("wb") as output:
            self._popen = subprocess.Popen(
                _used(self.build).argv([DOVECOT, "-F", "-c", str(self.conf_path)]),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._popen.poll() is not None:
                code = self._popen.returncode
                self._popen = None
                raise self._failure(f"dovecot exited with {code} during startup")
            if "Fatal:" in self.log_text():
                self.stop()
                raise self._failure("dovecot logged a fatal error during startup")
            if self._probe():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise self._failure(f"dovecot not ready after {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master (SIGKILL after TIMEOUT), then make sure its whole session is gone."""
        if self._popen is None:
            return
        popen, self._popen = self._popen, None
        stop_session(popen.pid, popen, timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ReferenceDovecot(_Dovecot):
    """Dovecot's own auth process on auth-client, auth-login, auth-master, auth-userdb (all 0666).

    DATABASES is the passdb/userdb config text (see db_block). FAILURE_DELAY is
    auth_failure_delay in seconds; 0 still leaves up to 0.5 s because Dovecot releases delayed
    failures from a 500 ms timer; pass 2 for Dovecot's real default. The per-IP auth penalty
    cannot be switched off: after a failure, the next request with the same `rip` waits 4-15 s
    (all requests without `rip` share one bucket; only the `no-penalty` field exempts a request).

    start() waits for a full auth-client greeting (that also starts the auth process), so the
    first connection a test makes sees CUID 2, not 1.
    """

    def __init__(
        self,
        workdir: Path,
        databases: str,
        *,
        mechanisms: str = "plain login",
        failure_delay: int = 0,
        debug: bool = False,
        extra_config: str = "",
        build: DovecotBuild | None = None,
    ) -> None:
        super().__init__(workdir, debug, extra_config, build)
        self.databases = databases
        self.mechanisms = mechanisms
        self.failure_delay = failure_delay

    def _specific_config(self) -> str:
        listeners = "".join(
            f"  unix_listener {name} {{\n    mode = 0666\n  }}\n"
            for name in ("auth-client", "auth-login", "auth-master", "auth-userdb")
        )
        cleartext = "auth_allow_cleartext = yes\n" if self.dialect == "2.4" else ""
        return (
            "protocols =\n"
            f"{cleartext}"
            f"auth_mechanisms = {self.mechanisms}\n"
            f"auth_failure_delay = {self.failure_delay} secs\n"
            f"{self.databases}\n"
            f"service auth {{\n{listeners}}}\n"
        )

    def _probe(self) -> bool:
        # The auth process starts on the first connection; a full greeting proves it initialised
        # its passdbs/userdbs (a broken Lua script shows up here as a Fatal in the log).
        try:
            Wire.auth_client(self.socket("auth-client"), timeout=2.0, hello=self.dialect == "2.4").close()
        except (OSError, WireError):
            return False
        return True


@dataclass(frozen=True)
class ExternalSockets:
    """Route A: where an external auth server listens (login-type, master-type, userdb-type)."""

    login: Path
    master: Path
    userdb: Path

    @classmethod
    def in_dir(cls, directory: Path) -> ExternalSockets:
        """The auth-login / auth-master / auth-userdb sockets of one directory (e.g. a base_dir)."""
        return cls(directory / "auth-login", directory / "auth-master", directory / "auth-userdb")


@dataclass(frozen=True)
class AuthCommand:
    """Route B: a command line Dovecot's master runs as its auth service (as root)."""

    command: str


class DovecotImap(_Dovecot):
    """Dovecot IMAP (imap_port) + LMTP (lmtp_port) on 127.0.0.1 with someone else's auth service.

    Route A re-points imap-login (login socket, unchrooted), imap (`-a` master socket) and
    auth_socket_path (userdb socket: LMTP, LDA, doveadm with this config); pop3/submission are
    not enabled. Route B keeps Dovecot's listeners in base_dir (socket("auth-client") is made
    0666 so Postfix can use it) and runs the command in the auth slot. Repeating a `service`
    block in EXTRA_CONFIG overrides single settings of it.
    """

    def __init__(
        self,
        workdir: Path,
        auth: ExternalSockets | AuthCommand,
        *,
        debug: bool = False,
        extra_config: str = "",
        build: DovecotBuild | None = None,
    ) -> None:
        super().__init__(workdir, debug, extra_config, build)
        self.auth = auth
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.home_root = workdir / "home"
        self.home_root.mkdir(exist_ok=True)
        uid, gid = mail_ids()
        os.chown(self.home_root, uid, gid)

    def _auth_config(self) -> str:
        if isinstance(self.auth, AuthCommand):
            # Dovecot keeps creating the usual listeners and hands them to the command. Its
            # default 256 MB address-space limit (default_vsz_limit) is too small for a Python
            # process with threads: they fail with "can't start new thread".
            return (
                "service auth {\n"
                f"  executable = {self.auth.command}\n"
                f"  vsz_limit = {'unlimited' if self.dialect == '2.4' else '0'}\n"
                "  unix_listener auth-client {\n    mode = 0666\n  }\n"
                "}\n"
                "service auth-worker {\n  executable =\n}\n"
            )
        if self.dialect == "2.4":
            return self._route_a_24()
        # The route A file we ship, pointed at this authd's sockets instead of /run/authd/.
        shipped = ROUTE_A_CONF.read_text()
        for name, path in (("auth-login", self.auth.login), ("auth-master", self.auth.master)):
            shipped = shipped.replace(f"/run/authd/{name}", str(path))
        shipped = shipped.replace("/run/authd/auth-userdb", str(self.auth.userdb))
        assert "/run/authd/" not in shipped, "the route A file names a socket this harness does not map"
        return shipped

    def _route_a_24(self) -> str:
        # What deploy/dovecot/99-authd-route-a-2.4.conf says for 2.4.0/2.4.1 (auth_master_socket_path
        # exists from 2.4.2 only): the post-login imap gets the master socket as `-a`.
        assert isinstance(self.auth, ExternalSockets)
        return (
            f"login_socket_path = {self.auth.login}\n"
            f"auth_socket_path = {self.auth.userdb}\n"
            "service imap-login {\n  chroot =\n}\n"
            f"service imap {{\n  executable = imap -a {self.auth.master}\n}}\n"
        )

    def _specific_config(self) -> str:
        if self.dialect == "2.4":
            return self._specific_config_24()
        return (
            "protocols = imap lmtp\n"
            # Only 127.0.0.1 -> 127.0.0.1 counts as secured; clients on other loopback addresses
            # (used to dodge the per-IP auth penalty) must still be allowed LOGIN without TLS.
            "disable_plaintext_auth = no\n"
            "mail_location = maildir:~/Maildir\n"
            f"mail_home = {self.home_root}/%Lu\n"
            f"mail_uid = {MAIL_USER}\n"
            f"mail_gid = {MAIL_GROUP}\n"
            f"mail_debug = {_yes(self.debug)}\n"
            "service imap-login {\n"
            "  inet_listener imap {\n"
            "    address = 127.0.0.1\n"
            f"    port = {self.imap_port}\n"
            "  }\n"
            "  inet_listener imaps {\n    port = 0\n  }\n"
            "}\n"
            "service lmtp {\n"
            "  inet_listener lmtp {\n"
            "    address = 127.0.0.1\n"
            f"    port = {self.lmtp_port}\n"
            "  }\n"
            "}\n"
            f"{self._auth_config()}"
        )

    def _specific_config_24(self) -> str:
        return (
            "protocols = imap lmtp\n"
            "auth_allow_cleartext = yes\n"
            "mail_driver = maildir\n"
            "mail_path = ~/Maildir\n"
            f"mail_home = {self.home_root}/%{{user | lower}}\n"
            f"mail_uid = {MAIL_USER}\n"
            f"mail_gid = {MAIL_GROUP}\n"
            f"mail_debug = {_yes(self.debug)}\n"
            "service imap-login {\n"
            "  inet_listener imap {\n"
            "    listen = 127.0.0.1\n"
            f"    port = {self.imap_port}\n"
            "  }\n"
            "  inet_listener imaps {\n    port = 0\n  }\n"
            "}\n"
            "service lmtp {\n"
            "  inet_listener lmtp {\n"
            "    listen = 127.0.0.1\n"
            f"    port = {self.lmtp_port}\n"
            "  }\n"
            "}\n"
            f"{self._auth_config()}"
        )

    def _probe(self) -> bool:
        return greets(self.imap_port, b"* OK") and greets(self.lmtp_port, b"220 ")


def doveadm(
    conf: Path | None, *args: str, timeout: float = 30.0, build: DovecotBuild | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `doveadm -c CONF ARGS...`; CONF None means an empty config (all defaults: `-O` on 2.4,
    which refuses an empty file without dovecot_storage_version)."""
    build = _build(build)
    config = ["-c", str(conf)] if conf is not None else build.empty_config
    return subprocess.run(
        _used(build).argv([DOVEADM, *config, *args]),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def dovecot_lda(
    conf: Path, user: str, message: bytes, *args: str, timeout: float = 30.0, build: DovecotBuild | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Deliver MESSAGE with `dovecot-lda -c CONF -d USER ARGS...`.

    Exit codes: 0 delivered, 67 unknown user, 75 temporary failure.
    """
    return subprocess.run(
        _used(_build(build)).argv([DOVECOT_LDA, "-c", str(conf), "-d", user, *args]),
        input=message,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


class SourcedIMAP4(imaplib.IMAP4):
    """imaplib's client, connecting from a chosen local address."""

    def __init__(self, host: str, port: int, source_ip: str, timeout: float) -> None:
        self.source_ip = source_ip
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source_ip, 0))


def imap_connect(port: int, source_ip: str = "127.0.0.1", timeout: float = 15.0) -> imaplib.IMAP4:
    """An IMAP connection to 127.0.0.1:PORT from SOURCE_IP (any 127.x.y.z works on Linux).

    Failed logins raise the per-IP auth penalty, so tests that fail on purpose should use a
    source address of their own.
    """
    return SourcedIMAP4("127.0.0.1", port, source_ip, timeout)

r"""Plumbing shared by the compat and differential suites.

`deployment()` renders the fixture scripts of `scripts/` for fresh HTTP backends (their
`{{ BACKEND_URL }}` and `{{ LUA_DIR }}` placeholders filled in) and serves each script by its
own server: authd (`make_authd`) or a throwaway Dovecot 2.3 with the same settings
(`dovecot_instance`). Requests are small `Exchange` objects that run against either server
(anything with `socket(name)`) and return the lines the server sent:

    Auth("alice", "alicepass").run(authd).lines      # ["OK\t1\tuser=alice"]
    UserLookup("alice").run(dovecot).lines           # ["USER\t1\talice\tuid=..."]

Everything started here is stopped by PID (`AuthdProcess.stop`, `ReferenceDovecot.stop`).
"""

from __future__ import annotations

import base64
import itertools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.http_backend import Account, Backend, HttpBackend
from tests.interop.dovecot import ReferenceDovecot, db_block
from tests.interop.procs import live_logs, subdir
from tests.interop.wire import Wire

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"
FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"

#: The fixture scripts, each served as passdb and userdb by both servers.
SCRIPTS = (
    "nextcloud.lua",
    "json_cjson.lua",
    "json_purelua.lua",
    "proxy.lua",
    "userli.lua",
    "users_file.lua",
    "request_api.lua",
    "results_lookup.lua",
    "results_verify.lua",
    "trusted_nets.lua",
)
#: Files the scripts load at run time (modules, the users file).
SUPPORT_FILES = (SCRIPTS_DIR / "json.lua", SCRIPTS_DIR / "users.txt", FIXTURES_DIR / "base64.lua")

USERNAME_FORMAT = "%Lu"
USERLI_TOKEN = "userli-secret-token"
#: Environment variables the scripts may read (authd [lua] import_environment, Dovecot import_environment).
ENVIRONMENT = ("USERLI_API_URL", "USERLI_API_ACCESS_TOKEN")

ALICE_CRYPT = (
    "{SHA512-CRYPT}$6$XELUar593fgHDQF8$ssN5O4.rR5SBqN1JLR8.Nx7XrfSMXIHV7orXKfZ4BR8C"
    "egwooYiGgc8/fc8hN8dk4uPlewuBN4wFNhoEFoyQT/"
)
NEXTCLOUD_APP_PASSWORD = "Abcde-Fghij-Klmno-Pqrst-Uvwxy"


def backends_for_scripts() -> dict[str, Backend]:
    """Fresh HTTP backend tables, one per script that talks HTTP, with its users."""
    return {
        "nextcloud.lua": Backend(
            users={"alice": NEXTCLOUD_APP_PASSWORD}, accounts={"maint": Account("", state="broken")}
        ),
        "json_cjson.lua": Backend(
            accounts={
                "alice@example.org": Account(
                    "alicepass",
                    userdb={
                        "uid": 5000,
                        "gid": 5000,
                        "home": "/var/vmail/example.org/alice",
                        "quota": 1073741824,
                        "crypt": True,
                    },
                ),
                "bob@example.org": Account(
                    "bobpass", userdb={"uid": 5001, "gid": 5000, "home": "/var/vmail/bob", "quota": 0}
                ),
                "dis@example.org": Account("dispass", state="disabled"),
                "exp@example.org": Account("exppass", state="expired"),
                "down@example.org": Account("downpass", state="broken"),
                "nxt@example.org": Account("nxtpass", state="next"),
                "sch@example.org": Account("schpass", state="scheme"),
            }
        ),
        "json_purelua.lua": Backend(
            accounts={
                "alice@example.org": Account(
                    "alicepass",
                    passdb={
                        "password": ALICE_CRYPT,
                        "userdb_quota_rule": "*:storage=1000000000",
                        "userdb_uid": 8,
                        "userdb_gid": 12,
                    },
                    userdb={"uid": 8, "gid": 12, "home": "/mail/alice@example.org"},
                ),
                "moved@example.org": Account(
                    "movedpass",
                    passdb={"password": "{PLAIN}movedpass", "nologin": True, "reason": "Mailbox moved away"},
                ),
                "quirky@example.org": Account(
                    "quirkypass",
                    passdb={
                        "password": "{PLAIN}quirkypass",
                        "ratio": 1.5,
                        "offset": -5,
                        "big": 1e20,
                        "flag": False,
                        "count": 3,
                    },
                    userdb={"uid": 8.0, "gid": -1, "home": "/mail/quirky"},
                ),
                "token@example.org": Account("", passdb={"nopassword": "y", "userdb_uid": 8}),
                "down@example.org": Account("downpass", state="broken"),
            }
        ),
        "proxy.lua": Backend(
            accounts={
                "alice@example.org": Account("alicepass", proxy=("192.0.2.25", 10143, "alice")),
                "down@example.org": Account("downpass", state="broken"),
            }
        ),
        "userli.lua": Backend(
            token=USERLI_TOKEN,
            accounts={
                "alice@example.org": Account(
                    "alicepass",
                    userdb={
                        "uid": 5000,
                        "gid": 5000,
                        "home": "/var/vmail/example.org/alice",
                        "mailCrypt": 2,
                        "mailCryptPrivateKey": "PRIVATE-KEY",
                        "mailCryptPublicKey": "PUBLIC-KEY",
                        "quota": "1G",
                    },
                ),
                "bob@example.org": Account(
                    "bobpass", userdb={"uid": 5001, "gid": 5000, "home": "/var/vmail/bob", "mailCrypt": 0}
                ),
                "dis@example.org": Account("dispass", state="disabled"),
                "exp@example.org": Account("exppass", state="expired"),
                "down@example.org": Account("downpass", state="broken"),
            },
        ),
    }


BACKEND_SCRIPTS = tuple(backends_for_scripts())


def render_scripts(lua_dir: Path, urls: Mapping[str, str]) -> None:
    """Write every script and support file into LUA_DIR (0644), placeholders filled in."""
    for source in (*(SCRIPTS_DIR / name for name in SCRIPTS), *SUPPORT_FILES):
        text = source.read_text()
        text = text.replace("{{ LUA_DIR }}", str(lua_dir))
        text = text.replace("{{ BACKEND_URL }}", urls.get(source.name, "http://127.0.0.1:9"))
        target = lua_dir / source.name
        target.write_text(text)
        target.chmod(0o644)


def authd_config(script: Path, *, workers: int = 2, environment: tuple[str, ...] = ENVIRONMENT) -> str:
    """authd's TOML for SCRIPT as passdb and userdb, like `dovecot_instance`'s Dovecot."""
    imported = ", ".join(f'"{name}"' for name in environment)
    return f"""
[auth]
mechanisms = ["plain", "login"]
failure_delay = 0
username_format = "{USERNAME_FORMAT}"

[[passdb]]
driver = "lua"
file = "{script}"
blocking = true

[[userdb]]
driver = "lua"
file = "{script}"
blocking = true

[lua]
workers = {workers}
# Fixed pools: the concurrent differential cases would grow them, and test_userli
# counts one script_init health check per state.
max_states = {workers}
import_environment = [{imported}]
{LISTENERS}"""


def dovecot_instance(workdir: Path, script: Path) -> ReferenceDovecot:
    """A throwaway Dovecot serving SCRIPT as passdb and userdb lua (blocking=yes), like authd_config."""
    args = f"file={script} blocking=yes"
    return ReferenceDovecot(
        workdir,
        db_block("passdb", "lua", args) + db_block("userdb", "lua", args),
        mechanisms="plain login",
        failure_delay=0,
        extra_config=(
            f"auth_username_format = {USERNAME_FORMAT}\nimport_environment = TZ {' '.join(ENVIRONMENT)}\n"
            "auth_verbose = yes\n"
        ),
    )


class CompatAuthd(AuthdProcess):
    """AuthdProcess that waits for all four sockets."""

    def start(
        self,
        timeout: float = 60.0,
        wait_for: tuple[str, ...] = ("auth-client", "auth-login", "auth-master", "auth-userdb"),
    ) -> None:
        super().start(timeout, wait_for)


class Instance(Protocol):
    def start(self) -> None: ...
    def stop(self) -> object: ...
    def log_text(self) -> str: ...


@contextmanager
def all_running(instances: Mapping[str, Instance]) -> Iterator[None]:
    """Start INSTANCES in parallel, and stop every one that started (by PID), in parallel."""
    started: list[tuple[str, Instance]] = []

    def start(item: tuple[str, Instance]) -> None:
        label, instance = item
        instance.start()
        started.append(item)
        live_logs[label] = instance.log_text

    try:
        with ThreadPoolExecutor(max_workers=len(instances) or 1) as pool:
            list(pool.map(start, instances.items()))
        yield
    finally:
        for label, _ in started:
            live_logs.pop(label, None)
        with ThreadPoolExecutor(max_workers=len(started) or 1) as pool:
            list(pool.map(lambda item: item[1].stop(), started))


ServerT = TypeVar("ServerT", CompatAuthd, ReferenceDovecot)


@dataclass(frozen=True)
class Deployment(Generic[ServerT]):
    """Every fixture script served by one kind of server, each script by its own instance."""

    lua_dir: Path
    backends: dict[str, HttpBackend]
    servers: dict[str, ServerT]

    def script(self, name: str) -> Path:
        return self.lua_dir / name


def make_authd(workdir: Path, script: Path) -> CompatAuthd:
    return CompatAuthd(workdir, authd_config(script))


@contextmanager
def deployment(workdir: Path, label: str, make: Callable[[Path, Path], ServerT]) -> Iterator[Deployment[ServerT]]:
    """Fresh HTTP backends, the scripts rendered for them, and MAKE(dir, script) for every script.

    The servers start in parallel with USERLI_API_URL and USERLI_API_ACCESS_TOKEN in their
    environment (both import them for userli.lua), and are stopped by PID on exit.
    """
    lua_dir = subdir(workdir, f"lua-{label}")
    with ExitStack() as stack:
        backends = {name: stack.enter_context(HttpBackend(b)) for name, b in backends_for_scripts().items()}
        render_scripts(lua_dir, {name: backends[name].url for name in BACKEND_SCRIPTS})
        servers = {name: make(subdir(workdir, f"{label}-{Path(name).stem}"), lua_dir / name) for name in SCRIPTS}
        with pytest.MonkeyPatch.context() as env:
            env.setenv("USERLI_API_URL", backends["userli.lua"].url)
            env.setenv("USERLI_API_ACCESS_TOKEN", USERLI_TOKEN)
            stack.enter_context(all_running({f"{label} {name}": server for name, server in servers.items()}))
        yield Deployment(lua_dir, backends, servers)


# --- talking to a server ------------------------------------------------------------------


class Server(Protocol):
    def socket(self, name: str) -> Path: ...


_cpids = itertools.count(os.getpid() * 100 % 4_000_000_000 + 1)


def next_cpid() -> int:
    """A client pid no other connection of this test run uses (login sockets require that)."""
    return next(_cpids)


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def plain_response(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


WIRE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Reply:
    """What a server sent for one exchange, and the whole conversation for error messages."""

    lines: list[str]
    transcript: str


class Exchange(Protocol):
    def run(self, server: Server) -> Reply: ...


def _client(server: Server, socket: str) -> Wire:
    wire = Wire.auth_client(server.socket(socket), timeout=WIRE_TIMEOUT)
    wire.send("VERSION\t1\t2", f"CPID\t{next_cpid()}")
    return wire


def _auth_fields(service: str, fields: tuple[str, ...]) -> str:
    return "\t".join((f"service={service}", "no-penalty", *fields))


@dataclass(frozen=True)
class Auth:
    """AUTH with PLAIN (initial response) or LOGIN (two CONT rounds), `no-penalty` always set."""

    user: str
    password: str
    mech: str = "PLAIN"
    service: str = "imap"
    fields: tuple[str, ...] = ()
    socket: str = "auth-client"

    def run(self, server: Server) -> Reply:
        with _client(server, self.socket) as wire:
            lines = _authenticate(wire, 1, self)
            return Reply(lines, wire.transcript())


def _authenticate(wire: Wire, request_id: int, auth: Auth) -> list[str]:
    head = f"AUTH\t{request_id}\t{auth.mech}\t{_auth_fields(auth.service, auth.fields)}"
    if auth.mech == "LOGIN":
        wire.send(head)
        lines = [wire.read_line()]
        wire.send(f"CONT\t{request_id}\t{b64(auth.user)}")
        lines.append(wire.read_line())
        wire.send(f"CONT\t{request_id}\t{b64(auth.password)}")
        return [*lines, wire.read_line()]
    wire.send(f"{head}\tresp={plain_response(auth.user, auth.password)}")
    return [wire.read_line()]


def _master(server: Server, command: str, final: str = "") -> Reply:
    """COMMAND on the auth-userdb socket; one reply line, or the lines through FINAL."""
    with Wire.auth_master(server.socket("auth-userdb"), timeout=WIRE_TIMEOUT) as wire:
        wire.send("VERSION\t1\t0", command)
        lines = wire.read_until(final) if final else [wire.read_line()]
        return Reply(lines, wire.transcript())


@dataclass(frozen=True)
class UserLookup:
    """USER on the auth-userdb socket (LMTP/LDA/doveadm user)."""

    user: str
    service: str = "lmtp"

    def run(self, server: Server) -> Reply:
        return _master(server, f"USER\t1\t{self.user}\tservice={self.service}")


@dataclass(frozen=True)
class PassLookup:
    """PASS on the auth-userdb socket (doveadm auth lookup), with FIELDS after service=."""

    user: str
    service: str = "doveadm"
    fields: tuple[str, ...] = ()

    def run(self, server: Server) -> Reply:
        return _master(server, "\t".join((f"PASS\t1\t{self.user}\tservice={self.service}", *self.fields)))


@dataclass(frozen=True)
class ListUsers:
    """LIST on the auth-userdb socket, read through DONE."""

    def run(self, server: Server) -> Reply:
        return _master(server, "LIST\t1\tuser=*\tservice=doveadm", "DONE")


@dataclass(frozen=True)
class LoginRequest:
    """A login on the auth-login socket, then REQUEST on auth-master (and a replay of it).

    Lines: the login reply, the REQUEST reply, the replayed REQUEST's reply.
    """

    auth: Auth

    def run(self, server: Server) -> Reply:
        cpid = next_cpid()
        with Wire.auth_client(server.socket("auth-login"), timeout=WIRE_TIMEOUT) as login:
            login.send("VERSION\t1\t2", f"CPID\t{cpid}")
            lines = _authenticate(login, 1, self.auth)
            cookie = login.greeting_value("COOKIE")
            request = f"{cpid}\t1\t{cookie}\tsession_pid={os.getpid()}\trequest_auth_token"
            with Wire.auth_master(server.socket("auth-master"), timeout=WIRE_TIMEOUT) as master:
                master.send("VERSION\t1\t1", f"REQUEST\t77\t{request}")
                lines.append(master.read_line())
                master.send(f"REQUEST\t78\t{request}")
                lines.append(master.read_line())
                return Reply(lines, f"{login.transcript()}\n--- master ---\n{master.transcript()}")


@dataclass(frozen=True)
class Greeting:
    """The greeting of one socket, read through DONE (client types) or SPID (master types)."""

    socket: str

    def run(self, server: Server) -> Reply:
        opener: Callable[..., Wire] = (
            Wire.auth_master if "master" in self.socket or "userdb" in self.socket else Wire.auth_client
        )
        with opener(server.socket(self.socket), timeout=WIRE_TIMEOUT) as wire:
            return Reply(wire.greeting, wire.transcript())


# --- comparing replies ----------------------------------------------------------------------

_VOLATILE = ("SPID", "CUID", "COOKIE")


def normalise(lines: list[str], unordered: frozenset[str] = frozenset()) -> list[str]:
    """LINES with SPID/CUID/COOKIE/auth_token values masked and UNORDERED keys sorted in place.

    Only the slots holding keys from UNORDERED (fields that come from a Lua table, whose
    order is hash order in both servers) are permuted; every other field stays where it is.
    """
    out = []
    for line in lines:
        fields = line.split("\t")
        if fields[0] in _VOLATILE and len(fields) == 2:
            fields[1] = f"<{fields[0]}>"
        fields = ["auth_token=<token>" if f.startswith("auth_token=") else f for f in fields]
        slots = [i for i, f in enumerate(fields) if i >= 2 and f.split("=", 1)[0] in unordered]
        for slot, value in zip(slots, sorted(fields[i] for i in slots), strict=True):
            fields[slot] = value
        out.append("\t".join(fields))
    return out


def expect(server: Server, exchange: Exchange, expected: list[str], unordered: str = "") -> Reply:
    """Run EXCHANGE and require EXPECTED lines (normalised; UNORDERED: space-separated table keys)."""
    reply = exchange.run(server)
    keys = frozenset(unordered.split())
    assert normalise(reply.lines, keys) == normalise(expected, keys), reply.transcript
    return reply


_SCRIPT_PATH = re.compile(r"\S*/([\w.-]+\.lua):")


def without_script_dir(message: str) -> str:
    """MESSAGE with script paths as "<lua>/name.lua:" (Lua shortens long ones to "...tail")."""
    return _SCRIPT_PATH.sub(r"<lua>/\1:", message)


def wait_logged(proc: AuthdProcess, user: str | None, message: str, level: str | None = None) -> None:
    """Wait until authd logged MESSAGE about USER (None: a process-level line) at LEVEL."""
    proc.wait_for_log(
        lambda e: e.get("user") == user and e.get("message") == message and (level is None or e.get("level") == level)
    )

"""`authd try`: run one script's entry points in-process, exactly as the daemon would.

Nothing is re-implemented here: a one-passdb (and, with --userdb, one-userdb) Server
is built from a Config like any other, and the request goes through a real
auth-client connection (AUTH PLAIN) and a real auth-userdb connection (USER) over
socket pairs. What comes back is the wire reply, so `try` shows what Dovecot, Postfix
or doveadm would receive. The driver's result code and every log line with a message
are recorded on the side.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import trio

from authd.client_conn import ClientConnection
from authd.master_conn import MasterConnection
from authd.server import Server
from config.schema import AuthSettings, Config, LuaSettings, PassdbSettings, UserdbSettings
from lua_api.results import PassdbResult, UserdbResult
from protocol.escape import tab_escape, tab_unescape

#: How long one exchange may take before `try` gives up (the daemon's call_timeout still applies).
EXCHANGE_TIMEOUT = 300.0


@dataclass
class TryOptions:
    script: Path
    user: str
    password: str | None = None
    dialect: str = "2.3"
    userdb: bool = False
    #: lua_settings for script_init(tbl) (2.4).
    settings: tuple[tuple[str, str], ...] = ()
    #: Request fields, like `doveadm auth test -x`: service=pop3, rip=192.0.2.1, ...
    params: tuple[tuple[str, str], ...] = ()
    lua_version: str = "5.4"
    #: What os.getenv() may see, as [lua] import_environment.
    import_environment: tuple[str, ...] = ()


@dataclass
class TryReport:
    """What happened: result codes by name, the wire lines, the log lines."""

    passdb_result: str | None = None
    reply: bytes | None = None
    userdb_result: str | None = None
    user_reply: bytes | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> str:
        out = []
        if self.reply is not None:
            out.append(f"passdb result: {self.passdb_result or '(not called)'}")
            out.append("auth reply: " + _show(self.reply))
        if self.user_reply is not None:
            out.append(f"userdb result: {self.userdb_result or '(not called)'}")
            out.append("userdb reply: " + _show(self.user_reply))
        if self.log:
            out.append("log:")
            out += [f"  {event.get('log_level', 'info')}: {event['message']}" for event in self.log]
        return "\n".join(out)

    @property
    def ok(self) -> bool:
        auth_ok = self.reply is None or self.reply.startswith(b"OK\t")
        user_ok = self.user_reply is None or self.user_reply.startswith(b"USER\t")
        return auth_ok and user_ok


def _show(line: bytes) -> str:
    return line.decode("utf-8", "backslashreplace").replace("\t", "\\t")


def try_config(options: TryOptions) -> Config:
    """The configuration `try` runs: the script as the only passdb (and userdb), no delays."""
    common = {"driver": "lua", "file": options.script, "dialect": options.dialect, "settings": options.settings}
    return Config(
        auth=replace(AuthSettings(), mechanisms=("plain",), failure_delay=0.0, penalty=False, debug=True),
        passdbs=(PassdbSettings(**common),),  # type: ignore[arg-type]
        userdbs=(UserdbSettings(**common),) if options.userdb else (),  # type: ignore[arg-type]
        lua=LuaSettings(version=options.lua_version, workers=1, import_environment=options.import_environment),
    )


def run_try(options: TryOptions) -> TryReport:
    """Run the entry points for one request; raises ScriptLoadError if the script does not load."""
    report = TryReport()

    def collect(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        if "message" in event:
            report.log.append({**event, "log_level": method})
        raise structlog.DropEvent

    previous = structlog.get_config()
    structlog.configure(processors=[collect], cache_logger_on_first_use=False)
    try:
        trio.run(_run, options, report)
    finally:
        structlog.configure(**previous)
    return report


class TryError(Exception):
    """`try` cannot run the script the way it was asked to."""


async def _run(options: TryOptions, report: TryReport) -> None:
    server = Server(try_config(options))
    drivers = [entry.driver for entry in server.passdbs.entries] + [e.driver for e in server.userdbs.entries]
    for driver in drivers:
        if getattr(driver, "dialect", None) != options.dialect:
            raise TryError(f"this authd builds its Lua drivers without the {options.dialect} dialect")
    _record_results(server, report)
    await server.load()
    try:
        user = options.user
        if options.password is not None:
            report.reply = await _authenticate(server, user, options.password, options.params)
            renamed = _field(report.reply, b"user")
            user = renamed.decode("utf-8", "surrogateescape") if renamed is not None else user
        if options.userdb:
            report.user_reply = await _user_lookup(server, user, options.params)
    finally:
        with trio.CancelScope(shield=True):
            await server.close()


def _record_results(server: Server, report: TryReport) -> None:
    """Note each Lua driver's own result (before the chain's rules) for the report."""
    for entry in server.passdbs.entries:
        verify = entry.driver.verify_plain

        async def recorded_verify(req: Any, password: bytes, verify: Any = verify) -> int:
            code: int = await verify(req, password)
            report.passdb_result = f"PASSDB_RESULT_{PassdbResult(code).name}"
            return code

        entry.driver.verify_plain = recorded_verify  # type: ignore[method-assign]
    for user_entry in server.userdbs.entries:
        lookup = user_entry.driver.lookup

        async def recorded_lookup(req: Any, lookup: Any = lookup) -> int:
            code: int = await lookup(req)
            report.userdb_result = f"USERDB_RESULT_{UserdbResult(code).name}"
            return code

        user_entry.driver.lookup = recorded_lookup  # type: ignore[method-assign]


def _request_fields(params: tuple[tuple[str, str], ...]) -> bytes:
    fields = [b"service=imap"]
    for key, value in params:
        item = tab_escape(f"{key}={value}".encode("utf-8", "surrogateescape"))
        if key == "service":
            fields[0] = item
        else:
            fields.append(item)
    return b"\t".join(fields)


async def _authenticate(server: Server, user: str, password: str, params: tuple[tuple[str, str], ...]) -> bytes:
    """AUTH PLAIN on an auth-client connection; returns the OK or FAIL line."""
    initial = b"\0" + user.encode("utf-8", "surrogateescape") + b"\0" + password.encode("utf-8", "surrogateescape")
    request = (
        b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid()
        + b"AUTH\t1\tPLAIN\t"
        + _request_fields(params)
        + b"\tresp="
        + base64.b64encode(initial)
        + b"\n"
    )

    def connection(stream: trio.SocketStream) -> ClientConnection:
        return ClientConnection(server, stream, login=False, handshake="2.3", where="authd try")

    return await _exchange(connection, request, (b"OK\t1", b"FAIL\t1"))


async def _user_lookup(server: Server, user: str, params: tuple[tuple[str, str], ...]) -> bytes:
    """USER on an auth-userdb connection; returns the USER, NOTFOUND or FAIL line."""
    name = tab_escape(user.encode("utf-8", "surrogateescape"))
    request = b"VERSION\t1\t0\nUSER\t1\t" + name + b"\t" + _request_fields(params) + b"\n"

    def connection(stream: trio.SocketStream) -> MasterConnection:
        return MasterConnection(server, stream, userdb_only=True, where="authd try", path=None)

    return await _exchange(connection, request, (b"USER\t1\t", b"NOTFOUND\t1", b"FAIL\t1"))


async def _exchange(
    connection: Callable[[trio.SocketStream], Any], request: bytes, answers: tuple[bytes, ...]
) -> bytes:
    """Serve one connection of a socket pair with the daemon's code; return the answer line."""
    ours, theirs = trio.socket.socketpair()
    client = trio.SocketStream(ours)
    served = connection(trio.SocketStream(theirs))
    run: Callable[[], Awaitable[None]] = served.run
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(EXCHANGE_TIMEOUT):
            await client.send_all(request)
            line = await _read_until(client, answers)
        await client.aclose()
    return line


async def _read_until(stream: trio.SocketStream, answers: tuple[bytes, ...]) -> bytes:
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            if line.startswith(answers) or line in answers:
                return line
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError(f"authd closed the connection (received: {buffer!r})")
        buffer += data


def _field(line: bytes, key: bytes) -> bytes | None:
    for part in line.split(b"\t")[2:]:
        name, sep, value = part.partition(b"=")
        if name == key and sep:
            return tab_unescape(value)
    return None

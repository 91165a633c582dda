"""The `authd` command: serve, check, test."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import resources
from pathlib import Path

import trio

from authd.listeners import ListenerError
from authd.scheduling import serve_in_arrival_order
from authd.tools import ToolError
from authd.workers import WorkerStartError
from config import ConfigError, load_config
from config.schema import Config
from lua_api.script import ScriptLoadError

DEMO_DIR = Path("run/authd-demo")


def _demo_config() -> Path:
    """Copy the bundled demo config and script into ./run/authd-demo/."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    demo = resources.files("authd.demo")
    for name in ("authd.toml", "demo.lua"):
        (DEMO_DIR / name).write_bytes(demo.joinpath(name).read_bytes())
    return (DEMO_DIR / "authd.toml").resolve()


def cmd_serve(args: argparse.Namespace) -> int:
    from authd.logging import configure
    from authd.server import Server

    if args.dovecot_service:
        return _serve_dovecot_service(args)
    demo = args.config is None
    path = _demo_config() if demo else Path(args.config)
    # Under systemd socket activation the sockets come from the .socket units.
    config = load_config(path, require_listeners="LISTEN_FDS" not in os.environ)
    log_format = "json" if args.json_logs else None
    configure(fmt=log_format or config.log.format, level=args.log_level or config.log.level)
    if demo:
        print(f"authd demo: config and script in {path.parent}/", file=sys.stderr)
        for listener in config.listeners:
            print(f"  {listener.type:7s} socket: {listener.where}", file=sys.stderr)
        client = next(x.where for x in config.listeners if x.type == "client")
        print(f"try: authd test --socket {client} alice alicepass", file=sys.stderr)
    server = Server(config, log_options=(log_format, args.log_level))
    serve_in_arrival_order()
    try:
        trio.run(server.serve)
    except BaseExceptionGroup as group:
        failed = group.subgroup(WorkerStartError)
        if failed is None:
            raise
        raise _innermost(failed) from None
    return 0


def _innermost(group: BaseExceptionGroup[WorkerStartError]) -> WorkerStartError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, WorkerStartError)
    return exc


def _serve_dovecot_service(args: argparse.Namespace) -> int:
    """Run as Dovecot's `service auth` executable (sockets and log pipe from its master)."""
    from authd import dovecot_service
    from authd.logging import configure
    from authd.server import ListenerInfo, Server
    from config.schema import ListenerSettings
    from lua_api.runtime import lua_module

    if args.config is None:
        raise SystemExit("authd: --dovecot-service needs --config")
    config = load_config(Path(args.config), require_listeners=False)
    configure(fmt="dovecot", level=args.log_level or config.log.level)
    listeners = []
    for inherited in dovecot_service.inherited_listeners():
        settings = ListenerSettings(type=inherited.type, path=Path(inherited.path) if inherited.path else None)
        listeners.append(ListenerInfo(settings, inherited.listener, owned=False))
    # Build everything (imports, Lua runtimes) while still root, then become the
    # service user: modules imported later might not be readable by it.
    server = Server(config, listeners=listeners)
    lua_module(config.lua.version)
    dovecot_service.drop_privileges()

    serve_in_arrival_order()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dovecot_service.watch_master, lambda: server.shutdown("Dovecot master went away"))
            await server.serve()
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _check(Path(args.config))
    print(f"{args.config}: OK ({len(config.listeners)} listeners, {len(config.passdbs)} passdbs)")
    return 0


def _check(path: Path) -> Config:
    """Validate a config and load (script_init) every script once; raises on any problem."""
    from dataclasses import replace

    from authd.logging import configure
    from authd.server import Server

    config = load_config(path)
    configure(level="warning")
    # One state per script is enough to prove every script loads and initialises.
    server = Server(replace(config, lua=replace(config.lua, workers=1)))

    async def load() -> None:
        await server.load()
        await server.close()

    trio.run(load)
    return config


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the config and scripts, then SIGHUP the daemon that serves the config's sockets."""
    from authd.tools import server_pid

    config = _check(Path(args.config))
    where = args.socket or next((x.where for x in config.listeners), None)
    if where is None:
        raise SystemExit("authd reload: the config has no listener; name a socket with --socket")
    pid = server_pid(where)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise ToolError(f"cannot signal authd (pid {pid}): {exc.strerror}") from None
    print(f"{args.config}: OK; reloading authd (pid {pid}): its log says reload.done or reload.failed")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from authd.tools import authenticate

    params = []
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"authd test: -x expects key=value, got {item!r}")
        params.append((key, value))
    reply = authenticate(args.socket, args.user, args.password, mechanism=args.mechanism, params=params)
    user = next((v for k, v in reply.fields if k == "user"), args.user)
    print(f"passdb: {user} auth {'succeeded' if reply.ok else 'failed'}")
    if reply.fields:
        print("extra fields:")
        for key, value in reply.fields:
            print(f"  {key}" if value is None else f"  {key}={value}")
    return 0 if reply.ok else 77


def cmd_lookup(args: argparse.Namespace) -> int:
    from authd.tools import user_lookup

    reply = user_lookup(args.socket, args.user)
    if reply.failed:
        print(f"userdb lookup failed for {args.user}", file=sys.stderr)
        return 75
    if not reply.found:
        print(f"userdb lookup: user {args.user} doesn't exist", file=sys.stderr)
        return 67
    print(f"userdb: {reply.user}")
    for key, value in reply.fields:
        print(f"  {key:10s}: {value if value is not None else ''}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from authd.tools import list_users

    for name in list_users(args.socket, args.mask):
        print(name)
    return 0


def cmd_cache_flush(args: argparse.Namespace) -> int:
    from authd.tools import cache_flush

    print(f"{cache_flush(args.socket, args.users)} cache entries flushed")
    return 0


def cmd_pw(args: argparse.Namespace) -> int:
    from authd import pw

    try:
        print(pw.run(args))
    except pw.PwError as exc:
        print(f"authd pw: {exc}", file=sys.stderr)
        return 1
    return 0


def _pairs(items: list[str], option: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"authd: {option} expects key=value, got {item!r}")
        pairs.append((key, value))
    return tuple(pairs)


def cmd_try(args: argparse.Namespace) -> int:
    from authd.try_script import TryError, TryOptions, run_try

    if args.password is None and not args.userdb:
        raise SystemExit("authd try: give a PASSWORD to authenticate, --userdb for a userdb lookup, or both")
    try:
        report = run_try(
            TryOptions(
                script=Path(args.script).resolve(),
                user=args.user,
                password=args.password,
                dialect=args.dialect,
                userdb=args.userdb,
                settings=_pairs(args.setting, "--setting"),
                params=_pairs(args.extra, "-x"),
                import_environment=tuple(args.import_environment),
            )
        )
    except TryError as exc:
        print(f"authd try: {exc}", file=sys.stderr)
        return 1
    print(report.render())
    return 0 if report.ok else 77


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="authd", description="Dovecot-protocol auth daemon running Dovecot Lua scripts"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon in the foreground (no --config: bundled demo)")
    serve.add_argument("--config", "-c", help="TOML configuration file")
    serve.add_argument("--json-logs", action="store_true", help="log one JSON object per line")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--dovecot-service",
        action="store_true",
        help="run as Dovecot's `service auth` executable: take its sockets (fds 7..), log to its log pipe",
    )
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate a configuration and load every script")
    check.add_argument("--config", "-c", required=True)
    check.set_defaults(func=cmd_check)

    test = commands.add_parser("test", help="authenticate against an auth-client socket, like doveadm auth test")
    test.add_argument("--socket", "-a", required=True, help="unix socket path or host:port")
    test.add_argument("--mechanism", "-m", default="PLAIN", choices=("PLAIN", "LOGIN", "plain", "login"))
    test.add_argument("-x", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="extra AUTH fields")
    test.add_argument("user")
    test.add_argument("password")
    test.set_defaults(func=cmd_test)

    lookup = commands.add_parser("lookup", help="look a user up in the userdb, like doveadm user")
    lookup.add_argument("--socket", "-a", required=True, help="auth-userdb or auth-master socket")
    lookup.add_argument("user")
    lookup.set_defaults(func=cmd_lookup)

    listing = commands.add_parser("list", help="list users, like doveadm user '*'")
    listing.add_argument("--socket", "-a", required=True, help="auth-userdb or auth-master socket")
    listing.add_argument("mask", nargs="?", default="*")
    listing.set_defaults(func=cmd_list)

    reloading = commands.add_parser(
        "reload", help="check the config and scripts, then make the running daemon load them (SIGHUP)"
    )
    reloading.add_argument("--config", "-c", required=True)
    reloading.add_argument("--socket", "-a", help="a socket of the daemon (default: the config's first listener)")
    reloading.set_defaults(func=cmd_reload)

    hashing = commands.add_parser("pw", help="hash a password for a passdb, like doveadm pw")
    from authd import pw

    pw.add_arguments(hashing)
    hashing.set_defaults(func=cmd_pw)

    cache = commands.add_parser("cache", help="the auth cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    flush = cache_commands.add_parser("flush", help="drop cached entries, like doveadm auth cache flush")
    flush.add_argument("--socket", "-a", required=True, help="auth-master socket")
    flush.add_argument("users", nargs="*", help="only these users (default: everything)")
    flush.set_defaults(func=cmd_cache_flush)

    trying = commands.add_parser(
        "try", help="run a script's entry points for one request, in-process, as the daemon would"
    )
    trying.add_argument("--script", required=True, help="the Lua script")
    trying.add_argument("--dialect", choices=("2.3", "2.4"), default="2.3")
    trying.add_argument("--userdb", action="store_true", help="also look the user up (auth_userdb_lookup)")
    trying.add_argument(
        "--setting", action="append", default=[], metavar="KEY=VALUE", help="2.4 lua_settings for script_init"
    )
    trying.add_argument(
        "-x", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="request fields (service=...)"
    )
    trying.add_argument(
        "--import-environment",
        action="append",
        default=[],
        metavar="NAME",
        help="an environment variable os.getenv() may see, as [lua] import_environment",
    )
    trying.add_argument("user")
    trying.add_argument("password", nargs="?", help="authenticate with PLAIN (omit with --userdb for a lookup only)")
    trying.set_defaults(func=cmd_try)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"authd: {exc}", file=sys.stderr)
        return 2
    except (ScriptLoadError, ListenerError, ToolError, WorkerStartError) as exc:
        print(f"authd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

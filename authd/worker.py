"""A worker process (`python -m authd.worker`): serves the connections the main process hands it.

It builds the same Server from the same config file, without listeners, metrics endpoint
or script watcher of its own, and obeys its control socket (see authd.workers): it serves
handed-over connections, reloads when told, applies the other processes' penalty
updates, reports its login clients and answers REQUEST for them, answers for metrics and
cache flushes, and stops when told or when the main process goes away.
"""

from __future__ import annotations

import argparse
import socket
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from authd.control import ControlChannel
from authd.logging import configure
from authd.login_request import FAILED, LoginRequestArgs, finish_login
from authd.scheduling import serve_in_arrival_order
from authd.server import Server
from config import load_config
from config.schema import ListenerSettings

log = structlog.get_logger("authd.worker")


async def run(server: Server, channel: ControlChannel) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run_sender)
        server.penalty.on_update = lambda ident, value, checksum: channel.send(
            {"op": "penalty", "ident": ident, "value": value, "checksum": checksum}
        )
        server.request_reload = lambda reason: channel.send({"op": "reload", "reason": reason})
        server.on_login_client = lambda pid, served: channel.send({"op": "login" if served else "logout", "pid": pid})
        await nursery.start(_serve, server, nursery.cancel_scope)
        channel.send({"op": "ready"})
        server.shutdown(await _obey(server, channel, nursery))


async def _serve(server: Server, done: trio.CancelScope, *, task_status: trio.TaskStatus[Server]) -> None:
    """Serve until shut down, then end the worker (its control loop included)."""
    await server.serve(task_status=task_status)
    done.cancel()


async def _obey(server: Server, channel: ControlChannel, nursery: trio.Nursery) -> str:
    """Act on the main process's messages; returns why to stop."""
    while True:
        received = await channel.receive()
        if received is None:
            return "the main process went away"
        message, attached = received
        op = message.get("op")
        if op == "connection" and attached is not None:
            if server.stopping:
                attached.close()
                continue
            attached.setblocking(False)
            settings = ListenerSettings(
                type=message["type"],
                path=Path(message["path"]) if message["path"] is not None else None,
                address=message["address"],
                port=message["port"],
                handshake=message["handshake"],
            )
            try:
                server.serve_connection(settings, trio.SocketStream(trio.socket.from_stdlib_socket(attached)))
            except Exception:
                # A connection that cannot be set up costs itself, never the worker.
                log.exception("worker.connection_failed", type=settings.type, where=settings.where)
                attached.close()
            continue
        if attached is not None:
            attached.close()
        if op == "reload":
            nursery.start_soon(partial(server.reload, message["reason"], reread_config=message["reread"]))
        elif op == "penalty":
            server.penalty.apply(message["ident"], message["value"], message["checksum"])
        elif op == "metrics":
            channel.send({"op": "answer", "id": message["id"], "value": server.metrics.render().decode()})
        elif op == "request":
            nursery.start_soon(_login_request, server, channel, message)
        elif op == "secret":
            server.token_secret = bytes.fromhex(message["value"])
        elif op == "cache-flush":
            users = tuple(user.encode("latin-1") for user in message["users"])
            channel.send({"op": "answer", "id": message["id"], "value": server.flush_local_cache(users)})
        elif op == "stop":
            return "the main process asked"


async def _login_request(server: Server, channel: ControlChannel, message: dict[str, Any]) -> None:
    """REQUEST for a login this worker served; the main process writes the reply."""
    try:
        reply = await finish_login(server, LoginRequestArgs.from_message(message))
    except Exception:
        log.exception("master.internal_error", request_id=message["request_id"])
        reply = FAILED
    channel.send({"op": "answer", "id": message["id"], "value": reply.to_message()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authd.worker", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-format")
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    channel_socket = socket.socket(fileno=args.control_fd)
    channel_socket.set_inheritable(False)  # nor the control socket
    config = load_config(Path(args.config), require_listeners=False)
    configure(fmt=args.log_format or config.log.format, level=args.log_level or config.log.level, worker=args.index)
    server = Server(config, listeners=[], worker=(args.index, args.processes))
    serve_in_arrival_order()
    trio.run(run, server, ControlChannel(channel_socket))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

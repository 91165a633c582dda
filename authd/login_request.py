"""REQUEST: a post-login process collects a finished login (auth_request_handler_master_request).

Kept apart from the auth-master connection because the login may live in another
process: the main process answers REQUEST, and when a worker served the login
connection it asks that worker to run this (authd.workers), which answers with a
LoginReply the main process writes out.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from authd.auth_request import AuthRequest
from lua_api.results import UserdbResult
from protocol.events import Field

if TYPE_CHECKING:
    from authd.server import Server

log = structlog.get_logger("authd.master")


@dataclass(frozen=True)
class LoginRequestArgs:
    """What a REQUEST line and its connection say."""

    request_id: int
    client_pid: int
    client_request_id: int
    cookie: bytes
    session_pid: bytes | None
    auth_token: bool
    #: The post-login process's pid from SO_PEERCRED, when known.
    peer_pid: int | None

    def to_message(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "client_pid": self.client_pid,
            "client_request_id": self.client_request_id,
            "cookie": self.cookie.hex(),
            "session_pid": self.session_pid.decode("latin-1") if self.session_pid is not None else None,
            "auth_token": self.auth_token,
            "peer_pid": self.peer_pid,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> LoginRequestArgs:
        session_pid = message["session_pid"]
        return cls(
            request_id=message["request_id"],
            client_pid=message["client_pid"],
            client_request_id=message["client_request_id"],
            cookie=bytes.fromhex(message["cookie"]),
            session_pid=session_pid.encode("latin-1") if session_pid is not None else None,
            auth_token=message["auth_token"],
            peer_pid=message["peer_pid"],
        )


@dataclass(frozen=True)
class LoginReply:
    """USER with the user and fields, NOTFOUND, or FAIL (maybe with a reason)."""

    kind: str  # "user", "notfound" or "fail"
    user: bytes = b""
    fields: tuple[Field, ...] = ()
    reason: bytes | None = None

    def to_message(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "user": self.user.decode("latin-1"),
            "fields": [
                [f.key.decode("latin-1"), None if f.value is None else f.value.decode("latin-1"), f.hidden]
                for f in self.fields
            ],
            "reason": self.reason.decode("latin-1") if self.reason is not None else None,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> LoginReply:
        fields = tuple(
            Field(key.encode("latin-1"), None if value is None else value.encode("latin-1"), hidden)
            for key, value, hidden in message["fields"]
        )
        reason = message["reason"]
        encoded = reason.encode("latin-1") if reason is not None else None
        return cls(message["kind"], message["user"].encode("latin-1"), fields, encoded)


FAILED = LoginReply("fail")


async def finish_login(server: Server, args: LoginRequestArgs) -> LoginReply:
    """master_input_request: check the cookie and the request, then look the user up."""
    client = server.login_clients.get(args.client_pid)
    if client is None:
        log.error("master.request", message=f"Master requested auth for nonexistent client {args.client_pid}")
        return FAILED
    if not hmac.compare_digest(client.proto.cookie, args.cookie):
        log.error("master.request", message=f"Master requested auth for client {args.client_pid} with invalid cookie")
        return FAILED
    taken = client.take_request(args.client_request_id)
    if taken is None:
        log.error("master.request", message=f"Master request {args.client_pid}.{args.client_request_id} not found")
        return FAILED
    req: AuthRequest | None = taken.keep if isinstance(taken.keep, AuthRequest) else None
    if req is not None:
        if args.session_pid is not None and args.session_pid.isdigit():
            req.session_pid = int(args.session_pid)
        if args.auth_token:
            req.request_auth_token = True
    if req is not None and req.session_pid is not None and args.peer_pid and req.session_pid != args.peer_pid:
        log.error(
            "master.request",
            message=f"Session pid {req.session_pid} provided by master for request "
            f"{args.client_pid}.{args.client_request_id} did not match peer credentials "
            f"(pid={args.peer_pid})",
        )
        return FAILED
    if req is None or not taken.finished:
        log.error(
            "master.request",
            message=f"Master requested unfinished authentication request {args.client_pid}.{args.client_request_id}",
        )
        return FAILED
    req.id = args.request_id
    with server.generation.use() as generation:
        result = await generation.userdbs.lookup(req)
    if req.userdb_lookup_tempfailed:
        result = UserdbResult.INTERNAL_FAILURE
    if result == UserdbResult.OK:
        return LoginReply("user", req.user or b"", tuple(_reply_fields(server, req)))
    if result == UserdbResult.USER_UNKNOWN:
        return LoginReply("notfound")
    reply = req.userdb_reply
    reason = reply.find(b"reason") if req.userdb_lookup_tempfailed and reply is not None else None
    return LoginReply("fail", reason=reason)


def _reply_fields(server: Server, req: AuthRequest) -> list[Field]:
    """auth_str_append_userdb_extra_fields: userdb fields, then what Dovecot adds."""
    reply = req.userdb_reply
    fields = [f for f in (reply or []) if not f.hidden]
    # Dovecot writes a TAB before the userdb fields even when there are none.
    added: list[Field] = [] if fields else [Field(b"")]
    if req.master_user is not None and (reply is None or b"master_user" not in reply):
        added.append(Field(b"master_user", req.master_user))
    added.append(Field(b"auth_mech", req.mech or b""))
    anonymous = server.rules.anonymous_username.encode()
    if anonymous and req.user == anonymous:
        added.append(Field(b"anonymous"))
    if req.request_auth_token and req.session_pid is not None:
        added.append(Field(b"auth_token", server.auth_token(req)))
    if req.master_user is not None:
        added.append(Field(b"auth_user", req.master_user))
    elif req.original_user is not None and req.original_user != req.user:
        added.append(Field(b"auth_user", req.original_user))
    return fields + added

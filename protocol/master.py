"""The auth-master protocol, server side: USER, PASS, LIST, REQUEST, CACHE-FLUSH.

Post-login processes finish logins here with REQUEST; LMTP, LDA and doveadm ask
for users with USER, PASS and LIST. A `userdb` socket allows only the last three.
Same sans-IO shape as `protocol.client`: bytes in, events out, replies queued.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.client import parse_uint
from protocol.errors import PeerError, UsageError
from protocol.escape import split_tabescaped, tab_escape
from protocol.events import Field, Params
from protocol.lines import LineBuffer

#: MAX_INBUF_SIZE of Dovecot's auth-master connections.
MAX_LINE_LENGTH = 1024
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1


@dataclass(frozen=True, slots=True)
class UserLookup:
    """USER: a userdb lookup. Answer with user_found/user_not_found/user_failed."""

    request_id: int
    username: bytes
    params: Params


@dataclass(frozen=True, slots=True)
class PassLookup:
    """PASS: a passdb lookup without a password check. Answer with pass_*()."""

    request_id: int
    username: bytes
    params: Params


@dataclass(frozen=True, slots=True)
class ListUsers:
    """LIST: iterate users. Answer with list_user() for each, then list_done()."""

    request_id: int
    mask: bytes | None
    params: Params


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """REQUEST: a post-login process collects a finished login-socket request."""

    request_id: int
    client_pid: int
    client_request_id: int
    cookie: bytes
    params: Params


@dataclass(frozen=True, slots=True)
class CacheFlush:
    """CACHE-FLUSH: drop all (no users) or the listed users' cache entries."""

    request_id: bytes
    users: tuple[bytes, ...]


MasterEvent = UserLookup | PassLookup | ListUsers | LoginRequest | CacheFlush


class AuthMasterServer:
    """One auth-master (or auth-userdb, with `userdb_only`) connection."""

    def __init__(self, spid: int, *, userdb_only: bool) -> None:
        self.spid = spid
        self.userdb_only = userdb_only
        self._lines = LineBuffer(MAX_LINE_LENGTH)
        self._out = bytearray()
        self._initiated = False
        self._version_received = False
        self.listing: int | None = None

    def initiate(self) -> None:
        if self._initiated:
            raise UsageError("initiate() called twice")
        self._initiated = True
        self._out += b"VERSION\t%d\t%d\nSPID\t%d\n" % (PROTOCOL_MAJOR, PROTOCOL_MINOR, self.spid)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> list[MasterEvent]:
        """Consume bytes. Raises PeerError where Dovecot drops the connection."""
        self.feed(data)
        events: list[MasterEvent] = []
        while (line_events := self.next_events()) is not None:
            events.extend(line_events)
        return events

    def feed(self, data: bytes | bytearray) -> None:
        """Buffer bytes from the peer; `next_events()` then parses them line by line."""
        if not self._initiated:
            raise UsageError("call initiate() before receive_data()")
        self._lines.feed(data)

    def next_events(self) -> list[MasterEvent] | None:
        """The event of the next complete line (or none), or None if no line is complete.

        Raises PeerError where Dovecot drops the connection. A caller that stops asking
        stops the parsing, so it can hold a peer's pipelined lines where they are.
        """
        line = self._lines.next_line()
        if line is None:
            return None
        event = self._handle_line(line)
        return [] if event is None else [event]

    def _handle_line(self, line: bytes) -> MasterEvent | None:
        if not self._version_received:
            major = line[8:].split(b"\t", 1)[0]
            if not line.startswith(b"VERSION\t") or parse_uint(major) != PROTOCOL_MAJOR:
                raise PeerError("Master not compatible with this server (mixed old and new binaries?)")
            self._version_received = True
            return None
        if line.startswith(b"USER\t"):
            return self._lookup(line[5:], UserLookup, "USER")
        if line.startswith(b"PASS\t"):
            return self._lookup(line[5:], PassLookup, "PASS")
        if line.startswith(b"LIST\t"):
            return self._list(line[5:])
        if not self.userdb_only:
            if line.startswith(b"REQUEST\t"):
                return self._request(line[8:])
            if line.startswith(b"CACHE-FLUSH\t"):
                fields = split_tabescaped(line[12:])
                return CacheFlush(fields[0], tuple(fields[1:]))
            if line.startswith(b"CPID\t"):
                raise PeerError("Authentication client trying to connect to master socket")
        kind = "userdb" if self.userdb_only else "master"
        raise PeerError(f"Unknown command in {kind} socket: {line[:80]!r}")

    def _lookup(self, args: bytes, event: type[UserLookup] | type[PassLookup], command: str) -> MasterEvent:
        fields = split_tabescaped(args)
        request_id = parse_uint(fields[0])
        if len(fields) < 2 or request_id is None:
            raise PeerError(f"Master sent broken {command}")
        params = Params.parse(fields[2:])
        if params.service is None:
            raise PeerError(f"Master sent {command} request without service")
        return event(request_id, fields[1], params)

    def _list(self, args: bytes) -> MasterEvent | None:
        fields = split_tabescaped(args)
        request_id = parse_uint(fields[0])
        if request_id is None:
            raise PeerError("Master sent broken LIST")
        if self.listing is not None:
            self.list_done(request_id, failed=True)
            return None
        params = Params.parse(fields[1:])
        self.listing = request_id
        return ListUsers(request_id, params.get(b"user"), params)

    def _request(self, args: bytes) -> MasterEvent:
        fields = split_tabescaped(args)
        numbers = [parse_uint(f) for f in fields[:3]]
        if len(fields) < 4 or None in numbers:
            raise PeerError("Master sent broken REQUEST")
        try:
            cookie = binascii.unhexlify(fields[3])
        except binascii.Error:
            raise PeerError("Master sent broken REQUEST cookie") from None
        request_id, client_pid, client_request_id = (n for n in numbers if n is not None)
        return LoginRequest(request_id, client_pid, client_request_id, cookie, Params.parse(fields[4:]))

    # --- replies -----------------------------------------------------------------

    def user_found(self, request_id: int, user: bytes, fields: Sequence[Field]) -> None:
        """USER reply; Dovecot always puts a TAB after the user name."""
        visible = b"\t".join(f.wire() for f in fields if not f.hidden)
        self._out += b"USER\t%d\t%s\t%s\n" % (request_id, tab_escape(user), visible)

    def not_found(self, request_id: int) -> None:
        self._out += b"NOTFOUND\t%d\n" % request_id

    def failed(self, request_id: int, reason: bytes | None = None) -> None:
        """FAIL; as in Dovecot 2.3 the reason goes out unescaped (minus line breaks)."""
        line = b"FAIL\t%d" % request_id
        if reason is not None:
            line += b"\treason=" + reason.replace(b"\n", b" ").replace(b"\t", b" ")
        self._out += line + b"\n"

    def pass_found(self, request_id: int, user: bytes, fields: Sequence[Field]) -> None:
        line = b"PASS\t%d\tuser=%s" % (request_id, tab_escape(user))
        if fields:
            line += b"\t" + b"\t".join(f.wire() for f in fields if not f.hidden)
        self._out += line + b"\n"

    def list_user(self, request_id: int, username: bytes) -> None:
        self._out += b"LIST\t%d\t%s\n" % (request_id, tab_escape(username))

    def list_done(self, request_id: int, *, failed: bool = False) -> None:
        self._out += b"DONE\t%d\t%s\n" % (request_id, b"fail" if failed else b"")
        if self.listing == request_id:
            self.listing = None

    def cache_flushed(self, request_id: bytes, count: int) -> None:
        self._out += b"OK\t%s\t%d\n" % (request_id, count)

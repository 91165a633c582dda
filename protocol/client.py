"""The auth-client protocol, server side: what login processes, Postfix and Exim talk to.

`AuthClientServer` is a sans-IO state machine in the style of h2: feed it bytes with
`receive_data()`, act on the events it returns, answer through its methods, and
write out whatever `data_to_send()` returns. It owns the handshake, the request
table, the SASL mechanisms and every byte of the wire format; the caller owns
passdb lookups, failure delays, penalties and the REQUEST hand-over between sockets.

Failures from `fail()` are returned rather than queued, because Dovecot removes a
failed request at once but sends its FAIL line only after the failure delay.
"""

from __future__ import annotations

import enum
import itertools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from protocol.errors import PeerError, UsageError
from protocol.escape import b64decode_strict, b64encode, split_tabescaped, tab_escape
from protocol.events import (
    AnonymousLoggedIn,
    Authenticated,
    AuthFailed,
    AuthStarted,
    CertUsernameWanted,
    ClientConnected,
    ClientEvent,
    CredentialsWanted,
    Field,
    Params,
    PassdbVerdict,
    PasswordReceived,
    RequestDropped,
    UsernameReceived,
)
from protocol.lines import LineBuffer
from protocol.mechanisms.base import (
    AnonymousLogin,
    Challenge,
    Environment,
    Failure,
    Mechanism,
    NeedCertUsername,
    NeedCredentials,
    NeedPassword,
    NeedUsername,
    Step,
    Success,
)

#: AUTH_CLIENT_MAX_LINE_LENGTH: the input buffer size of Dovecot's auth server.
MAX_LINE_LENGTH = 16384
#: MASTER_AUTH_SERVER_TIMEOUT_SECS: a request lives at most this long after AUTH, its last
#: accepted CONT or its OK (Dovecot's to_abort timer, reset by auth_request_refresh_last_access).
REQUEST_TIMEOUT_SECS = 3 * 60 - 30
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 2

_VERSION_LINE = re.compile(rb"VERSION\t([0-9]+)\t([0-9]+)")
_UINT_MAX = 0xFFFFFFFF


def parse_uint(value: bytes) -> int | None:
    """Dovecot's str_to_uint: ASCII digits only, 32-bit range, else None."""
    if not value or not value.isdigit():
        return None
    number = int(value)
    return number if number <= _UINT_MAX else None


class RequestState(enum.IntEnum):
    """Dovecot's enum auth_request_state, the number its timeout error names."""

    NEW = 0
    PASSDB = 1
    MECH_CONTINUE = 2
    FINISHED = 3


@dataclass(frozen=True, slots=True)
class RequestTimedOut(RequestDropped):
    """The request timed out (nothing is sent, as in Dovecot); a later CONT for it gets
    "Authentication request timed out". `secs` since its last access, `state` as Dovecot
    counts it: MECH_CONTINUE means it was waiting for the client."""

    secs: int
    state: RequestState


class _State(enum.Enum):
    NEW = "new"  # AUTH seen, waiting for begin() (the penalty wait)
    CLIENT = "client"  # a challenge was sent; one CONT is accepted
    SERVER = "server"  # waiting for the caller's answer
    FINAL_ACK = "final_ack"  # succeeded; the final SASL message went out as a CONT
    FINISHED = "finished"  # OK sent on a login connection; kept for REQUEST


@dataclass(frozen=True, slots=True)
class RequestHandle:
    """One request as its AUTH started it: the id, which a later AUTH may reuse once the
    request is gone, and a serial number that no other request of the connection has."""

    id: int
    serial: int


@dataclass
class _Request:
    id: int
    serial: int
    mechanism: Mechanism
    params: Params
    initial: bytes | None
    last_access: float
    state: _State = _State.NEW
    server_final: bytes = b""
    pending_ok: bytes = b""
    keep: object = None


@dataclass(frozen=True, slots=True)
class TakenRequest:
    """A request handed over to an auth-master REQUEST."""

    finished: bool
    keep: object


@dataclass
class HandshakeSettings:
    """What the server announces and how it greets."""

    mechanisms: Sequence[type[Mechanism]]
    spid: int
    cuid: int
    cookie: bytes
    #: Dovecot 2.4 style: send only VERSION until the client's VERSION arrives.
    wait_for_client_version: bool = False
    #: Randomness, clock and host name for the mechanisms (CRAM-MD5, SCRAM).
    environment: Environment = field(default_factory=Environment)


class AuthClientServer:
    """One auth-client connection, server side."""

    def __init__(
        self,
        settings: HandshakeSettings,
        *,
        login: bool = False,
        clock: Callable[[], float] = time.monotonic,
        request_timeout: float = REQUEST_TIMEOUT_SECS,
    ) -> None:
        if len(settings.cookie) != 16:
            raise UsageError("the cookie must be 16 bytes")
        self.settings = settings
        self.login = login
        self._clock = clock
        self.request_timeout = request_timeout
        self._mechanisms = {m.name: m for m in settings.mechanisms}
        self._lines = LineBuffer(MAX_LINE_LENGTH)
        self._out = bytearray()
        #: In order of last access (refreshing one moves it to the end), so the oldest is first.
        self._requests: dict[int, _Request] = {}
        self._serials = itertools.count(1)
        self._initiated = False
        self.minor_version: int | None = None
        self.pid: int | None = None

    # --- output ---------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server greeting; call once, right after accepting."""
        if self._initiated:
            raise UsageError("initiate() called twice")
        self._initiated = True
        self._out += b"VERSION\t%d\t%d\n" % (PROTOCOL_MAJOR, PROTOCOL_MINOR)
        if not self.settings.wait_for_client_version:
            self._out += self._handshake_rest()

    def _handshake_rest(self) -> bytes:
        lines = []
        for mech in self.settings.mechanisms:
            lines.append(b"\t".join([b"MECH", mech.name.encode()] + [f.encode() for f in mech.flags]))
        lines.append(b"SPID\t%d" % self.settings.spid)
        lines.append(b"CUID\t%d" % self.settings.cuid)
        lines.append(b"COOKIE\t" + self.settings.cookie.hex().encode())
        lines.append(b"DONE")
        return b"".join(line + b"\n" for line in lines)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def cookie(self) -> bytes:
        return self.settings.cookie

    @property
    def handshake_done(self) -> bool:
        return self.pid is not None

    # --- input ----------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """Consume bytes from the client. Raises PeerError where Dovecot disconnects."""
        self.feed(data)
        events: list[ClientEvent] = []
        while (line_events := self.next_events()) is not None:
            events.extend(line_events)
        return events

    def feed(self, data: bytes | bytearray) -> None:
        """Buffer bytes from the client; `next_events()` then parses them line by line."""
        if not self._initiated:
            raise UsageError("call initiate() before receive_data()")
        self._lines.feed(data)

    def next_events(self) -> list[ClientEvent] | None:
        """The events of the next complete line (often none), or None if no line is complete.

        Raises PeerError where Dovecot disconnects. A caller that answers each line's
        events before asking for the next line's keeps the replies in line order, as
        Dovecot does: a FAIL this parser sends at once for a later line (bad base64,
        CONT for an unknown id) cannot overtake the answer to an earlier one.
        """
        line = self._lines.next_line()
        if line is None:
            return None
        return self._handle_line(line)

    def _handle_line(self, line: bytes) -> list[ClientEvent]:
        if self.minor_version is None:
            match = _VERSION_LINE.fullmatch(line)
            major = parse_uint(match.group(1)) if match else None
            minor = parse_uint(match.group(2)) if match else None
            if major is None or minor is None:
                raise PeerError(f"Authentication client sent invalid VERSION line: {line[:80]!r}")
            if major != PROTOCOL_MAJOR:
                raise PeerError("Authentication client not compatible with this server")
            self.minor_version = minor
            if self.settings.wait_for_client_version:
                self._out += self._handshake_rest()
            return []
        if self.pid is None:
            if not line.startswith(b"CPID\t"):
                raise PeerError(f"Authentication client sent unknown handshake command: {line[:80]!r}")
            pid = parse_uint(line[5:])
            if not pid:
                raise PeerError("Authentication client said it's PID 0")
            self.pid = pid
            return [ClientConnected(pid, self.minor_version)]
        if line.startswith(b"AUTH\t"):
            return self._handle_auth(line[5:])
        if line.startswith(b"CONT\t"):
            return self._handle_cont(line[5:])
        if line.startswith(b"CANCEL\t"):
            return self._handle_cancel(line[7:])
        raise PeerError(f"Authentication client sent unknown command: {line[:80]!r}")

    def _handle_auth(self, args: bytes) -> list[ClientEvent]:
        fields = split_tabescaped(args)
        request_id = parse_uint(fields[0])
        if len(fields) < 2 or not request_id:
            raise PeerError("Authentication client sent broken AUTH request")
        mech_name = fields[1].upper().decode("latin-1")
        mech_class = self._mechanisms.get(mech_name)
        if mech_class is None:
            raise PeerError(f"Authentication client requested unsupported mechanism {mech_name[:64]!r}")
        params: list[bytes] = []
        initial_resp: bytes | None = None
        rest = fields[2:]
        for index, item in enumerate(rest):
            if item == b"resp" or item.startswith(b"resp="):
                initial_resp = item[5:]
                if index != len(rest) - 1:
                    raise PeerError("Authentication client sent AUTH parameters after 'resp'")
                break
            params.append(item)
        parsed = Params.parse(params)
        if parsed.service is None:
            raise PeerError("Authentication client didn't specify service in request")
        if request_id in self._requests:
            # Dovecot's words: a pid only where logins are served (elsewhere its handler has 0).
            client_pid = self.pid if self.login else 0
            raise PeerError(f"BUG: Authentication client {client_pid} sent a duplicate ID {request_id}")
        request = _Request(
            request_id, next(self._serials), mech_class(self.settings.environment), parsed, None, self._clock()
        )
        self._requests[request_id] = request
        if initial_resp is not None:
            assert self.minor_version is not None
            if self.minor_version < 2 and initial_resp == b"":
                pass  # old clients (Exim, Postfix) send an empty resp= for "none"
            elif initial_resp in (b"", b"="):
                request.initial = b""
            else:
                try:
                    request.initial = b64decode_strict(initial_resp)
                except ValueError:
                    return self._fail_now(request, b"Invalid base64 data in initial response", code=b"invalid_base64")
        return [AuthStarted(request_id, mech_class.name, parsed)]

    def _handle_cont(self, args: bytes) -> list[ClientEvent]:
        id_part, sep, data = args.partition(b"\t")
        request_id = parse_uint(id_part)
        if not sep or request_id is None:
            raise PeerError("Authentication client sent broken CONT request")
        request = self._requests.get(request_id)
        if request is None:
            self._out += b"FAIL\t%d\treason=Authentication request timed out\n" % request_id
            return []
        if request.state not in (_State.CLIENT, _State.FINAL_ACK):
            return self._fail_now(request, b"Unexpected continuation")
        try:
            decoded = b64decode_strict(data)
        except ValueError:
            return self._fail_now(request, b"Invalid base64 data in continued response", code=b"invalid_base64")
        self._refresh(request)
        if request.state is _State.FINAL_ACK:
            self._send_ok(request)
            return []
        request.state = _State.SERVER
        if not request.mechanism.allows_nuls and b"\x00" in decoded:
            return self._apply(request, Failure("Unexpected NUL in auth data"))
        return self._apply(request, request.mechanism.step(decoded))

    def _handle_cancel(self, args: bytes) -> list[ClientEvent]:
        request_id = parse_uint(args)
        if request_id is None:
            raise PeerError("Authentication client sent broken CANCEL")
        if self._requests.pop(request_id, None) is None:
            return []
        return [RequestDropped(request_id, "cancelled by client")]

    def _fail_now(self, request: _Request, reason: bytes, code: bytes = b"") -> list[ClientEvent]:
        """Dovecot's auth_request_handler_auth_fail_code: immediate FAIL, request gone."""
        line = b"FAIL\t%d" % request.id
        if code:
            line += b"\tcode=" + code
        line += b"\treason=" + tab_escape(reason) + b"\n"
        self._out += line
        del self._requests[request.id]
        return [RequestDropped(request.id, reason.decode())]

    # --- mechanism steps ---------------------------------------------------------

    def _apply(self, request: _Request, step: Step) -> list[ClientEvent]:
        if isinstance(step, Challenge):
            request.state = _State.CLIENT
            self._out += b"CONT\t%d\t%s\n" % (request.id, b64encode(step.data))
            return []
        request.state = _State.SERVER
        if isinstance(step, NeedUsername):
            return [UsernameReceived(request.id, step.username)]
        if isinstance(step, NeedPassword):
            return [PasswordReceived(request.id, step.username, step.password, step.authzid)]
        if isinstance(step, NeedCredentials):
            return [CredentialsWanted(request.id, step.username, step.scheme, step.authzid)]
        if isinstance(step, NeedCertUsername):
            return [CertUsernameWanted(request.id)]
        if isinstance(step, AnonymousLogin):
            return [AnonymousLoggedIn(request.id, step.trace)]
        if isinstance(step, Success):
            request.server_final = step.server_final
            return [Authenticated(request.id)]
        return [AuthFailed(request.id, step.reason, step.internal)]

    def handle(self, request_id: int) -> RequestHandle | None:
        """The handle of the request now in the table under `request_id`, or None.

        Take it when the request's event arrives and answer through it: an answer that
        comes after the request was dropped (CANCEL, a FAIL, a timeout) is then ignored,
        even if a new AUTH has reused the id meanwhile, as Dovecot's old lookup ends on
        the old, removed request.
        """
        request = self._requests.get(request_id)
        return None if request is None else RequestHandle(request.id, request.serial)

    def _lookup(self, ref: int | RequestHandle) -> _Request | None:
        """The request `ref` names; None if it is gone or (for a handle) was replaced."""
        if isinstance(ref, RequestHandle):
            request = self._requests.get(ref.id)
            return request if request is not None and request.serial == ref.serial else None
        return self._requests.get(ref)

    def _waiting(self, ref: int | RequestHandle, *states: _State) -> _Request | None:
        request = self._lookup(ref)
        if request is None:
            return None  # cancelled, timed out or dropped meanwhile: nothing to do
        if request.state not in states:
            raise UsageError(f"request {request.id} is {request.state.value}, not {states}")
        return request

    def begin(self, request_id: int | RequestHandle) -> list[ClientEvent]:
        """Run the mechanism's first step (after any penalty wait)."""
        request = self._waiting(request_id, _State.NEW)
        if request is None:
            return []
        request.state = _State.SERVER
        initial = request.initial
        if initial and not request.mechanism.allows_nuls and b"\x00" in initial:
            return self._apply(request, Failure("Unexpected NUL in auth data"))
        return self._apply(request, request.mechanism.initial(initial))

    def refuse(self, request_id: int | RequestHandle, reason: bytes) -> list[ClientEvent]:
        """Fail a request before its mechanism runs: an immediate FAIL with `reason`
        (auth_request_handler_auth_fail, as for the client-certificate checks)."""
        request = self._waiting(request_id, _State.NEW)
        if request is None:
            return []
        return self._fail_now(request, reason)

    def username_result(self, request_id: int | RequestHandle, accepted: bool) -> list[ClientEvent]:
        request = self._waiting(request_id, _State.SERVER)
        if request is None:
            return []
        return self._apply(request, request.mechanism.username_result(accepted))

    def password_result(self, request_id: int | RequestHandle, verdict: PassdbVerdict) -> list[ClientEvent]:
        request = self._waiting(request_id, _State.SERVER)
        if request is None:
            return []
        return self._apply(request, request.mechanism.password_result(verdict))

    def credentials_result(
        self, request_id: int | RequestHandle, verdict: PassdbVerdict, credentials: bytes = b""
    ) -> list[ClientEvent]:
        request = self._waiting(request_id, _State.SERVER)
        if request is None:
            return []
        return self._apply(request, request.mechanism.credentials_result(verdict, credentials))

    def cert_username_result(self, request_id: int | RequestHandle, known: bool) -> list[ClientEvent]:
        """Answer `CertUsernameWanted`: True if the request got a user name from the certificate."""
        request = self._waiting(request_id, _State.SERVER)
        if request is None:
            return []
        return self._apply(request, request.mechanism.cert_username_result(known))

    # --- final replies ---------------------------------------------------------

    def succeed(
        self,
        request_id: int | RequestHandle,
        user: bytes,
        fields: Sequence[Field] = (),
        trailer: Sequence[Field] = (),
        *,
        keep: object = None,
    ) -> bool:
        """Queue the OK reply. `keep` (login connections) is handed to a later REQUEST.

        `fields` are the passdb's extra fields (hidden ones included, for the 2.3
        empty-field quirk); `trailer` the fields Dovecot appends after them
        (original_user, auth_user, anonymous, pass, master). Returns False if the
        request is gone.
        """
        request = self._waiting(request_id, _State.SERVER)
        if request is None:
            return False
        fields = list(fields)
        final = request.server_final
        final_resp_ok = request.params.has(b"final-resp-ok")
        if final and final_resp_ok:
            _set_field(fields, Field(b"resp", b64encode(final)))
        request.pending_ok = _render(b"OK\t%d\tuser=%s" % (request.id, tab_escape(user)), fields, trailer)
        request.keep = keep
        if final and not final_resp_ok:
            # The client cannot take the final message inside OK: one more round.
            request.state = _State.FINAL_ACK
            self._out += b"CONT\t%d\t%s\n" % (request.id, b64encode(final))
        else:
            self._refresh(request)
            self._send_ok(request)
        return True

    def _send_ok(self, request: _Request) -> None:
        self._out += request.pending_ok
        request.pending_ok = b""
        if self.login and request.keep is not None:
            request.state = _State.FINISHED
        else:
            del self._requests[request.id]

    def fail(
        self,
        request_id: int | RequestHandle,
        user: bytes | None = None,
        *,
        code: bytes = b"",
        nodelay: bool = False,
        fields: Sequence[Field] = (),
        trailer: Sequence[Field] = (),
    ) -> bytes | None:
        """Remove the request and return its FAIL line for the caller to send.

        The caller writes the line when its failure delay is over (or at once for
        `nodelay`). Returns None if the request is gone already.
        """
        request = self._lookup(request_id)
        if request is None:
            return None
        del self._requests[request.id]
        head = b"FAIL\t%d" % request.id
        if user is not None:
            head += b"\tuser=" + tab_escape(user)
        if nodelay:
            head += b"\tnodelay"
        if code:
            head += b"\tcode=" + code
        return _render(head, fields, trailer)

    # --- bookkeeping -----------------------------------------------------------

    def take_request(self, request_id: int) -> TakenRequest | None:
        """Remove a request for an auth-master REQUEST (one-shot)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        return TakenRequest(request.state is _State.FINISHED, request.keep)

    def _refresh(self, request: _Request) -> None:
        """auth_request_refresh_last_access: the timeout starts again."""
        request.last_access = self._clock()
        self._requests[request.id] = self._requests.pop(request.id)

    def expire(self, now: float | None = None) -> list[ClientEvent]:
        """Drop the requests not accessed for `request_timeout` seconds (150 in Dovecot).

        Nothing is sent; each becomes a RequestTimedOut for the caller to log and forget.
        """
        now = self._clock() if now is None else now
        stale = []
        for request in self._requests.values():
            if now - request.last_access < self.request_timeout:
                break  # the rest were accessed later
            stale.append(request)
        events: list[ClientEvent] = []
        for request in stale:
            del self._requests[request.id]
            events.append(
                RequestTimedOut(request.id, "timed out", int(now - request.last_access), _DOVECOT[request.state])
            )
        return events

    def next_expiry(self) -> float | None:
        """When the oldest request times out (on the `clock`), or None without requests."""
        for request in self._requests.values():
            return request.last_access + self.request_timeout
        return None

    @property
    def open_requests(self) -> int:
        """Requests in the table: in progress, waiting for the client, or kept for REQUEST."""
        return len(self._requests)

    def request_ids(self) -> Iterable[int]:
        return list(self._requests)


#: Where each state of ours is in Dovecot's: waiting for the caller is (mostly) a passdb lookup.
_DOVECOT = {
    _State.NEW: RequestState.NEW,
    _State.CLIENT: RequestState.MECH_CONTINUE,
    _State.SERVER: RequestState.PASSDB,
    _State.FINAL_ACK: RequestState.MECH_CONTINUE,
    _State.FINISHED: RequestState.FINISHED,
}


def _set_field(fields: list[Field], new: Field) -> None:
    for index, existing in enumerate(fields):
        if existing.key == new.key:
            fields[index] = new
            return
    fields.append(new)


def _render(head: bytes, fields: Sequence[Field], trailer: Sequence[Field]) -> bytes:
    line = bytearray(head)
    if fields:
        # Dovecot appends a TAB whenever the field list is non-empty, even if
        # every field in it is hidden: hence "OK\t1\tuser=alice\t".
        line += b"\t" + b"\t".join(f.wire() for f in fields if not f.hidden)
    for f in trailer:
        line += b"\t" + f.wire()
    line += b"\n"
    return bytes(line)

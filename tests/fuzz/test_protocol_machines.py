"""Hypothesis state machines over protocol/: the line codec, TAB-escaping and base64, and the
auth-client and auth-master servers driven by a peer sending anything and a caller obeying the events.

Invariants: peer garbage raises PeerError and nothing else (never UsageError for a caller that
answers each event as documented); every byte queued is a well-formed, complete line of the
protocol, naming only request ids the peer used; escaping and base64 round-trip. Examples are
bounded and derandomized (a fixed seed), so a run is reproducible and takes a few seconds.
"""

from __future__ import annotations

import base64
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol.client import AuthClientServer, HandshakeSettings
from protocol.errors import LineTooLong, PeerError
from protocol.escape import (
    b64decode_strict,
    b64encode,
    join_tabescaped,
    split_tabescaped,
    tab_escape,
    tab_unescape,
)
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
    PassdbVerdict,
    PasswordReceived,
    RequestDropped,
    UsernameReceived,
)
from protocol.lines import LineBuffer
from protocol.master import AuthMasterServer, CacheFlush, ListUsers, LoginRequest, MasterEvent, PassLookup, UserLookup
from protocol.mechanisms import MECHANISMS
from tests.protocol.replay import fixed_env
from tests.protocol.test_mechanisms import _client_message, _credentials

MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=50,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROPERTY_SETTINGS = settings(max_examples=400, derandomize=True, database=None, deadline=None)

# A value on the wire after tab_escape: no TAB, CR, LF or NUL, and 0x01 only as an escape prefix.
ESCAPED = rb"(?:[^\x00\x01\t\r\n]|\x01[01trn])*"
ID = rb"[0-9]+"
BASE64 = rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
CLIENT_LINES = re.compile(
    rb"VERSION\t1\t2|MECH\t[A-Z0-9-]+(?:\t[a-z-]+)*|SPID\t[0-9]+|CUID\t[0-9]+|COOKIE\t[0-9a-f]{32}|DONE"
    rb"|CONT\t(?P<cont>"
    + ID
    + rb")\t"
    + BASE64
    + rb"|OK\t(?P<ok>"
    + ID
    + rb")\tuser="
    + ESCAPED
    + rb"(?:\t"
    + ESCAPED
    + rb")*|FAIL\t(?P<fail>"
    + ID
    + rb")(?:\t"
    + ESCAPED
    + rb")*"
)
MASTER_LINES = re.compile(
    rb"VERSION\t1\t1|SPID\t[0-9]+|USER\t(?P<user>"
    + ID
    + rb")\t"
    + ESCAPED
    + rb"\t(?:"
    + ESCAPED
    + rb"(?:\t"
    + ESCAPED
    + rb")*)?|NOTFOUND\t(?P<notfound>"
    + ID
    + rb")|FAIL\t(?P<fail>"
    + ID
    + rb")(?:\treason=[^\t\n]*)?"
    rb"|PASS\t(?P<pass>"
    + ID
    + rb")\tuser="
    + ESCAPED
    + rb"(?:\t"
    + ESCAPED
    + rb")*|LIST\t(?P<list>"
    + ID
    + rb")\t"
    + ESCAPED
    + rb"|DONE\t(?P<done>"
    + ID
    + rb")\t(?:fail)?|OK\t(?P<ok>"
    + ESCAPED
    + rb")\t[0-9]+"
)


def check_lines(data: bytes, pattern: re.Pattern[bytes], ids: set[bytes]) -> list[bytes]:
    """Every line of DATA matches PATTERN and names a request id the peer sent; returns the lines."""
    assert data == b"" or data.endswith(b"\n"), data
    lines = data.split(b"\n")[:-1]
    for line in lines:
        match = pattern.fullmatch(line)
        assert match is not None, f"malformed line {line!r}"
        named = [value for value in match.groupdict().values() if value is not None]
        assert all(value in ids for value in named), f"{line!r} answers an id the peer never sent ({ids})"
    return lines


# --- the line codec and escaping ---------------------------------------------------------------


class LineCodec(RuleBasedStateMachine):
    """LineBuffer against a model: the same lines, LineTooLong exactly when a line cannot fit."""

    LIMIT = 24

    def __init__(self) -> None:
        super().__init__()
        self.buffer = LineBuffer(self.LIMIT)
        self.model = b""
        self.too_long = False

    @precondition(lambda self: not self.too_long)
    @rule(
        data=st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"\n", b"x" * 23 + b"\n", b"x" * 24, b"x" * 24 + b"\n", b"\n\n\n"]),
            st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=4).map(b"".join),
        )
    )
    def feed(self, data: bytes) -> None:
        self.buffer.feed(data)
        self.model += data
        while True:
            end = self.model.find(b"\n")
            try:
                line = self.buffer.next_line()
            except LineTooLong:
                assert end >= self.LIMIT or (end < 0 and len(self.model) >= self.LIMIT), self.model
                self.too_long = True
                return
            if line is None:
                assert end < 0 and len(self.model) < self.LIMIT, self.model
                return
            assert 0 <= end < self.LIMIT and line == self.model[:end]
            self.model = self.model[end + 1 :]

    @precondition(lambda self: self.too_long)
    @rule()
    def reconnect(self) -> None:
        self.buffer = LineBuffer(self.LIMIT)
        self.model = b""
        self.too_long = False

    @invariant()
    def pending_matches(self) -> None:
        if not self.too_long:
            assert self.buffer.pending == len(self.model)


TestLineCodec = LineCodec.TestCase
TestLineCodec.settings = MACHINE_SETTINGS


@PROPERTY_SETTINGS
@given(st.binary(max_size=64))
def test_tab_escape_round_trip(value: bytes) -> None:
    escaped = tab_escape(value)
    assert re.fullmatch(ESCAPED, escaped), escaped
    assert tab_unescape(escaped) == value


@PROPERTY_SETTINGS
@given(st.lists(st.binary(max_size=16), min_size=1, max_size=6))
def test_join_split_round_trip(fields: list[bytes]) -> None:
    line = join_tabescaped(fields)
    assert b"\n" not in line and b"\r" not in line
    assert split_tabescaped(line) == fields


@PROPERTY_SETTINGS
@given(st.binary(max_size=64))
def test_unescape_and_base64_take_any_bytes(data: bytes) -> None:
    tab_unescape(data)
    split_tabescaped(data)
    assert b64decode_strict(b64encode(data)) == data
    try:
        decoded = b64decode_strict(data)
    except ValueError:
        return
    assert b64decode_strict(b64encode(decoded)) == decoded


# --- auth-client ----------------------------------------------------------------------------------

COOKIE = bytes.fromhex("29953adde20f7bac35222a06c220e7ba")
MECH_NAMES = sorted(MECHANISMS)
REQUEST_IDS = st.integers(1, 6)
VERDICTS = st.sampled_from(list(PassdbVerdict))
GARBAGE_LINES = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from(
        [
            b"",
            b"AUTH",
            b"AUTH\t",
            b"AUTH\t0\tPLAIN\tservice=imap",
            b"AUTH\t4294967296\tPLAIN\tservice=imap",
            b"AUTH\t1\tNOSUCH\tservice=imap",
            b"AUTH\t1\tPLAIN",
            b"AUTH\t1\tPLAIN\tresp=AA==\tservice=imap",
            b"CONT",
            b"CONT\t1",
            b"CONT\tx\tAA==",
            b"CANCEL\t",
            b"CANCEL\t-1",
            b"CPID\t1",
            b"VERSION\t1\t2",
            b"VERSION\t2\t0",
        ]
    ),
)
FIELD_VALUES = st.binary(max_size=12)


class AuthClient(RuleBasedStateMachine):
    """One auth-client connection: a peer sending anything, a caller answering every event."""

    def __init__(self) -> None:
        super().__init__()
        self.now = [0.0]
        self.conn: AuthClientServer | None = None
        self.dead = False
        self.peer_ids: set[bytes] = set()
        self.started: set[int] = set()
        self.waiting: dict[int, ClientEvent] = {}  # the event each request awaits an answer to
        self.challenges: dict[int, bytes] = {}
        self.mechanism: dict[int, str] = {}

    @initialize(login=st.booleans(), wait=st.booleans(), minor=st.sampled_from([0, 1, 2, 3]))
    def connect(self, login: bool, wait: bool, minor: int) -> None:
        self.open(login, wait, minor)

    @precondition(lambda self: self.dead)
    @rule(login=st.booleans(), wait=st.booleans(), minor=st.sampled_from([0, 1, 2, 3]))
    def reconnect(self, login: bool, wait: bool, minor: int) -> None:
        """Dovecot dropped the connection: the peer connects again."""
        self.__init__()  # type: ignore[misc]
        self.open(login, wait, minor)

    def open(self, login: bool, wait: bool, minor: int) -> None:
        settings = HandshakeSettings(
            list(MECHANISMS.values()),
            spid=4242,
            cuid=7,
            cookie=COOKIE,
            wait_for_client_version=wait,
            environment=fixed_env(),
        )
        self.conn = AuthClientServer(settings, login=login, clock=lambda: self.now[0])
        self.conn.initiate()
        self.check_output()
        self.send(b"VERSION\t1\t%d\nCPID\t%d\n" % (minor, 1000 + minor))

    # the peer

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        for number in re.findall(rb"^(?:AUTH|CONT|CANCEL)\t([0-9]+)", data, re.M):
            self.peer_ids.add(number)
        self.conn.feed(data)
        while True:
            try:
                events = self.conn.next_events()
            except PeerError:
                self.dead = True
                return
            if events is None:
                break
            self.handle(events)
        self.check_output()

    @precondition(lambda self: not self.dead)
    @rule(request_id=REQUEST_IDS, mech=st.sampled_from(MECH_NAMES), data=st.data())
    def auth(self, request_id: int, mech: str, data: st.DataObject) -> None:
        params = data.draw(st.lists(st.sampled_from([b"debug", b"final-resp-ok", b"no-penalty", b"x=\x01t"])))
        line = b"AUTH\t%d\t%s\tservice=imap" % (request_id, mech.encode())
        line += b"".join(b"\t" + tab_escape(p) for p in params)
        if data.draw(st.booleans()):
            first = data.draw(_client_message(mech, b"", b""))
            line += b"\tresp=" + (base64.b64encode(first) or b"=")
        self.mechanism[request_id] = mech
        self.challenges[request_id] = b""
        self.send(line + b"\n")

    @precondition(lambda self: not self.dead)
    @rule(request_id=REQUEST_IDS, user=st.binary(max_size=8), password=st.binary(max_size=8))
    def plain(self, request_id: int, user: bytes, password: bytes) -> None:
        """A well-formed AUTH PLAIN with an initial response, as most clients send."""
        resp = base64.b64encode(b"\0" + user.replace(b"\0", b"") + b"\0" + password.replace(b"\0", b""))
        self.mechanism[request_id] = "PLAIN"
        self.send(b"AUTH\t%d\tPLAIN\tservice=smtp\tresp=%s\n" % (request_id, resp))

    @precondition(lambda self: not self.dead)
    @rule(request_id=REQUEST_IDS, data=st.data())
    def cont(self, request_id: int, data: st.DataObject) -> None:
        mech = self.mechanism.get(request_id, "PLAIN")
        message = data.draw(_client_message(mech, self.challenges.get(request_id, b""), b"n,,n=erin,r=x"))
        encoded = base64.b64encode(message)
        if data.draw(st.integers(0, 9)) == 0:
            encoded = data.draw(st.sampled_from([b"!", b"AAA", b"AA==x", encoded + b"="]))
        self.send(b"CONT\t%d\t%s\n" % (request_id, encoded))

    @precondition(lambda self: not self.dead)
    @rule(request_id=REQUEST_IDS)
    def cancel(self, request_id: int) -> None:
        self.send(b"CANCEL\t%d\n" % request_id)

    @precondition(lambda self: not self.dead)
    @rule(line=GARBAGE_LINES, cut=st.integers(0, 40), size=st.sampled_from([0, 0, 0, 16383, 16384, 20000]))
    def garbage(self, line: bytes, cut: int, size: int) -> None:
        """A broken line, in two pieces (lines may arrive so), or one too long for the buffer."""
        if size:
            line = b"AUTH\t1\tPLAIN\tservice=imap\tx=" + b"y" * size
        self.send(line[:cut])
        self.send(line[cut:] + b"\n")

    # the caller

    def handle(self, events: list[ClientEvent]) -> None:
        assert self.conn is not None
        for event in events:
            if isinstance(event, ClientConnected):
                continue
            if isinstance(event, RequestDropped):
                self.waiting.pop(event.request_id, None)
                continue
            if isinstance(event, AuthStarted):
                self.started.add(event.request_id)
            self.waiting[event.request_id] = event

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        """The caller answers one waiting request."""
        self.answer_one(data.draw(st.sampled_from(sorted(self.waiting))), data)

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def answer_all(self, data: st.DataObject) -> None:
        """The caller answers every waiting request, and what that leads to, until none waits."""
        for _ in range(20):
            if not self.waiting:
                break
            self.answer_one(min(self.waiting), data)

    def answer_one(self, request_id: int, data: st.DataObject) -> None:
        assert self.conn is not None
        event = self.waiting.pop(request_id)
        events: list[ClientEvent] = []
        if isinstance(event, AuthStarted):
            if data.draw(st.integers(0, 9)):
                events = self.conn.begin(request_id)
            else:
                events = self.conn.refuse(request_id, b"refused\tby\ncaller")
        elif isinstance(event, UsernameReceived):
            events = self.conn.username_result(request_id, data.draw(st.booleans()))
        elif isinstance(event, PasswordReceived):
            events = self.conn.password_result(request_id, data.draw(VERDICTS))
        elif isinstance(event, CredentialsWanted):
            creds = data.draw(_credentials(event.scheme))
            events = self.conn.credentials_result(request_id, data.draw(VERDICTS), creds)
        elif isinstance(event, CertUsernameWanted):
            events = self.conn.cert_username_result(request_id, data.draw(st.booleans()))
        elif isinstance(event, Authenticated | AnonymousLoggedIn):
            fields = [Field(b"k", data.draw(FIELD_VALUES)), Field(b"bare"), Field(b"pass", b"x", hidden=True)]
            keep = object() if data.draw(st.booleans()) else None
            assert self.conn.succeed(request_id, data.draw(FIELD_VALUES), fields, keep=keep)
        elif isinstance(event, AuthFailed):
            user = data.draw(st.one_of(st.none(), FIELD_VALUES))
            line = self.conn.fail(request_id, user, code=b"temp_fail", nodelay=data.draw(st.booleans()))
            assert line is not None
            check_lines(line, CLIENT_LINES, self.peer_ids | {b"%d" % request_id})
        else:
            raise AssertionError(f"no answer for {event}")
        self.handle(events)
        self.check_output()

    @precondition(lambda self: not self.dead)
    @rule(request_id=REQUEST_IDS)
    def take_request(self, request_id: int) -> None:
        assert self.conn is not None
        if self.conn.take_request(request_id) is not None:
            self.waiting.pop(request_id, None)

    @rule(seconds=st.sampled_from([1.0, 149.0, 150.0]))
    def expire(self, seconds: float) -> None:
        assert self.conn is not None
        self.now[0] += seconds
        self.handle(self.conn.expire())

    def check_output(self) -> None:
        assert self.conn is not None
        data = self.conn.data_to_send()
        for line in check_lines(data, CLIENT_LINES, self.peer_ids):
            if line.startswith(b"CONT\t"):
                _, number, challenge = line.split(b"\t")
                self.challenges[int(number)] = base64.b64decode(challenge)

    @invariant()
    def requests_are_the_peers(self) -> None:
        if self.conn is not None:
            assert set(self.conn.request_ids()) <= self.started
            assert set(self.waiting) <= self.started


TestAuthClient = AuthClient.TestCase
TestAuthClient.settings = MACHINE_SETTINGS


# --- auth-master / auth-userdb --------------------------------------------------------------------

USERNAMES = st.one_of(st.sampled_from([b"alice", b"a\x01tb", b"\x01n", b""]), st.binary(max_size=8))


def master_line(name: bytes, request_id: int, rest: list[bytes]) -> bytes:
    return b"\t".join([name, b"%d" % request_id, *(tab_escape(part) for part in rest)]) + b"\n"


MASTER_GARBAGE = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from(
        [
            b"",
            b"USER",
            b"USER\t1",
            b"USER\tx\talice\tservice=imap",
            b"USER\t1\talice",
            b"PASS\t1\talice\tdebug",
            b"LIST\t",
            b"LIST\tx",
            b"REQUEST\t1\t2\t3",
            b"REQUEST\t1\t2\t3\tzz",
            b"REQUEST\t1\t2\t3\tabc",
            b"CACHE-FLUSH",
            b"CPID\t1",
            b"VERSION\t1\t1",
        ]
    ),
)


class AuthMaster(RuleBasedStateMachine):
    """One auth-master or auth-userdb connection; the caller answers each lookup at once or later."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: AuthMasterServer | None = None
        self.dead = False
        self.peer_ids: set[bytes] = set()
        self.waiting: list[MasterEvent] = []

    @initialize(userdb_only=st.booleans(), version=st.sampled_from([b"VERSION\t1\t0", b"VERSION\t1\t1"]))
    def connect(self, userdb_only: bool, version: bytes) -> None:
        self.open(userdb_only, version)

    @precondition(lambda self: self.dead)
    @rule(userdb_only=st.booleans(), version=st.sampled_from([b"VERSION\t1\t0", b"VERSION\t1\t1", b"VERSION\t2"]))
    def reconnect(self, userdb_only: bool, version: bytes) -> None:
        self.__init__()  # type: ignore[misc]
        self.open(userdb_only, version)

    def open(self, userdb_only: bool, version: bytes) -> None:
        self.conn = AuthMasterServer(9999, userdb_only=userdb_only)
        self.conn.initiate()
        self.send(version + b"\n")

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        for match in re.finditer(rb"^(?:USER|PASS|LIST|REQUEST)\t([^\t\n]*)", data, re.M):
            self.peer_ids.add(match.group(1))
        for match in re.finditer(rb"^CACHE-FLUSH\t([^\t\n]*)", data, re.M):
            self.peer_ids.add(tab_escape(tab_unescape(match.group(1))))
        try:
            self.waiting += self.conn.receive_data(data)
        except PeerError:
            self.dead = True
        self.check_output()

    @precondition(lambda self: not self.dead)
    @rule(
        command=st.sampled_from([b"USER", b"PASS", b"LIST", b"REQUEST", b"CACHE-FLUSH"]),
        request_id=REQUEST_IDS,
        user=USERNAMES,
        params=st.lists(st.sampled_from([b"service=imap", b"protocol=lmtp", b"debug", b"user=a*", b"x=\t"])),
    )
    def lookup(self, command: bytes, request_id: int, user: bytes, params: list[bytes]) -> None:
        if command in (b"USER", b"PASS"):
            self.send(master_line(command, request_id, [user, b"service=imap", *params]))
        elif command == b"LIST":
            self.send(master_line(command, request_id, params))
        elif command == b"REQUEST":
            self.send(master_line(command, request_id, [b"42", b"7", COOKIE.hex().encode(), *params]))
        else:
            self.send(
                b"CACHE-FLUSH\t" + tab_escape(b"%d" % request_id) + b"".join(b"\t" + user for _ in params) + b"\n"
            )

    @precondition(lambda self: not self.dead)
    @rule(line=MASTER_GARBAGE)
    def garbage(self, line: bytes) -> None:
        self.send(line + b"\n")

    @precondition(lambda self: not self.dead)
    @rule(size=st.sampled_from([1023, 1024, 5000]))
    def long_line(self, size: int) -> None:
        self.send(b"USER\t1\t" + b"u" * size + b"\tservice=imap\n")

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def answer(self, data: st.DataObject) -> None:
        assert self.conn is not None
        event = self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1)))
        fields = [Field(b"uid", b"1000"), Field(b"k", data.draw(FIELD_VALUES)), Field(b"h", b"x", hidden=True)]
        choice = data.draw(st.integers(0, 2))
        if isinstance(event, LoginRequest):
            pass  # authd answers REQUEST itself (authd/master_conn.py), not through this object
        elif isinstance(event, UserLookup | PassLookup):
            found = self.conn.user_found if isinstance(event, UserLookup) else self.conn.pass_found
            if choice == 0:
                found(event.request_id, data.draw(USERNAMES), fields)
            elif choice == 1:
                self.conn.not_found(event.request_id)
            else:
                self.conn.failed(event.request_id, data.draw(st.one_of(st.none(), FIELD_VALUES)))
        elif isinstance(event, ListUsers):
            for user in data.draw(st.lists(USERNAMES, max_size=3)):
                self.conn.list_user(event.request_id, user)
            self.conn.list_done(event.request_id, failed=choice == 2)
        elif isinstance(event, CacheFlush):
            self.conn.cache_flushed(event.request_id, choice)
        self.check_output()

    def check_output(self) -> None:
        assert self.conn is not None
        check_lines(self.conn.data_to_send(), MASTER_LINES, self.peer_ids)


TestAuthMaster = AuthMaster.TestCase
TestAuthMaster.settings = MACHINE_SETTINGS

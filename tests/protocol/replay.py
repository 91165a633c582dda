"""Replay a mechanism transcript (transcripts/*.txt) through AuthClientServer, byte for byte.

The daemon side is simulated by `FakeDaemon`: a passwd-file passdb and just enough of
Dovecot's auth_request rules (user name checks with the default auth_username_chars and
%Lu, cert_username, original_user, anonymous) to produce the same OK/FAIL lines as the
Dovecot the transcripts were captured from. Passwords and credentials are handled by
authd.passwords, as in the daemon. See transcripts/README.md for the file format.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from authd.passwords import SchemeNotAvailable, credentials, verify
from protocol.client import AuthClientServer, HandshakeSettings
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
from protocol.mechanisms import MECHANISMS, Environment

TRANSCRIPTS = Path(__file__).parent / "transcripts"
_USERNAME_CHARS = re.compile(rb"[a-zA-Z0-9.\-_@]*")


@dataclass
class _Request:
    params: Params
    user: bytes | None = None
    original_user: bytes | None = None
    cert: bool = False
    fields: list[Field] = field(default_factory=list)


@dataclass
class FakeDaemon:
    """The daemon's answers to a connection's events, after Dovecot 2.3's auth_request rules."""

    conn: AuthClientServer
    passdb: dict[bytes, tuple[bytes | None, list[Field]]]
    anonymous_username: bytes = b"anonymous"
    username_from_cert: bool = False
    output: bytearray = field(default_factory=bytearray)
    requests: dict[int, _Request] = field(default_factory=dict)

    def feed(self, data: bytes) -> None:
        self.run(self.conn.receive_data(data))

    def run(self, events: list[ClientEvent]) -> None:
        pending = deque(events)
        while pending:
            pending.extend(self.answer(pending.popleft()))
        self.output += self.conn.data_to_send()

    def answer(self, event: ClientEvent) -> list[ClientEvent]:
        if isinstance(event, AuthStarted):
            request = self.requests[event.request_id] = _Request(event.params)
            cert_username = event.params.get(b"cert_username")
            if self.username_from_cert and cert_username:
                request.user, request.cert = cert_username, True
            return self.conn.begin(event.request_id)
        if isinstance(event, ClientConnected):
            return []
        if isinstance(event, RequestDropped):
            self.requests.pop(event.request_id, None)
            return []
        request = self.requests[event.request_id]
        if isinstance(event, UsernameReceived):
            return self.conn.username_result(event.request_id, self.set_username(request, event.username))
        if isinstance(event, PasswordReceived):
            if not self.set_user(request, event.username, event.authzid):
                return self.fail(event.request_id)
            return self.conn.password_result(event.request_id, self.verify(request, event.password))
        if isinstance(event, CredentialsWanted):
            if not self.set_user(request, event.username, event.authzid):
                return self.fail(event.request_id)
            verdict, creds = self.credentials(request, event.scheme)
            return self.conn.credentials_result(event.request_id, verdict, creds)
        if isinstance(event, CertUsernameWanted):
            return self.conn.cert_username_result(event.request_id, request.user is not None)
        if isinstance(event, AnonymousLoggedIn):
            request.user = self.anonymous_username
            return self.succeed(event.request_id)
        if isinstance(event, Authenticated):
            return self.succeed(event.request_id)
        assert isinstance(event, AuthFailed)
        return self.fail(event.request_id)

    # --- auth_request rules ---------------------------------------------------------

    def set_username(self, request: _Request, username: bytes) -> bool:
        """auth_request_set_username with %Lu and the default auth_username_chars."""
        if request.original_user is None:
            request.original_user = username
        if request.cert:
            assert request.user is not None
            username = request.user
        username = username.lower()
        if not username or not _USERNAME_CHARS.fullmatch(username):
            request.user = None
            return False
        request.user = username
        return True

    def set_user(self, request: _Request, username: bytes, authzid: bytes) -> bool:
        """The user name, then a login-as authzid: only the user itself (there are no master passdbs)."""
        return self.set_username(request, username) and authzid in (b"", request.user)

    def verify(self, request: _Request, password: bytes) -> PassdbVerdict:
        assert request.user is not None
        entry = self.passdb.get(request.user)
        if entry is None:
            return PassdbVerdict.FAILED
        stored, fields = entry
        if stored is not None and verify(password, stored).code != 1:
            return PassdbVerdict.FAILED
        request.fields = fields
        return PassdbVerdict.OK

    def credentials(self, request: _Request, scheme: str) -> tuple[PassdbVerdict, bytes]:
        assert request.user is not None
        stored, fields = self.passdb.get(request.user, (None, []))
        if stored is None:
            return PassdbVerdict.FAILED, b""
        try:
            creds = credentials(stored, scheme)
        except SchemeNotAvailable:
            return PassdbVerdict.FAILED, b""
        request.fields = fields
        return PassdbVerdict.OK, creds

    def trailer(self, request: _Request) -> list[Field]:
        trailer = []
        if request.original_user is not None and request.original_user != request.user:
            trailer.append(Field(b"original_user", request.original_user))
        if request.user == self.anonymous_username:
            trailer.append(Field(b"anonymous"))
        return trailer

    def succeed(self, request_id: int) -> list[ClientEvent]:
        request = self.requests.pop(request_id)
        assert request.user is not None
        self.conn.succeed(request_id, request.user, request.fields, self.trailer(request))
        return []

    def fail(self, request_id: int) -> list[ClientEvent]:
        request = self.requests.pop(request_id)
        user = request.user if request.user is not None else request.original_user
        line = self.conn.fail(request_id, user, trailer=self.trailer(request))
        assert line is not None
        self.output += line
        return []


@dataclass
class _Injected:
    """The server's random parts, as the transcript's @random/@time/@hostname lines give them."""

    random: bytearray = field(default_factory=bytearray)
    time: float = 0.0
    hostname: bytes = b"localhost"

    def random_bytes(self, count: int) -> bytes:
        if len(self.random) < count:
            raise AssertionError(f"the transcript does not say which {count} random bytes come next")
        chunk = bytes(self.random[:count])
        del self.random[:count]
        return chunk


def unescape(text: str) -> bytes:
    """A transcript line's bytes: Python escapes (\\t, \\n, \\x01) in ASCII text."""
    return codecs.escape_decode(text.encode("ascii"))[0]


def replay(name: str) -> int:
    """Replay transcripts/NAME.txt; returns how many server lines matched. Fails on the first difference."""
    injected = _Injected()
    passdb: dict[bytes, tuple[bytes | None, list[Field]]] = {}
    settings: dict[str, str] = {}
    daemon: FakeDaemon | None = None
    matched = 0
    for number, line in enumerate((TRANSCRIPTS / f"{name}.txt").read_text().splitlines(), 1):
        where = f"{name}.txt:{number}"
        if not line or line.startswith("#"):
            continue
        directive, _, rest = line.partition(" ")
        if directive == "@passdb":
            user, _, spec = rest.partition(" ")
            stored, *extra = spec.split(" ") if spec else [""]
            fields = [
                Field(key.encode(), value.encode(), hidden=key.startswith("userdb_"))
                for key, _, value in (item.partition("=") for item in extra)
            ]
            passdb[user.encode()] = (stored.encode() or None, fields)
        elif directive == "@setting":
            key, _, value = rest.partition("=")
            settings[key] = value
        elif directive == "@random":
            injected.random += bytes.fromhex(rest)
        elif directive == "@time":
            injected.time = float(rest)
        elif directive == "@hostname":
            # The host name is fixed once the connection exists.
            assert daemon is None or rest.encode() == injected.hostname, where
            injected.hostname = rest.encode()
        elif directive in ("C>", "S>"):
            if daemon is None:
                env = Environment(injected.random_bytes, lambda: injected.time, injected.hostname)
                conn = AuthClientServer(
                    HandshakeSettings(list(MECHANISMS.values()), spid=1, cuid=1, cookie=bytes(16), environment=env)
                )
                conn.initiate()
                conn.data_to_send()
                daemon = FakeDaemon(
                    conn,
                    passdb,
                    anonymous_username=settings.get("auth_anonymous_username", "anonymous").encode(),
                    username_from_cert=settings.get("auth_ssl_username_from_cert") == "yes",
                )
                daemon.feed(b"VERSION\t1\t2\nCPID\t4242\n")
            data = unescape(rest)
            if directive == "C>":
                daemon.feed(data)
                continue
            got = bytes(daemon.output[: len(data)])
            assert got == data, f"{where}: expected {data!r}, server sent {bytes(daemon.output)!r}"
            del daemon.output[: len(data)]
            matched += 1
        else:
            raise AssertionError(f"{where}: unknown line {line!r}")
    assert daemon is not None and not daemon.output, f"{name}.txt: unexpected output {daemon and daemon.output!r}"
    return matched


def connect(*mechanisms: str, env: Environment | None = None, minor: int = 2) -> AuthClientServer:
    """A connection past its handshake, offering MECHANISMS (default: all of them)."""
    classes = [MECHANISMS[name] for name in mechanisms] if mechanisms else list(MECHANISMS.values())
    settings = HandshakeSettings(classes, spid=1, cuid=1, cookie=bytes(16), environment=env or Environment())
    conn = AuthClientServer(settings)
    conn.initiate()
    conn.receive_data(b"VERSION\t1\t%d\nCPID\t4242\n" % minor)
    conn.data_to_send()
    return conn


def fixed_env(random: bytes = bytes(64), clock: float = 1795304125.0, hostname: bytes = b"vm") -> Environment:
    """An environment whose random source repeats RANDOM (cut to the size asked for)."""
    return Environment(lambda count: (random * count)[:count], lambda: clock, hostname)

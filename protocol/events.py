"""Frozen events and value types shared by the protocol state machines.

Events flow from a protocol object to its caller: "the client wants this". Value
types (`Params`, `Field`) describe what goes on the wire in either direction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.escape import tab_escape


@dataclass(frozen=True, slots=True)
class Params:
    """Request parameters (`key=value` or bare `key`) in wire order, unescaped.

    Dovecot imports them one by one, so a key given twice takes its last value.
    """

    items: tuple[tuple[bytes, bytes], ...]

    def get(self, key: bytes) -> bytes | None:
        found = None
        for name, value in self.items:
            if name == key:
                found = value
        return found

    def has(self, key: bytes) -> bool:
        return any(name == key for name, _ in self.items)

    @property
    def service(self) -> bytes | None:
        """`service=`, or `protocol=` as Dovecot 2.4 clients send it."""
        service = self.get(b"service")
        return service if service is not None else self.get(b"protocol")

    @staticmethod
    def parse(fields: list[bytes]) -> Params:
        items = []
        for field in fields:
            key, sep, value = field.partition(b"=")
            items.append((key, value if sep else b""))
        return Params(tuple(items))


@dataclass(frozen=True, slots=True)
class Field:
    """One reply field. `value=None` renders a bare key; `hidden` fields are never sent.

    Hidden fields still count for Dovecot 2.3's quirk of ending an OK line with an
    empty field when a passdb returned only hidden fields.
    """

    key: bytes
    value: bytes | None = None
    hidden: bool = False

    def wire(self) -> bytes:
        """`key=escaped value`, or the bare key."""
        if self.value is None:
            return self.key
        return self.key + b"=" + tab_escape(self.value)


class PassdbVerdict(enum.Enum):
    """What a password check or credentials lookup told the mechanism."""

    OK = "ok"
    FAILED = "failed"
    INTERNAL_FAILURE = "internal_failure"


# --- auth-client events -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientConnected:
    """The handshake finished: the client sent VERSION and CPID."""

    pid: int
    minor_version: int


@dataclass(frozen=True, slots=True)
class AuthStarted:
    """A new AUTH request. Call `begin()` (after any penalty wait) to run the mechanism."""

    request_id: int
    mechanism: str
    params: Params


@dataclass(frozen=True, slots=True)
class UsernameReceived:
    """Set the user name (auth_request_set_username) and answer with `username_result()`.

    LOGIN sends it before its password prompt; SCRAM and OAuth send it only before a
    failure that Dovecot reports with this `user=`.
    """

    request_id: int
    username: bytes


@dataclass(frozen=True, slots=True)
class PasswordReceived:
    """Set the user name, then verify this plaintext password. Answer with `password_result()`.

    OAUTHBEARER and XOAUTH2 send the bearer token as the password. EXTERNAL sends an
    empty user name and password: like Dovecot, set the empty name, which the
    certificate's user name overrides (so `original_user` becomes empty), then verify.
    A non-empty `authzid` asks to log in as that user (auth_request_set_login_username).
    """

    request_id: int
    username: bytes
    password: bytes
    authzid: bytes


@dataclass(frozen=True, slots=True)
class CredentialsWanted:
    """Set the user name, look up its credentials in `scheme`; answer with `credentials_result()`.

    Hand over the credentials as passdb_get_credentials() produces them: decoded, and
    converted from a plaintext password (authd.passwords.credentials()). CRAM-MD5 wants
    the 32-byte HMAC-MD5 context, SCRAM-SHA-1/-256 `iterations,salt,StoredKey,ServerKey`
    with the three values in base64. A non-empty `authzid` asks to log in as that user.
    """

    request_id: int
    username: bytes
    scheme: str
    authzid: bytes


@dataclass(frozen=True, slots=True)
class CertUsernameWanted:
    """EXTERNAL: does the request have a user name from the TLS client certificate?

    That is `cert_username=` from the AUTH line, honoured only with
    auth_ssl_username_from_cert. Answer with `cert_username_result()`.
    """

    request_id: int


@dataclass(frozen=True, slots=True)
class AnonymousLoggedIn:
    """ANONYMOUS succeeded without any passdb: set the user to the anonymous user name
    (no checks or translations), count the passdb as successful, then call `succeed()`.

    `trace` is what the client sent (NULs included), for the log only.
    """

    request_id: int
    trace: bytes


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The mechanism finished successfully; reply with `succeed()`."""

    request_id: int


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """The mechanism failed; reply with `fail()` after the failure delay."""

    request_id: int
    reason: str
    internal: bool = False


@dataclass(frozen=True, slots=True)
class RequestDropped:
    """The protocol removed the request (cancel, timeout, protocol error). Forget it."""

    request_id: int
    reason: str


ClientEvent = (
    ClientConnected
    | AuthStarted
    | UsernameReceived
    | PasswordReceived
    | CredentialsWanted
    | CertUsernameWanted
    | AnonymousLoggedIn
    | Authenticated
    | AuthFailed
    | RequestDropped
)

"""The step types mechanisms return, the environment they see and the base class they share."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from protocol.errors import UsageError
from protocol.events import PassdbVerdict


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send `CONT` with this (raw, not yet base64) data and wait for the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NeedUsername:
    """Ask the caller to set (and so check) the user name before the mechanism goes on.

    LOGIN asks before its password prompt; SCRAM and the OAuth mechanisms ask only when
    they are about to fail after Dovecot has already set the name, because that name
    then shows up as `user=` in the FAIL line.
    """

    username: bytes


@dataclass(frozen=True, slots=True)
class NeedPassword:
    """Ask the caller to set the user name, then verify a plaintext password.

    EXTERNAL sends an empty user name, as Dovecot does: the name from the client
    certificate, set when the request began, overrides it.
    """

    username: bytes
    password: bytes
    authzid: bytes = b""


@dataclass(frozen=True, slots=True)
class NeedCredentials:
    """Ask the caller for the user's credentials in a scheme."""

    username: bytes
    scheme: str
    authzid: bytes = b""


@dataclass(frozen=True, slots=True)
class NeedCertUsername:
    """EXTERNAL: ask whether the request has a user name from the TLS client certificate."""


@dataclass(frozen=True, slots=True)
class AnonymousLogin:
    """ANONYMOUS finished: the caller logs in the anonymous user; `trace` is only for the log."""

    trace: bytes


@dataclass(frozen=True, slots=True)
class Success:
    """Authentication succeeded; `server_final` is the last SASL message, if any."""

    server_final: bytes = b""


@dataclass(frozen=True, slots=True)
class Failure:
    """Authentication failed. `internal` marks a temporary (backend) failure."""

    reason: str
    internal: bool = False


Step = Challenge | NeedUsername | NeedPassword | NeedCredentials | NeedCertUsername | AnonymousLogin | Success | Failure


@dataclass(frozen=True, slots=True)
class Environment:
    """What mechanisms take from the world outside the connection; tests pass fixed ones.

    `random_bytes(n)` feeds the CRAM-MD5 challenge and the SCRAM server nonce, `clock`
    (Unix time) and `hostname` the CRAM-MD5 challenge, as Dovecot's my_hostname.
    """

    random_bytes: Callable[[int], bytes] = os.urandom
    clock: Callable[[], float] = time.time
    hostname: bytes = field(default_factory=lambda: socket.gethostname().encode())


class Mechanism:
    """Base class: one instance per authentication request."""

    name: ClassVar[str]
    #: The MECH line flags, in Dovecot's fixed order.
    flags: ClassVar[tuple[str, ...]] = ()
    #: Mechanisms without MECH_SEC_ALLOW_NULS fail on any NUL in client data.
    allows_nuls: ClassVar[bool] = False

    def __init__(self, env: Environment) -> None:
        self.env = env

    def initial(self, data: bytes | None) -> Step:
        """Start the exchange; None means the AUTH line had no initial response."""
        if data is None:
            return Challenge(b"")
        return self.step(data)

    def step(self, data: bytes) -> Step:
        raise NotImplementedError

    def username_result(self, accepted: bool) -> Step:
        raise UsageError(f"{self.name} never asks about user names")

    def password_result(self, verdict: PassdbVerdict) -> Step:
        if verdict is PassdbVerdict.OK:
            return Success()
        return verdict_failure(verdict)

    def credentials_result(self, verdict: PassdbVerdict, credentials: bytes) -> Step:
        raise UsageError(f"{self.name} never looks up credentials")

    def cert_username_result(self, known: bool) -> Step:
        raise UsageError(f"{self.name} never asks about certificate user names")


def verdict_failure(verdict: PassdbVerdict) -> Failure:
    """The Failure for a passdb answer that is not OK (what auth_request_fail/internal_failure mean)."""
    if verdict is PassdbVerdict.INTERNAL_FAILURE:
        return Failure("internal failure", internal=True)
    return Failure("authentication failed")

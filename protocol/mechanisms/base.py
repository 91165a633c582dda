"""The step types mechanisms return and the base class they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocol.errors import UsageError
from protocol.events import PassdbVerdict


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send `CONT` with this (raw, not yet base64) data and wait for the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NeedUsername:
    """Ask the caller to accept the user name before going on."""

    username: bytes


@dataclass(frozen=True, slots=True)
class NeedPassword:
    """Ask the caller to verify a plaintext password."""

    username: bytes | None
    password: bytes
    authzid: bytes = b""


@dataclass(frozen=True, slots=True)
class NeedCredentials:
    """Ask the caller for the user's credentials in a scheme."""

    username: bytes
    scheme: str
    authzid: bytes = b""


@dataclass(frozen=True, slots=True)
class Success:
    """Authentication succeeded; `server_final` is the last SASL message, if any."""

    server_final: bytes = b""


@dataclass(frozen=True, slots=True)
class Failure:
    """Authentication failed. `internal` marks a temporary (backend) failure."""

    reason: str
    internal: bool = False


Step = Challenge | NeedUsername | NeedPassword | NeedCredentials | Success | Failure


class Mechanism:
    """Base class: one instance per authentication request."""

    name: ClassVar[str]
    #: The MECH line flags, in Dovecot's fixed order.
    flags: ClassVar[tuple[str, ...]] = ()
    #: Mechanisms without MECH_SEC_ALLOW_NULS fail on any NUL in client data.
    allows_nuls: ClassVar[bool] = False

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
        if verdict is PassdbVerdict.INTERNAL_FAILURE:
            return Failure("internal failure", internal=True)
        return Failure("authentication failed")

    def credentials_result(self, verdict: PassdbVerdict, credentials: bytes) -> Step:
        raise UsageError(f"{self.name} never looks up credentials")

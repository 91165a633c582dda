"""OAUTHBEARER (RFC 7628) and XOAUTH2, as Dovecot 2.3's mech-oauth2.c.

The bearer token is checked like a password: the caller verifies it as the user's
plaintext password (an oauth2-aware passdb or script does the introspection). A
rejected token does not fail at once: the server sends a JSON error as a challenge,
which the client must acknowledge, and the next client message of any content fails
the request. Dovecot 2.3 does this extra round even with final-resp-ok.
"""

from __future__ import annotations

from typing import ClassVar

from protocol.events import PassdbVerdict
from protocol.mechanisms.base import (
    Challenge,
    Environment,
    Failure,
    Mechanism,
    NeedPassword,
    NeedUsername,
    Step,
    Success,
    verdict_failure,
)
from protocol.mechanisms.gs2 import unescape_saslname


def parse_bearer(value: bytes) -> bytes | None:
    """The token of an `auth=` value: `Bearer ` in any case, then at least one byte, no CR or LF."""
    token = value[7:]
    if value[:7].lower() != b"bearer " or not token or b"\r" in token or b"\n" in token:
        return None
    return token


class _OAuth2(Mechanism):
    flags = ("plaintext",)
    #: The challenge that tells the client its token was rejected.
    error_json: ClassVar[bytes]
    #: What Dovecot logs when the user name or the token is missing.
    missing: ClassVar[str]

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self._rejected = False

    def step(self, data: bytes) -> Step:
        if self._rejected:
            return Failure("authentication failed")
        parsed = self.parse(data)
        if isinstance(parsed, Failure):
            return parsed
        username, token = parsed
        if username is None:
            return Failure(self.missing)
        if token is None:
            # Dovecot sets the user name before noticing the token is missing, so
            # the FAIL carries it.
            return NeedUsername(username)
        return NeedPassword(username, token)

    def parse(self, data: bytes) -> tuple[bytes | None, bytes | None] | Failure:
        """User name and token, either possibly missing, or a Failure for malformed data."""
        raise NotImplementedError

    def username_result(self, accepted: bool) -> Step:
        """Only asked before failing on a missing token (see `step`)."""
        return Failure(self.missing if accepted else "invalid user name")

    def password_result(self, verdict: PassdbVerdict) -> Step:
        if verdict is PassdbVerdict.OK:
            return Success()
        if verdict is PassdbVerdict.INTERNAL_FAILURE:
            return verdict_failure(verdict)
        self._rejected = True
        return Challenge(self.error_json)


class OAuthBearer(_OAuth2):
    """`gs2-header \\x01 key=value \\x01 ... \\x01 \\x01`; the user name is the gs2 authzid."""

    name = "OAUTHBEARER"
    error_json = b'{"status":"invalid_token"}'
    missing = "Missing username or token"

    def parse(self, data: bytes) -> tuple[bytes | None, bytes | None] | Failure:
        fields = data.split(b"\x01")
        if not fields[0]:
            return Failure("Invalid continued data")
        username = None
        for item in fields[0].split(b","):
            kind = item[:1]
            if not item or kind in (b"n", b"y"):
                continue
            if kind == b"f":
                return Failure("Client requested non-standard mechanism")
            if kind == b"p":
                return Failure("Client requested and used channel-binding")
            if kind != b"a":
                return Failure("Invalid gs2-header in request")
            unescaped = unescape_saslname(item[2:]) if item[1:2] == b"=" else None
            if unescaped is None:
                return Failure("Invalid username escaping")
            username = unescaped
        token = _find_token(fields)
        if isinstance(token, Failure):
            return token
        return username, token


class XOAuth2(_OAuth2):
    """`user=NAME \\x01 auth=Bearer TOKEN \\x01 \\x01`; the name is taken as is, unescaped."""

    name = "XOAUTH2"
    error_json = b'{"status":"401","schemes":"bearer","scope":"mail"}'
    missing = "Username or token missing"

    def parse(self, data: bytes) -> tuple[bytes | None, bytes | None] | Failure:
        fields = data.split(b"\x01")
        token = _find_token(fields)
        if isinstance(token, Failure):
            return token
        username = None
        for item in fields:
            if item.startswith(b"user="):
                username = item[5:]
        return username, token


def _find_token(fields: list[bytes]) -> bytes | Failure | None:
    """The last `auth=` field's token; any malformed `auth=` field fails. Other keys are ignored."""
    token = None
    for item in fields:
        if item.startswith(b"auth="):
            token = parse_bearer(item[5:])
            if token is None:
                return Failure("Invalid continued data")
    return token

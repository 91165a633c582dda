"""CRAM-MD5 (RFC 2195), as Dovecot 2.3's mech-cram-md5.c.

The server always opens with `<16 random digits.unixtime@hostname>` (an initial
response is ignored); the client answers `user SP hex-digest`. The check needs the
user's HMAC-MD5 context, so the caller looks up credentials in scheme CRAM-MD5.
"""

from __future__ import annotations

import hmac

from protocol.events import PassdbVerdict
from protocol.hmac_md5 import CRAM_MD5_CONTEXT_LEN, hmac_md5_from_cram_context
from protocol.mechanisms.base import (
    Challenge,
    Environment,
    Failure,
    Mechanism,
    NeedCredentials,
    Step,
    Success,
    verdict_failure,
)


class CramMD5(Mechanism):
    name = "CRAM-MD5"
    flags = ("dictionary", "active")

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self._challenge = b""
        self._response = b""

    def initial(self, data: bytes | None) -> Step:
        digits = bytes(ord("0") + byte % 10 for byte in self.env.random_bytes(16))
        self._challenge = b"<%s.%d@%s>" % (digits, int(self.env.clock()), self.env.hostname)
        return Challenge(self._challenge)

    def step(self, data: bytes) -> Step:
        # User names may contain spaces: the last one separates the digest.
        space = data.rfind(b" ")
        if space <= 0:
            return Failure("missing digest")
        self._response = data[space + 1 :]
        return NeedCredentials(data[:space], self.name)

    def credentials_result(self, verdict: PassdbVerdict, credentials: bytes) -> Step:
        if verdict is not PassdbVerdict.OK:
            return verdict_failure(verdict)
        if len(credentials) != CRAM_MD5_CONTEXT_LEN:
            return Failure("invalid credentials length")
        expected = hmac_md5_from_cram_context(credentials, self._challenge).hex().encode()
        # Dovecot compares exactly 32 bytes: anything after them is ignored, and
        # upper-case hex never matches.
        if not hmac.compare_digest(expected, self._response[: len(expected)]):
            return Failure("Password mismatch")
        return Success()

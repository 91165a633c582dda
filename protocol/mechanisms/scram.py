"""SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802), as Dovecot 2.3's mech-scram.c.

client-first -> credentials lookup -> server-first -> client-final -> `v=` server
signature, delivered through `Success.server_final` (inside OK with final-resp-ok,
otherwise as one more CONT round). Every failure is a plain FAIL: 2.3 never sends an
`e=` server-error message.

The -PLUS variants are not offered: channel binding needs auth protocol minor 3,
and authd announces minor 2 like Dovecot 2.3, so a `p=` gs2 flag is refused.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import ClassVar

from protocol.escape import b64decode_strict, b64encode
from protocol.events import PassdbVerdict
from protocol.mechanisms.base import (
    Challenge,
    Environment,
    Failure,
    Mechanism,
    NeedCredentials,
    NeedUsername,
    Step,
    Success,
    verdict_failure,
)
from protocol.mechanisms.gs2 import unescape_saslname

#: SCRAM_SERVER_NONCE_LEN
SERVER_NONCE_LEN = 64
#: The iteration counts Dovecot accepts in stored credentials.
MIN_ITERATIONS = 4096
MAX_ITERATIONS = 0x7FFFFFFF


def server_nonce(random: bytes) -> bytes:
    """Dovecot's s-nonce: printable '!'..'}' with ',' (not allowed in a nonce) made '~'."""
    nonce = bytes(ord("!") + byte % (ord("~") - ord("!")) for byte in random)
    return nonce.replace(b",", b"~")


class Scram(Mechanism):
    """The exchange, shared by both hash functions."""

    hash_name: ClassVar[str]
    flags = ("mutual-auth",)

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self._digest_size = hashlib.new(self.hash_name).digest_size
        self._gs2_header = b""
        self._first_bare = b""
        self._client_nonce = b""
        self._server_first = b""
        self._server_nonce = b""
        self._stored_key = b""
        self._server_key = b""

    def step(self, data: bytes) -> Step:
        # The connection takes client data only after a challenge: the first one is
        # sent before client-first (or none, with an initial response), the second is
        # server-first.
        if not self._server_first:
            return self._client_first(data)
        return self._client_final(data)

    # --- client-first ------------------------------------------------------------

    def _client_first(self, data: bytes) -> Step:
        cbind_flag, sep, rest = data.partition(b",")
        if not sep:
            return Failure("Invalid initial client message: Missing first ',' in GS2 header")
        authzid_field, sep, bare = rest.partition(b",")
        if not sep:
            return Failure("Invalid initial client message: Missing second ',' in GS2 header")
        fields = bare.split(b",")
        if len(fields) < 2:
            return Failure("Invalid initial client message: Missing nonce field")
        username_field, nonce_field = fields[0], fields[1]
        if cbind_flag[:1] == b"p":
            return Failure("Channel binding not supported")
        if cbind_flag[:1] not in (b"n", b"y"):
            return Failure("Invalid GS2 header")
        authzid = b""
        if authzid_field.startswith(b"a="):
            unescaped = unescape_saslname(authzid_field[2:])
            if unescaped is None:
                return Failure("authzid escaping is invalid")
            authzid = unescaped
        elif authzid_field:
            return Failure("Invalid authzid field")
        if username_field[:1] == b"m":
            return Failure("Mandatory extension(s) not supported")
        if not username_field.startswith(b"n="):
            return Failure("Invalid username field")
        username = unescape_saslname(username_field[2:])
        if username is None:
            return Failure("Username escaping is invalid")
        if not nonce_field.startswith(b"r="):
            # Dovecot has set the user name by now, so the FAIL carries it.
            return NeedUsername(username)
        self._gs2_header = data[: len(data) - len(bare)]
        self._first_bare = bare
        self._client_nonce = nonce_field[2:]
        return NeedCredentials(username, self.name, authzid)

    def username_result(self, accepted: bool) -> Step:
        """Only asked before failing on a bad nonce (see `_client_first`)."""
        return Failure("Invalid client nonce" if accepted else "invalid user name")

    # --- server-first ------------------------------------------------------------

    def credentials_result(self, verdict: PassdbVerdict, credentials: bytes) -> Step:
        if verdict is not PassdbVerdict.OK:
            return verdict_failure(verdict)
        parsed = self._parse_credentials(credentials.split(b"\x00", 1)[0])
        if isinstance(parsed, Failure):
            return parsed
        iterations, salt = parsed
        self._server_nonce = server_nonce(self.env.random_bytes(SERVER_NONCE_LEN))
        self._server_first = b"r=%s%s,s=%s,i=%d" % (self._client_nonce, self._server_nonce, salt, iterations)
        return Challenge(self._server_first)

    def _parse_credentials(self, credentials: bytes) -> tuple[int, bytes] | Failure:
        """scram_scheme_parse(): `iterations,salt,StoredKey,ServerKey`; the salt is passed on as is."""
        fields = credentials.split(b",")
        if len(fields) != 4:
            return Failure(f"Invalid {self.name} passdb entry format")
        iterations = int(fields[0]) if fields[0].isdigit() else 0
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            return Failure(f"Invalid {self.name} iteration count in passdb")
        keys = []
        for label, encoded in (("StoredKey", fields[2]), ("ServerKey", fields[3])):
            try:
                key = b64decode_strict(encoded)
            except ValueError:
                key = b""
            if len(key) != self._digest_size:
                return Failure(f"Invalid {self.name} {label} in passdb")
            keys.append(key)
        self._stored_key, self._server_key = keys
        return iterations, fields[1]

    # --- client-final ------------------------------------------------------------

    def _client_final(self, data: bytes) -> Step:
        fields = data.split(b",")
        if len(fields) < 3:
            return Failure("Invalid final client message")
        if fields[0] != b"c=" + b64encode(self._gs2_header):
            return Failure("Invalid channel binding data")
        if fields[1] != b"r=" + self._client_nonce + self._server_nonce:
            return Failure("Wrong nonce")
        proof_field = fields[-1]
        if proof_field[:1] != b"p":
            return Failure("Invalid ClientProof")
        try:
            proof = b64decode_strict(proof_field[2:])
        except ValueError:
            return Failure("Invalid base64 encoding")
        if len(proof) != self._digest_size:
            return Failure("Invalid ClientProof length")
        auth_message = b",".join([self._first_bare, self._server_first, *fields[:-1]])
        signature = hmac.digest(self._stored_key, auth_message, self.hash_name)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self.hash_name, client_key).digest(), self._stored_key):
            return Failure("Password mismatch")
        server_signature = hmac.digest(self._server_key, auth_message, self.hash_name)
        return Success(server_final=b"v=" + b64encode(server_signature))


class ScramSha1(Scram):
    name = "SCRAM-SHA-1"
    hash_name = "sha1"


class ScramSha256(Scram):
    name = "SCRAM-SHA-256"
    hash_name = "sha256"

"""protocol.mechanisms.cram_md5: CRAM-MD5 as Dovecot 2.3 (protocol.md §2.6)."""

from __future__ import annotations

import hmac

import pytest

from protocol.events import Authenticated, AuthFailed, CredentialsWanted, PassdbVerdict, RequestDropped
from protocol.hmac_md5 import cram_md5_context
from protocol.mechanisms import CramMD5
from protocol.mechanisms.base import Challenge, Failure, NeedCredentials, Success
from tests.protocol.replay import connect, fixed_env, replay

CHALLENGE = b"<5848487814836966.1795304125@vm>"
RANDOM = bytes.fromhex("05080408040807080104080306090606")
FRANK = cram_md5_context(b"frankpass")


@pytest.mark.parametrize("name", ["doc-cram-md5", "cram-md5"])
def test_transcripts(name: str) -> None:
    assert replay(name) > 0


def mechanism() -> CramMD5:
    return CramMD5(fixed_env(RANDOM))


def answered(response: bytes) -> CramMD5:
    mech = mechanism()
    assert mech.initial(None) == Challenge(CHALLENGE)
    assert mech.step(response) == NeedCredentials(response[: response.rfind(b" ")], "CRAM-MD5")
    return mech


def digest(password: bytes = b"frankpass") -> bytes:
    return hmac.digest(password, CHALLENGE, "md5").hex().encode()


def test_challenge_digits_are_random_bytes_modulo_10() -> None:
    mech = CramMD5(fixed_env(bytes(range(246, 256)) + bytes(range(6)), clock=7.9, hostname=b"mail.example"))
    assert mech.initial(None) == Challenge(b"<6789012345012345.7@mail.example>")


def test_initial_response_is_ignored() -> None:
    assert mechanism().initial(b"frank 0123") == Challenge(CHALLENGE)


def test_success_from_context() -> None:
    assert answered(b"frank " + digest()).credentials_result(PassdbVerdict.OK, FRANK) == Success()


def test_last_space_separates_the_digest() -> None:
    mech = answered(b"frank x " + digest())
    assert mech.credentials_result(PassdbVerdict.OK, FRANK) == Success()


@pytest.mark.parametrize("response", [b"frank" + b"0" * 32, b" frank" + b"0" * 32, b"", b" "])
def test_missing_digest(response: bytes) -> None:
    assert mechanism().step(response) == Failure("missing digest")


def test_only_32_characters_are_compared() -> None:
    mech = answered(b"frank " + digest() + b"trailing")
    assert mech.credentials_result(PassdbVerdict.OK, FRANK) == Success()


@pytest.mark.parametrize(
    "response",
    [digest().upper(), digest()[:31], digest(b"alicepass"), b""],
    ids=["upper-case", "short", "wrong", "empty"],
)
def test_mismatch(response: bytes) -> None:
    mech = answered(b"frank " + response)
    assert mech.credentials_result(PassdbVerdict.OK, FRANK) == Failure("Password mismatch")


@pytest.mark.parametrize("credentials", [b"", FRANK[:31], FRANK + b"x", b"frankpass"])
def test_credentials_must_be_a_32_byte_context(credentials: bytes) -> None:
    mech = answered(b"frank " + digest())
    assert mech.credentials_result(PassdbVerdict.OK, credentials) == Failure("invalid credentials length")


def test_passdb_failures() -> None:
    assert answered(b"frank " + digest()).credentials_result(PassdbVerdict.FAILED, b"") == Failure(
        "authentication failed"
    )
    assert answered(b"frank " + digest()).credentials_result(PassdbVerdict.INTERNAL_FAILURE, b"") == Failure(
        "internal failure", internal=True
    )


def test_through_the_connection() -> None:
    conn = connect("CRAM-MD5", env=fixed_env(RANDOM))
    conn.receive_data(b"AUTH\t1\tCRAM-MD5\tservice=imap\n")
    assert conn.begin(1) == []
    assert conn.data_to_send() == b"CONT\t1\tPDU4NDg0ODc4MTQ4MzY5NjYuMTc5NTMwNDEyNUB2bT4=\n"
    assert conn.receive_data(b"CONT\t1\tZnJhbmsgMzNiZDE4MzNhMmZjOGQ2YTNkZjI2OGEzMjJkOTM2Y2E=\n") == [
        CredentialsWanted(1, b"frank", "CRAM-MD5", b"")
    ]
    # A second answer before the credentials are in is not expected.
    assert conn.receive_data(b"CONT\t1\t\n") == [RequestDropped(1, "Unexpected continuation")]
    conn.data_to_send()
    conn.receive_data(b"AUTH\t2\tCRAM-MD5\tservice=imap\n")
    conn.begin(2)
    conn.receive_data(b"CONT\t2\tZnJhbmsgMzNiZDE4MzNhMmZjOGQ2YTNkZjI2OGEzMjJkOTM2Y2E=\n")
    assert conn.credentials_result(2, PassdbVerdict.OK, FRANK) == [Authenticated(2)]


def test_nul_fails_before_parsing() -> None:
    conn = connect("CRAM-MD5", env=fixed_env(RANDOM))
    conn.receive_data(b"AUTH\t1\tCRAM-MD5\tservice=imap\n")
    conn.begin(1)
    assert conn.receive_data(b"CONT\t1\tZnJhbmsAIDAw\n") == [AuthFailed(1, "Unexpected NUL in auth data")]

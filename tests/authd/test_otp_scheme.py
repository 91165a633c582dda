"""The OTP password scheme (Dovecot 2.3's password-scheme-otp.c + lib-otp): RFC 2289 vectors,
and what the real `doveadm pw` makes of the same entries, including the malformed ones."""

from __future__ import annotations

import re

import pytest

from authd.passwords import SCHEMES, VerifyResult, format_for_pw, verify
from tests.authd.test_passwords import MATCH, MISMATCH, doveadm_pw, doveadm_verdict

PHRASE = b"This is a test."
INVALID = VerifyResult(-1, "Invalid OTP data in passdb")

#: RFC 2289 appendix C (seed "TeSt"; lib-otp lowercases the seed as the RFC says).
ENTRIES = [
    (b"{OTP}md4 0 TeSt d1854218ebbb0b51", MATCH),
    (b"{OTP}md5 0 TeSt 9e876134d90499dd", MATCH),
    (b"{OTP}sha1 0 TeSt bb9e6ae1979d8ff4", MATCH),
    (b"{OTP}sha1 1 TeSt 63d936639734385b", MATCH),
    (b"{OTP}sha1 99 TeSt 87fec7768b73ccf9", MATCH),
    (b"{OTP}sha1 0 TeSt BB9E6AE1979D8FF4", MATCH),
    (b"{OTP}md5 99 TeSt 7cd34c1040add14b", MISMATCH),
    (b"{OTP}sha1 0 test  bb9e6ae1979d8ff4", MISMATCH),
    (b"{OTP}sha1 0 test bb9e 6ae1979d8ff4", MISMATCH),
    (b"{OTP}sha1 0 test bb9e6ae1979d8ff4 trailing", MISMATCH),
    (b"{OTP}sha1\t0\ttest bb9e6ae1979d8ff4", MISMATCH),
    (b"{OTP}sha1 00 test bb9e6ae1979d8ff4", MISMATCH),
    (b"{OTP}sha1 0  bb9e6ae1979d8ff4", MISMATCH),
    (b"{OTP}SHA1 0 test bb9e6ae1979d8ff4", INVALID),
    (b"{OTP}sha1 0 test bb9e6ae1979d8ff", INVALID),
    (b"{OTP}sha1 0 te-st bb9e6ae1979d8ff4", INVALID),
    (b"{OTP}sha1 0 abcdefghijklmnopq bb9e6ae1979d8ff4", INVALID),
    (b"{OTP}sha1 0 test\tbb9e6ae1979d8ff4", INVALID),
    (b"{OTP}sha1 x test bb9e6ae1979d8ff4", INVALID),
    (b"{OTP}sha1 0 test", INVALID),
]


@pytest.mark.parametrize(("stored", "expected"), ENTRIES)
def test_verify(stored: bytes, expected: VerifyResult) -> None:
    assert verify(PHRASE, stored) == expected


@pytest.mark.requires("doveadm")
@pytest.mark.parametrize(("stored", "expected"), ENTRIES)
def test_doveadm_agrees(stored: bytes, expected: VerifyResult) -> None:
    assert doveadm_verdict(stored, PHRASE) == expected


def test_generated_entry_shape() -> None:
    assert "OTP" in SCHEMES
    made = format_for_pw(b"secret", "otp")
    assert re.fullmatch(rb"\{OTP\}sha1 1024 [0-9a-f]{16} [0-9a-f]{16}", made)
    assert verify(b"secret", made) == MATCH
    assert verify(b"wrong", made) == MISMATCH


@pytest.mark.requires("doveadm")
def test_doveadm_verifies_ours_and_we_verify_doveadms() -> None:
    ours = format_for_pw(b"s3cret pass", "OTP")
    assert doveadm_verdict(ours, b"s3cret pass") == MATCH
    theirs = doveadm_pw("-s", "OTP", "-p", "s3cret pass").stdout.removesuffix(b"\n")
    assert re.fullmatch(rb"\{OTP\}sha1 1024 [0-9a-f]{16} [0-9a-f]{16}", theirs)
    assert verify(b"s3cret pass", theirs) == MATCH
    assert verify(b"other", theirs) == MISMATCH

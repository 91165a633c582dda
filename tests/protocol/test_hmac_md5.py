"""protocol.hmac_md5: HMAC-MD5 finished from Dovecot's stored CRAM-MD5 context."""

from __future__ import annotations

import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.hmac_md5 import cram_md5_context, hmac_md5_from_cram_context

# doveadm pw -s CRAM-MD5 -p frankpass
FRANK = bytes.fromhex("3325050039f67920243892fdaf38b2290d5fdcbd381c29e18964006d3bdf2abd")


def test_context_matches_doveadm() -> None:
    assert cram_md5_context(b"frankpass") == FRANK


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_finishing_the_context_is_hmac_md5(secret: bytes, message: bytes) -> None:
    # Secrets over 64 bytes are hashed first, as HMAC does.
    assert hmac_md5_from_cram_context(cram_md5_context(secret), message) == hmac.digest(secret, message, "md5")


def test_context_length_is_checked() -> None:
    with pytest.raises(ValueError):
        hmac_md5_from_cram_context(FRANK[:31], b"challenge")

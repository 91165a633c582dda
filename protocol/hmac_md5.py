"""HMAC-MD5 from the half-finished state Dovecot stores for CRAM-MD5.

A `{CRAM-MD5}` password is not a hash of the password but the MD5 chaining state
after the HMAC key blocks: four little-endian words after the outer pad block, then
four after the inner one (src/lib/hmac-cram-md5.c). Checking a CRAM-MD5 response
means finishing both hashes from those states, and hashlib cannot import an MD5
state, so the compression function is written out here (RFC 1321, section 3.4).
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Final

__all__ = ["CRAM_MD5_CONTEXT_LEN", "cram_md5_context", "hmac_md5_from_cram_context"]

#: CRAM_MD5_CONTEXTLEN: two MD5 states of four 32-bit words.
CRAM_MD5_CONTEXT_LEN: Final = 32

_MD5_INITIAL_STATE: Final = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFTS: Final = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_SINES: Final = tuple(int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64))

_MD5State = tuple[int, int, int, int]


def _md5_compress(state: _MD5State, block: bytes) -> _MD5State:
    """One application of the MD5 compression function to a 64-byte block."""
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for step in range(64):
        if step < 16:
            mixed, index = (b & c) | (~b & d), step
        elif step < 32:
            mixed, index = (d & b) | (~d & c), (5 * step + 1) % 16
        elif step < 48:
            mixed, index = b ^ c ^ d, (3 * step + 5) % 16
        else:
            mixed, index = c ^ (b | ~d), (7 * step) % 16
        total = (a + (mixed & 0xFFFFFFFF) + _MD5_SINES[step] + words[index]) & 0xFFFFFFFF
        shift = _MD5_SHIFTS[step]
        rotated = ((total << shift) | (total >> (32 - shift))) & 0xFFFFFFFF
        a, b, c, d = d, (b + rotated) & 0xFFFFFFFF, b, c
    return (
        (state[0] + a) & 0xFFFFFFFF,
        (state[1] + b) & 0xFFFFFFFF,
        (state[2] + c) & 0xFFFFFFFF,
        (state[3] + d) & 0xFFFFFFFF,
    )


def _md5_finish(state: _MD5State, data: bytes, already_hashed: int) -> bytes:
    """MD5 digest of `data`, continuing from `state` after `already_hashed` (a multiple of 64) bytes."""
    bit_length = ((already_hashed + len(data)) * 8) & 0xFFFFFFFFFFFFFFFF
    message = data + b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", bit_length)
    for offset in range(0, len(message), 64):
        state = _md5_compress(state, message[offset : offset + 64])
    return struct.pack("<4I", *state)


def cram_md5_context(secret: bytes) -> bytes:
    """The 32-byte context for `secret`, as hmac_md5_get_cram_context() (outer state first)."""
    if len(secret) > 64:
        secret = hashlib.md5(secret).digest()
    key = secret.ljust(64, b"\0")
    outer = _md5_compress(_MD5_INITIAL_STATE, bytes(byte ^ 0x5C for byte in key))
    inner = _md5_compress(_MD5_INITIAL_STATE, bytes(byte ^ 0x36 for byte in key))
    return struct.pack("<8I", *outer, *inner)


def hmac_md5_from_cram_context(context: bytes, message: bytes) -> bytes:
    """HMAC-MD5(secret, message) from the 32-byte context of `secret`, without the secret itself."""
    if len(context) != CRAM_MD5_CONTEXT_LEN:
        raise ValueError("CRAM-MD5 context must be 32 bytes")
    a, b, c, d, e, f, g, h = struct.unpack("<8I", context)
    return _md5_finish((a, b, c, d), _md5_finish((e, f, g, h), message, 64), 64)

"""PLAIN (RFC 4616): `authzid NUL authcid NUL password`, exactly two NULs."""

from __future__ import annotations

from protocol.mechanisms.base import Failure, Mechanism, NeedPassword, Step


class Plain(Mechanism):
    name = "PLAIN"
    flags = ("plaintext",)
    allows_nuls = True

    def step(self, data: bytes) -> Step:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return Failure("invalid input")
        authzid, authcid, password = parts
        if authzid == authcid:
            authzid = b""
        return NeedPassword(authcid, password, authzid)

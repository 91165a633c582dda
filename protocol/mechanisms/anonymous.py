"""ANONYMOUS (RFC 4505), as Dovecot 2.3's mech-anonymous.c.

Whatever the client sends (a trace string, NULs allowed) only goes to the log; the
user becomes auth_anonymous_username and no passdb is asked.
"""

from __future__ import annotations

from protocol.mechanisms.base import AnonymousLogin, Mechanism, Step


class Anonymous(Mechanism):
    name = "ANONYMOUS"
    flags = ("anonymous",)
    allows_nuls = True

    def step(self, data: bytes) -> Step:
        return AnonymousLogin(data)

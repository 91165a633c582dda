"""EXTERNAL (RFC 4422 appendix A), as Dovecot 2.3's mech-external.c.

The identity comes from outside SASL: the user name of the TLS client certificate,
which the login process passes as `cert_username=` and which counts only with
auth_ssl_username_from_cert. The client data is an optional authzid. With a known
user name Dovecot verifies an empty password, so the passdb must allow it
(`nopassword`).
"""

from __future__ import annotations

from protocol.mechanisms.base import Environment, Failure, Mechanism, NeedCertUsername, NeedPassword, Step


class External(Mechanism):
    name = "EXTERNAL"

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self._authzid = b""

    def step(self, data: bytes) -> Step:
        self._authzid = data
        return NeedCertUsername()

    def cert_username_result(self, known: bool) -> Step:
        if not known:
            return Failure("username not known")
        # An empty name, as Dovecot passes it: the certificate's name overrides it.
        return NeedPassword(b"", b"", self._authzid)

"""SASL mechanisms as small step machines, one module each.

A mechanism never verifies anything itself against a database: it tells the
connection what it needs (a password check, credentials in some scheme) and turns
the answers into challenges, success or failure.

No `-PLUS` (channel binding) variants: channel binding data travels in auth protocol
minor 3, and authd announces minor 2, as Dovecot 2.3 does.
"""

from __future__ import annotations

from protocol.mechanisms.anonymous import Anonymous
from protocol.mechanisms.base import Environment, Mechanism
from protocol.mechanisms.cram_md5 import CramMD5
from protocol.mechanisms.external import External
from protocol.mechanisms.login import Login
from protocol.mechanisms.oauth import OAuthBearer, XOAuth2
from protocol.mechanisms.plain import Plain
from protocol.mechanisms.scram import ScramSha1, ScramSha256

MECHANISMS: dict[str, type[Mechanism]] = {
    m.name: m for m in (Plain, Login, CramMD5, ScramSha1, ScramSha256, OAuthBearer, XOAuth2, External, Anonymous)
}

__all__ = [
    "MECHANISMS",
    "Anonymous",
    "CramMD5",
    "Environment",
    "External",
    "Login",
    "Mechanism",
    "OAuthBearer",
    "Plain",
    "ScramSha1",
    "ScramSha256",
    "XOAuth2",
]

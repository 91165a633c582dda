"""SASL mechanisms as small step machines, one module each.

A mechanism never verifies anything itself against a database: it tells the
connection what it needs (a password check, credentials in some scheme) and turns
the answers into challenges, success or failure.
"""

from __future__ import annotations

from protocol.mechanisms.base import Mechanism
from protocol.mechanisms.login import Login
from protocol.mechanisms.plain import Plain

MECHANISMS: dict[str, type[Mechanism]] = {m.name: m for m in (Plain, Login)}

__all__ = ["MECHANISMS", "Mechanism"]

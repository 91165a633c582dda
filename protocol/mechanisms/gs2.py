"""The RFC 5801/5802 `saslname` escaping SCRAM and OAUTHBEARER share."""

from __future__ import annotations

import re

_BAD_ESCAPE = re.compile(rb"=(?!2C|3D)|,")
_ESCAPE = re.compile(rb"=(2C|3D)")


def unescape_saslname(value: bytes) -> bytes | None:
    """`=2C` -> `,` and `=3D` -> `=`; None (the mechanism fails) for any other `=` or a raw `,`."""
    if _BAD_ESCAPE.search(value):
        return None
    return _ESCAPE.sub(lambda m: b"," if m.group(1) == b"2C" else b"=", value)

"""The two ways things go wrong, kept apart as h11 does.

`PeerError` means the other side broke the protocol; Dovecot reacts by closing the
connection, so the caller should log the message and disconnect. `UsageError` means
the calling code misused a protocol object: a bug on our side, never the peer's.
"""


class PeerError(Exception):
    """The peer sent something Dovecot would drop the connection for."""


class LineTooLong(PeerError):
    """The peer sent more than the protocol's line limit without a newline."""


class UsageError(Exception):
    """The caller used a protocol object in a way its contract forbids."""

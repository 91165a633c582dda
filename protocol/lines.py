"""A bounded line buffer, like h11's ReceiveBuffer but for LF-terminated lines.

Dovecot reads each protocol with a fixed input buffer (16384 bytes for
auth-client, 1024 for auth-master); a line that does not fit is a reason to drop
the connection. The buffer remembers how far it already searched, so feeding data
in small pieces stays linear.
"""

from __future__ import annotations

from protocol.errors import LineTooLong


class LineBuffer:
    """Collects bytes and returns complete lines without their LF."""

    def __init__(self, max_line_length: int) -> None:
        self._max = max_line_length
        self._data = bytearray()
        self._searched = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._data += data

    def next_line(self) -> bytes | None:
        """Return the next complete line, or None if more data is needed.

        Raises LineTooLong when the pending line cannot fit in the buffer Dovecot
        would use (the limit counts the LF, as Dovecot's istream does).
        """
        end = self._data.find(b"\n", self._searched)
        if end < 0:
            self._searched = len(self._data)
            if len(self._data) >= self._max:
                raise LineTooLong(f"sent more than {self._max} bytes without a newline")
            return None
        if end >= self._max:
            raise LineTooLong(f"sent a line longer than {self._max} bytes")
        line = bytes(self._data[:end])
        del self._data[: end + 1]
        self._searched = 0
        return line

    @property
    def pending(self) -> int:
        """How many bytes are buffered without a complete line yet."""
        return len(self._data)

"""protocol.lines: bounded line framing."""

import pytest

from protocol.errors import LineTooLong
from protocol.lines import LineBuffer


def test_lines_split_across_feeds() -> None:
    buf = LineBuffer(100)
    buf.feed(b"VERS")
    assert buf.next_line() is None
    buf.feed(b"ION\t1\t2\nCPID\t4")
    assert buf.next_line() == b"VERSION\t1\t2"
    assert buf.next_line() is None
    buf.feed(b"2\n")
    assert buf.next_line() == b"CPID\t42"


def test_limit_counts_the_newline() -> None:
    buf = LineBuffer(16)
    buf.feed(b"x" * 15 + b"\n")
    assert buf.next_line() == b"x" * 15
    buf.feed(b"y" * 16 + b"\n")
    with pytest.raises(LineTooLong):
        buf.next_line()


def test_limit_without_newline() -> None:
    buf = LineBuffer(16)
    buf.feed(b"z" * 15)
    assert buf.next_line() is None
    buf.feed(b"z")
    with pytest.raises(LineTooLong):
        buf.next_line()

"""protocol.escape: TAB-escaping and Dovecot's strict base64."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.escape import b64decode_strict, split_tabescaped, tab_escape, tab_unescape
from tests.protocol.replay import replay


def test_escapes_every_special_byte() -> None:
    assert tab_escape(b"a\tb\x01c\r\nd\x00") == b"a\x01tb\x011c\x01r\x01nd\x010"


def test_captured_username_escape() -> None:
    # protocol.md §1.2: user a<TAB>b<0x01>c in a FAIL reply
    assert b"user=" + tab_escape(b"a\tb\x01c") == b"user=a\x01tb\x011c"


def test_unescape_rules() -> None:
    assert tab_unescape(b"a\x01tb\x011c\x01r\x01n\x010") == b"a\tb\x01c\r\n\x00"
    assert tab_unescape(b"x\x01zy") == b"xzy"  # unknown escape: the byte itself
    assert tab_unescape(b"abc\x01") == b"abc"  # lone trailing escape dropped


def test_split_happens_before_unescape() -> None:
    assert split_tabescaped(b"a\x01tb\tc") == [b"a\tb", b"c"]


@given(st.binary())
def test_escape_round_trip(value: bytes) -> None:
    escaped = tab_escape(value)
    assert not any(c in escaped for c in b"\t\r\n\x00")
    assert tab_unescape(escaped) == value


@given(st.lists(st.binary(), min_size=1))
def test_fields_round_trip(fields: list[bytes]) -> None:
    line = b"\t".join(tab_escape(f) for f in fields)
    assert split_tabescaped(line) == fields


@pytest.mark.parametrize(
    ("data", "decoded"),
    [
        (b"", b""),
        (b"YWxpY2U=", b"alice"),
        (b"YWxp Y2U=", b"alice"),  # whitespace is ignored
        (b"AGFsaWNlAGFsaWNlcGFzcw==", b"\x00alice\x00alicepass"),
        (b"YQ= =\r\n", b"a"),  # even inside and after the padding
        (b"YR==", b"a"),  # unused bits are not checked
    ],
)
def test_base64_accepts(data: bytes, decoded: bytes) -> None:
    assert b64decode_strict(data) == decoded


@pytest.mark.parametrize(
    "data",
    [
        b"AGFsaWNlAGFsaWNlcGFzcw",  # missing padding
        b"AB===",  # superfluous padding
        b"AB==CD==",  # data after padding
        b"!!!notbase64",
        b"@@@",
        b"=",
        b"A",
        b"YWJj=",  # padding after a complete quantum (Python's strict mode takes it)
        b"YWJj==",
        b"YQ=",
    ],
)
def test_base64_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        b64decode_strict(data)


def test_base64_on_the_wire_like_dovecot() -> None:
    # transcripts/base64.txt, captured from Dovecot 2.3.19.1
    assert replay("base64") == 5

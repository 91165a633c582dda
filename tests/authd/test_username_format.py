"""The username_format fast path gives exactly what the general var_expand gives."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authd.auth_request import AuthRequest, UsernameError, UsernameRules
from authd.username_format import compile_username_format
from lua_api.request_vars import RequestVars
from lua_api.var_expand import ExpandContext, expand_username_format

SIMPLE_FORMATS = [b"%Lu", b"%u", b"%Uu", b"%n", b"%Ln", b"%d", b"%Ld", b"%n@%d", b"%Ln@%Ld", b"%d/%n", b"x%u-y"]
#: Formats the fast path leaves to var_expand (long names, functions, widths, stray '%', NUL, two modifiers).
GENERAL_FORMATS = [b"%{user}", b"%LLu", b"%2.3u", b"%u%", b"%%u", b"%Ls", b"%Lu\x00x", b"%n@%{if;%d;eq;;x;%d}", b"%U"]

VARS = RequestVars(user=b"ignored", service=b"imap", original_user=b"Orig@Example.COM", remote_ip=b"192.0.2.1")
NAMES = st.binary(max_size=12) | st.lists(st.sampled_from([b"a", b"B", b"@", b"\x00", b"\xc4", b".", b"Z"])).map(
    b"".join
)


@pytest.mark.parametrize("fmt", SIMPLE_FORMATS)
@given(name=NAMES)
def test_fast_path_matches_var_expand(fmt: bytes, name: bytes) -> None:
    formatter = compile_username_format(fmt)
    assert formatter is not None
    assert formatter(name) == expand_username_format(fmt, name, VARS, ExpandContext())


@pytest.mark.parametrize("fmt", GENERAL_FORMATS)
def test_other_formats_use_var_expand(fmt: bytes) -> None:
    assert compile_username_format(fmt) is None


@pytest.mark.parametrize(
    ("fmt", "name", "expected"),
    [
        (b"%Lu", b"John@EXAMPLE.com", b"john@example.com"),
        (b"%n@%d", b"plain", b"plain@"),
        (b"%Ln@%Ld", b"A@B@C", b"a@b@c"),
        (b"%u", b"cut\x00here", b"cut"),
        (b"%d", b"x@dom\x00ain", b"dom"),
    ],
)
def test_fast_path_examples(fmt: bytes, name: bytes, expected: bytes) -> None:
    formatter = compile_username_format(fmt)
    assert formatter is not None
    assert formatter(name) == expected


@given(
    name=st.binary(max_size=10),
    chars=st.sampled_from(["", "abc@.", "abcdefghijklmnopqrstuvwxyz@"]),
    translation=st.sampled_from(["", "#@", "A@ab", "aXaY"]),
)
def test_translation_and_allowed_chars(name: bytes, chars: str, translation: str) -> None:
    """fix_username's table-driven checks against the byte-by-byte rule they replace."""
    rules = UsernameRules(chars=chars, translation=translation, format="")
    raw = translation.encode()
    mapping = {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
    allowed = set(chars.encode()) if chars else None
    expected: bytes | str = b""
    for byte in name:
        byte = mapping.get(byte, byte)
        if allowed is not None and byte not in allowed:
            shown = name[:128].decode("utf-8", "replace")
            expected = f"Username character disallowed by auth_username_chars: 0x{byte:02x} (username: {shown})"
            break
        assert isinstance(expected, bytes)
        expected += bytes([byte])
    if expected == b"":
        expected = "Empty username"
    try:
        got: bytes | str = AuthRequest(rules).fix_username(name)
    except UsernameError as exc:
        got = str(exc)
    assert got == expected


def test_empty_format_leaves_the_name_alone() -> None:
    assert AuthRequest(UsernameRules(format="")).fix_username(b"MiXed") == b"MiXed"


def test_general_format_still_expands() -> None:
    req = AuthRequest(UsernameRules(format="%Lu.%{service}"), service=b"imap")
    assert req.fix_username(b"Bob") == b"bob.imap"

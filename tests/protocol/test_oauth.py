"""protocol.mechanisms.oauth: OAUTHBEARER and XOAUTH2 as Dovecot 2.3 (protocol.md §2.8)."""

from __future__ import annotations

import base64

import pytest

from protocol.events import AuthFailed, PassdbVerdict, PasswordReceived
from protocol.mechanisms import OAuthBearer, XOAuth2
from protocol.mechanisms.base import Challenge, Environment, Failure, NeedPassword, NeedUsername, Success
from protocol.mechanisms.oauth import parse_bearer
from tests.protocol.replay import connect, replay

INVALID_TOKEN = b'{"status":"invalid_token"}'
XOAUTH2_401 = b'{"status":"401","schemes":"bearer","scope":"mail"}'


@pytest.mark.parametrize("name", ["doc-oauth", "oauth"])
def test_transcripts(name: str) -> None:
    assert replay(name) > 0


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bEaReR abc def", b"abc def"),
        (b"Bearer  x", b" x"),
        (b"Bearer ", None),
        (b"Bearer", None),
        (b"Basic abc", None),
        (b"Bearer a\rb", None),
        (b"Bearer a\nb", None),
        (b"Bearerxabc", None),
    ],
)
def test_parse_bearer(value: bytes, token: bytes | None) -> None:
    assert parse_bearer(value) == token


@pytest.mark.parametrize(
    ("data", "step"),
    [
        (b"n,a=alice,\x01host=h\x01port=143\x01auth=Bearer tok\x01\x01", NeedPassword(b"alice", b"tok")),
        (b"y,a=alice,\x01auth=Bearer tok", NeedPassword(b"alice", b"tok")),
        (b"n,a=al=2Cice=3D,\x01auth=Bearer tok\x01\x01", NeedPassword(b"al,ice=", b"tok")),
        (b"a=bob,n,a=alice\x01auth=Bearer tok", NeedPassword(b"alice", b"tok")),  # the last a= wins
        (b"nope,,a=alice\x01auth=Bearer tok", NeedPassword(b"alice", b"tok")),  # first letters only
        (b"n,a=alice,\x01auth=Bearer a\x01auth=Bearer b\x01\x01", NeedPassword(b"alice", b"b")),
        (b"n,a=alice,\x01\x01", NeedUsername(b"alice")),
        (b"n,a=,\x01\x01", NeedUsername(b"")),
        (b"", Failure("Invalid continued data")),
        (b"\x01auth=Bearer tok\x01\x01", Failure("Invalid continued data")),
        (b"n,,\x01auth=Bearer tok\x01\x01", Failure("Missing username or token")),
        (b",\x01auth=Bearer tok\x01\x01", Failure("Missing username or token")),
        (b"f,a=alice,\x01auth=Bearer tok", Failure("Client requested non-standard mechanism")),
        (b"p=tls-unique,a=alice,\x01auth=Bearer tok", Failure("Client requested and used channel-binding")),
        (b"n, a=alice,\x01auth=Bearer tok", Failure("Invalid gs2-header in request")),
        (b"n,alice,\x01auth=Bearer tok", Failure("Invalid username escaping")),
        (b"n,a=al=41ice,\x01auth=Bearer tok", Failure("Invalid username escaping")),
        (b"n,a=alice,\x01auth=Basic tok\x01\x01", Failure("Invalid continued data")),
        (b"n,a=alice,\x01auth=Bearer tok\x01auth=Bearer \x01\x01", Failure("Invalid continued data")),
    ],
)
def test_oauthbearer_parsing(data: bytes, step: object) -> None:
    assert OAuthBearer(Environment()).step(data) == step


@pytest.mark.parametrize(
    ("data", "step"),
    [
        (b"user=alice\x01auth=Bearer tok\x01\x01", NeedPassword(b"alice", b"tok")),
        (b"auth=bearer tok\x01user=al=2Cice", NeedPassword(b"al=2Cice", b"tok")),  # no unescaping
        (b"user=bob\x01user=alice\x01x=y\x01auth=Bearer tok", NeedPassword(b"alice", b"tok")),
        (b"user=\x01auth=Bearer tok", NeedPassword(b"", b"tok")),
        (b"user=alice\x01\x01", NeedUsername(b"alice")),
        (b"auth=Bearer tok\x01\x01", Failure("Username or token missing")),
        (b"", Failure("Username or token missing")),
        (b"user=alice\x01auth=Bearer\x01\x01", Failure("Invalid continued data")),
        (b"auth=Bearer \x01user=alice", Failure("Invalid continued data")),
    ],
)
def test_xoauth2_parsing(data: bytes, step: object) -> None:
    assert XOAuth2(Environment()).step(data) == step


@pytest.mark.parametrize(("mech_class", "error"), [(OAuthBearer, INVALID_TOKEN), (XOAuth2, XOAUTH2_401)])
def test_rejected_token_gets_an_error_challenge(mech_class: type[OAuthBearer], error: bytes) -> None:
    mech = mech_class(Environment())
    assert mech.password_result(PassdbVerdict.FAILED) == Challenge(error)
    assert mech.step(b"\x01") == Failure("authentication failed")


def test_missing_token_after_user_name_check() -> None:
    mech = XOAuth2(Environment())
    mech.step(b"user=alice")
    assert mech.username_result(True) == Failure("Username or token missing")
    assert mech.username_result(False) == Failure("invalid user name")


def test_verdicts() -> None:
    assert OAuthBearer(Environment()).password_result(PassdbVerdict.OK) == Success()
    assert OAuthBearer(Environment()).password_result(PassdbVerdict.INTERNAL_FAILURE) == Failure(
        "internal failure", internal=True
    )


def test_error_round_through_the_connection_even_with_final_resp_ok() -> None:
    conn = connect("OAUTHBEARER")
    resp = base64.b64encode(b"n,a=alice,\x01auth=Bearer badtoken\x01\x01")
    conn.receive_data(b"AUTH\t1\tOAUTHBEARER\tservice=imap\tfinal-resp-ok\tresp=" + resp + b"\n")
    assert conn.begin(1) == [PasswordReceived(1, b"alice", b"badtoken", b"")]
    assert conn.password_result(1, PassdbVerdict.FAILED) == []
    assert conn.data_to_send() == b"CONT\t1\teyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\n"
    assert conn.receive_data(b"CONT\t1\teHl6\n") == [AuthFailed(1, "authentication failed")]
    assert conn.fail(1, b"alice") == b"FAIL\t1\tuser=alice\n"


def test_internal_failure_through_the_connection() -> None:
    conn = connect("XOAUTH2")
    resp = base64.b64encode(b"user=alice\x01auth=Bearer tok\x01\x01")
    conn.receive_data(b"AUTH\t1\tXOAUTH2\tservice=imap\tresp=" + resp + b"\n")
    conn.begin(1)
    assert conn.password_result(1, PassdbVerdict.INTERNAL_FAILURE) == [AuthFailed(1, "internal failure", internal=True)]
    assert conn.fail(1, b"alice", code=b"temp_fail") == b"FAIL\t1\tuser=alice\tcode=temp_fail\n"


def test_token_size_is_limited_only_by_the_line() -> None:
    token = b"t" * 12000
    conn = connect("XOAUTH2")
    resp = base64.b64encode(b"user=alice\x01auth=Bearer " + token + b"\x01\x01")
    conn.receive_data(b"AUTH\t1\tXOAUTH2\tservice=imap\tresp=" + resp + b"\n")
    assert conn.begin(1) == [PasswordReceived(1, b"alice", token, b"")]

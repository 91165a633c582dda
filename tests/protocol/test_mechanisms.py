"""protocol.mechanisms: the registry, MECH flags, NUL rules, and robustness against any client data."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

import config.schema
from protocol.client import AuthClientServer, HandshakeSettings
from protocol.events import (
    AnonymousLoggedIn,
    Authenticated,
    AuthFailed,
    AuthStarted,
    CertUsernameWanted,
    ClientEvent,
    CredentialsWanted,
    PassdbVerdict,
    PasswordReceived,
    UsernameReceived,
)
from protocol.hmac_md5 import cram_md5_context
from protocol.mechanisms import MECHANISMS
from tests.protocol.replay import fixed_env

# The MECH lines of a Dovecot 2.3.19.1 with auth_mechanisms = plain login cram-md5 scram-sha-1
# scram-sha-256 oauthbearer xoauth2 external anonymous (tests/protocol/transcripts/capture.py).
DOVECOT_MECH_LINES = (
    b"MECH\tPLAIN\tplaintext\n"
    b"MECH\tLOGIN\tplaintext\n"
    b"MECH\tCRAM-MD5\tdictionary\tactive\n"
    b"MECH\tSCRAM-SHA-1\tmutual-auth\n"
    b"MECH\tSCRAM-SHA-256\tmutual-auth\n"
    b"MECH\tOAUTHBEARER\tplaintext\n"
    b"MECH\tXOAUTH2\tplaintext\n"
    b"MECH\tEXTERNAL\n"
    b"MECH\tANONYMOUS\tanonymous\n"
)


def test_mech_lines_match_dovecot() -> None:
    conn = AuthClientServer(HandshakeSettings(list(MECHANISMS.values()), spid=1, cuid=1, cookie=bytes(16)))
    conn.initiate()
    greeting = conn.data_to_send()
    assert greeting.startswith(b"VERSION\t1\t2\n" + DOVECOT_MECH_LINES + b"SPID\t")


def test_registry_names() -> None:
    assert all(name == mech.name for name, mech in MECHANISMS.items())
    assert sorted(MECHANISMS) == sorted(name.upper() for name in config.schema.MECHANISMS)
    assert [name for name, mech in MECHANISMS.items() if mech.allows_nuls] == ["PLAIN", "ANONYMOUS"]


# --- any client data yields steps or a Failure, never an exception ----------------------------------

_JUNK = st.binary(max_size=60)
_VERDICTS = st.sampled_from([PassdbVerdict.OK, PassdbVerdict.OK, *PassdbVerdict])
_TEXT = st.binary(max_size=6)
_SASLNAME = st.lists(st.sampled_from([b"erin", b"=2C", b"=3D", b"=", b"=2", b",", b"x"]), max_size=4).map(b"".join)
_BEARER = st.tuples(st.sampled_from([b"auth=Bearer ", b"auth=bEaReR ", b"auth=Basic ", b"auth="]), _TEXT).map(b"".join)
_TOKEN = st.binary(min_size=1, max_size=6).filter(lambda token: b"\r" not in token and b"\n" not in token)


def _joined(separator: bytes, *parts: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(st.one_of(*parts), max_size=5).map(separator.join)


def _scram(challenge: bytes, first: bytes) -> st.SearchStrategy[bytes]:
    if not challenge.startswith(b"r="):
        valid = st.tuples(st.sampled_from([b"n,,", b"y,,", b"n,a=erin,"]), _TEXT.map(b"n=erin,r=".__add__))
        mutated = st.tuples(
            st.sampled_from([b"n", b"y", b"p=tls-unique", b"x", b""]),
            st.one_of(st.just(b""), _SASLNAME.map(b"a=".__add__), _TEXT),
            st.one_of(_SASLNAME.map(b"n=".__add__), st.sampled_from([b"m=x", b""])),
            st.one_of(_TEXT.map(b"r=".__add__), _TEXT),
            _joined(b",", _TEXT),
        )
        return st.one_of(valid.map(b"".join), mutated.map(b",".join))
    # client-final for this server-first: right or wrong binding, nonce and proof
    gs2_header = first[: first.find(b",", first.find(b",") + 1) + 1]
    binding = b"c=" + base64.b64encode(gs2_header)
    nonce = challenge.split(b",")[0]
    proof = st.binary(min_size=20, max_size=32).map(lambda p: b"p=" + base64.b64encode(p))
    return st.tuples(
        st.sampled_from([binding, binding, b"c=biws", b"c="]),
        st.sampled_from([nonce, nonce, nonce + b"x", b"r="]),
        _joined(b",", st.sampled_from([b"x=1", b""])),
        st.one_of(proof, st.sampled_from([b"p", b"p=!!", b"x=1"])),
    ).map(lambda t: b",".join(part for part in t if part))


def _client_message(mech: str, challenge: bytes, first: bytes) -> st.SearchStrategy[bytes]:
    """Data near each mechanism's syntax (so the deeper checks run too), or plain junk.

    `challenge` is the server's last one, `first` the client's first message.
    """
    if mech.startswith("SCRAM"):
        message = _scram(challenge, first)
    elif mech == "OAUTHBEARER":
        valid = st.tuples(st.sampled_from([b"n,a=erin,", b"y,a=erin,"]), _TOKEN)
        valid_message = valid.map(lambda t: t[0] + b"\x01host=x\x01auth=Bearer " + t[1] + b"\x01\x01")
        gs2 = _joined(b",", st.sampled_from([b"n", b"y", b"p=x", b"f", b" a=x", b""]), _SASLNAME.map(b"a=".__add__))
        mutated = st.tuples(gs2, _joined(b"\x01", _BEARER, st.sampled_from([b"host=x", b""]))).map(b"\x01".join)
        message = st.one_of(valid_message, mutated)
    elif mech == "XOAUTH2":
        valid_message = _TOKEN.map(lambda token: b"user=erin\x01auth=Bearer " + token + b"\x01\x01")
        message = st.one_of(valid_message, _joined(b"\x01", _BEARER, _TEXT.map(b"user=".__add__), st.just(b"")))
    elif mech == "CRAM-MD5":
        digest = st.text("0123456789abcdefABCDEF", max_size=40).map(str.encode)
        message = st.tuples(_TEXT, st.sampled_from([b" ", b""]), digest).map(b"".join)
    else:
        message = _joined(b"\x00", _TEXT)
    return st.one_of(message, message, _JUNK)


def _credentials(scheme: str) -> st.SearchStrategy[bytes]:
    if scheme == "CRAM-MD5":
        valid = st.binary(max_size=20).map(cram_md5_context)
    else:
        size = 20 if scheme == "SCRAM-SHA-1" else 32
        key = st.binary(min_size=size, max_size=size).map(base64.b64encode)
        valid = st.tuples(st.integers(4090, 5000), st.binary(max_size=8).map(base64.b64encode), key, key).map(
            lambda t: b"%d,%s,%s,%s" % t
        )
    return st.one_of(valid, valid, _JUNK)


@settings(max_examples=1000)
@given(st.sampled_from(sorted(MECHANISMS)), st.booleans(), st.booleans(), st.data())
def test_any_client_data_only_yields_steps(
    mech: str, with_initial: bool, final_resp_ok: bool, data: st.DataObject
) -> None:
    conn = AuthClientServer(
        HandshakeSettings([MECHANISMS[mech]], spid=1, cuid=1, cookie=bytes(16), environment=fixed_env())
    )
    conn.initiate()
    conn.receive_data(b"VERSION\t1\t2\nCPID\t1\n")
    conn.data_to_send()
    line = b"AUTH\t1\t" + mech.encode() + b"\tservice=imap"
    if final_resp_ok:
        line += b"\tfinal-resp-ok"
    first = data.draw(_client_message(mech, b"", b""))
    if with_initial:
        line += b"\tresp=" + (base64.b64encode(first) or b"=")
    events: list[ClientEvent] = conn.receive_data(line + b"\n")
    first_sent = with_initial
    for _ in range(5):
        while events:
            event = events.pop(0)
            if isinstance(event, AuthStarted):
                events += conn.begin(1)
            elif isinstance(event, UsernameReceived):
                events += conn.username_result(1, data.draw(st.booleans()))
            elif isinstance(event, PasswordReceived):
                events += conn.password_result(1, data.draw(_VERDICTS))
            elif isinstance(event, CredentialsWanted):
                creds = data.draw(_credentials(event.scheme))
                events += conn.credentials_result(1, data.draw(_VERDICTS), creds)
            elif isinstance(event, CertUsernameWanted):
                events += conn.cert_username_result(1, data.draw(st.booleans()))
            elif isinstance(event, Authenticated | AnonymousLoggedIn):
                conn.succeed(1, b"user")
            elif isinstance(event, AuthFailed):
                assert conn.fail(1) is not None
            else:
                raise AssertionError(f"unexpected {event}")
        out = conn.data_to_send()
        if not out.startswith(b"CONT\t1\t"):
            assert out in (b"", b"OK\t1\tuser=user\n") or out.startswith(b"OK\t1\tuser=user\tresp="), out
            break
        challenge = base64.b64decode(out.split(b"\t")[2])
        # Without an initial response, `first` answers the empty challenge.
        message = data.draw(_client_message(mech, challenge, first)) if first_sent or challenge else first
        first_sent = True
        events = conn.receive_data(b"CONT\t1\t" + base64.b64encode(message) + b"\n")

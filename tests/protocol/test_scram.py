"""protocol.mechanisms.scram: SCRAM-SHA-1/-256 as Dovecot 2.3 (protocol.md §2.7)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from protocol.events import Authenticated, CredentialsWanted, PassdbVerdict
from protocol.mechanisms import ScramSha1, ScramSha256
from protocol.mechanisms.base import Challenge, Failure, NeedCredentials, NeedUsername, Step, Success
from protocol.mechanisms.scram import Scram, server_nonce
from tests.protocol.replay import connect, fixed_env, replay

# erin / erinpass, protocol.md §2.7
ERIN = (
    b"4096,8h0DZ4pyARdjelb8OYMOgg==,dKq3OAb78bdrpRZeTjqv/92Hn7RSLxX5heunb3fmUHE="
    b",SHI5o3Gqkyve0nIO7NJbouZNahHHu4YmvYxDSxawPpA="
)
FIRST = b"n,,n=erin,r=rOprNGfwEbeRWgbNEkqO"
RANDOM = bytes(range(64))
NONCE = server_nonce(RANDOM)


@pytest.mark.parametrize("name", ["doc-scram", "scram"])
def test_transcripts(name: str) -> None:
    assert replay(name) > 0


def test_server_nonce_alphabet() -> None:
    assert server_nonce(bytes([0, 11, 92, 93, 255])) == b"!~}!f"
    assert len(NONCE) == 64 and b"," not in NONCE


def client_final(
    first: bytes = FIRST, server_first: bytes = b"", password: bytes = b"erinpass", hash_name: str = "sha256"
) -> tuple[bytes, bytes]:
    """A correct client-final message for `server_first`, and the server-final it must bring."""
    gs2_end = first.index(b",", first.index(b",") + 1) + 1
    attrs = dict(item.split(b"=", 1) for item in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(hash_name, password, base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    without_proof = b"c=" + base64.b64encode(first[:gs2_end]) + b",r=" + attrs[b"r"]
    auth_message = first[gs2_end:] + b"," + server_first + b"," + without_proof
    signature = hmac.digest(hashlib.new(hash_name, client_key).digest(), auth_message, hash_name)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    server_final = b"v=" + base64.b64encode(hmac.digest(server_key, auth_message, hash_name))
    return without_proof + b",p=" + base64.b64encode(proof), server_final


def started(first: bytes = FIRST, credentials: bytes = ERIN, mech_class: type[Scram] = ScramSha256) -> Scram:
    """A mechanism that sent its server-first for `first`."""
    mech = mech_class(fixed_env(RANDOM))
    step = mech.initial(first)
    assert isinstance(step, NeedCredentials)
    challenge = mech.credentials_result(PassdbVerdict.OK, credentials)
    assert isinstance(challenge, Challenge)
    return mech


def server_first(mech: Scram, first: bytes = FIRST, credentials: bytes = ERIN) -> bytes:
    nonce = first.split(b"r=", 1)[1].split(b",")[0]
    iterations, salt = credentials.split(b",")[:2]
    return b"r=" + nonce + NONCE + b",s=" + salt + b",i=" + iterations


def test_exchange() -> None:
    mech = ScramSha256(fixed_env(RANDOM))
    assert mech.initial(FIRST) == NeedCredentials(b"erin", "SCRAM-SHA-256")
    first = server_first(mech)
    assert mech.credentials_result(PassdbVerdict.OK, ERIN) == Challenge(first)
    final, expected = client_final(server_first=first)
    assert mech.step(final) == Success(server_final=expected)


def test_sha1() -> None:
    # doveadm pw -s SCRAM-SHA-1 -p sampass
    sam = b"4096,ZUCWFSOIGkgkDcPO/3n6Qw==,oePk8/IBAwJbvtsc6/MX42fqcUI=,xox5DPNIvlCB73WXdCHSG82gJeU="
    first = b"n,,n=sam,r=abc"
    mech = started(first, sam, ScramSha1)
    final, expected = client_final(first, server_first(mech, first, sam), b"sampass", "sha1")
    assert mech.step(final) == Success(server_final=expected)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"", "Invalid initial client message: Missing first ',' in GS2 header"),
        (b"n", "Invalid initial client message: Missing first ',' in GS2 header"),
        (b"n,n=erin,r=abc", "Invalid initial client message: Missing nonce field"),
        (b"n,,n=erin", "Invalid initial client message: Missing nonce field"),
        (b"n,a=x", "Invalid initial client message: Missing second ',' in GS2 header"),
        (b"p=tls-unique,,n=erin,r=abc", "Channel binding not supported"),
        (b"x,,n=erin,r=abc", "Invalid GS2 header"),
        (b",,n=erin,r=abc", "Invalid GS2 header"),
        (b"n,a=bo=2,n=erin,r=abc", "authzid escaping is invalid"),
        (b"n,b=x,n=erin,r=abc", "Invalid authzid field"),
        (b"n,a,n=erin,r=abc", "Invalid authzid field"),
        (b"n,,m=ext,n=erin,r=abc", "Mandatory extension(s) not supported"),
        (b"n,,r=abc,n=erin", "Invalid username field"),
        (b"n,,n=er=2Xin,r=abc", "Username escaping is invalid"),
        (b"n,,n=erin=,r=abc", "Username escaping is invalid"),
    ],
)
def test_client_first_failures(first: bytes, reason: str) -> None:
    assert ScramSha256(fixed_env()).initial(first) == Failure(reason)


@pytest.mark.parametrize(
    ("first", "username", "authzid"),
    [
        (b"n,,n=erin,r=abc", b"erin", b""),
        (b"y,,n=erin,r=abc,x=ext", b"erin", b""),
        (b"nonsense,,n=erin,r=abc", b"erin", b""),  # only the first letter counts
        (b"n,a=bo=3Ds=2C,n=e=2Crin=3D,r=abc", b"e,rin=", b"bo=s,"),
        (b"n,,n=,r=", b"", b""),
    ],
)
def test_client_first_accepted(first: bytes, username: bytes, authzid: bytes) -> None:
    assert ScramSha256(fixed_env()).initial(first) == NeedCredentials(username, "SCRAM-SHA-256", authzid)


def test_bad_nonce_fails_after_the_user_name_is_set() -> None:
    # Dovecot sets the user name first, so its FAIL carries user= (transcripts/scram.txt).
    mech = ScramSha256(fixed_env())
    assert mech.initial(b"n,,n=erin,x=abc") == NeedUsername(b"erin")
    assert mech.username_result(True) == Failure("Invalid client nonce")
    mech = ScramSha256(fixed_env())
    mech.initial(b"n,,n=Er:in,x=abc")
    assert mech.username_result(False) == Failure("invalid user name")


@pytest.mark.parametrize(
    ("credentials", "reason"),
    [
        (b"4096,salt,key", "Invalid SCRAM-SHA-256 passdb entry format"),
        (ERIN + b",x", "Invalid SCRAM-SHA-256 passdb entry format"),
        (b"4095" + ERIN[4:], "Invalid SCRAM-SHA-256 iteration count in passdb"),
        (b"2147483648" + ERIN[4:], "Invalid SCRAM-SHA-256 iteration count in passdb"),
        (b"+4096" + ERIN[4:], "Invalid SCRAM-SHA-256 iteration count in passdb"),
        (b"4096,c2FsdA==,AAAA," + ERIN.rsplit(b",", 1)[1], "Invalid SCRAM-SHA-256 StoredKey in passdb"),
        (ERIN.rsplit(b",", 1)[0] + b",!!!!", "Invalid SCRAM-SHA-256 ServerKey in passdb"),
    ],
)
def test_bad_stored_credentials(credentials: bytes, reason: str) -> None:
    mech = ScramSha256(fixed_env())
    mech.initial(FIRST)
    assert mech.credentials_result(PassdbVerdict.OK, credentials) == Failure(reason)


def test_credentials_end_at_a_nul_and_the_salt_is_passed_on_as_is() -> None:
    credentials = b"5000,not base64!," + ERIN.split(b",", 2)[2]
    mech = ScramSha256(fixed_env(RANDOM))
    mech.initial(FIRST)
    step = mech.credentials_result(PassdbVerdict.OK, credentials + b"\x00,junk")
    assert step == Challenge(b"r=rOprNGfwEbeRWgbNEkqO" + NONCE + b",s=not base64!,i=5000")


def test_passdb_failures() -> None:
    for verdict, failure in [
        (PassdbVerdict.FAILED, Failure("authentication failed")),
        (PassdbVerdict.INTERNAL_FAILURE, Failure("internal failure", internal=True)),
    ]:
        mech = ScramSha256(fixed_env())
        mech.initial(FIRST)
        assert mech.credentials_result(verdict, b"") == failure


def final_step(build: bytes) -> Step:
    mech = started()
    final, _ = client_final(server_first=server_first(mech))
    without_proof, proof = final.rsplit(b",", 1)
    return mech.step(build.replace(b"WITHOUT", without_proof).replace(b"PROOF", proof))


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"WITHOUT", "Invalid final client message"),
        (b"", "Invalid final client message"),
        (b"c=eSws,r=x,PROOF", "Invalid channel binding data"),
        (b"WITHOUTx,PROOF", "Wrong nonce"),
        (b"WITHOUT,x=y", "Invalid ClientProof"),
        (b"WITHOUT,PROOF,x=y", "Invalid ClientProof"),
        (b"WITHOUT,p=!!!!", "Invalid base64 encoding"),
        (b"WITHOUT,p=AAAA", "Invalid ClientProof length"),
        (b"WITHOUT,p", "Invalid ClientProof length"),
        (b"WITHOUT,x=ext,PROOF", "Password mismatch"),  # the extension is part of AuthMessage
    ],
)
def test_client_final_failures(message: bytes, reason: str) -> None:
    assert final_step(message) == Failure(reason)


def test_proof_field_quirks() -> None:
    mech = started()
    final, expected = client_final(server_first=server_first(mech))
    # Dovecot checks only the first letter, decodes from the third byte on, and its
    # base64 decoder skips blanks.
    assert mech.step(final.replace(b",p=", b",p:")[:-8] + b" " + final[-8:]) == Success(expected)


def test_wrong_password() -> None:
    mech = started()
    final, _ = client_final(server_first=server_first(mech), password=b"wrong")
    assert mech.step(final) == Failure("Password mismatch")


@pytest.mark.parametrize("final_resp_ok", [False, True])
def test_server_final_through_the_connection(final_resp_ok: bool) -> None:
    conn = connect("SCRAM-SHA-256", env=fixed_env(RANDOM))
    flag = b"\tfinal-resp-ok" if final_resp_ok else b""
    conn.receive_data(b"AUTH\t1\tSCRAM-SHA-256\tservice=imap" + flag + b"\tresp=" + base64.b64encode(FIRST) + b"\n")
    assert conn.begin(1) == [CredentialsWanted(1, b"erin", "SCRAM-SHA-256", b"")]
    conn.credentials_result(1, PassdbVerdict.OK, ERIN)
    first = base64.b64decode(conn.data_to_send().split(b"\t")[2])
    final, expected = client_final(server_first=first)
    assert conn.receive_data(b"CONT\t1\t" + base64.b64encode(final) + b"\n") == [Authenticated(1)]
    conn.succeed(1, b"erin")
    if final_resp_ok:
        assert conn.data_to_send() == b"OK\t1\tuser=erin\tresp=" + base64.b64encode(expected) + b"\n"
    else:
        assert conn.data_to_send() == b"CONT\t1\t" + base64.b64encode(expected) + b"\n"
        assert conn.receive_data(b"CONT\t1\t\n") == []
        assert conn.data_to_send() == b"OK\t1\tuser=erin\n"

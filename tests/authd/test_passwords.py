"""authd.passwords against Dovecot 2.3.19: fixed vectors, and the 2.3.19 reference's real `doveadm pw`
(the host's on Debian 12, the chroot's on Debian 13: 2.4 has other schemes and rounds)."""

from __future__ import annotations

import hashlib
import hmac
import re
import subprocess

import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authd.passwords import (
    PASSWORD_MISMATCH,
    SCHEMES,
    PasswordGenerationError,
    SchemeNotAvailable,
    VerifyResult,
    credentials,
    format_for_pw,
    generate,
    hmac_md5_from_cram_context,
    split_scheme,
    verify,
)
from tests.interop.dovecot import DOVEADM, dovecot_build

needs_doveadm = pytest.mark.requires("doveadm")


def reference_doveadm() -> list[str]:
    """The 2.3.19 reference's doveadm command line (never a 2.4 host's)."""
    build = dovecot_build("2.3")
    if build is None:
        pytest.skip("no Dovecot 2.3 reference: run ./scripts/bootstrap as root")
    return build.argv([DOVEADM])


MATCH = VerifyResult(1, None)
MISMATCH = VerifyResult(0, PASSWORD_MISMATCH)
USER = b"user@realm"

# C strings: no NUL inside passwords or user names, as everywhere in Dovecot.
c_strings = st.binary(max_size=90).map(lambda data: data.replace(b"\0", b"\x01"))


def doveadm_pw(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    # -O: no dovecot.conf needed.
    command = [*reference_doveadm(), "-O", "pw", *args]
    return subprocess.run(command, capture_output=True, check=False, timeout=120)


def doveadm_generate(scheme: str, password: bytes = b"secret", user: bytes = USER, rounds: int | None = None) -> bytes:
    args: list[str | bytes] = ["-s", scheme, "-p", password, "-u", user]
    if rounds is not None:
        args += ["-r", str(rounds)]
    result = doveadm_pw(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix(b"\n")


def doveadm_verdict(stored: bytes, password: bytes = b"secret", user: bytes = USER) -> VerifyResult:
    """`doveadm pw -t`'s verdict, put the way verify() reports the same check."""
    result = doveadm_pw("-t", stored, "-p", password, "-u", user)
    if result.returncode == 0:
        assert result.stdout.endswith(b" (verified)\n")
        return MATCH
    message = result.stderr.decode().strip()
    scheme = split_scheme(stored)[0]
    if message == "Fatal: reverse decode check failed: Unknown scheme":
        return VerifyResult(0, f"Unknown scheme {scheme}")
    decode_error = message.removeprefix("Fatal: reverse decode check failed: ")
    if decode_error != message:
        return VerifyResult(-1, f"Password data is not valid for scheme {scheme}: {decode_error}")
    verify_error = message.removeprefix("Fatal: reverse password verification check failed: ")
    assert verify_error != message, message
    return MISMATCH if verify_error == PASSWORD_MISMATCH else VerifyResult(-1, verify_error)


# --- the scheme list ---------------------------------------------------------------------------------


@needs_doveadm
def test_schemes_are_doveadms() -> None:
    listed = doveadm_pw("-l").stdout.decode().split()
    assert list(SCHEMES) == listed


# --- doveadm generates, we verify ------------------------------------------------------------------

VERIFIABLE = [name for name in SCHEMES if name != "PLAIN-TRUNC"]
WITH_SUFFIX = [
    "SHA256.HEX",
    "sha.b64",
    "PLAIN.B64",
    "PLAIN.HEX",
    "CRAM-MD5.B64",
    "LDAP-MD5.HEX",
    "PLAIN-MD5.BASE64",
    "SSHA.HEX",
    "SSHA512.HEX",
    "DIGEST-MD5.B64",
    "SCRAM-SHA-1.HEX",
    "BLF-CRYPT.B64",
]


@needs_doveadm
@pytest.mark.parametrize("scheme", VERIFIABLE + WITH_SUFFIX)
def test_verifies_what_doveadm_generates(scheme: str) -> None:
    stored = doveadm_generate(scheme)
    assert verify(b"secret", stored, user=USER) == MATCH
    assert verify(b"wrong", stored, user=USER) == MISMATCH


@needs_doveadm
def test_plain_trunc_from_doveadm_lacks_the_length_prefix_for_both() -> None:
    stored = doveadm_generate("PLAIN-TRUNC")
    assert stored == b"{PLAIN-TRUNC}secret"
    expected = VerifyResult(-1, "PLAIN-TRUNC missing length: prefix")
    assert verify(b"secret", stored) == expected
    assert doveadm_verdict(stored) == expected


# --- we generate, doveadm verifies -------------------------------------------------------------------


@needs_doveadm
@pytest.mark.parametrize("scheme", VERIFIABLE + WITH_SUFFIX)
def test_doveadm_verifies_what_we_generate(scheme: str) -> None:
    stored = format_for_pw(b"secret", scheme, USER)
    result = doveadm_pw("-t", stored, "-p", "secret", "-u", USER)
    assert (result.returncode, result.stdout) == (0, stored + b" (verified)\n"), result.stderr
    assert doveadm_verdict(stored, b"wrong") == MISMATCH


DETERMINISTIC = [
    "PLAIN",
    "CLEAR",
    "CLEARTEXT",
    "PLAIN-TRUNC",
    "SHA",
    "SHA1",
    "SHA256",
    "SHA512",
    "PLAIN-MD4",
    "PLAIN-MD5",
    "LDAP-MD5",
    "CRAM-MD5",
    "HMAC-MD5",
    "DIGEST-MD5",
    "sha256.hex",
    "Cram-Md5.b64",
    "PLAIN.BASE64",
    "DIGEST-MD5.b64",
]


@needs_doveadm
@pytest.mark.parametrize("scheme", DETERMINISTIC)
def test_unsalted_output_equals_doveadms(scheme: str) -> None:
    assert format_for_pw(b"secret", scheme, USER) == doveadm_generate(scheme)


@needs_doveadm
@settings(max_examples=25, deadline=None)
@given(password=c_strings, user=c_strings)
def test_unsalted_output_equals_doveadms_for_any_password(password: bytes, user: bytes) -> None:
    for scheme in ("CRAM-MD5", "PLAIN-MD4", "DIGEST-MD5", "SHA512", "LDAP-MD5"):
        assert format_for_pw(password, scheme, user) == doveadm_generate(scheme, password, user)


B64 = rb"[A-Za-z0-9+/]"
CRYPT64 = rb"[./0-9A-Za-z]"
SALTED_SHAPES = {
    "CRYPT": rb"\$2y\$05\$" + CRYPT64 + rb"{53}",
    "BLF-CRYPT": rb"\$2y\$05\$" + CRYPT64 + rb"{53}",
    "DES-CRYPT": CRYPT64 + rb"{13}",
    "MD5": rb"\$1\$" + CRYPT64 + rb"{8}\$" + CRYPT64 + rb"{22}",
    "MD5-CRYPT": rb"\$1\$" + CRYPT64 + rb"{8}\$" + CRYPT64 + rb"{22}",
    "SHA256-CRYPT": rb"\$5\$" + CRYPT64 + rb"{16}\$" + CRYPT64 + rb"{43}",
    "SHA512-CRYPT": rb"\$6\$" + CRYPT64 + rb"{16}\$" + CRYPT64 + rb"{86}",
    "PBKDF2": rb"\$1\$" + CRYPT64 + rb"{16}\$5000\$[0-9a-f]{40}",
    "SCRAM-SHA-1": rb"4096," + B64 + rb"{22}==," + B64 + rb"{27}=," + B64 + rb"{27}=",
    "SCRAM-SHA-256": rb"4096," + B64 + rb"{22}==," + B64 + rb"{43}=," + B64 + rb"{43}=",
    "ARGON2I": rb"\$argon2i\$v=19\$m=32768,t=4,p=1\$" + B64 + rb"{22}\$" + B64 + rb"{43}",
    "ARGON2ID": rb"\$argon2id\$v=19\$m=65536,t=3,p=1\$" + B64 + rb"{22}\$" + B64 + rb"{43}",
    "OTP": rb"sha1 1024 [0-9a-f]{16} [0-9a-f]{16}",
    "SSHA": B64 + rb"{32}",
    "SSHA256": B64 + rb"{48}",
    "SSHA512": B64 + rb"{91}=",
    "SMD5": B64 + rb"{27}=",
}


def test_every_salted_scheme_has_a_shape() -> None:
    assert set(SALTED_SHAPES) == set(SCHEMES) - {name.upper() for name in DETERMINISTIC}


@pytest.mark.parametrize(("scheme", "shape"), SALTED_SHAPES.items())
def test_salted_output_has_doveadms_shape(scheme: str, shape: bytes) -> None:
    assert re.fullmatch(shape, generate(b"secret", scheme))
    assert generate(b"secret", scheme) != generate(b"secret", scheme)


@needs_doveadm
@pytest.mark.parametrize(("scheme", "shape"), SALTED_SHAPES.items())
def test_doveadm_output_has_the_same_shape(scheme: str, shape: bytes) -> None:
    assert re.fullmatch(b"{%s}%s" % (scheme.encode(), shape), doveadm_generate(scheme))


ROUNDS_SHAPES = [
    ("BLF-CRYPT", 2, rb"\$2y\$04\$.{53}"),
    ("CRYPT", 6, rb"\$2y\$06\$.{53}"),
    ("SHA256-CRYPT", 10, rb"\$5\$rounds=1000\$.{16}\$.{43}"),
    ("SHA512-CRYPT", 5000, rb"\$6\$.{16}\$.{86}"),
    ("SHA256-CRYPT", 6000, rb"\$5\$rounds=6000\$.{16}\$.{43}"),
    ("PBKDF2", 3, rb"\$1\$.{16}\$3\$[0-9a-f]{40}"),
    ("ARGON2I", 6, rb"\$argon2i\$v=19\$m=131072,t=6,p=1\$.*"),
    ("ARGON2ID", 1, rb"\$argon2id\$v=19\$m=65536,t=3,p=1\$.*"),
    ("ARGON2ID", 3, rb"\$argon2id\$v=19\$m=262144,t=3,p=1\$.*"),
    ("SCRAM-SHA-1", 5000, rb"4096,.*"),
]


@pytest.mark.parametrize(("scheme", "rounds", "shape"), ROUNDS_SHAPES)
def test_rounds_are_clamped_like_doveadm(scheme: str, rounds: int, shape: bytes) -> None:
    stored = generate(b"secret", scheme, rounds=rounds)
    assert re.fullmatch(shape, stored)
    assert verify(b"secret", b"{%s}%s" % (scheme.encode(), stored)) == MATCH


@needs_doveadm
@pytest.mark.parametrize(("scheme", "rounds", "shape"), ROUNDS_SHAPES)
def test_doveadm_clamps_rounds_the_same_way(scheme: str, rounds: int, shape: bytes) -> None:
    assert re.fullmatch(b"{%s}%s" % (scheme.encode(), shape), doveadm_generate(scheme, rounds=rounds))


def test_generation_errors() -> None:
    with pytest.raises(PasswordGenerationError, match=r"^Unknown scheme: NOSUCH$"):
        format_for_pw(b"secret", "nosuch")
    with pytest.raises(PasswordGenerationError, match=r"^Unknown scheme: SHA256.XYZ$"):
        generate(b"secret", "SHA256.XYZ")
    with pytest.raises(PasswordGenerationError, match=r"^crypto_pwhash_argon2i_str failed: Invalid argument$"):
        generate(b"secret", "ARGON2I", rounds=2)
    with pytest.raises(PasswordGenerationError, match=r"^Invalid number of rounds: 4294967296$"):
        generate(b"secret", "PBKDF2", rounds=2**32)


@needs_doveadm
def test_generation_errors_match_doveadms() -> None:
    assert doveadm_pw("-s", "nosuch", "-p", "secret").stderr == b"Fatal: Unknown scheme: NOSUCH\n"
    result = doveadm_pw("-s", "ARGON2I", "-r", "2", "-p", "secret")
    assert result.stderr == b"Fatal: crypto_pwhash_argon2i_str failed: Invalid argument\n"


# --- fixed vectors (made by Dovecot 2.3.19 for "secret", unless noted) ------------------------------

KNOWN = [
    (
        b"{SCRAM-SHA-256}4096,8h0DZ4pyARdjelb8OYMOgg==,dKq3OAb78bdrpRZeTjqv/92Hn7RSLxX5heunb3fmUHE=,"
        b"SHI5o3Gqkyve0nIO7NJbouZNahHHu4YmvYxDSxawPpA=",
        b"erinpass",
    ),
    (
        b"{SCRAM-SHA-1}4096,s9aV8lEoZ3K82iuwTWb79Q==,t3FOOkHuRTtDHV94hw3IEPSdygM=,+dolU6SrU8mLZIOgRHDyaIxNaQg=",
        b"secret",
    ),
    (b"{CRAM-MD5}cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56", b"secret"),
    (b"{HMAC-MD5.B64}zTun3qrW5cojRIukLjeXR6ng9/H7wAyKgbuqw5VzG1Y=", b"secret"),
    (b"{DIGEST-MD5}fb6cb9e166c6c764ff2bdea12175a8aa", b"secret"),  # user@realm
    (b"{PLAIN-MD4}67d3dafef63ff00603aeef3769cfbf0d", b"secret"),
    (b"{PLAIN-MD5}5ebe2294ecd0e0f08eab7690d2a6ee69", b"secret"),
    (b"{LDAP-MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==", b"secret"),
    (b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", b"secret"),
    (b"{SHA256.HEX}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b", b"secret"),
    (b"{SHA256}2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b", b"secret"),  # guessed hex
    (b"{SSHA}nESL9vhj+5POK9+Cw0qfnInD+FdXrejP", b"secret"),
    (b"{SSHA256}VfXB8SnF5GCOjLeaPnKO37sX8KxSHQTpqEmKoIs7lCkaS0bo", b"secret"),
    (
        b"{SSHA512}y7BVAr5I4sdfdpJwrBMAEZWSaj1aJ1JNF15GH5KSugUDvGRQMsOuSrkIBT3f6aAz1DE/zqMw6tFUUXjQzZopzytZQrU=",
        b"secret",
    ),
    (b"{SMD5}C53jYO82bFZVu5h078DF2g1yFyM=", b"secret"),
    (b"{PBKDF2}$1$2YuuOYBf2sgDlXz7$5000$672ae3c45ee72f0949c6b2098e90d7fba1318b10", b"secret"),
    (b"{MD5}$1$bVayAZSl$n0wGjcPaOSYB02mDWrf7B/", b"secret"),
    (b"{MD5}5ebe2294ecd0e0f08eab7690d2a6ee69", b"secret"),
    (b"{MD5-CRYPT}$1$NufE2zrn$qTQyKx7XUMZSyybLrFwFO0", b"secret"),
    (b"$1$NufE2zrn$qTQyKx7XUMZSyybLrFwFO0", b"secret"),
    (b"{DES-CRYPT}irr3vZRiLk1EI", b"secret"),
    (b"{CRYPT}irr3vZRiLk1EI", b"secret"),
    (b"{SHA256-CRYPT}$5$OeccQkeuZ9iUjvlK$M0YsdTLihZXxVGKEvcpBxOzBKn86m2DbiFvtc40s2bA", b"secret"),
    (
        b"{SHA512-CRYPT}$6$WUUvROcLIEoAweNp$99scFcZSg20HbVnozNa8XPKkYHZGIOTs6CUqnDFDvvuxqnc4Gz7BtyBjl.8nuJvgB6j"
        b"7k2vFSYvlBj0hMKIva.",
        b"secret",
    ),
    (b"{CRYPT}$y$j9T$abcdefghijklmnop$3dL1LkYnZM.OVXuVdnnaKVDlLYT92dRwOzDZ5XiVCe.", b"secret"),  # libxcrypt
    (b"{BLF-CRYPT}$2y$05$EIYo2eyfunYcdoTPKALTAOaXnt.r4g7qrWXgKqFAwJgCo.StlpWBi", b"secret"),
    (b"{CRYPT}$2y$05$9FRSsrxLXsR3LGZ3gBs6WuYyYuQS7/94E.d6p9IxUL.9bXpUE5EGu", b"secret"),
    (
        b"{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$qhlQXQhMJ9GBohku/6O35w$zVK9ipm69rhKDbgi7C6F+kgnALi+gSAPMjdV6vO7pv4",
        b"secret",
    ),
    (
        b"{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$YQ/CvTpYRVimhUBbM2mAcA$goFttDfBpmm21HQFp6cxSQwhc805snu+3eWsTszOLAY",
        b"secret",
    ),
]


@pytest.mark.parametrize(("stored", "password"), KNOWN)
def test_known_vectors(stored: bytes, password: bytes) -> None:
    assert verify(password, stored, user=USER) == MATCH
    assert verify(password + b"x", stored, user=USER) == MISMATCH


def test_default_scheme_applies_without_a_prefix() -> None:
    assert verify(b"secret", b"secret") == MATCH
    assert verify(b"secret", b"5en6G6MezRroT3XKqkdPOmY/BfQ=", default_scheme="SHA1") == MATCH
    assert verify(b"secret", b"irr3vZRiLk1EI", default_scheme="crypt") == MATCH
    assert verify(b"secret", b"{PLAIN") == MISMATCH  # no "}": all of it is a PLAIN password


def test_passwords_are_c_strings() -> None:
    assert verify(b"secret\0ignored", b"{PLAIN}secret") == MATCH
    assert verify(b"secret", b"{PLAIN}secret\0ignored") == MATCH
    assert generate(b"secret\0ignored", "SHA1") == b"5en6G6MezRroT3XKqkdPOmY/BfQ="


# --- failures, and Dovecot's quirks ---------------------------------------------------------------

BLF = b"$2y$05$EIYo2eyfunYcdoTPKALTAOaXnt.r4g7qrWXgKqFAwJgCo.StlpWBi"
SCRAM_SHA1_KEYS = b"t3FOOkHuRTtDHV94hw3IEPSdygM=,+dolU6SrU8mLZIOgRHDyaIxNaQg="
NOT_BLOWFISH = VerifyResult(-1, "Password is not blowfish password")
BLOWFISH_EINVAL = VerifyResult(-1, "crypt_blowfish_rn failed: Invalid argument")


def invalid(scheme: str, error: str) -> VerifyResult:
    return VerifyResult(-1, f"Password data is not valid for scheme {scheme}: {error}")


VERDICTS = [
    # unknown schemes and encodings
    (b"{NOSUCH}secret", VerifyResult(0, "Unknown scheme NOSUCH")),
    (b"{}secret", VerifyResult(0, "Unknown scheme ")),
    (b"{SHA.foo}5en6G6MezRroT3XKqkdPOmY/BfQ=", VerifyResult(0, "Unknown scheme SHA.foo")),
    (b"{sha1}5en6G6MezRroT3XKqkdPOmY/BfQ=", MATCH),
    # Dovecot's base64: blanks anywhere, complete padding, nothing after it
    (b"{SSHA256}!!!", invalid("SSHA256", "Input isn't valid base64 encoded data")),
    (b"{ssha256}!!!", invalid("ssha256", "Input isn't valid base64 encoded data")),
    (b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ", invalid("SHA", "Input isn't valid base64 encoded data")),
    (b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ==", invalid("SHA", "Input isn't valid base64 encoded data")),
    (b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=x", invalid("SHA", "Input isn't valid base64 encoded data")),
    (b"{SHA}5en6G6MezR roT3XKqkdPOmY/BfQ= ", MATCH),
    (b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ\t=\r\n", MATCH),
    (b"{SHA}5en6G6MezRroT3XKqkdP=OmY/BfQ=", invalid("SHA", "Input isn't valid base64 encoded data")),
    (b"{SHA}5en6G6MezRroT3XKqkdPOmY_BfQ=", invalid("SHA", "Input isn't valid base64 encoded data")),
    (b"{SMD5}C53jYO82bFZVu5h078DF2g1yFyM", invalid("SMD5", "Input isn't valid base64 encoded data")),
    (b"{SMD5}C53jYO82bFZVu5h078DF2g1yFy==", MISMATCH),
    (b"{SSHA}nESL9vhj+5POK9+Cw0qfnInD+FdXrejPA=", invalid("SSHA", "Input isn't valid base64 encoded data")),
    (b"{SSHA}nESL9vhj+5POK9+Cw0qfnInD+FdXrej=", MISMATCH),
    # hex, guessed from the length for fixed-length schemes, else base64
    (b"{SHA}E5E9FA1BA31ECD1AE84F75CAAA474F3A663F05F4", MATCH),
    (
        b"{SHA}e5e9fa1ba31ecd1ae84f75caaa474f3a663f05fz",
        invalid("SHA", "Input length isn't valid (30 instead of 20)"),
    ),
    (
        b"{SHA.hex}e5e9fa1ba31ecd1ae84f75caaa474f3a663f05f",
        invalid("SHA.hex", "Input isn't valid HEX encoded data"),
    ),
    (
        b"{SHA.b64}e5e9fa1ba31ecd1ae84f75caaa474f3a663f05f4",
        invalid("SHA.b64", "Input length isn't valid (30 instead of 20)"),
    ),
    (b"{SHA256}c2VjcmV0", invalid("SHA256", "Input length isn't valid (6 instead of 32)")),
    (b"{CRAM-MD5}cd3ba7de", invalid("CRAM-MD5", "Input length isn't valid (6 instead of 32)")),
    (b"{PLAIN.HEX}73656372657", invalid("PLAIN.HEX", "Input isn't valid HEX encoded data")),
    (b"{PLAIN.B64}c2VjcmV0", MATCH),
    # salted digests
    (b"{SSHA}nESL9vhj+5POK9+Cw0qfnInD+FdX", MISMATCH),
    (
        b"{SSHA256}VfXB8SnF5GCOjLeaPnKO37sX8KxSHQTpqEmKoIs7lCk=",
        VerifyResult(-1, "SSHA256 password is too short"),
    ),
    (b"{SSHA512}AAAA", VerifyResult(-1, "SSHA512 password is too short")),
    (b"{SMD5}C53jYO82bFZVu5h078DF2g==", VerifyResult(-1, "SMD5 password is too short")),
    # PLAIN-TRUNC
    (b"{PLAIN-TRUNC}3-sec", MATCH),
    (b"{PLAIN-TRUNC}4-sec", MISMATCH),
    (b"{PLAIN-TRUNC}10-secret", MATCH),
    (b"{PLAIN-TRUNC}-", MATCH),
    (b"{PLAIN-TRUNC}x-secret", VerifyResult(-1, "PLAIN-TRUNC missing length: prefix")),
    # MD5 = MD5-CRYPT or PLAIN-MD5
    (b"{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==", MATCH),
    (b"{MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ", VerifyResult(-1, "Not a valid MD5-CRYPT or PLAIN-MD5 password")),
    (b"{MD5}$1$bVayAZSl$n0wGjcPaOSYB02mDWrf7B.", MISMATCH),
    (b"{MD5-CRYPT}$1$NufE2zrn$qTQyKx7XUMZSyybLrFwFO0$", MISMATCH),
    (b"$1$NufE2zrn$qTQyKx7XUMZSyybLrFwFO0$ignored", MATCH),
    (b"{MD5-CRYPT}irr3vZRiLk1EI", MISMATCH),
    # crypt(3)
    (b"{SHA512-CRYPT}irr3vZRiLk1EI", MATCH),
    (b"{CRYPT}$1$NufE2zrn$qTQyKx7XUMZSyybLrFwFO0", MATCH),
    (b"{CRYPT}$5$rounds=5000$OeccQkeuZ9iUjvlK$M0YsdTLihZXxVGKEvcpBxOzBKn86m2DbiFvtc40s2bA", MATCH),
    (b"{CRYPT}$5$rounds=10$OeccQkeuZ9iUjvlK$M0YsdTLihZXxVGKEvcpBxOzBKn86m2DbiFvtc40s2bA", MISMATCH),
    (b"{CRYPT}", MISMATCH),
    (b"{CRYPT}*", MISMATCH),
    (b"{CRYPT}*0", MISMATCH),
    (b"{CRYPT}ab", MISMATCH),
    (b"{CRYPT}$2y$05$EIYo", NOT_BLOWFISH),
    (b"{CRYPT}$2$05$EIYo2eyfunYcdoTPKALTAOaXnt.r4g7qrWXgKqFAwJgCo.StlpWBi", MISMATCH),
    # BLF-CRYPT
    (b"{BLF-CRYPT}$2a" + BLF[3:], MATCH),
    (b"{BLF-CRYPT}$2b" + BLF[3:], MATCH),
    (b"{BLF-CRYPT}$2x" + BLF[3:], MATCH),
    (b"{BLF-CRYPT}$2c" + BLF[3:], BLOWFISH_EINVAL),
    (b"{BLF-CRYPT}$2Y" + BLF[3:], NOT_BLOWFISH),
    (b"{BLF-CRYPT}$2y$03" + BLF[6:], BLOWFISH_EINVAL),
    (b"{BLF-CRYPT}$2y$32" + BLF[6:], BLOWFISH_EINVAL),
    (b"{BLF-CRYPT}" + BLF[:20] + b"!" + BLF[21:], BLOWFISH_EINVAL),
    (b"{BLF-CRYPT}" + BLF[:28] + b"P" + BLF[29:], MISMATCH),  # non-canonical last salt character
    (b"{BLF-CRYPT}" + BLF + b"x", MISMATCH),
    (b"{BLF-CRYPT}", MISMATCH),
    (b"{BLF-CRYPT}$1$NufE2zrn$qTQyKx7XUMZSyybLrFwFO0", NOT_BLOWFISH),
    # ARGON2: every failure is a mismatch
    (
        b"{ARGON2I}$argon2id$v=19$m=65536,t=3,p=1$YQ/CvTpYRVimhUBbM2mAcA$goFttDfBpmm21HQFp6cxSQwhc805snu+3eWsTszOLAY",
        MATCH,
    ),
    (b"{ARGON2ID}garbage", MISMATCH),
    (  # argon2 version 16, which libsodium does not support
        b"{ARGON2I}$argon2i$v=16$m=1024,t=3,p=1$MDEyMzQ1Njc4OWFiY2RlZg$ax1GC2B9nEGkifYakTGltp7ratZ9q6IvKlKeCaJw66Y",
        MISMATCH,
    ),
    (
        b"{ARGON2I}$argon2i$m=1024,t=3,p=1$MDEyMzQ1Njc4OWFiY2RlZg$ax1GC2B9nEGkifYakTGltp7ratZ9q6IvKlKeCaJw66Y",
        MISMATCH,
    ),
    (
        b"{ARGON2ID}$argon2id$v=19$m=1024,t=1,p=2$MDEyMzQ1Njc4OWFiY2RlZg$+fcIqvz8JeTeeduC3TSjVh/O7hff40BmEycXsXtl74o",
        MATCH,
    ),
    (b"{ARGON2ID}$argon2id$v=19$m=1024,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg$Etw2/QXRpLTs7BTxIo8aiQ", MATCH),
    (
        b"{ARGON2ID}$argon2d$v=19$m=65536,t=3,p=1$YQ/CvTpYRVimhUBbM2mAcA$goFttDfBpmm21HQFp6cxSQwhc805snu+3eWsTszOLAY",
        MISMATCH,
    ),
    # PBKDF2; zero rounds leave Dovecot's key all zeros, whatever the password
    (b"{PBKDF2}$1$salt$0$" + b"0" * 40, MATCH),
    (b"{PBKDF2}$2$salt$5$" + b"0" * 40, VerifyResult(-1, "Invalid PBKDF2 passdb entry prefix")),
    (b"{PBKDF2}$1$salt$x$" + b"0" * 40, VerifyResult(-1, "Invalid PBKDF2 passdb entry format")),
    (b"{PBKDF2}$1$salt$5", VerifyResult(-1, "Invalid PBKDF2 passdb entry format")),
    (b"{PBKDF2}$1$salt$5$" + b"0" * 38, VerifyResult(-1, "PBKDF2 hash not 160bit hex-encoded")),
    (b"{PBKDF2}$1$salt$5$" + b"0" * 39 + b"g", VerifyResult(-1, "PBKDF2 hash not 160bit hex-encoded")),
    # SCRAM; a salt that is bad base64 is used as far as it decodes
    (b"{SCRAM-SHA-1}4096,s9aV8lEoZ3K82iuwTWb79Q," + SCRAM_SHA1_KEYS, MATCH),
    (b"{SCRAM-SHA-1}04096,s9aV8lEoZ3K82iuwTWb79Q==," + SCRAM_SHA1_KEYS, MATCH),
    (b"{SCRAM-SHA-1}4096,s9aV8lEoZ3K82iuwTWb79Q=x," + SCRAM_SHA1_KEYS, MATCH),
    (b"{SCRAM-SHA-1}4096,s9aV8lEoZ3K82iuwTWb79Q!A," + SCRAM_SHA1_KEYS, MATCH),
    (b"{SCRAM-SHA-1}4096,s9aV8lEoZ3K82iuwTWb79QA," + SCRAM_SHA1_KEYS, MISMATCH),
    (b"{SCRAM-SHA-1}4096,abc," + SCRAM_SHA1_KEYS, MISMATCH),
    (
        b"{scram-sha-1}4095,abc," + SCRAM_SHA1_KEYS,
        VerifyResult(-1, "Invalid SCRAM-SHA-1 iteration count in passdb"),
    ),
    (
        b"{SCRAM-SHA-1}+4096,abc," + SCRAM_SHA1_KEYS,
        VerifyResult(-1, "Invalid SCRAM-SHA-1 iteration count in passdb"),
    ),
    (
        b"{SCRAM-SHA-1}4096,abc,t3FOOkHuRTtDHV94hw3IEPSdygM=",
        VerifyResult(-1, "Invalid SCRAM-SHA-1 passdb entry format"),
    ),
    (
        b"{SCRAM-SHA-1}4096,abc,t3FOOkHuRTtDHV94hw3IEPSdygM,+dolU6SrU8mLZIOgRHDyaIxNaQg=",
        VerifyResult(-1, "Invalid SCRAM-SHA-1 StoredKey in passdb"),
    ),
    (
        b"{SCRAM-SHA-256}4096,abc,t3FOOkHuRTtDHV94hw3IEPSdygM=,+dolU6SrU8mLZIOgRHDyaIxNaQg=",
        VerifyResult(-1, "Invalid SCRAM-SHA-256 StoredKey in passdb"),
    ),
    (
        b"{SCRAM-SHA-1}4096,abc,t3FOOkHuRTtDHV94hw3IEPSdygM=,+dolU6SrU8mLZIOgRHDyaIxNa==",
        VerifyResult(-1, "Invalid SCRAM-SHA-1 ServerKey in passdb"),
    ),
    # DIGEST-MD5 depends on the user name
    (b"{DIGEST-MD5}a5db0679d7fb553691d5f75c98f4418f", MISMATCH),
]


@pytest.mark.parametrize(("stored", "expected"), VERDICTS)
def test_verdicts(stored: bytes, expected: VerifyResult) -> None:
    assert verify(b"secret", stored, user=USER) == expected


@needs_doveadm
@pytest.mark.parametrize(("stored", "expected"), VERDICTS)
def test_verdicts_match_doveadms(stored: bytes, expected: VerifyResult) -> None:
    assert doveadm_verdict(stored) == expected


OPENWALL_SELF_TEST_KEY = b"\xff\xa334\xff\xff\xff\xa3345"  # $2a$ hashes it differently


@needs_doveadm
@pytest.mark.parametrize("password", [OPENWALL_SELF_TEST_KEY, b"p\xc3\xa4ss", b"\xe4bc", b"x" * 100])
@pytest.mark.parametrize("prefix", [b"$2a$", b"$2b$", b"$2x$", b"$2y$"])
def test_bcrypt_variants_with_8bit_passwords_match_doveadm(password: bytes, prefix: bytes) -> None:
    stored = b"{BLF-CRYPT}" + prefix + bcrypt.hashpw(password[:72], b"$2b$04$abcdefghijklmnopqrstuu")[4:]
    assert verify(password, stored) == doveadm_verdict(stored, password)


@needs_doveadm
def test_crypt_keeps_libxcrypts_passphrase_limit_but_md5_crypt_does_not() -> None:
    password = b"y" * 600
    assert format_for_pw(password, "SHA512-CRYPT") == doveadm_generate("SHA512-CRYPT", password)
    assert generate(password, "DES-CRYPT") == b"*0"
    md5_crypt_hash = generate(password, "MD5-CRYPT")
    for stored in (b"{MD5-CRYPT}" + md5_crypt_hash, b"{CRYPT}" + md5_crypt_hash):
        assert verify(password, stored) == doveadm_verdict(stored, password)
    assert verify(password, b"{CRYPT}" + md5_crypt_hash) == MISMATCH


@needs_doveadm
@settings(max_examples=15, deadline=None)
@given(password=c_strings)
def test_any_password_round_trips_through_doveadm(password: bytes) -> None:
    for scheme in ("SHA512-CRYPT", "MD5-CRYPT", "BLF-CRYPT", "DES-CRYPT", "SCRAM-SHA-1", "PBKDF2", "SSHA256"):
        ours = format_for_pw(password, scheme)
        assert doveadm_verdict(ours, password) == MATCH
        assert verify(password, doveadm_generate(scheme, password)) == MATCH


@settings(max_examples=30, deadline=None)
@given(password=c_strings, user=c_strings)
def test_generated_passwords_verify(password: bytes, user: bytes) -> None:
    for scheme in (
        "SSHA",
        "SMD5",
        "SSHA512",
        "CRAM-MD5",
        "DIGEST-MD5",
        "PLAIN-MD4",
        "SCRAM-SHA-256",
        "PLAIN.HEX",
    ):
        stored = b"{%s}%s" % (scheme.encode(), generate(password, scheme, user=user))
        assert verify(password, stored, user=user) == MATCH
        assert verify(password + b"!", stored, user=user) == MISMATCH


# --- split_scheme ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (b"{SHA256}abc", ("SHA256", b"abc")),
        (b"{sha256.hex}abc", ("sha256.hex", b"abc")),
        (b"{}abc", ("", b"abc")),
        (b"{A}b}c", ("A", b"b}c")),
        (b"{\xff}x", ("\udcff", b"x")),
        (b"{abc", (None, b"{abc")),
        (b"abc", (None, b"abc")),
        (b"", (None, b"")),
        (b"$1$salt$hash", ("MD5-CRYPT", b"$1$salt$hash")),
        (b"$1$salt$hash$more$", ("MD5-CRYPT", b"$1$salt$hash")),
        (b"$1$$", ("MD5-CRYPT", b"$1$$")),
        (b"$1$salt", (None, b"$1$salt")),
        (b"$5$salt$hash", (None, b"$5$salt$hash")),
        (b" {PLAIN}x", (None, b" {PLAIN}x")),
    ],
)
def test_split_scheme(stored: bytes, expected: tuple[str | None, bytes]) -> None:
    assert split_scheme(stored) == expected


# --- credentials ----------------------------------------------------------------------------------

CRAM_MD5_SECRET = bytes.fromhex("cd3ba7deaad6e5ca23448ba42e379747a9e0f7f1fbc00c8a81bbaac395731b56")


@pytest.mark.parametrize(
    ("stored", "wanted", "expected"),
    [
        # plaintext converts to anything
        (b"{PLAIN}secret", "CRAM-MD5", CRAM_MD5_SECRET),
        (b"secret", "HMAC-MD5", CRAM_MD5_SECRET),
        (b"{CLEAR.b64}c2VjcmV0", "CRAM-MD5.HEX", CRAM_MD5_SECRET),
        (b"{PLAIN}secret", "DIGEST-MD5", hashlib.md5(b"user:realm:secret").digest()),
        (b"{PLAIN}secret", "PLAIN", b"secret"),
        (b"{CLEARTEXT}secret", "PLAIN", b"secret"),
        # PLAIN-TRUNC counts as plaintext, length prefix and all
        (b"{PLAIN-TRUNC}3-sec", "PLAIN", b"3-sec"),
        # the same scheme, or one sharing its generator, gives the decoded value
        (b"{CRAM-MD5}" + CRAM_MD5_SECRET.hex().encode(), "CRAM-MD5", CRAM_MD5_SECRET),
        (b"{HMAC-MD5.b64}zTun3qrW5cojRIukLjeXR6ng9/H7wAyKgbuqw5VzG1Y=", "CRAM-MD5", CRAM_MD5_SECRET),
        (b"{LDAP-MD5}Xr4ilOzQ4PCOq3aQ0qbuaQ==", "PLAIN-MD5", hashlib.md5(b"secret").digest()),
        (b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", "SHA1", hashlib.sha1(b"secret").digest()),
        (b"{BLF-CRYPT}" + BLF, "CRYPT", BLF),
        (b"{MD5}$1$bVayAZSl$n0wGjcPaOSYB02mDWrf7B/", "MD5-CRYPT", b"$1$bVayAZSl$n0wGjcPaOSYB02mDWrf7B/"),
        # "" takes whatever is stored
        (b"{SHA256}K7gNU3sdo+OL0wNhqoVWhr3g6s1xYv72ol/pe/Unols=", "", hashlib.sha256(b"secret").digest()),
    ],
)
def test_credentials(stored: bytes, wanted: str, expected: bytes) -> None:
    assert credentials(stored, wanted, user=USER) == expected


@pytest.mark.parametrize(
    ("stored", "wanted", "message", "log_level"),
    [
        (
            b"{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
            "CRAM-MD5",
            "Requested CRAM-MD5 scheme, but we have only SHA",
            "info",
        ),
        (b"{crypt}irr3vZRiLk1EI", "PLAIN", "Requested PLAIN scheme, but we have only crypt", "info"),
        (
            b"{SHA256.HEX}" + b"00" * 32,
            "PLAIN",
            "Requested PLAIN scheme, but we have only SHA256.HEX",
            "info",
        ),
        (
            b"{SHA256.HEX}00",
            "PLAIN",
            "Password data is not valid for scheme SHA256.HEX: Input length isn't valid (1 instead of 32)",
            "error",
        ),
        (b"{PLAIN}secret", "NOSUCH", "Requested unknown scheme NOSUCH", "error"),
        (b"{NOSUCH}x", "PLAIN", "Unknown scheme NOSUCH", "error"),
        (b"{NOSUCH.hex}", "", "Unknown scheme NOSUCH.hex", "error"),
        (
            b"{SHA}!!!",
            "PLAIN",
            "Password data is not valid for scheme SHA: Input isn't valid base64 encoded data",
            "error",
        ),
        (
            b"5en6G6MezRroT3XKqkdPOmY/BfQ=",
            "SCRAM-SHA-1",
            "Requested SCRAM-SHA-1 scheme, but we have only SHA1",
            "info",
        ),
    ],
)
def test_credentials_not_available(stored: bytes, wanted: str, message: str, log_level: str) -> None:
    with pytest.raises(SchemeNotAvailable) as caught:
        credentials(stored, wanted, default_scheme="SHA1")
    assert (str(caught.value), caught.value.log_level) == (message, log_level)


@needs_doveadm
def test_plaintext_to_cram_md5_equals_doveadms_cram_md5() -> None:
    stored = doveadm_generate("CRAM-MD5", b"p\xc3\xa4ss")
    assert credentials(b"{PLAIN}p\xc3\xa4ss", "CRAM-MD5") == bytes.fromhex(stored.removeprefix(b"{CRAM-MD5}").decode())


def test_plaintext_to_scram_makes_verifiable_credentials() -> None:
    for scheme, shape in (
        ("SCRAM-SHA-1", SALTED_SHAPES["SCRAM-SHA-1"]),
        ("SCRAM-SHA-256", SALTED_SHAPES["SCRAM-SHA-256"]),
    ):
        converted = credentials(b"{PLAIN}secret", scheme)
        assert re.fullmatch(shape, converted)
        assert verify(b"secret", b"{%s}%s" % (scheme.encode(), converted)) == MATCH


# --- CRAM-MD5 contexts ----------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    password=st.binary(max_size=150).map(lambda data: data.replace(b"\0", b"")),
    message=st.binary(max_size=200),
)
def test_cram_md5_context_continues_to_hmac_md5(password: bytes, message: bytes) -> None:
    context = credentials(b"{PLAIN.HEX}" + password.hex().encode(), "CRAM-MD5")
    assert hmac_md5_from_cram_context(context, message) == hmac.digest(password, message, "md5")


def test_cram_md5_context_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        hmac_md5_from_cram_context(CRAM_MD5_SECRET[:31], b"challenge")

"""Dovecot 2.3.19 password schemes: parsing, verification, generation and credential conversion.

Stored passwords written for Dovecot must behave the same here, down to the error texts that end
up in logs and in Lua's ``req:password_verify()``, so this module follows src/auth/password-scheme*.c
and passdb_get_credentials() closely, including their quirks.

Dovecot handles passwords, stored values and user names as C strings, so everything after a NUL
byte is ignored; the public functions do the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import functools
import hashlib
import hmac
import os
import re
import secrets
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import argon2.exceptions
import argon2.low_level
import bcrypt
from passlib.crypto.digest import lookup_hash  # type: ignore[import-untyped]
from passlib.hash import md5_crypt  # type: ignore[import-untyped]

from protocol.hmac_md5 import cram_md5_context, hmac_md5_from_cram_context

__all__ = [
    "PASSWORD_MISMATCH",
    "SCHEMES",
    "PasswordGenerationError",
    "SchemeNotAvailable",
    "VerifyResult",
    "credentials",
    "format_for_pw",
    "generate",
    "hmac_md5_from_cram_context",
    "split_scheme",
    "verify",
]

PASSWORD_MISMATCH: Final = "Password mismatch"

_UINT_MAX: Final = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What Dovecot's password verification returns: 1 match, 0 mismatch, -1 error, plus its message."""

    code: int
    error: str | None


class SchemeNotAvailable(Exception):
    """Dovecot's PASSDB_RESULT_SCHEME_NOT_AVAILABLE; the text is what Dovecot logs at ``log_level``."""

    def __init__(self, message: str, *, log_level: Literal["info", "error"]) -> None:
        super().__init__(message)
        self.log_level: Literal["info", "error"] = log_level


class PasswordGenerationError(ValueError):
    """A password cannot be generated; the text is what ``doveadm pw`` dies with (minus "Fatal: ")."""


class _InvalidStoredPassword(Exception):
    """The stored password is unusable for its scheme (verification result -1)."""


class _Encoding(enum.Enum):
    NONE = enum.auto()
    BASE64 = enum.auto()
    HEX = enum.auto()


@dataclass(frozen=True, slots=True)
class _Params:
    """Dovecot's password_generate_params."""

    user: bytes = b""
    rounds: int = 0


_Generator = Callable[[bytes, _Params], bytes]
_Verifier = Callable[[bytes, bytes, _Params], bool]


@dataclass(frozen=True, slots=True)
class _Scheme:
    name: str
    default_encoding: _Encoding
    # Non-zero means the decoded password has exactly this length, which lets Dovecot guess hex vs. base64.
    raw_len: int
    generate: _Generator
    # None means "generate and compare"; otherwise returns the match or raises _InvalidStoredPassword.
    verify: _Verifier | None


def _c_string(data: bytes) -> bytes:
    return data.split(b"\0", 1)[0]


def _ascii_upper(name: str) -> str:
    """Dovecot upper-cases with toupper(), which leaves non-ASCII bytes alone (unlike str.upper)."""
    if name.isascii():
        return name.upper()
    return "".join(char.upper() if char.isascii() else char for char in name)


def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


# --- Dovecot's decoders, which differ from Python's in what they accept ---------------------------

_BASE64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_VALUES: Final = {char: value for value, char in enumerate(_BASE64_ALPHABET)}
_BASE64_BLANKS: Final = frozenset(b" \t\r\n")
_HEX_PAIRS: Final = re.compile(rb"(?:[0-9a-fA-F]{2})*")


def _base64_decode(data: bytes) -> tuple[bytes, bool]:
    """Decode like Dovecot's base64_decode(): returns what was decoded so far and whether it was valid.

    Blanks are skipped, "=" padding must complete the last quantum and only blanks may follow it.
    Callers such as the SCRAM salt parser ignore the validity and use the partial output, so it
    is returned too.
    """
    decoded = bytearray()
    pending = 0
    sextets = 0
    pos = 0
    while pos < len(data):
        value = _BASE64_VALUES.get(data[pos])
        if value is None:
            if data[pos] not in _BASE64_BLANKS:
                break
        else:
            if sextets == 1:
                decoded.append(((pending << 2) | (value >> 4)) & 0xFF)
            elif sextets == 2:
                decoded.append(((pending << 4) | (value >> 2)) & 0xFF)
            elif sextets == 3:
                decoded.append(((pending << 6) | value) & 0xFF)
            pending = value
            sextets = (sextets + 1) % 4
        pos += 1
    if pos == len(data):
        return bytes(decoded), sextets == 0

    def skip_blanks(start: int) -> int:
        while start < len(data) and data[start] in _BASE64_BLANKS:
            start += 1
        return start

    if sextets < 2 or data[pos] != ord("="):
        return bytes(decoded), False
    if sextets == 2:
        pos = skip_blanks(pos + 1)
        if pos == len(data) or data[pos] != ord("="):
            return bytes(decoded), False
    return bytes(decoded), skip_blanks(pos + 1) == len(data)


def _hex_decode(data: bytes) -> bytes | None:
    """Strict hex like Dovecot's hex_to_binary() (bytes.fromhex would also skip blanks)."""
    if _HEX_PAIRS.fullmatch(data) is None:
        return None
    return bytes.fromhex(data.decode("ascii"))


def _parse_uint(text: bytes) -> int | None:
    """Dovecot's str_to_uint(): ASCII digits only, at most UINT_MAX."""
    if re.fullmatch(rb"[0-9]+", text) is None:
        return None
    value = int(text)
    return value if value <= _UINT_MAX else None


_SALT_CHARS: Final = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _random_salt(length: int) -> str:
    """Dovecot's password_generate_salt(): characters from the crypt(3) alphabet."""
    return "".join(secrets.choice(_SALT_CHARS) for _ in range(length))


# --- CRAM-MD5: the HMAC-MD5 state after the key blocks (protocol.hmac_md5 does the MD5 work) ------


def _cram_md5_context(plain: bytes, params: _Params) -> bytes:
    return cram_md5_context(plain)


# --- crypt(3) --------------------------------------------------------------------------------------
# Dovecot's CRYPT, DES-CRYPT and SHA*-CRYPT call libc crypt(), so these do too (through libcrypt, as
# the stdlib crypt module is deprecated). That gives the same formats (yescrypt included), the same
# treatment of odd settings, and libxcrypt's 511-byte passphrase limit, past which crypt() returns
# the failure token "*0" (so such passwords never match, and doveadm pw prints "*0" for them).

# sizeof(struct crypt_data) is 32768 in libxcrypt and 131232 in glibc's old libcrypt.
_CRYPT_DATA_SIZE: Final = 262144


@functools.cache
def _libcrypt() -> ctypes.CDLL | None:
    path = ctypes.util.find_library("crypt")
    if path is None:
        return None
    library = ctypes.CDLL(path, use_errno=True)
    library.crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    library.crypt_r.restype = ctypes.c_char_p
    return library


def _libc_crypt(plain: bytes, setting: bytes) -> bytes:
    """libc crypt_r(); raises OSError where crypt() would return NULL."""
    library = _libcrypt()
    if library is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    work_area = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    result = library.crypt_r(plain, setting, work_area)
    if result is None:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return bytes(result)


def _crypt_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    """Dovecot's crypt_verify(): bcrypt goes to BLF-CRYPT, the rest checks crypt(plain, stored) == stored."""
    if len(raw) > 4 and raw.startswith(b"$2") and raw[3:4] == b"$":
        return _blf_crypt_verify(plain, raw, params)
    if not raw:
        return False  # crypt("", "") would "match"
    crypted = _c_string(raw)
    try:
        computed = _libc_crypt(plain, crypted)
    except OSError as exc:
        raise _InvalidStoredPassword(f"crypt() failed: {exc.strerror}") from None
    return hmac.compare_digest(computed, crypted)


def _des_crypt_generate(plain: bytes, params: _Params) -> bytes:
    return _libc_crypt(plain, _random_salt(2).encode())


def _sha_crypt_generator(prefix: str) -> _Generator:
    def generate(plain: bytes, params: _Params) -> bytes:
        rounds = min(max(params.rounds or 5000, 1000), 999999999)
        salt = _random_salt(16)
        # Dovecot leaves "rounds=" out for the default, and crypt(3) then keeps it out of the result.
        setting = f"{prefix}{salt}" if rounds == 5000 else f"{prefix}rounds={rounds}${salt}"
        return _libc_crypt(plain, setting.encode())

    return generate


_sha256_crypt_generate = _sha_crypt_generator("$5$")
_sha512_crypt_generate = _sha_crypt_generator("$6$")


# --- MD5-CRYPT (Dovecot's own md5crypt, also behind the MD5 scheme) ------------------------------


def _md5_crypt_generate(plain: bytes, params: _Params) -> bytes:
    try:
        return str(md5_crypt.using(salt=_random_salt(8)).hash(plain)).encode("ascii")
    except ValueError as exc:  # libpass caps passwords at 4096 bytes, Dovecot does not
        raise PasswordGenerationError(str(exc)) from None


def _md5_crypt_matches(plain: bytes, crypted: bytes) -> bool:
    """Dovecot hashes with the stored salt and compares the whole string, which libpass's verify matches.

    libpass refuses what Dovecot would hash and then not match (no "$1$", salts over 8 characters,
    malformed checksums), but also salts outside [./0-9A-Za-z] and passwords over 4096 bytes,
    which Dovecot's own implementation accepts; those count as mismatches here.
    """
    try:
        return bool(md5_crypt.verify(plain, crypted.decode("ascii")))
    except ValueError:
        return False


def _md5_crypt_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    return _md5_crypt_matches(plain, _c_string(raw))


def _md5_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    """The MD5 scheme accepts MD5-CRYPT values and, failing that, PLAIN-MD5 digests."""
    stored = _c_string(raw)
    if stored.startswith(b"$1$"):
        return _md5_crypt_matches(plain, stored)
    try:
        decoded = _decode(stored, "PLAIN-MD5")
    except _InvalidStoredPassword:
        decoded = None
    if decoded is None:
        raise _InvalidStoredPassword("Not a valid MD5-CRYPT or PLAIN-MD5 password")
    return hmac.compare_digest(hashlib.md5(plain).digest(), decoded[1])


# --- BLF-CRYPT (Dovecot's bundled crypt_blowfish) ------------------------------------------------

_BCRYPT_ALPHABET: Final = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT_SETTING: Final = re.compile(rb"\$2[abxy]\$(?:[0-2][0-9]|3[01])\$[./A-Za-z0-9]{22}")
_BCRYPT_MAX_KEY: Final = 72


def _bcrypt_setting(crypted: bytes) -> bytes | None:
    """The 29-byte setting crypt_blowfish would hash with, or None where it fails with EINVAL."""
    setting = crypted[:29]
    if _BCRYPT_SETTING.fullmatch(setting) is None or int(setting[4:6]) < 4:
        return None
    # crypt_blowfish only uses the top two bits of the last salt character and writes it canonically.
    last = _BCRYPT_ALPHABET[_BCRYPT_ALPHABET.index(setting[28]) & 0x30]
    return setting[:28] + bytes([last])


def _bcrypt(plain: bytes, setting: bytes) -> bytes:
    key = plain[:_BCRYPT_MAX_KEY]
    if setting[2:3] in (b"b", b"y") or key.isascii():
        return bcrypt.hashpw(key, setting)
    # $2a$ (with its 8-bit "safety" tweak) and $2x$ (sign-extension bug) hash 8-bit passwords the
    # Openwall way, which libc's bcrypt shares with Dovecot's bundled copy and pyca/bcrypt does not.
    try:
        return _libc_crypt(key, setting)
    except OSError as exc:
        raise _InvalidStoredPassword(f"crypt_blowfish_rn failed: {exc.strerror}") from None


def _blf_crypt_generate(plain: bytes, params: _Params) -> bytes:
    cost = min(max(params.rounds or 5, 4), 31)
    setting = b"$2y$" + bcrypt.gensalt(rounds=cost, prefix=b"2b")[4:]
    return _bcrypt(plain, setting)


def _blf_crypt_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    if not raw:
        return False
    crypted = _c_string(raw)
    if len(raw) < 30 or not re.match(rb"\$2[a-z]\$", crypted):
        raise _InvalidStoredPassword("Password is not blowfish password")
    setting = _bcrypt_setting(crypted)
    if setting is None:
        raise _InvalidStoredPassword(f"crypt_blowfish_rn failed: {os.strerror(errno.EINVAL)}")
    return hmac.compare_digest(_bcrypt(plain, setting), crypted)


# --- ARGON2 (libsodium's crypto_pwhash) ------------------------------------------------------------

_MIB: Final = 1024 * 1024


def _argon2_generate(type_: argon2.low_level.Type, plain: bytes, time_cost: int, memory_bytes: int) -> bytes:
    return argon2.low_level.hash_secret(
        plain,
        os.urandom(16),
        time_cost=time_cost,
        memory_cost=memory_bytes // 1024,
        parallelism=1,
        hash_len=32,
        type=type_,
    )


def _argon2i_generate(plain: bytes, params: _Params) -> bytes:
    """libsodium's argon2i presets: the rounds pick the memory tier (32/128/512 MiB)."""
    rounds = params.rounds or 4
    if rounds < 3:
        raise PasswordGenerationError(f"crypto_pwhash_argon2i_str failed: {os.strerror(errno.EINVAL)}")
    memory = 512 * _MIB if rounds >= 8 else 128 * _MIB if rounds >= 6 else 32 * _MIB
    return _argon2_generate(argon2.low_level.Type.I, plain, rounds, memory)


def _argon2id_generate(plain: bytes, params: _Params) -> bytes:
    """libsodium's argon2id presets (64/256/1024 MiB); rounds are raised to 3 after picking memory."""
    rounds = params.rounds or 2
    memory = 1024 * _MIB if rounds >= 4 else 256 * _MIB if rounds >= 3 else 64 * _MIB
    return _argon2_generate(argon2.low_level.Type.ID, plain, max(rounds, 3), memory)


def _argon2_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    """crypto_pwhash_str_verify(): any failure, even a malformed hash, is a mismatch.

    libsodium only knows Argon2 version 19 (0x13), while argon2-cffi would also accept older hashes.
    """
    encoded = _c_string(raw)
    if encoded.startswith(b"$argon2id$v=19$"):
        type_ = argon2.low_level.Type.ID
    elif encoded.startswith(b"$argon2i$v=19$"):
        type_ = argon2.low_level.Type.I
    else:
        return False
    try:
        return argon2.low_level.verify_secret(encoded, plain, type_)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


# --- PBKDF2 (Dovecot's own "$1$salt$rounds$hexhash" format) ---------------------------------------


def _pbkdf2_sha1(plain: bytes, salt: bytes, rounds: int) -> bytes:
    # Dovecot's pkcs5_pbkdf() refuses 0 rounds and leaves its zero-filled output buffer as it is.
    return hashlib.pbkdf2_hmac("sha1", plain, salt, rounds, 20) if rounds else bytes(20)


def _pbkdf2_generate(plain: bytes, params: _Params) -> bytes:
    rounds = params.rounds or 5000
    salt = _random_salt(16).encode()
    return b"$1$%s$%d$%s" % (salt, rounds, _pbkdf2_sha1(plain, salt, rounds).hex().encode())


def _pbkdf2_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    if not raw.startswith(b"$1$"):
        raise _InvalidStoredPassword("Invalid PBKDF2 passdb entry prefix")
    fields = _c_string(raw[3:]).split(b"$")
    rounds = _parse_uint(fields[1]) if len(fields) == 3 else None
    if rounds is None:
        raise _InvalidStoredPassword("Invalid PBKDF2 passdb entry format")
    salt, _, hex_hash = fields
    expected = _hex_decode(hex_hash) if len(hex_hash) == 40 else None
    if expected is None:
        raise _InvalidStoredPassword("PBKDF2 hash not 160bit hex-encoded")
    return hmac.compare_digest(_pbkdf2_sha1(plain, salt, rounds), expected)


# --- SCRAM (RFC 5802 "iterations,salt,StoredKey,ServerKey") ----------------------------------------

_SCRAM_ITERATIONS: Final = 4096
_SCRAM_MAX_ITERATIONS: Final = 0x7FFFFFFF


def _scram_keys(hash_name: str, plain: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """StoredKey and ServerKey of RFC 5802 section 3 (Dovecot does not SASLprep the password)."""
    salted = hashlib.pbkdf2_hmac(hash_name, plain, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    return hashlib.new(hash_name, client_key).digest(), hmac.digest(salted, b"Server Key", hash_name)


def _scram_scheme(hash_name: str, scheme_name: str) -> tuple[_Generator, _Verifier]:
    digest_size = hashlib.new(hash_name).digest_size

    def generate(plain: bytes, params: _Params) -> bytes:
        salt = os.urandom(16)
        stored_key, server_key = _scram_keys(hash_name, plain, salt, _SCRAM_ITERATIONS)
        encoded = (b64encode(salt), b64encode(stored_key), b64encode(server_key))
        return b"%d,%s,%s,%s" % (_SCRAM_ITERATIONS, *encoded)

    def verify(plain: bytes, raw: bytes, params: _Params) -> bool:
        fields = _c_string(raw).split(b",")
        if len(fields) != 4:
            raise _InvalidStoredPassword(f"Invalid {scheme_name} passdb entry format")
        iterations = _parse_uint(fields[0])
        if iterations is None or not _SCRAM_ITERATIONS <= iterations <= _SCRAM_MAX_ITERATIONS:
            raise _InvalidStoredPassword(f"Invalid {scheme_name} iteration count in passdb")
        keys = []
        for label, encoded_key in (("StoredKey", fields[2]), ("ServerKey", fields[3])):
            key, valid = _base64_decode(encoded_key)
            if not valid or len(key) != digest_size:
                raise _InvalidStoredPassword(f"Invalid {scheme_name} {label} in passdb")
            keys.append(key)
        # Dovecot ignores base64 errors in the salt and uses whatever decoded before them.
        salt, _ = _base64_decode(fields[1])
        stored_key, _ = _scram_keys(hash_name, plain, salt, iterations)
        return hmac.compare_digest(stored_key, keys[0])

    return generate, verify


_scram_sha1_generate, _scram_sha1_verify = _scram_scheme("sha1", "SCRAM-SHA-1")
_scram_sha256_generate, _scram_sha256_verify = _scram_scheme("sha256", "SCRAM-SHA-256")


# --- OTP (RFC 2289 one-time-password state, as Dovecot's lib-otp stores it) ------------------------

_OTP_ALGORITHMS: Final = ("md4", "md5", "sha1")
_OTP_SEQUENCE: Final = 1024
_OTP_MAX_SEED_LEN: Final = 16
#: otp_parse_dbentry: ALGO LWS SEQ LWS SEED(<= 16 alphanumerics) SPACE, then 16 hex digits among blanks.
_OTP_ENTRY = re.compile(rb"([^ \t]*)[ \t](-?[0-9]+)[ \t]([0-9A-Za-z]{0,16}) ([0-9A-Fa-f \t]*)")


def _otp_fold(algorithm: str, data: bytes) -> bytes:
    """One RFC 2289 step: the digest folded to 64 bits by XOR (SHA-1's halves byte-reversed)."""
    if algorithm == "md4":
        digest = bytes(lookup_hash("md4").const(data).digest())
    else:
        digest = hashlib.new(algorithm, data).digest()

    def xor(*parts: bytes) -> bytes:
        return bytes(functools.reduce(lambda a, b: a ^ b, column) for column in zip(*parts, strict=True))

    if algorithm == "sha1":
        return xor(digest[0:4], digest[8:12], digest[16:20])[::-1] + xor(digest[4:8], digest[12:16])[::-1]
    return xor(digest[0:4], digest[8:12]) + xor(digest[4:8], digest[12:16])


def _otp_hash(algorithm: str, seed: bytes, plain: bytes, sequence: int) -> bytes:
    result = _otp_fold(algorithm, seed + plain)
    for _ in range(sequence):
        result = _otp_fold(algorithm, result)
    return result


def _otp_entry(algorithm: str, sequence: int, seed: bytes, plain: bytes) -> bytes:
    """Dovecot's otp_print_dbentry: "ALGO SEQ SEED HEXHASH"."""
    hashed = _otp_hash(algorithm, seed, plain, sequence)
    return b"%s %d %s %s" % (algorithm.encode(), sequence, seed, hashed.hex().encode())


def _otp_generate(plain: bytes, params: _Params) -> bytes:
    """A new SHA-1 state: sequence 1024, a random 16-hex-digit seed (-r is ignored, as in Dovecot)."""
    return _otp_entry("sha1", _OTP_SEQUENCE, secrets.token_hex(_OTP_MAX_SEED_LEN // 2).encode(), plain)


def _otp_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    """otp_parse_dbentry, then the entry made again from the password, compared case-insensitively.

    A negative sequence is refused as invalid data (Dovecot would hash some 4 billion times).
    """
    stored = _c_string(raw)
    match = _OTP_ENTRY.match(stored)
    invalid = _InvalidStoredPassword("Invalid OTP data in passdb")
    if match is None:
        raise invalid
    algorithm, sequence_text, seed, tail = match.groups()
    sequence = int(sequence_text)
    hex_digits = re.sub(rb"[ \t]", b"", tail)
    if algorithm.decode("latin-1") not in _OTP_ALGORITHMS or not 0 <= sequence <= 0x7FFFFFFF or len(hex_digits) < 16:
        raise invalid
    generated = _otp_entry(algorithm.decode(), sequence, seed.lower(), plain)
    return stored.lower() == generated.lower()


# --- plain digests and salted digests ------------------------------------------------------------


def _digest_generator(hash_name: str) -> _Generator:
    def generate(plain: bytes, params: _Params) -> bytes:
        return hashlib.new(hash_name, plain).digest()

    return generate


_sha1_generate = _digest_generator("sha1")
_sha256_generate = _digest_generator("sha256")
_sha512_generate = _digest_generator("sha512")
_plain_md5_generate = _digest_generator("md5")


def _plain_md4_generate(plain: bytes, params: _Params) -> bytes:
    """hashlib lacks MD4 on OpenSSL 3; libpass ships a fallback implementation."""
    return bytes(lookup_hash("md4").const(plain).digest())


def _digest_md5_generate(plain: bytes, params: _Params) -> bytes:
    """MD5("user:realm:password"), with the realm taken from after the user name's last "@"."""
    user, at, realm = params.user.rpartition(b"@")
    if not at:
        user, realm = realm, b""
    return hashlib.md5(b"%s:%s:%s" % (user, realm, plain)).digest()


def _salted_scheme(hash_name: str, scheme_name: str) -> tuple[_Generator, _Verifier]:
    """SSHA* and SMD5 store <digest of password + salt><salt>; Dovecot makes 4-byte salts, reads any."""
    digest_size = hashlib.new(hash_name).digest_size

    def generate(plain: bytes, params: _Params) -> bytes:
        salt = os.urandom(4)
        return hashlib.new(hash_name, plain + salt).digest() + salt

    def verify(plain: bytes, raw: bytes, params: _Params) -> bool:
        if len(raw) <= digest_size:
            raise _InvalidStoredPassword(f"{scheme_name} password is too short")
        digest, salt = raw[:digest_size], raw[digest_size:]
        return hmac.compare_digest(hashlib.new(hash_name, plain + salt).digest(), digest)

    return generate, verify


_smd5_generate, _smd5_verify = _salted_scheme("md5", "SMD5")
_ssha_generate, _ssha_verify = _salted_scheme("sha1", "SSHA")
_ssha256_generate, _ssha256_verify = _salted_scheme("sha256", "SSHA256")
_ssha512_generate, _ssha512_verify = _salted_scheme("sha512", "SSHA512")


def _plain_generate(plain: bytes, params: _Params) -> bytes:
    return plain


def _plain_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    return hmac.compare_digest(plain, raw)


def _plain_trunc_verify(plain: bytes, raw: bytes, params: _Params) -> bool:
    """Stored as <length>-<password>: a password cut to <length> accepts longer ones with that prefix."""
    match = re.match(rb"([0-9]*)-", raw)
    if match is None:
        raise _InvalidStoredPassword("PLAIN-TRUNC missing length: prefix")
    truncated_to = int(match[1] or b"0")
    stored = raw[match.end() :]
    if len(stored) == truncated_to and len(plain) >= truncated_to:
        return hmac.compare_digest(plain[:truncated_to], stored)
    return hmac.compare_digest(plain, stored)


# --- the registry ----------------------------------------------------------------------------------

_NONE, _BASE64, _HEX = _Encoding.NONE, _Encoding.BASE64, _Encoding.HEX

# In the order `doveadm pw -l` lists them (2.3.19's hash-table order).
_REGISTRY: Final = {
    scheme.name: scheme
    for scheme in (
        _Scheme("SHA1", _BASE64, 20, _sha1_generate, None),
        _Scheme("SSHA512", _BASE64, 0, _ssha512_generate, _ssha512_verify),
        _Scheme("SCRAM-SHA-256", _NONE, 0, _scram_sha256_generate, _scram_sha256_verify),
        _Scheme("BLF-CRYPT", _NONE, 0, _blf_crypt_generate, _blf_crypt_verify),
        _Scheme("PLAIN", _NONE, 0, _plain_generate, _plain_verify),
        _Scheme("HMAC-MD5", _HEX, 32, _cram_md5_context, None),
        _Scheme("OTP", _NONE, 0, _otp_generate, _otp_verify),
        _Scheme("SHA512", _BASE64, 64, _sha512_generate, None),
        _Scheme("SHA", _BASE64, 20, _sha1_generate, None),
        _Scheme("DES-CRYPT", _NONE, 0, _des_crypt_generate, _crypt_verify),
        _Scheme("CRYPT", _NONE, 0, _blf_crypt_generate, _crypt_verify),
        _Scheme("SSHA", _BASE64, 0, _ssha_generate, _ssha_verify),
        _Scheme("MD5-CRYPT", _NONE, 0, _md5_crypt_generate, _md5_crypt_verify),
        _Scheme("PLAIN-MD4", _HEX, 16, _plain_md4_generate, None),
        _Scheme("PLAIN-MD5", _HEX, 16, _plain_md5_generate, None),
        _Scheme("SCRAM-SHA-1", _NONE, 0, _scram_sha1_generate, _scram_sha1_verify),
        _Scheme("SHA512-CRYPT", _NONE, 0, _sha512_crypt_generate, _crypt_verify),
        _Scheme("CLEAR", _NONE, 0, _plain_generate, _plain_verify),
        _Scheme("CLEARTEXT", _NONE, 0, _plain_generate, _plain_verify),
        _Scheme("ARGON2I", _NONE, 0, _argon2i_generate, _argon2_verify),
        _Scheme("ARGON2ID", _NONE, 0, _argon2id_generate, _argon2_verify),
        _Scheme("SSHA256", _BASE64, 0, _ssha256_generate, _ssha256_verify),
        _Scheme("MD5", _NONE, 0, _md5_crypt_generate, _md5_verify),
        _Scheme("PBKDF2", _NONE, 0, _pbkdf2_generate, _pbkdf2_verify),
        _Scheme("SHA256", _BASE64, 32, _sha256_generate, None),
        _Scheme("CRAM-MD5", _HEX, 32, _cram_md5_context, None),
        _Scheme("PLAIN-TRUNC", _NONE, 0, _plain_generate, _plain_trunc_verify),
        _Scheme("SHA256-CRYPT", _NONE, 0, _sha256_crypt_generate, _crypt_verify),
        _Scheme("SMD5", _BASE64, 0, _smd5_generate, _smd5_verify),
        _Scheme("DIGEST-MD5", _HEX, 16, _digest_md5_generate, None),
        _Scheme("LDAP-MD5", _BASE64, 16, _plain_md5_generate, None),
    )
}

SCHEMES: Final[tuple[str, ...]] = tuple(_REGISTRY)


def _lookup_name(name: str) -> _Scheme | None:
    return _REGISTRY.get(_ascii_upper(name))


def _lookup(name: str) -> tuple[_Scheme, _Encoding] | None:
    """Scheme and encoding for "NAME[.b64|.base64|.hex]"; any other suffix makes the name unknown."""
    base, dot, suffix = name.partition(".")
    scheme = _lookup_name(base)
    if scheme is None:
        return None
    if not dot:
        return scheme, scheme.default_encoding
    encoding = {"B64": _BASE64, "BASE64": _BASE64, "HEX": _HEX}.get(_ascii_upper(suffix))
    return None if encoding is None else (scheme, encoding)


def _is_alias(name1: str, name2: str) -> bool:
    """Dovecot's password_scheme_is_alias(): same name, or schemes sharing a generator."""
    if not name1 or not name2:
        return False
    base1, base2 = name1.partition(".")[0], name2.partition(".")[0]
    if _ascii_upper(base1) == _ascii_upper(base2):
        return True
    scheme1, scheme2 = _lookup_name(base1), _lookup_name(base2)
    return scheme1 is not None and scheme2 is not None and scheme1.generate is scheme2.generate


def _decode(encoded: bytes, scheme_name: str) -> tuple[_Scheme, bytes] | None:
    """Dovecot's password_decode(): scheme and raw password, None if unknown, or _InvalidStoredPassword.

    Without an explicit suffix, fixed-length schemes take hex when the length fits and base64 otherwise.
    """
    found = _lookup(scheme_name)
    if found is None:
        return None
    scheme, encoding = found
    guessed = encoding is not _NONE and scheme.raw_len != 0 and "." not in scheme_name
    if guessed:
        encoding = _HEX if len(encoded) == scheme.raw_len * 2 else _BASE64
    raw: bytes | None = encoded if encoding is _NONE else None
    if encoding is _HEX:
        raw = _hex_decode(encoded)
        if raw is None and not guessed:
            raise _InvalidStoredPassword("Input isn't valid HEX encoded data")
    if raw is None:
        raw, valid = _base64_decode(encoded)
        if not valid:
            raise _InvalidStoredPassword("Input isn't valid base64 encoded data")
    if scheme.raw_len != 0 and len(raw) != scheme.raw_len:
        raise _InvalidStoredPassword(f"Input length isn't valid ({len(raw)} instead of {scheme.raw_len})")
    return scheme, raw


def _verify_decoded(plain: bytes, scheme: _Scheme, raw: bytes, params: _Params) -> VerifyResult:
    """Dovecot's password_verify() for a known scheme."""
    try:
        if scheme.verify is None:
            matched = hmac.compare_digest(scheme.generate(plain, params), raw)
        else:
            matched = scheme.verify(plain, raw, params)
    except _InvalidStoredPassword as exc:
        return VerifyResult(-1, str(exc))
    return VerifyResult(1, None) if matched else VerifyResult(0, PASSWORD_MISMATCH)


# --- public API ------------------------------------------------------------------------------------


def split_scheme(stored: bytes) -> tuple[str | None, bytes]:
    """Dovecot's password_get_scheme(): "{SCHEME}rest" -> ("SCHEME", rest), else (None, stored).

    The scheme keeps the case it was written in, as Dovecot repeats it verbatim in messages; it is
    decoded with surrogateescape so it round-trips to bytes. A bare "$1$salt$hash" is recognised as
    MD5-CRYPT and cut after the hash, dropping any further "$..." part.
    """
    if stored.startswith(b"$1$"):
        salt_end = stored.find(b"$", 3)
        if salt_end != -1:
            hash_end = stored.find(b"$", salt_end + 1)
            return "MD5-CRYPT", stored if hash_end == -1 else stored[:hash_end]
    if not stored.startswith(b"{"):
        return None, stored
    scheme_end = stored.find(b"}")
    if scheme_end == -1:
        return None, stored
    return stored[1:scheme_end].decode("utf-8", "surrogateescape"), stored[scheme_end + 1 :]


def verify(plain: bytes, stored: bytes, *, default_scheme: str = "PLAIN", user: bytes = b"") -> VerifyResult:
    """Check a plaintext password against a stored one, as Lua's req:password_verify() does.

    An unknown scheme gives code 0 here (db-lua.c); passdbs that call auth_request_password_verify()
    log the same message but treat it as -1. `user` matters only to DIGEST-MD5.
    """
    scheme_name, encoded = split_scheme(_c_string(stored))
    if scheme_name is None:
        scheme_name = default_scheme
    try:
        decoded = _decode(encoded, scheme_name)
    except _InvalidStoredPassword as exc:
        return VerifyResult(-1, f"Password data is not valid for scheme {scheme_name}: {exc}")
    if decoded is None:
        return VerifyResult(0, f"Unknown scheme {scheme_name}")
    scheme, raw = decoded
    return _verify_decoded(_c_string(plain), scheme, raw, _Params(user=_c_string(user)))


def generate(plain: bytes, scheme: str, *, user: bytes = b"", rounds: int | None = None) -> bytes:
    """The stored form of `plain` in `scheme` (without "{SCHEME}"), encoded as the scheme or its suffix says.

    `rounds` is doveadm pw's -r; each scheme clamps or ignores it as Dovecot does. Salts are random.
    """
    if rounds is not None and not 0 <= rounds <= _UINT_MAX:
        raise PasswordGenerationError(f"Invalid number of rounds: {rounds}")
    found = _lookup(scheme)
    if found is None:
        raise PasswordGenerationError(f"Unknown scheme: {scheme}")
    scheme_info, encoding = found
    raw = scheme_info.generate(_c_string(plain), _Params(user=_c_string(user), rounds=rounds or 0))
    if encoding is _BASE64:
        return b64encode(raw)
    if encoding is _HEX:
        return raw.hex().encode("ascii")
    return raw


def format_for_pw(plain: bytes, scheme: str, user: bytes = b"", rounds: int | None = None) -> bytes:
    """The line `doveadm pw -s SCHEME -p PLAIN [-u USER] [-r ROUNDS]` prints, without its newline.

    doveadm fails for DIGEST-MD5 without -u; here an empty `user` acts like `-u ""`.
    """
    name = _ascii_upper(scheme)
    return b"{%s}%s" % (_name_bytes(name), generate(plain, name, user=user, rounds=rounds))


def credentials(stored: bytes, wanted_scheme: str, *, default_scheme: str = "PLAIN", user: bytes = b"") -> bytes:
    """Credentials in `wanted_scheme` for a lookup-credentials mechanism, as passdb_get_credentials().

    Returns the decoded (raw, not hex/base64) stored credentials when the schemes are the same or
    aliases, or when `wanted_scheme` is "" (any); generates them when the stored password is plaintext.
    `user` is the one DIGEST-MD5 needs (Dovecot appends "@realm" when the domain is not the realm).
    Raises SchemeNotAvailable otherwise.
    """
    scheme_name, encoded = split_scheme(_c_string(stored))
    if scheme_name is None:
        scheme_name = default_scheme
    try:
        decoded = _decode(encoded, scheme_name)
    except _InvalidStoredPassword as exc:
        message = f"Password data is not valid for scheme {scheme_name}: {exc}"
        raise SchemeNotAvailable(message, log_level="error") from None
    if decoded is None:
        raise SchemeNotAvailable(f"Unknown scheme {scheme_name}", log_level="error")
    raw = decoded[1]
    if not wanted_scheme or _is_alias(scheme_name, wanted_scheme):
        return raw
    if not _is_alias(scheme_name, "PLAIN"):
        message = f"Requested {wanted_scheme} scheme, but we have only {scheme_name}"
        raise SchemeNotAvailable(message, log_level="info")
    wanted = _lookup(wanted_scheme)
    if wanted is None:
        raise SchemeNotAvailable(f"Requested unknown scheme {wanted_scheme}", log_level="error")
    return wanted[0].generate(_c_string(raw), _Params(user=_c_string(user)))

"""`authd pw -r ROUNDS` against `doveadm pw -r ROUNDS`: the rounds in the hash, and doveadm -t.

Each case runs the real command line (python -m authd.cli pw) and the 2.3.19 reference's doveadm
(the host's on Debian 12, the chroot's on Debian 13).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.authd.test_cli import authd
from tests.authd.test_passwords import reference_doveadm

needs_doveadm = pytest.mark.requires("doveadm")

PASSWORD = "s3cret pass"

#: scheme, -r value, the hash's shape after {SCHEME} (rounds as doveadm 2.3.19 writes them).
ROUNDS = [
    ("SHA512-CRYPT", 10000, r"\$6\$rounds=10000\$.{16}\$.{86}"),
    ("SHA512-CRYPT", 3, r"\$6\$rounds=1000\$.{16}\$.{86}"),
    ("SHA256-CRYPT", 7000, r"\$5\$rounds=7000\$.{16}\$.{43}"),
    ("BLF-CRYPT", 6, r"\$2y\$06\$.{53}"),
    ("CRYPT", 4, r"\$2y\$04\$.{53}"),
    ("PBKDF2", 1234, r"\$1\$.{16}\$1234\$[0-9a-f]{40}"),
    ("ARGON2ID", 3, r"\$argon2id\$v=19\$m=262144,t=3,p=1\$.*"),
    ("ARGON2I", 5, r"\$argon2i\$v=19\$m=32768,t=5,p=1\$.*"),
    ("SCRAM-SHA-256", 10000, r"4096,.*"),
]


def pw_line(scheme: str, shape: str) -> str:
    """The pattern of the line `pw -s SCHEME` prints, its hash matching SHAPE."""
    return r"\{" + scheme + r"\}" + shape + r"\n"


def doveadm_pw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*reference_doveadm(), "-c", "/dev/null", "pw", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(("scheme", "rounds", "shape"), ROUNDS)
def test_pw_uses_the_rounds(scheme: str, rounds: int, shape: str) -> None:
    made = authd("pw", "-s", scheme, "-r", str(rounds), "-p", PASSWORD)
    assert made.returncode == 0, made.stderr
    assert re.fullmatch(pw_line(scheme, shape), made.stdout)


@needs_doveadm
@pytest.mark.parametrize(("scheme", "rounds", "shape"), ROUNDS)
def test_doveadm_writes_the_same_rounds_and_verifies_ours(scheme: str, rounds: int, shape: str) -> None:
    theirs = doveadm_pw("-s", scheme, "-r", str(rounds), "-p", PASSWORD)
    assert re.fullmatch(pw_line(scheme, shape), theirs.stdout), theirs.stderr
    ours = authd("pw", "-s", scheme, "-r", str(rounds), "-p", PASSWORD).stdout.strip()
    checked = doveadm_pw("-t", ours, "-p", PASSWORD)
    assert checked.stdout == ours + " (verified)\n", checked.stderr


def test_pw_reverse_verifies_with_rounds() -> None:
    made = authd("pw", "-s", "SHA256-CRYPT", "-r", "2000", "-V", "-p", PASSWORD)
    assert made.returncode == 0, made.stderr
    assert re.fullmatch(r"\{SHA256-CRYPT\}\$5\$rounds=2000\$.{16}\$.{43} \(verified\)\n", made.stdout)


@needs_doveadm
def test_pw_rounds_errors_match_doveadm() -> None:
    theirs = doveadm_pw("-s", "ARGON2I", "-r", "2", "-p", PASSWORD)
    ours = authd("pw", "-s", "ARGON2I", "-r", "2", "-p", PASSWORD)
    assert theirs.stderr == "Fatal: crypto_pwhash_argon2i_str failed: Invalid argument\n"
    assert (ours.returncode, ours.stderr) == (1, "authd pw: crypto_pwhash_argon2i_str failed: Invalid argument\n")
    too_many = authd("pw", "-s", "PBKDF2", "-r", "4294967296", "-p", PASSWORD)
    assert doveadm_pw("-s", "PBKDF2", "-r", "4294967296", "-p", PASSWORD).stderr == (
        "Fatal: Invalid number of rounds: 4294967296\n"
    )
    assert (too_many.returncode, too_many.stderr) == (1, "authd pw: Invalid number of rounds: 4294967296\n")

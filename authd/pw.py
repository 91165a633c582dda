"""`authd pw`: doveadm pw's password hashing, for the passwords scripts return.

Same options and output as `doveadm pw` (2.3): -s scheme (default CRYPT), -p plaintext
(else asked twice on the terminal), -u user (DIGEST-MD5), -r rounds, -t hash to verify,
-V to verify what was generated, -l to list the schemes.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from authd.passwords import SCHEMES, PasswordGenerationError, format_for_pw, split_scheme, verify

DEFAULT_SCHEME = "CRYPT"


class PwError(Exception):
    """What doveadm pw dies with (its text without "Fatal: ")."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-l", dest="list", action="store_true", help="list the known schemes")
    parser.add_argument("-p", dest="plaintext", help="the password (visible to other users in ps: prefer the prompt)")
    parser.add_argument("-r", dest="rounds", type=int, help="rounds, for the schemes that have them")
    parser.add_argument("-s", dest="scheme", default=DEFAULT_SCHEME, help=f"the scheme (default {DEFAULT_SCHEME})")
    parser.add_argument("-t", dest="test_hash", help="verify the password against this {SCHEME}hash")
    parser.add_argument("-u", dest="user", default="", help="the user name (DIGEST-MD5 needs it)")
    parser.add_argument("-V", dest="reverse_verify", action="store_true", help="verify the generated hash")


def run(args: argparse.Namespace) -> str:
    """The line doveadm pw prints (without its newline); raises PwError."""
    if args.list:
        return " ".join(SCHEMES) + " "
    scheme = args.scheme.upper()
    plaintext = args.plaintext
    if plaintext is None:
        plaintext = _ask(verify_only=args.test_hash is not None)
    plain, user = plaintext.encode(), args.user.encode()
    if args.rounds is not None and not 0 <= args.rounds <= 0xFFFFFFFF:
        raise PwError(f"Invalid number of rounds: {args.rounds}")
    try:
        line = format_for_pw(plain, scheme, user, args.rounds)
    except PasswordGenerationError as exc:
        raise PwError(str(exc)) from None
    if args.test_hash is None and not args.reverse_verify:
        return line.decode()
    if args.test_hash is not None:
        name, _ = split_scheme(args.test_hash.encode())
        if name is None:
            raise PwError("Missing {scheme} prefix from hash")
        line = args.test_hash.encode()
    result = verify(plain, line, user=user)
    if result.code < 0:
        raise PwError(f"reverse decode check failed: {result.error}")
    if result.code == 0:
        raise PwError(f"reverse password verification check failed: {result.error or 'Password mismatch'}")
    return line.decode() + " (verified)"


def _ask(*, verify_only: bool) -> str:
    if verify_only:
        return getpass.getpass("Enter password to verify: ")
    for _ in range(3):
        first = getpass.getpass("Enter new password: ")
        if first == getpass.getpass("Retype new password: "):
            return first
        print("Error: Passwords don't match!", file=sys.stderr)
    raise PwError("Passwords don't match!")

"""Checking a request's password the way Dovecot's auth_request does.

Shared by every passdb driver and the cache: verification with Dovecot's log
lines (auth_request_password_verify), the "no password" rule, and turning a
looked-up password into the credentials a mechanism asked for.
"""

from __future__ import annotations

import functools

import structlog
import trio

from authd.auth_request import AuthRequest
from authd.passwords import SchemeNotAvailable, credentials, verify
from lua_api.results import PassdbResult

log = structlog.get_logger("authd.passdb")


def verify_password(
    req: AuthRequest, plain: bytes, stored: bytes | None, scheme: str, *, log_mismatch: bool = True
) -> int:
    """auth_request_password_verify(_log): 1 ok, 0 mismatch, -1 error; logs like Dovecot."""
    if req.skip_password_check:
        return 1
    if b"nopassword" in req.extra_fields:
        log.debug("auth.password", message="Allowing any password", **req.log_context())
        return 1
    result = verify(plain, b"{" + scheme.encode() + b"}" + (stored or b""), user=req.original_user or b"")
    if result.code < 0 or (result.code == 0 and result.error and result.error.startswith("Unknown scheme")):
        log.error("auth.password", message=result.error or "invalid password data", **req.log_context())
        return -1
    if result.code == 0 and log_mismatch:
        log.info("auth.password_mismatch", message="Password mismatch", **req.log_context())
    return result.code


#: Schemes whose verification takes milliseconds or more (key stretching, rounds).
#: CRYPT may be any crypt(3) hash, bcrypt and SHA-crypt included.
SLOW_SCHEMES = frozenset(
    {
        "CRYPT",
        "MD5-CRYPT",
        "SHA256-CRYPT",
        "SHA512-CRYPT",
        "BLF-CRYPT",
        "ARGON2I",
        "ARGON2ID",
        "PBKDF2",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
    }
)


async def verify_password_off_loop(
    req: AuthRequest, plain: bytes, stored: bytes | None, scheme: str, *, log_mismatch: bool = True
) -> int:
    """verify_password, in a worker thread for slow schemes: a bcrypt hash costs about
    0.1-0.3 s of CPU, which must not stall every other request (Dovecot verifies a
    blocking passdb's passwords in its auth workers)."""
    check = functools.partial(verify_password, req, plain, stored, scheme, log_mismatch=log_mismatch)
    base = scheme.upper().partition(".")[0]
    if base not in SLOW_SCHEMES or req.skip_password_check or b"nopassword" in req.extra_fields:
        return check()
    return await trio.to_thread.run_sync(check)


def password_missing(req: AuthRequest) -> int:
    """auth_request_password_missing: no password and no nopassword is a mismatch."""
    if req.skip_password_check:
        return PassdbResult.OK
    log.info("auth.no_password", message="No password returned (and no nopassword)", **req.log_context())
    return PassdbResult.PASSWORD_MISMATCH


def handle_credentials(
    req: AuthRequest, code: int, password: bytes | None, scheme: str, wanted: str
) -> tuple[int, bytes | None]:
    """passdb_handle_credentials: turn a lookup's password into `wanted`'s credentials."""
    if code != PassdbResult.OK:
        return code, None
    if b"noauthenticate" in req.extra_fields:
        return PassdbResult.NEXT, None
    if password is None:
        if wanted:
            log.info(
                "auth.credentials",
                message=f"Requested {wanted} scheme, but we have a NULL password",
                **req.log_context(),
            )
            return PassdbResult.SCHEME_NOT_AVAILABLE, None
        return code, None
    try:
        return code, credentials(b"{" + scheme.encode() + b"}" + password, wanted, user=req.original_user or b"")
    except SchemeNotAvailable as exc:
        getattr(log, exc.log_level)("auth.credentials", message=str(exc), **req.log_context())
        return PassdbResult.SCHEME_NOT_AVAILABLE, None

"""Using the auth cache from the passdb and userdb chains (passdb-cache.c, auth-request.c).

Keys: `P<db id>[+<master user>]\\t<cache_key template expanded>` with values
tab-escaped, so a user name can never forge a key. Passdb values are the password
(with its scheme) then the fields the lookup set; userdb values are the fields.
"""

from __future__ import annotations

import dataclasses
import re

import structlog

from authd.auth_request import AuthRequest
from authd.cache import AuthCache, CacheHit
from authd.password_check import verify_password_off_loop
from authd.passwords import generate, split_scheme
from lua_api.request_vars import RequestVars, VarEntry, var_table_23, var_table_24
from lua_api.results import PassdbResult, UserdbResult
from lua_api.var_expand import ExpandContext, VarExpandError, expand
from lua_api.var_expand24 import ExpandContext24, expand24
from protocol.escape import split_tabescaped, tab_escape

log = structlog.get_logger("authd.cache")

#: What a password the passdb did not return is cached as (CACHED_PASSWORD_SCHEME).
CACHED_PASSWORD_SCHEME = "SHA1"
#: AUTH_REQUEST_USER_KEY_IGNORE: a userdb entry with no fields (empty would mean "unknown").
USER_KEY_IGNORE = b" "

_VARIABLE = re.compile(rb"%[-0-9.]*[LUEXRHNMDT]*(\{[^}]*\}|[^{])")


def parse_cache_key(template: str) -> bytes:
    """auth_cache_parse_key: the template's variables only, known ones in table order."""
    table = var_table_23(RequestVars())
    seen = [False] * len(table)
    extra: list[bytes] = []
    for match in _VARIABLE.finditer(template.encode()):
        name = match.group(1)
        key = name[1:-1] if name.startswith(b"{") else name
        for index, entry in enumerate(table):
            if (entry.short is not None and key == entry.short.encode()) or (
                entry.long is not None and key == entry.long.encode()
            ):
                seen[index] = True
                break
        else:
            extra.append(b"%" + name)
    if seen[1] and seen[2]:  # %n and %d together mean %u
        seen[0], seen[1], seen[2] = True, False, False
    parts = [_canonical(entry) for entry, used in zip(table, seen, strict=True) if used]
    return b"\t".join(parts + extra)


def _canonical(entry: VarEntry) -> bytes:
    return b"%" + (entry.short.encode() if entry.short else b"{" + (entry.long or "").encode() + b"}")


class Template24(bytes):
    """A cache key a 2.4 script's auth_*_get_cache_key() returned: a 2.4 template."""


def expand_key(req: AuthRequest, template: bytes, db_id: int, *, user: bytes | None) -> bytes:
    """auth_request_expand_cache_key."""
    prefix = b"U" if req.userdb_lookup else b"P"
    variables = req.vars(db_id=db_id)
    if user is not None:
        variables = dataclasses.replace(variables, user=user)
    if isinstance(template, Template24):
        return _expand_key24(prefix, req, template, variables, db_id)
    head = prefix + b"%!" + (b"+%{master_user}" if req.master_user is not None else b"") + b"\t"
    table = [
        VarEntry(e.short, e.long, tab_escape(e.value) if e.value is not None else None) for e in var_table_23(variables)
    ]
    context = req.rules.expand_context if isinstance(req.rules.expand_context, ExpandContext) else ExpandContext()
    try:
        return expand(head + template, table, context)
    except VarExpandError as exc:  # unknown %variables are fine in keys; errors are only logged
        log.error("cache.key", message=f"Failed to expand auth cache key {template!r}: {exc}")
        return head + template


def _expand_key24(prefix: bytes, req: AuthRequest, template: bytes, variables: RequestVars, db_id: int) -> bytes:
    head = prefix + b"%d" % db_id + (b"+" + tab_escape(req.master_user) if req.master_user is not None else b"")
    table = {key: tab_escape(value) if value is not None else None for key, value in var_table_24(variables).items()}
    try:
        return head + b"\t" + expand24(template, table, ExpandContext24())
    except VarExpandError as exc:
        log.error("cache.key", message=f"Failed to expand auth cache key {template!r}: {exc}")
        return head + b"\t" + template


class PassdbCache:
    """The passdb side of the cache for one chain."""

    def __init__(self, cache: AuthCache) -> None:
        self.cache = cache

    def _lookup(self, req: AuthRequest, template: bytes, db_id: int, use_expired: bool) -> CacheHit | None:
        hit = self.cache.lookup(expand_key(req, template, db_id, user=req.translated_user))
        if hit is None or (hit.expired and not use_expired):
            return None
        return hit

    async def verify_plain(
        self, req: AuthRequest, template: bytes, db_id: int, password: bytes, *, use_expired: bool
    ) -> int | None:
        """passdb_cache_verify_plain: a result from the cache, or None to ask the passdb."""
        hit = self._lookup(req, template, db_id, use_expired)
        if hit is None:
            return None
        if hit.value == b"":
            log.info("passdb.unknown_user", message="unknown user (cached)", **req.log_context())
            return PassdbResult.USER_UNKNOWN
        parts = split_tabescaped(hit.value)
        if parts[0] == b"":
            log.info("cache.hit", message="Cached NULL password access", **req.log_context())
            ret = 1
        else:
            scheme, stored = split_scheme(parts[0])
            ret = await verify_password_off_loop(
                req,
                password,
                stored,
                scheme or "PLAIN",
                log_mismatch=not (hit.node.last_success or hit.negative_expired),
            )
            if ret == 0 and (hit.node.last_success or hit.negative_expired):
                # The last login succeeded: the password probably changed. Ask the passdb.
                hit.node.last_success = False
                return None
        hit.node.last_success = ret > 0
        req.set_fields(parts[1:])
        return PassdbResult.OK if ret > 0 else PassdbResult.PASSWORD_MISMATCH

    def lookup_credentials(
        self, req: AuthRequest, template: bytes, db_id: int, *, use_expired: bool
    ) -> tuple[int, bytes | None, str | None] | None:
        """passdb_cache_lookup_credentials: (result, password, scheme) or None."""
        hit = self._lookup(req, template, db_id, use_expired)
        if hit is None:
            return None
        if hit.value == b"":
            return PassdbResult.USER_UNKNOWN, None, None
        parts = split_tabescaped(hit.value)
        req.set_fields(parts[1:])
        if parts[0] == b"":
            return PassdbResult.OK, None, None
        scheme, stored = split_scheme(parts[0])
        return PassdbResult.OK, stored, scheme

    def save(self, req: AuthRequest, template: bytes, db_id: int, result: int, default_scheme: str) -> None:
        """auth_request_save_cache: remember a (non-internal-failure) passdb answer."""
        if result in (PassdbResult.NEXT, PassdbResult.USER_DISABLED, PassdbResult.PASS_EXPIRED):
            return  # a cache hit would wrongly turn these into a success
        key = expand_key(req, template, db_id, user=req.translated_user)
        if result < 0:
            if result == PassdbResult.USER_UNKNOWN:
                self.cache.insert(key, b"", last_success=False)
            return
        password = req.passdb_password
        if password is None and b"nopassword" not in req.extra_fields:
            if result != PassdbResult.OK or req.mech_password is None:
                return
            # The passdb verified the password itself: cache a hash of it.
            hashed = generate(req.mech_password, CACHED_PASSWORD_SCHEME, user=req.user or b"")
            password = b"{" + CACHED_PASSWORD_SCHEME.encode() + b"}" + hashed
        value = b""
        if password is not None:
            if not password.startswith(b"{"):
                password = b"{" + default_scheme.encode() + b"}" + password
            value = tab_escape(password)
        if len(req.extra_fields):
            value += b"\t" + b"\t".join(f.wire() for f in req.extra_fields.changed())
        self.cache.insert(key, value, last_success=result == PassdbResult.OK)


class UserdbCache:
    def __init__(self, cache: AuthCache) -> None:
        self.cache = cache

    def lookup(self, req: AuthRequest, template: bytes, db_id: int, *, use_expired: bool) -> int | None:
        """auth_request_lookup_user_cache."""
        hit = self.cache.lookup(expand_key(req, template, db_id, user=req.translated_user))
        if hit is None or (hit.expired and not use_expired):
            return None
        if hit.value == b"":
            return UserdbResult.USER_UNKNOWN
        for item in split_tabescaped(hit.value):
            key, _, value = item.partition(b"=")
            if key and key != USER_KEY_IGNORE.strip():
                req.set_userdb_field(key, value)
        return UserdbResult.OK

    def save(self, req: AuthRequest, template: bytes, db_id: int, result: int) -> None:
        """auth_request_userdb_save_cache."""
        if result == UserdbResult.USER_UNKNOWN:
            value = b""
        else:
            reply = req.userdb_reply
            value = b"\t".join(f.wire() for f in reply.changed()) if reply is not None else b""
            if req.user_changed_by_lookup:
                value += (b"\t" if value else b"") + b"user=" + tab_escape(req.user or b"")
            if not value:
                value = USER_KEY_IGNORE
        self.cache.insert(expand_key(req, template, db_id, user=req.translated_user), value, last_success=False)

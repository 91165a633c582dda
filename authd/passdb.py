"""The passdb chain: which passdb answers, and what its answer means.

A faithful port of Dovecot 2.3's auth_request_verify_plain and
auth_request_handle_passdb_callback: skip filters, deny passdbs, the result_*
rules, field snapshots and rollbacks between passdbs, and how an earlier internal
failure turns a later plain failure into a temporary one.
"""

from __future__ import annotations

import enum
import fnmatch
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from authd.auth_request import AuthRequest
from authd.cache_glue import PassdbCache, Template24
from authd.password_check import handle_credentials
from lua_api.results import PassdbResult

log = structlog.get_logger("authd.passdb")

#: Bytes a plaintext password may not contain (they could not be passed on to a passdb).
_ILLEGAL_PASSWORD_CHARS = re.compile(rb"[\x01\t\r\n]")


class Rule(enum.Enum):
    RETURN = "return"
    RETURN_OK = "return-ok"
    RETURN_FAIL = "return-fail"
    CONTINUE = "continue"
    CONTINUE_OK = "continue-ok"
    CONTINUE_FAIL = "continue-fail"


class PassdbDriver(Protocol):
    async def verify_plain(self, req: AuthRequest, password: bytes) -> int: ...

    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class PassdbEntry:
    """One [[passdb]]: a driver plus the chain rules around it."""

    driver: PassdbDriver
    name: str = ""
    deny: bool = False
    master: bool = False
    skip: str = "never"
    result_success: Rule = Rule.RETURN_OK
    result_failure: Rule = Rule.CONTINUE
    result_internalfail: Rule = Rule.CONTINUE
    mechanisms: tuple[str, ...] = ()
    username_filter: tuple[str, ...] = ()
    #: The %! of this passdb (also part of its cache keys).
    db_id: int = 0
    #: The canonical cache key template (auth_cache_parse_key); None: not cached.
    cache_key: bytes | None = None
    default_scheme: str = "PLAIN"
    #: 2.4 Lua: the cache key is what the script's auth_*_get_cache_key() returns (after start).
    cache_key_from_script: bool = False

    @property
    def label(self) -> str:
        """How metrics and logs name this passdb: its name, else its position."""
        return self.name or f"passdb{self.db_id}"

    def wants_skip(self, req: AuthRequest) -> bool:
        """auth_request_want_skip_passdb."""
        if self.mechanisms:
            mech = (req.mech or b"").decode("latin-1").upper()
            allowed = {m.upper() for m in self.mechanisms}
            if mech not in allowed and not (req.mech is None and "NONE" in allowed):
                return True
        if self.username_filter and not username_accepted(self.username_filter, req.user or b""):
            return True
        if self.skip == "authenticated":
            return req.skip_password_check
        if self.skip == "unauthenticated":
            return not req.skip_password_check
        return False


def username_accepted(filters: Sequence[str], username: bytes) -> bool:
    """auth_request_username_accepted: wildcards, `!` excludes; any include must match."""
    name = username.decode("utf-8", "replace")
    have_includes = matched = False
    for pattern in filters:
        exclude = pattern.startswith("!")
        glob = pattern[1:] if exclude else pattern
        if not exclude:
            have_includes = True
        if fnmatch.fnmatchcase(name, glob):
            if exclude:
                return False
            matched = True
    return matched or not have_includes


def _worker_result(req: AuthRequest, entry: PassdbEntry, result: int) -> int:
    """What Dovecot's auth worker answers for a blocking passdb: an OK whose fields failed a
    check (allow_nets, allow_real_nets, ...) comes back as a password mismatch, so a PASS
    lookup gets FAIL; a passdb in the main process turns it into "user unknown" later.
    """
    if result == PassdbResult.OK and req.failed and getattr(entry.driver, "blocking", False) is True:
        return PassdbResult.PASSWORD_MISMATCH
    return result


@dataclass
class PassdbChain:
    """The configured passdbs in order (master passdbs kept apart)."""

    entries: list[PassdbEntry] = field(default_factory=list)
    cache: PassdbCache | None = None
    #: Called with (db name, "passdb", seconds) after each backend call (metrics).
    observe: Callable[[str, str, float], None] = lambda db, kind, seconds: None

    @property
    def normal(self) -> list[PassdbEntry]:
        return [e for e in self.entries if not e.master]

    @property
    def masters(self) -> list[PassdbEntry]:
        return [e for e in self.entries if e.master]

    async def start(self) -> None:
        for entry in self.entries:
            await entry.driver.start()
            if entry.cache_key_from_script:
                template = getattr(entry.driver, "cache_key_template", None)
                entry.cache_key = Template24(template) if template is not None else None

    async def close(self) -> None:
        for entry in self.entries:
            await entry.driver.close()

    def _first(self, req: AuthRequest) -> list[PassdbEntry]:
        return self.masters if req.login_user is not None and self.masters else self.normal

    async def verify_plain(self, req: AuthRequest, password: bytes) -> int:
        """Run the chain for a plaintext password; returns the final passdb result."""
        req.mech_password = password
        chain = self._first(req)
        index = 0
        result: int
        while True:
            if _ILLEGAL_PASSWORD_CHARS.search(password) is not None:
                log.info(
                    "auth.password",
                    message="Attempted login with password having illegal chars",
                    **req.log_context(),
                )
                result = PassdbResult.USER_UNKNOWN
                break
            index = self._skip(req, chain, index)
            if index >= len(chain):
                result = self._all_skipped(req)
                break
            entry = chain[index]
            req.user_changed_by_lookup = False
            result = await self._verify_one(req, entry, password)
            done, result, chain, index = self._handle_result(req, entry, result, chain, index)
            if done:
                break
        req.passdb_result = result
        return result

    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]:
        """auth_request_lookup_credentials: credentials in `scheme` ("" = any, for PASS)."""
        chain = self._first(req)
        index = 0
        delayed: bytes | None = None
        credentials: bytes | None = None
        while True:
            index = self._skip(req, chain, index)
            if index >= len(chain):
                result, credentials = self._all_skipped(req), None
                break
            entry = chain[index]
            req.user_changed_by_lookup = False
            result, credentials = await self._lookup_one(req, entry, scheme)
            done, result, chain, index = self._handle_result(req, entry, result, chain, index)
            if done:
                break
            if req.skip_password_check and delayed is None and credentials:
                delayed = credentials
        if delayed is not None and not credentials:
            credentials = delayed
        if result == PassdbResult.SCHEME_NOT_AVAILABLE and req.passdbs_seen_user_unknown:
            result = PassdbResult.USER_UNKNOWN
        req.passdb_result = result
        return result, credentials

    async def _verify_one(self, req: AuthRequest, entry: PassdbEntry, password: bytes) -> int:
        """One passdb's answer for a password, through the cache when it has one."""
        cache = self.cache if entry.cache_key is not None else None
        if cache is not None and entry.cache_key is not None:
            cached = await cache.verify_plain(req, entry.cache_key, entry.db_id, password, use_expired=False)
            if cached is not None:
                return cached
        started = time.monotonic()
        result = _worker_result(req, entry, await entry.driver.verify_plain(req, password))
        self.observe(entry.label, "passdb", time.monotonic() - started)
        if result == PassdbResult.OK and b"noauthenticate" in req.extra_fields:
            result = PassdbResult.NEXT
        if cache is None or entry.cache_key is None:
            return result
        if result != PassdbResult.INTERNAL_FAILURE:
            cache.save(req, entry.cache_key, entry.db_id, result, entry.default_scheme)
            return result
        # The backend failed: an expired cache entry is better than nothing.
        cached = await cache.verify_plain(req, entry.cache_key, entry.db_id, password, use_expired=True)
        if cached is None:
            return result
        log.info("cache.fallback", message="Falling back to expired data from cache", **req.log_context())
        return cached

    async def _lookup_one(self, req: AuthRequest, entry: PassdbEntry, scheme: str) -> tuple[int, bytes | None]:
        """One passdb's credentials, through the cache when it has one."""
        cache = self.cache if entry.cache_key is not None else None
        if cache is not None and entry.cache_key is not None:
            cached = cache.lookup_credentials(req, entry.cache_key, entry.db_id, use_expired=False)
            if cached is not None:
                return handle_credentials(req, cached[0], cached[1], cached[2] or "PLAIN", scheme)
        started = time.monotonic()
        result, credentials = await entry.driver.lookup_credentials(req, scheme)
        result = _worker_result(req, entry, result)
        self.observe(entry.label, "passdb", time.monotonic() - started)
        if result == PassdbResult.OK and b"noauthenticate" in req.extra_fields:
            result = PassdbResult.NEXT
        if cache is None or entry.cache_key is None:
            return result, credentials
        if result != PassdbResult.INTERNAL_FAILURE:
            cache.save(req, entry.cache_key, entry.db_id, result, entry.default_scheme)
            return result, credentials
        cached = cache.lookup_credentials(req, entry.cache_key, entry.db_id, use_expired=True)
        if cached is None:
            return result, credentials
        log.info("cache.fallback", message="Falling back to expired data from cache", **req.log_context())
        return handle_credentials(req, cached[0], cached[1], cached[2] or "PLAIN", scheme)

    @staticmethod
    def _skip(req: AuthRequest, chain: list[PassdbEntry], index: int) -> int:
        while index < len(chain) and chain[index].wants_skip(req):
            index += 1
        return index

    @staticmethod
    def _all_skipped(req: AuthRequest) -> int:
        log.error("auth.passdb", message="All password databases were skipped", **req.log_context())
        return PassdbResult.INTERNAL_FAILURE

    def _handle_result(
        self, req: AuthRequest, entry: PassdbEntry, result: int, chain: list[PassdbEntry], index: int
    ) -> tuple[bool, int, list[PassdbEntry], int]:
        """auth_request_handle_passdb_callback: returns (done, result, chain, next index)."""
        if entry.deny and result != PassdbResult.USER_UNKNOWN:
            if result != PassdbResult.INTERNAL_FAILURE:
                log.info("auth.passdb", message="User found from deny passdb", **req.log_context())
                result = PassdbResult.USER_DISABLED
            return True, result, chain, index
        if req.failed:
            if result == PassdbResult.OK:
                result = PassdbResult.USER_UNKNOWN
            req.failed = False
        if result == PassdbResult.USER_DISABLED:
            return True, result, chain, index
        if result == PassdbResult.PASS_EXPIRED:
            req.set_field(b"reason", b"Password expired")
            return True, result, chain, index
        if result == PassdbResult.OK:
            rule = entry.result_success
        elif result == PassdbResult.INTERNAL_FAILURE:
            rule = entry.result_internalfail
        elif result == PassdbResult.NEXT:
            rule = Rule.CONTINUE
        else:
            rule = entry.result_failure
        carry_on = False
        if rule is Rule.RETURN_OK:
            req.passdb_success = True
        elif rule is Rule.RETURN_FAIL:
            req.passdb_success = False
        elif rule is Rule.CONTINUE:
            carry_on = True
            if result == PassdbResult.OK:
                req.skip_password_check = True
        elif rule is Rule.CONTINUE_OK:
            carry_on = True
            req.passdb_success = True
            req.skip_password_check = True
        elif rule is Rule.CONTINUE_FAIL:
            carry_on = True
            req.passdb_success = False
        req.extra_fields.remove(b"nopassword")
        req.extra_fields.remove(b"noauthenticate")

        if req.login_user is not None and result == PassdbResult.OK:
            self._master_login_finish(req)
            chain, next_index = self.normal, 0
        else:
            next_index = index + 1
        next_index = self._skip(req, chain, next_index)

        if result in (PassdbResult.OK, PassdbResult.NEXT):
            req.extra_fields.snapshot()
            req.snapshot_prefetch = req.userdb_prefetch_set
            if req.userdb_reply is not None:
                req.userdb_reply.snapshot()
        else:
            req.extra_fields.rollback()
            if req.userdb_reply is not None:
                req.userdb_reply.rollback()
                req.userdb_prefetch_set = req.snapshot_prefetch

        if carry_on and next_index < len(chain):
            req.passdb_password = None
            if result == PassdbResult.USER_UNKNOWN:
                req.passdbs_seen_user_unknown = True
            elif result == PassdbResult.INTERNAL_FAILURE:
                req.passdbs_seen_internal_failure = True
            return False, result, chain, next_index
        if result == PassdbResult.NEXT:
            log.error(
                "auth.passdb",
                message="Last passdb had noauthenticate field, cannot authenticate user",
                **req.log_context(),
            )
            result = PassdbResult.INTERNAL_FAILURE
        elif req.passdb_success:
            result = PassdbResult.OK
        elif req.passdbs_seen_internal_failure:
            result = PassdbResult.INTERNAL_FAILURE
        return True, result, chain, next_index

    def _master_login_finish(self, req: AuthRequest) -> None:
        """auth_request_master_user_login_finish: the master user becomes auth_user."""
        if req.failed:
            return
        target = (req.login_user or b"").decode("utf-8", "replace")
        log.info("auth.master_login", message=f"Master user logging in as {target}", **req.log_context())
        req.master_user = req.user
        req.user = req.login_user
        req.translated_user = req.login_user
        req.login_user = None

"""The userdb chain and the prefetch driver (Dovecot 2.3 auth_request_lookup_user).

Userdbs run in order with the same result_* rules as passdbs; fields of a failed
userdb are rolled back; `prefetch` serves the userdb_* fields a passdb returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from authd.auth_request import AuthRequest
from authd.cache_glue import Template24, UserdbCache
from authd.fields import AuthFields
from authd.passdb import Rule
from lua_api.results import IterateResult, UserdbResult

log = structlog.get_logger("authd.userdb")


class UserdbDriver(Protocol):
    async def lookup(self, req: AuthRequest) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class PrefetchUserdb:
    """userdb prefetch: the userdb_* fields the passdb lookup already returned."""

    def __init__(self, *, alone: bool) -> None:
        self.alone = alone

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def lookup(self, req: AuthRequest) -> int:
        if req.userdb_prefetch_set:
            return UserdbResult.OK
        if self.alone:
            message = (
                "userdb lookup not possible with only userdb prefetch"
                if req.userdb_lookup and req.passdb_result is None
                else "passdb didn't return userdb entries"
            )
            log.error("userdb.prefetch", message=message, **req.log_context())
            return UserdbResult.INTERNAL_FAILURE
        return UserdbResult.USER_UNKNOWN


@dataclass
class UserdbEntry:
    driver: UserdbDriver
    name: str = ""
    skip: str = "never"
    result_success: Rule = Rule.RETURN_OK
    result_failure: Rule = Rule.CONTINUE
    result_internalfail: Rule = Rule.CONTINUE
    db_id: int = 0
    cache_key: bytes | None = None
    #: 2.4 Lua: the cache key is what the script's auth_*_get_cache_key() returns (after start).
    cache_key_from_script: bool = False

    def wants_skip(self, req: AuthRequest) -> bool:
        if self.skip == "found":
            return req.userdb_success
        if self.skip == "notfound":
            return not req.userdb_success
        return False


@dataclass
class UserdbChain:
    entries: list[UserdbEntry] = field(default_factory=list)
    cache: UserdbCache | None = None
    observe: Callable[[str, str, float], None] = lambda db, kind, seconds: None

    async def start(self) -> None:
        for entry in self.entries:
            await entry.driver.start()
            if entry.cache_key_from_script:
                template = getattr(entry.driver, "cache_key_template", None)
                entry.cache_key = Template24(template) if template is not None else None

    async def close(self) -> None:
        for entry in self.entries:
            await entry.driver.close()

    async def lookup(self, req: AuthRequest) -> int:
        """Run the userdbs for `req.user`; returns the final userdb result."""
        req.userdb_lookup = True
        if req.userdb_reply is None:
            req.userdb_reply = AuthFields()
        if not self.entries:
            log.error("userdb.none", message="No userdbs configured", **req.log_context())
            return UserdbResult.INTERNAL_FAILURE
        index = 0
        result: int
        while True:
            entry = self.entries[index]
            req.user_changed_by_lookup = False
            result = await self._lookup_one(req, entry)
            rule = {
                int(UserdbResult.OK): entry.result_success,
                UserdbResult.INTERNAL_FAILURE: entry.result_internalfail,
            }.get(result, entry.result_failure)
            carry_on = rule in (Rule.CONTINUE, Rule.CONTINUE_OK, Rule.CONTINUE_FAIL)
            if rule in (Rule.RETURN_OK, Rule.CONTINUE_OK):
                req.userdb_success = True
            elif rule in (Rule.RETURN_FAIL, Rule.CONTINUE_FAIL):
                req.userdb_success = False
            index += 1
            while index < len(self.entries) and self.entries[index].wants_skip(req):
                index += 1
            if carry_on and index < len(self.entries):
                if result == UserdbResult.INTERNAL_FAILURE:
                    req.userdbs_seen_internal_failure = True
                if result == UserdbResult.OK:
                    req.userdb_reply.snapshot()
                else:
                    req.userdb_reply.rollback()
                continue
            break
        if req.userdb_success:
            result = UserdbResult.OK
        elif req.userdbs_seen_internal_failure or result == UserdbResult.INTERNAL_FAILURE:
            result = UserdbResult.INTERNAL_FAILURE
        else:
            if req.client_pid:
                log.error("userdb.not_found", message="user not found from userdb", **req.log_context())
            result = UserdbResult.USER_UNKNOWN
        if req.userdb_lookup_tempfailed:
            result = UserdbResult.INTERNAL_FAILURE
        return result

    async def _lookup_one(self, req: AuthRequest, entry: UserdbEntry) -> int:
        """One userdb's answer, through the cache when it has one."""
        cache, key = self.cache, entry.cache_key
        if cache is not None and key is not None:
            cached = cache.lookup(req, key, entry.db_id, use_expired=False)
            if cached is not None:
                return cached
        started = time.monotonic()
        result = await entry.driver.lookup(req)
        self.observe(entry.name or f"userdb{entry.db_id}", "userdb", time.monotonic() - started)
        if cache is None or key is None:
            return result
        if req.userdb_lookup_tempfailed:
            return result  # never cached
        if result != UserdbResult.INTERNAL_FAILURE:
            cache.save(req, key, entry.db_id, result)
            return result
        cached = cache.lookup(req, key, entry.db_id, use_expired=True)
        if cached is None:
            return result
        log.info("cache.fallback", message="Falling back to expired data from cache", **req.log_context())
        return cached

    async def iterate(self) -> list[IterateResult]:
        """Every iterable userdb's users, in order (LIST)."""
        results = []
        for entry in self.entries:
            iterate = getattr(entry.driver, "iterate", None)
            if iterate is not None:
                results.append(await iterate())
        return results

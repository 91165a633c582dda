"""The auth cache's size bound holds in real memory: entries are counted by what they cost.

60,000 users go through the real cache code (PassdbCache.save into AuthCache); tracemalloc measures what it holds.
"""

from __future__ import annotations

import gc
import tracemalloc

from authd.auth_request import AuthRequest, UsernameRules
from authd.cache import AuthCache
from authd.cache_glue import PassdbCache, UserdbCache, parse_cache_key
from lua_api.results import PassdbResult, UserdbResult

MAX_SIZE = 2 * 1024 * 1024  # [cache] size = "2M"
USERS = 60_000
HASH = b"{SHA512-CRYPT}$6$rounds=5000$abcdefghijklmnop$" + b"x" * 86


def entries(number: int) -> list[tuple[bytes, bytes]]:
    """What a login and its userdb lookup store for one user: the passdb's password and fields,
    then the userdb's fields (PassdbCache.save and UserdbCache.save build exactly these)."""
    user = b"user%05d@example.com" % number
    return [
        (b"P1\t" + user, HASH + b"\tquota_rule=*:storage=%dM" % number),
        (b"U1\t" + user, b"home=/var/mail/" + user + b"\tuid=5000"),
    ]


def test_the_entries_are_what_the_glue_stores() -> None:
    cache = AuthCache(MAX_SIZE, ttl=3600, negative_ttl=3600)
    rules, template = UsernameRules(), parse_cache_key("%u")
    for number in (7, 12345):
        user = b"user%05d@example.com" % number
        req = AuthRequest(rules, id=number)
        req.user = req.translated_user = user
        req.set_field(b"password", HASH, "CRYPT")
        req.set_field(b"quota_rule", b"*:storage=%dM" % number, "PLAIN")
        PassdbCache(cache).save(req, template, 1, PassdbResult.OK, "CRYPT")
        req.userdb_lookup = True
        req.set_userdb_field(b"home", b"/var/mail/" + user)
        req.set_userdb_field(b"uid", b"5000")
        UserdbCache(cache).save(req, template, 1, UserdbResult.OK)
        for key, value in entries(number):
            hit = cache.lookup(key)
            assert hit is not None and hit.value == value


def test_a_full_cache_holds_its_configured_size_in_real_memory() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = AuthCache(MAX_SIZE, ttl=3600, negative_ttl=3600)
        largest = 0
        for number in range(USERS):
            for key, value in entries(number):
                cache.insert(key, value, last_success=key.startswith(b"P"))
                largest = max(largest, cache.size)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert largest <= MAX_SIZE  # the counted size never went over
    assert 0 < len(cache) < 2 * USERS  # it did evict
    assert abs(held - MAX_SIZE) <= MAX_SIZE * 0.2, (held, cache.size, len(cache))
    assert abs(held - cache.size) <= MAX_SIZE * 0.1, (held, cache.size)  # the count is what it costs
    hit = cache.lookup(b"P1\tuser%05d@example.com" % (USERS - 1))
    assert hit is not None and hit.value.startswith(b"{SHA512-CRYPT}")

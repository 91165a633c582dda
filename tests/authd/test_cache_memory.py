"""The auth cache's size bound holds in real memory: entries are counted by what they cost.

60,000 users go through the real cache code (PassdbCache.save into AuthCache); tracemalloc measures what it holds.
"""

from __future__ import annotations

import base64
import gc
import re
import tracemalloc
import urllib.request
from pathlib import Path

from authd.auth_request import AuthRequest, UsernameRules
from authd.cache import AuthCache
from authd.cache_glue import PassdbCache, UserdbCache, parse_cache_key
from lua_api.results import PassdbResult, UserdbResult
from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire

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


SCRIPT = """\
function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw quota_rule=*:storage=1G"
end
"""


def test_the_size_holds_for_all_processes_together(tmp_path: Path) -> None:
    """Each process has its own cache: [cache] size is spread over them, as [lua] workers is."""
    config = (
        "[auth]\nfailure_delay = 0\npenalty = false\n[cache]\nsize = 100000\n"
        '[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[lua]\nworkers = 2\n'
        '[server]\nprocesses = 2\n[metrics]\naddress = "127.0.0.1"\nport = 0\n'
        '[[listener]]\ntype = "client"\npath = "auth-client"\n'
    )
    with AuthdProcess(tmp_path, config, {"s.lua": SCRIPT}) as proc:
        wires = [Wire.auth_client(proc.socket("auth-client"), timeout=20) for _ in range(4)]  # two per process
        try:
            for number, wire in enumerate(wires):
                wire.send("VERSION\t1\t2", f"CPID\t{number + 1}")
                users = [f"user{number}-{i:04d}@example.com" for i in range(400)]
                for start in range(0, len(users), 100):
                    batch = users[start : start + 100]
                    wire.send(
                        *(f"AUTH\t{start + i + 1}\tPLAIN\tservice=imap\tresp={plain(u)}" for i, u in enumerate(batch))
                    )
                    assert all(wire.read_line().startswith("OK\t") for _ in batch)
        finally:
            for wire in wires:
                wire.close()
        port = proc.wait_for_log(lambda e: e.get("event") == "metrics.ready")["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            page = response.read().decode()
    size = float(re.search(r"^authd_cache_bytes (\S+)$", page, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert 80_000 <= size <= 100_000, size


def plain(user: str) -> str:
    return base64.b64encode(f"\0{user}\0pw".encode()).decode()

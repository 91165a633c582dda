"""The auth cache: Dovecot's semantics, unit-level and through a real authd."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.cache import AuthCache
from authd.cache_glue import parse_cache_key
from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lru_ttl_and_negative_ttl() -> None:
    clock = Clock()
    cache = AuthCache(10_000, ttl=60, negative_ttl=10, clock=clock)
    cache.insert(b"P1\talice", b"{PLAIN}x", last_success=True)
    cache.insert(b"P1\tnobody", b"", last_success=False)
    hit = cache.lookup(b"P1\talice")
    assert hit is not None and not hit.expired and hit.value == b"{PLAIN}x"
    clock.now += 11
    negative = cache.lookup(b"P1\tnobody")
    assert negative is not None and negative.expired  # negative entries live negative_ttl
    positive = cache.lookup(b"P1\talice")
    assert positive is not None and not positive.expired and positive.negative_expired
    clock.now += 60
    expired = cache.lookup(b"P1\talice")
    assert expired is not None and expired.expired  # still returned, for the fallback
    assert cache.lookup(b"P1\tmissing") is None
    assert (cache.hits, cache.misses) == (2, 3)


def test_size_bound_evicts_least_recently_used() -> None:
    cache = AuthCache(1000, ttl=60, negative_ttl=60)  # two entries with their table
    for name in (b"a", b"b", b"c", b"d"):
        cache.insert(b"P1\t" + name, b"x" * 40, last_success=False)
        cache.lookup(b"P1\ta")  # keep "a" hot
    assert cache.size <= 1000 and len(cache) == 2
    assert cache.lookup(b"P1\ta") is not None
    assert cache.lookup(b"P1\tb") is None


def test_no_negative_cache_when_negative_ttl_is_zero() -> None:
    cache = AuthCache(10_000, ttl=60, negative_ttl=0)
    cache.insert(b"P1\tnobody", b"", last_success=False)
    assert len(cache) == 0


def test_clear_users_matches_the_key_like_dovecot() -> None:
    cache = AuthCache(10_000, ttl=60, negative_ttl=60)
    for key in (b"P1\talice", b"U1\talice", b"P1+boss\talice", b"P2\talice\timap", b"P1\talicex", b"P1\tbob"):
        cache.insert(key, b"v", last_success=False)
    assert cache.clear_users([b"alice"]) == 4
    assert cache.lookup(b"P1\talicex") is not None and cache.lookup(b"P1\tbob") is not None
    assert cache.clear() == 2 and len(cache) == 0 and cache.size == 0


@pytest.mark.parametrize(
    ("template", "canonical"),
    [("%u", b"%u"), ("%n@%d", b"%u"), ("%{user}", b"%u"), ("%s:%Lu", b"%u\t%s"), ("%{rip} %u", b"%u\t%r")],
)
def test_cache_key_templates_are_canonical(template: str, canonical: bytes) -> None:
    assert parse_cache_key(template) == canonical


SCRIPT = """\
function auth_passdb_lookup(req)
  dovecot.i_info("passdb lookup " .. req.user)
  local f = io.open(STATE .. "/down")
  if f then f:close(); return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "backend down" end
  f = io.open(STATE .. "/password")
  local password = f and f:read("*l")
  if f then f:close() end
  if req.user ~= "alice" then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no" end
  return dovecot.auth.PASSDB_RESULT_OK, "password=" .. password .. " quota=1"
end

function auth_userdb_lookup(req)
  dovecot.i_info("userdb lookup " .. req.user)
  if req.user ~= "alice" then return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no" end
  return dovecot.auth.USERDB_RESULT_OK, "uid=1000 home=/h/alice"
end
"""


@pytest.fixture
def cached_authd(tmp_path: Path) -> Iterator[AuthdProcess]:
    (tmp_path / "password").write_text("secret1\n")
    config = (
        "[auth]\nfailure_delay = 0\npenalty = false\n[cache]\nsize = 1000000\nttl = 2\nnegative_ttl = 2\n"
        '[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n[[userdb]]\ndriver = "lua"\nfile = "s.lua"\n'
        "[lua]\nworkers = 1\n" + LISTENERS
    )
    proc = AuthdProcess(tmp_path, config, {"s.lua": f'STATE = "{tmp_path}"\n' + SCRIPT})
    proc.start(wait_for=("auth-client", "auth-master", "auth-userdb"))
    yield proc
    proc.stop()


def auth(authd: AuthdProcess, user: str, password: str) -> str:
    resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with Wire.auth_client(authd.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=imap\tresp={resp}")
        return w.read_line()


def lookups(authd: AuthdProcess, what: str) -> int:
    return sum(1 for e in authd.log_events() if e.get("message") == what)


def test_hit_miss_and_negative(cached_authd: AuthdProcess) -> None:
    assert auth(cached_authd, "alice", "secret1") == "OK\t1\tuser=alice\tquota=1"
    assert auth(cached_authd, "alice", "secret1") == "OK\t1\tuser=alice\tquota=1"  # fields come from the cache
    assert auth(cached_authd, "alice", "wrong") == "FAIL\t1\tuser=alice"  # mismatch after success: fresh lookup
    assert lookups(cached_authd, "passdb lookup alice") == 2
    assert auth(cached_authd, "nobody", "x") == "FAIL\t1\tuser=nobody"
    assert auth(cached_authd, "nobody", "x") == "FAIL\t1\tuser=nobody"
    assert lookups(cached_authd, "passdb lookup nobody") == 1  # negative entry


def test_changed_password_is_picked_up_after_success(cached_authd: AuthdProcess) -> None:
    assert auth(cached_authd, "alice", "secret1").startswith("OK")
    (cached_authd.workdir / "password").write_text("secret2\n")
    assert auth(cached_authd, "alice", "secret2").startswith("OK")  # not stuck on the old password
    assert auth(cached_authd, "alice", "secret1") == "FAIL\t1\tuser=alice"


def test_expiry(cached_authd: AuthdProcess) -> None:
    assert auth(cached_authd, "alice", "secret1").startswith("OK")
    time.sleep(2.2)
    assert auth(cached_authd, "alice", "secret1").startswith("OK")
    assert lookups(cached_authd, "passdb lookup alice") == 2


def test_internal_failure_falls_back_to_expired_entry(cached_authd: AuthdProcess) -> None:
    assert auth(cached_authd, "alice", "secret1").startswith("OK")
    time.sleep(2.2)
    (cached_authd.workdir / "down").write_text("")
    assert auth(cached_authd, "alice", "secret1") == "OK\t1\tuser=alice\tquota=1"
    cached_authd.wait_for_log(lambda e: e.get("message") == "Falling back to expired data from cache")
    # internal failures are never cached; without an old entry they stay temporary failures
    assert auth(cached_authd, "bob", "x") == "FAIL\t1\tuser=bob\tcode=temp_fail"


def test_userdb_results_are_cached_and_flushed(cached_authd: AuthdProcess) -> None:
    with Wire.auth_master(cached_authd.socket("auth-master")) as w:
        w.send("VERSION\t1\t0", "USER\t1\talice\tservice=lmtp")
        assert w.read_line() == "USER\t1\talice\tuid=1000\thome=/h/alice"
        w.send("USER\t2\talice\tservice=lmtp")
        assert w.read_line() == "USER\t2\talice\tuid=1000\thome=/h/alice"
        assert lookups(cached_authd, "userdb lookup alice") == 1
        w.send("CACHE-FLUSH\t3\talice")
        assert w.read_line() == "OK\t3\t1"
        w.send("USER\t4\talice\tservice=lmtp")
        assert w.read_line() == "USER\t4\talice\tuid=1000\thome=/h/alice"
    assert lookups(cached_authd, "userdb lookup alice") == 2


@pytest.mark.requires("doveadm")
def test_doveadm_auth_cache_flush(cached_authd: AuthdProcess) -> None:
    from tests.interop.dovecot import doveadm

    auth(cached_authd, "alice", "secret1")
    auth(cached_authd, "nobody", "x")
    flushed = doveadm(None, "auth", "cache", "flush", "-a", str(cached_authd.socket("auth-master")), "alice")
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout == "1 cache entries flushed\n"
    everything = doveadm(None, "auth", "cache", "flush", "-a", str(cached_authd.socket("auth-master")))
    assert everything.stdout == "1 cache entries flushed\n"


def test_cli_cache_flush(cached_authd: AuthdProcess) -> None:
    from tests.authd.test_cli import authd

    auth(cached_authd, "alice", "secret1")
    auth(cached_authd, "nobody", "x")
    master = str(cached_authd.socket("auth-master"))
    one = authd("cache", "flush", "--socket", master, "alice")
    assert (one.returncode, one.stdout) == (0, "1 cache entries flushed\n"), one.stderr
    rest = authd("cache", "flush", "--socket", master)
    assert (rest.returncode, rest.stdout) == (0, "1 cache entries flushed\n"), rest.stderr
    userdb = authd("cache", "flush", "--socket", str(cached_authd.socket("auth-userdb")))
    assert userdb.returncode == 1
    assert userdb.stderr == "authd: the server hung up: cache flush needs the auth-master socket\n"

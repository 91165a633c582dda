"""[[dict]] driver = "redis" (authd/state/dict_redis.py) on a real redis-server, with data
written and read by Dovecot's own dict-redis (doveadm dict) where it is installed.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from authd.state.dict_redis import RedisDict, redis_key
from config.schema import DictSettings
from lua_api.dict import DictExtension
from lua_api.runtime import LuaState, StateOptions, drive, run_in_loop
from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire
from tests.lua_api.conftest import RecordingHost
from tests.state.conftest import RedisServer

DOVEADM = shutil.which("doveadm")
#: A username with Dovecot's separator and its escape character in it.
ODD_USER = "al/i\\ce"


def raw(server: RedisServer, *parts: bytes) -> bytes:
    """One command over RESP; the whole reply."""
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(request)
        return sock.recv(65536)


def state_for(server: RedisServer, **settings: Any) -> tuple[LuaState, RedisDict]:
    driver = RedisDict(DictSettings("r", driver="redis", url=server.url, **settings))
    return LuaState(RecordingHost(), StateOptions(extensions=(DictExtension({"r": driver}),))), driver


def python(state: LuaState, value: Any) -> Any:
    if state.module.lua_type(value) == "table":
        return [python(state, value[i]) for i in range(1, len(value) + 1)]
    return value


async def lua(state: LuaState, code: str) -> list[Any]:
    fn = state.lua.eval(f"function() d = authd.dict('r') result = table.pack((function() {code} end)()) end".encode())
    outcome = await drive(state, fn, b"none", run_in_loop)
    assert outcome.ok, outcome.error
    packed = state.lua.globals()[b"result"]
    return [python(state, packed[i]) for i in range(1, packed[b"n"] + 1)]


def test_key_mapping_is_dovecots() -> None:
    assert redis_key(b"", b"shared/quota/x", None) == b"quota/x"
    assert redis_key(b"dv-", b"priv/last_login", b"bob") == b"dv-bob/last_login"
    assert redis_key(b"dv-", b"priv/last_login", ODD_USER.encode()) == b"dv-al\\-i\\\\ce/last_login"
    # without a '/' in the username Dovecot leaves '\' alone
    assert redis_key(b"", b"priv/k", b"a\\b") == b"a\\b/k"


async def test_lookup_set_unset_and_keys(redis_server: RedisServer) -> None:
    state, _ = state_for(redis_server, key_prefix="dv-")
    assert await lua(state, "return d:lookup('shared/none')") == [None]
    code = "local t = d:transaction_begin(%r) t:set('priv/last_login', '1700000000') t:set('shared/x', 'y') t:commit()"
    assert await lua(state, code % ODD_USER + " return") == []
    assert raw(redis_server, b"GET", b"dv-al\\-i\\\\ce/last_login") == b"$10\r\n1700000000\r\n"
    assert raw(redis_server, b"GET", b"dv-x") == b"$1\r\ny\r\n"
    assert await lua(state, f"return d:lookup('priv/last_login', {ODD_USER!r})") == [[b"1700000000"]]
    assert await lua(
        state, "local t = d:transaction_begin() t:unset('shared/x') t:commit() return d:lookup('shared/x')"
    ) == [None]
    assert raw(redis_server, b"EXISTS", b"dv-x") == b":0\r\n"


async def test_atomic_inc_and_expiry(redis_server: RedisServer) -> None:
    state, _ = state_for(redis_server, expire=3600)
    inc = (
        "local t = d:transaction_begin(%s) t:atomic_inc('shared/fails', %d) t:commit() return d:lookup('shared/fails')"
    )
    assert await lua(state, inc % ("", 1)) == [[b"1"]]
    assert await lua(state, inc % ("", 4)) == [[b"5"]]
    ttl = int(raw(redis_server, b"TTL", b"fails")[1:-2])
    assert 3590 < ttl <= 3600  # the dict's expire (Dovecot's redis_expire)
    assert await lua(state, inc % ("'u', 60", 1)) == [[b"6"]]
    assert 50 < int(raw(redis_server, b"TTL", b"fails")[1:-2]) <= 60  # the transaction's expire_secs
    assert await lua(state, "local t = d:transaction_begin() t:atomic_inc('shared/w', 2, 30) t:commit() return") == []
    assert 20 < int(raw(redis_server, b"TTL", b"w")[1:-2]) <= 30  # atomic_inc's own
    # a failing change leaves the others of its commit undone
    raw(redis_server, b"SET", b"s", b"abc")
    [ok, message] = await lua(
        state,
        "return pcall(function() local t = d:transaction_begin() t:set('shared/a', '1') "
        "t:atomic_inc('shared/s', 1) t:commit() end)",
    )
    assert (ok, message) == (False, b"dict transaction commit failed: redis: value is not an integer or out of range")
    assert raw(redis_server, b"EXISTS", b"a") == b":0\r\n"


async def test_iterate_is_unsupported_as_in_dovecot(redis_server: RedisServer) -> None:
    state, _ = state_for(redis_server)
    assert await lua(state, "return pcall(function() for k in d:iterate('shared/', 0) do end end)") == [
        False,
        b"Unsupported operation (dict does not support this feature)",
    ]


async def test_shared_client_and_server_away(redis_server: RedisServer, tmp_path: Path) -> None:
    state, driver = state_for(redis_server, timeout=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver.run)
        with trio.fail_after(5):
            while driver._client is None:
                await trio.sleep(0.01)
        assert await lua(
            state, "local t = d:transaction_begin() t:set('shared/k', 'v') t:commit() return d:lookup('shared/k')"
        ) == [[b"v"]]
        nursery.cancel_scope.cancel()
    redis_server.stop()
    [ok, message] = await lua(state, "return pcall(function() return d:lookup('shared/k') end)")
    assert ok is False
    assert message.startswith(b"redis: ")


@pytest.mark.skipif(DOVEADM is None, reason="Dovecot's doveadm is not installed")
async def test_dovecots_data_reads_back_the_same(redis_server: RedisServer) -> None:
    """doveadm dict (Dovecot's own dict-redis) writes last_login and a counter; authd reads them,
    and what authd writes doveadm reads."""
    uri = f"redis:host=127.0.0.1:port={redis_server.port}:prefix=dv-"

    def doveadm(*args: str) -> str:
        # Dovecot's dict-redis without a proxy may crash on deinit (its docs warn); the data is written
        done = subprocess.run([DOVEADM or "doveadm", "-O", "dict", *args], capture_output=True, text=True, timeout=20)
        return done.stdout

    doveadm("set", "-u", ODD_USER, uri, "priv/last_login", "1700000000")
    doveadm("inc", uri, "shared/logins", "5")
    state, _ = state_for(redis_server, key_prefix="dv-")
    assert await lua(state, f"return d:lookup('priv/last_login', {ODD_USER!r}), d:lookup('shared/logins')") == [
        [b"1700000000"],
        [b"5"],
    ]
    await lua(
        state,
        "local t = d:transaction_begin('bob') t:set('priv/last_login', '42') "
        "t:atomic_inc('shared/logins', 2) t:commit() return",
    )
    assert doveadm("get", "-u", "bob", uri, "priv/last_login").strip() == "42"
    assert doveadm("get", uri, "shared/logins").strip() == "7"


SCRIPT = """\
local d = authd.dict("r")

function script_init()
  local t = d:transaction_begin()
  t:set("shared/started", "yes")
  t:commit()
  return 0
end

function auth_passdb_lookup(req)
  local t = d:transaction_begin(req.user)
  t:atomic_inc("priv/logins", 1)
  t:commit()
  return dovecot.auth.PASSDB_RESULT_OK,
    "password=pw logins=" .. d:lookup("priv/logins", req.user)[1] .. " started=" .. d:lookup("shared/started")[1]
end
"""


def test_daemon_with_a_redis_dict(tmp_path: Path, redis_server: RedisServer) -> None:
    config = f"""\
[auth]
failure_delay = 0
penalty = false

[[listener]]
type = "client"
path = "auth-client"

[[passdb]]
driver = "lua"
file = "s.lua"

[[dict]]
name = "r"
driver = "redis"
url = "{redis_server.url}"
key_prefix = "authd-"
"""
    resp = base64.b64encode(b"\0alice\0pw").decode()
    with (
        AuthdProcess(tmp_path / "authd", config, {"s.lua": SCRIPT}) as proc,
        Wire.auth_client(proc.socket("auth-client")) as w,
    ):
        w.send("VERSION\t1\t2", "CPID\t7")
        for i in (1, 2):
            w.send(f"AUTH\t{i}\tPLAIN\tservice=imap\tresp={resp}")
            assert w.read_line() == f"OK\t{i}\tuser=alice\tlogins={i}\tstarted=yes"
    assert raw(redis_server, b"GET", b"authd-alice/logins") == b"$1\r\n2\r\n"

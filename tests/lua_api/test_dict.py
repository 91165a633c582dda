"""authd.dict(name) with the memory driver (lua_api/dict.py, lua_api/dict.lua).

Return shapes and error texts are those of Dovecot's dict-lua.c, dict-iter-lua.c and dict-txn-lua.c.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from config import ConfigError
from config.load import parse_config
from config.schema import DictSettings
from lua_api.dict import DictExtension, MemoryDict
from lua_api.pool import thread_executor
from lua_api.runtime import Executor, LuaState, StateOptions, drive, run_in_loop
from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire
from tests.lua_api.conftest import RecordingHost

#: Dovecot's own conformance script (src/lib-lua/test-dict-lua.c), as a script function.
DOVECOT_TEST = """
function test_dict(dict)
  local trans = dict:transaction_begin()
  trans:set('shared/testkey', 'testvalue')
  trans:set('shared/testkey2', 'testvalue2')
  trans:commit()

  assert(dict:lookup('shared/testkey')[1] == 'testvalue')
  assert(dict:lookup('shared/testkey2')[1] == 'testvalue2')

  local key, values
  local table = {}
  for key, values in dict:iterate('shared/', 0) do
    assert(#values == 1)
    table[key] = values[1]
  end
  assert(table['shared/testkey'] == 'testvalue')
  assert(table['shared/testkey2'] == 'testvalue2')

  trans = dict:transaction_begin()
  trans:set_timestamp({['tv_sec'] = 1631278269, ['tv_nsec'] = 999999999})
  trans:set('shared/testkey', 'updated')
  trans:unset('shared/testkey2')
  trans:commit()

  assert(dict:lookup('shared/testkey')[1] == 'updated')
  assert(dict:lookup('shared/testkey2') == nil)
  return 'ok'
end
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_with(**dicts: MemoryDict) -> LuaState:
    ext = DictExtension(dicts or {"mem": MemoryDict()})
    return LuaState(RecordingHost(), StateOptions(extensions=(ext,)))


def python(state: LuaState, value: Any) -> Any:
    if state.module.lua_type(value) == "table":
        if len(value) == 0 and len(list(value.keys())) > 0:
            return {k: python(state, v) for k, v in value.items()}
        return [python(state, value[i]) for i in range(1, len(value) + 1)]
    return value


async def lua(state: LuaState, code: str, run: Executor = run_in_loop) -> list[Any]:
    """Run `code` (statements ending in a return) in a call, as entry points run; all its values."""
    fn = state.lua.eval(f"function() d = authd.dict('mem') result = table.pack((function() {code} end)()) end".encode())
    outcome = await drive(state, fn, b"none", run)
    assert outcome.ok, outcome.error
    packed = state.lua.globals()[b"result"]
    return [python(state, packed[i]) for i in range(1, packed[b"n"] + 1)]


async def error_of(state: LuaState, code: str) -> bytes:
    """The error `code` raises, caught by pcall in the script (positions start with the chunk's name)."""
    [ok, message] = await lua(state, f"return pcall(function() {code} end)")
    assert ok is False
    assert isinstance(message, bytes)
    return message


async def test_dovecots_conformance_script() -> None:
    state = state_with()
    state.lua.execute(DOVECOT_TEST.encode())
    assert await lua(state, "return test_dict(d)") == [b"ok"]


async def test_lookup_shapes() -> None:
    state = state_with()
    assert await lua(state, "return d:lookup('shared/none')") == [None]  # exactly one value, nil
    await lua(state, "local t = d:transaction_begin() t:set('shared/a', 'x') t:set('shared/n', 12) t:commit() return")
    assert await lua(state, "return d:lookup('shared/a')") == [[b"x"]]
    assert await lua(state, "return d:lookup('shared/n')") == [[b"12"]]  # luaL_checkstring turns numbers into strings
    assert await lua(state, "return d:lookup('shared/a', 'someone')") == [[b"x"]]
    # commit returns nothing; set/unset/rollback return nothing
    assert await lua(state, "local t = d:transaction_begin() return t:commit()") == []
    assert await lua(state, "local t = d:transaction_begin() return t:set('shared/b', 'y')") == []
    assert await lua(state, "local t = d:transaction_begin() return t:rollback()") == []


async def test_priv_keys_belong_to_their_user() -> None:
    state = state_with()
    await lua(state, "local t = d:transaction_begin('alice') t:set('priv/last_login', '1700000000') t:commit() return")
    assert await lua(state, "return d:lookup('priv/last_login', 'alice')") == [[b"1700000000"]]
    assert await lua(state, "return d:lookup('priv/last_login', 'bob')") == [None]
    assert await lua(state, "return d:iterate('priv/', 0, 'alice')(nil, nil)") == [b"priv/last_login", [b"1700000000"]]


async def test_argument_and_prefix_errors() -> None:
    state = state_with()
    line = b'[string "<python>"]:1: '
    assert await error_of(state, "d:lookup()") == line + b"expected 2 to 3 arguments, got 1"
    assert await error_of(state, "d:lookup('shared/a', 'u', 'x')") == line + b"expected 2 to 3 arguments, got 4"
    assert await error_of(state, "d:lookup('other/a')") == line + b"Invalid dict key prefix"
    assert await error_of(state, "d:lookup('priv/a')") == line + b"priv/ dict key prefix requires username"
    assert await error_of(state, "d:lookup('priv/a', '')") == line + b"priv/ dict key prefix requires username"
    assert await error_of(state, "d:iterate('shared/')") == line + b"expected 3 to 4 arguments, got 2"
    assert await error_of(state, "d:iterate('x/', 0)") == line + b"Invalid dict key prefix"
    assert await error_of(state, "d:transaction_begin('u', 5, 6)") == line + b"expected 1 to 3 arguments, got 4"
    assert await error_of(state, "d:transaction_begin():set('shared/a')") == line + b"expected 3 arguments, got 2"
    assert await error_of(state, "d:transaction_begin():unset()") == line + b"expected 2 arguments, got 1"
    assert await error_of(state, "d:transaction_begin():commit(1)") == line + b"expected 1 arguments, got 2"
    assert await error_of(state, "d:transaction_begin():set('priv/a', 'v')") == (
        line + b"priv/ dict key prefix requires username"
    )
    assert await error_of(state, "d:transaction_begin():unset('nope')") == line + b"Invalid dict key prefix"
    assert await error_of(state, "d:transaction_begin():set_timestamp({tv_nsec = 1})") == (
        line + b"tv_sec missing from table"
    )
    assert await error_of(state, "d:transaction_begin():set_timestamp({tv_sec = 1})") == (
        line + b"tv_nsec missing from table"
    )
    assert await error_of(state, "d:lookup(nil)") == line + b"bad argument #1 to 'lookup' (string expected, got nil)"
    assert await error_of(state, "d:iterate('shared/', 'x')") == (
        line + b"bad argument #2 to 'iterate' (number expected, got string)"
    )
    assert await error_of(state, "authd.dict('nosuch')") == line + b"authd.dict: no dict named 'nosuch' is configured"


async def test_commit_and_rollback_states() -> None:
    state = state_with()
    line = b'[string "<python>"]:1: '
    assert await error_of(state, "local t = d:transaction_begin() t:commit() t:commit()") == (
        line + b"dict transaction already committed"
    )
    assert await error_of(state, "local t = d:transaction_begin() t:commit() t:rollback()") == (
        line + b"dict transaction already committed"
    )
    assert await error_of(state, "local t = d:transaction_begin() t:rollback() t:commit()") == (
        line + b"dict transaction already aborted"
    )
    assert await error_of(state, "local t = d:transaction_begin() t:rollback() t:set('shared/a', 'b')") == (
        line + b"dict transaction already aborted"
    )
    # a rolled-back transaction changes nothing
    await lua(state, "local t = d:transaction_begin() t:set('shared/r', 'v') t:rollback() return")
    assert await lua(state, "return d:lookup('shared/r')") == [None]


async def test_iterate_flags_and_constants() -> None:
    state = state_with()
    assert await lua(
        state,
        "local f = dovecot.dict return f.ITERATE_FLAG_RECURSE, f.ITERATE_FLAG_SORT_BY_KEY, "
        "f.ITERATE_FLAG_SORT_BY_VALUE, f.ITERATE_FLAG_NO_VALUE, f.ITERATE_FLAG_EXACT_KEY, f.ITERATE_FLAG_ASYNC, "
        "math.type(f.ITERATE_FLAG_RECURSE)",
    ) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, b"float"]
    await lua(
        state,
        "local t = d:transaction_begin() t:set('shared/b', '1') t:set('shared/a', '3') "
        "t:set('shared/a/deep', '2') t:set('shared/c', '0') t:commit() return",
    )
    iterate = "local out = {} for k, v in d:iterate(%s) do out[#out + 1] = k out[#out + 1] = v end return out"
    assert await lua(state, iterate % "'shared/', dovecot.dict.ITERATE_FLAG_SORT_BY_KEY") == [
        [b"shared/a", [b"3"], b"shared/b", [b"1"], b"shared/c", [b"0"]]
    ]
    assert await lua(state, iterate % "'shared/', 1 | 4") == [
        [b"shared/c", [b"0"], b"shared/b", [b"1"], b"shared/a/deep", [b"2"], b"shared/a", [b"3"]]
    ]
    assert await lua(state, iterate % "'shared/a', dovecot.dict.ITERATE_FLAG_EXACT_KEY") == [[b"shared/a", [b"3"]]]
    # Dovecot hands NULL values to Lua here (and crashes); authd gives an empty table
    assert await lua(state, iterate % "'shared/b', 8 | 16") == [[b"shared/b", []]]
    # the step function takes exactly two arguments and ends with nothing
    assert await error_of(state, "local step, it = d:iterate('shared/', 0) step(it)") == (
        b'[string "<python>"]:1: expected 2 arguments, got 1'
    )
    assert await lua(state, "local step, it = d:iterate('shared/none/', 0) return step(it, nil)") == []


async def test_atomic_inc_with_expiry() -> None:
    clock = Clock()
    state = state_with(mem=MemoryDict(clock=clock))
    inc = (
        "local t = d:transaction_begin(%s) t:atomic_inc('shared/fails', %s) t:commit() return d:lookup('shared/fails')"
    )
    assert await lua(state, inc % ("", "1")) == [[b"1"]]
    assert await lua(state, inc % ("", "5")) == [[b"6"]]
    assert await lua(state, inc % ("", "-2")) == [[b"4"]]
    # expiry per key (authd) or per transaction (Dovecot's expire_secs)
    assert await lua(state, "local t = d:transaction_begin() t:atomic_inc('shared/w', 1, 60) t:commit() return") == []
    assert await lua(state, inc % ("'u', 30", "1")) == [[b"5"]]
    clock.now += 31
    assert await lua(state, "return d:lookup('shared/fails'), d:lookup('shared/w')") == [None, [b"1"]]
    clock.now += 30
    assert await lua(state, "return d:lookup('shared/w')") == [None]
    await lua(state, "local t = d:transaction_begin() t:set('shared/s', 'abc') t:commit() return")
    assert await error_of(state, "local t = d:transaction_begin() t:atomic_inc('shared/s', 1) t:commit()") == (
        b"dict transaction commit failed: Key shared/s is not a number"
    )
    assert await error_of(state, "d:transaction_begin():atomic_inc('shared/s', 1.5)") == (
        b"[string \"<python>\"]:1: bad argument #2 to 'atomic_inc' (number has no integer representation)"
    )


async def test_memory_dict_is_bounded() -> None:
    state = state_with(mem=MemoryDict(max_keys=2))
    await lua(state, "local t = d:transaction_begin() t:set('shared/a', '1') t:set('shared/b', '2') t:commit() return")
    assert await error_of(state, "local t = d:transaction_begin() t:set('shared/c', '3') t:commit()") == (
        b"dict transaction commit failed: dict is full (max_keys = 2)"
    )
    # overwriting keeps within the bound
    assert await lua(
        state, "local t = d:transaction_begin() t:set('shared/a', '9') t:commit() return d:lookup('shared/a')"
    ) == [[b"9"]]


async def test_calls_yield_to_the_event_loop() -> None:
    """While one call waits in a slow driver, the event loop runs other tasks."""
    release = trio.Event()
    ticks: list[int] = []

    class Slow(MemoryDict):
        async def lookup(self, key: bytes, username: bytes | None) -> tuple[bytes, ...] | None:
            await release.wait()
            return (b"late",)

    state = state_with(mem=Slow())
    results: list[Any] = []

    async def call() -> None:
        results.append(await lua(state, "return d:lookup('shared/x')"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        for i in range(3):
            await trio.sleep(0.01)
            ticks.append(i)
        release.set()
    assert ticks == [0, 1, 2]
    assert results == [[[b"late"]]]


@pytest.mark.parametrize("where", ["threads", "init"])
async def test_usable_from_threads_and_script_init(where: str) -> None:
    """From worker threads the call runs in the daemon's loop; outside any call (script
    loading, where Lua cannot yield) it blocks for its answer."""
    state = state_with()
    if where == "threads":
        assert await lua(
            state,
            "local t = d:transaction_begin() t:set('shared/t', 'v') t:commit() return d:lookup('shared/t')",
            thread_executor(trio.CapacityLimiter(1)),
        ) == [[b"v"]]
    else:
        state.lua.execute(b"local t = authd.dict('mem'):transaction_begin() t:set('shared/i', 'v') t:commit()")
        assert await lua(state, "return d:lookup('shared/i')") == [[b"v"]]


DAEMON_SCRIPT = """\
local d = authd.dict("counters")

function script_init()
  local t = d:transaction_begin()
  t:set("shared/started", "yes")
  t:commit()
  return 0
end

function auth_passdb_lookup(req)
  local t = d:transaction_begin(req.user, 300)
  t:atomic_inc("priv/lookups", 1)
  t:commit()
  local n = d:lookup("priv/lookups", req.user)[1]
  return dovecot.auth.PASSDB_RESULT_OK, "password=pw lookups=" .. n .. " started=" .. d:lookup("shared/started")[1]
end
"""

DAEMON_CONFIG = """\
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
name = "counters"
driver = "memory"
"""


def test_daemon_scripts_use_configured_dicts(tmp_path: Path) -> None:
    """A real authd: [[dict]] configured, written in script_init, counted per user in the entry point."""
    with (
        AuthdProcess(tmp_path, DAEMON_CONFIG, {"s.lua": DAEMON_SCRIPT}) as proc,
        Wire.auth_client(proc.socket("auth-client")) as w,
    ):
        w.send("VERSION\t1\t2", "CPID\t7")
        for i, user in enumerate(["alice", "alice", "bob", "alice"], start=1):
            w.send(f"AUTH\t{i}\tPLAIN\tservice=imap\tresp={plain(user)}")
        assert [w.read_line() for _ in range(4)] == [
            "OK\t1\tuser=alice\tlookups=1\tstarted=yes",
            "OK\t2\tuser=alice\tlookups=2\tstarted=yes",
            "OK\t3\tuser=bob\tlookups=1\tstarted=yes",
            "OK\t4\tuser=alice\tlookups=3\tstarted=yes",
        ]


def parse(data: dict[str, Any]) -> Any:
    return parse_config(data, require_listeners=False)


def test_dict_config() -> None:
    config = parse({"dict": [{"name": "a"}, {"name": "b", "driver": "memory", "max_keys": 5}]})
    assert config.dicts == (DictSettings("a"), DictSettings("b", max_keys=5))
    with pytest.raises(ConfigError, match=r"dict\[1\]\.name: another \[\[dict\]\] is named 'a'"):
        parse({"dict": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"dict\[0\]\.driver"):
        parse({"dict": [{"name": "a", "driver": "nosuch"}]})
    with pytest.raises(ConfigError, match=r"dict\[0\]\.name: every \[\[dict\]\] needs a name"):
        parse({"dict": [{"driver": "memory"}]})
    with pytest.raises(ConfigError, match=r"dict\[0\]\.bogus: unknown setting"):
        parse({"dict": [{"name": "a", "bogus": 1}]})


def plain(user: str) -> str:
    return base64.b64encode(f"\0{user}\0pw".encode()).decode()


VERSION_CHILD = """\
import sys, trio
from lua_api.dict import DictExtension, MemoryDict
from lua_api.runtime import LuaState, StateOptions, drive, run_in_loop
from tests.lua_api.conftest import RecordingHost

async def main():
    options = StateOptions(version=sys.argv[1], extensions=(DictExtension({"m": MemoryDict()}),))
    state = LuaState(RecordingHost(), options)
    fn = state.lua.eval(
        b"function() local d = authd.dict('m') local t = d:transaction_begin() t:atomic_inc('shared/n', 2) "
        b"t:set('shared/a', 'b') t:commit() local out = {} "
        b"for k, v in d:iterate('shared/', dovecot.dict.ITERATE_FLAG_SORT_BY_KEY) do "
        b"out[#out + 1] = k .. '=' .. v[1] end "
        b"r = table.concat(out, ',') .. ' ' .. d:lookup('shared/n')[1] .. ' ' .. select(2, pcall(t.commit, t)) end"
    )
    outcome = await drive(state, fn, b"none", run_in_loop)
    assert outcome.ok, outcome.error
    print(state.lua.globals()[b"r"].decode())

trio.run(main)
"""


@pytest.mark.parametrize("version", ["5.1", "luajit", "5.3"])
def test_other_lua_versions(version: str) -> None:
    """The other Lua versions (each in a child interpreter: one lupa module per process)."""
    done = subprocess.run(
        [sys.executable, "-c", VERSION_CHILD, version],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=60,
        check=True,
    )
    assert done.stdout == "shared/a=b,shared/n=2 2 dict transaction already committed\n"

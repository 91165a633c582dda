"""Entry points, events and the 2.4 additions on the other Lua versions authd offers.

Only one lupa Lua flavour may be loaded per process (its symbols are global for C
modules), so each version runs in a child interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.authd_process import REPO

CHILD = r"""
import json, pathlib, sys, tempfile, trio
from lua_api.request import LuaRequest
from lua_api.request_vars import RequestVars
from lua_api.runtime import LuaState, StateOptions, run_in_loop
from lua_api.script import Script

class Host:
    lines = []
    def log(self, level, message, context): self.lines.append(message)
    def password_verify(self, context, crypted, plain): return 0, None

SOURCE = '''
function auth_passdb_lookup(req)
  dovecot.event():append_log_prefix("e: "):log_info("x")
  req:event():log_info("y")
  local ok, err = pcall(function() dovecot.event():add_int("n", 1.5) end)
  return 1, {user = req.user, err = err:gsub("^.-:%d+: ", ""),
    esc = dovecot.tabescape and dovecot.tabescape("a\\tb") or "none"}
end
'''

async def main():
    out = {}
    for dialect in ("2.3", "2.4"):
        path = pathlib.Path(tempfile.mkdtemp()) / "s.lua"
        path.write_text(SOURCE)
        host = Host()
        host.lines = []
        script = Script(path, LuaState(host, StateOptions(version=sys.argv[1], dialect=dialect)))
        await script.load(run_in_loop)
        result = await script.passdb_lookup(LuaRequest(RequestVars(user=b"alice")), run_in_loop)
        out[dialect] = {"fields": {k.decode(): v.decode() for k, v in result.fields}, "log": host.lines}
    print(json.dumps(out))

trio.run(main)
"""


@pytest.mark.parametrize("version", ["5.1", "luajit", "5.3"])
def test_version(version: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, version], capture_output=True, text=True, cwd=REPO, timeout=60, check=True
    )
    out = json.loads(done.stdout)
    err = "bad argument #2 to 'add_int' (number has no integer representation)"
    assert out["2.3"] == {"fields": {"user": "alice", "err": err, "esc": "none"}, "log": ["e: x", "lua(alice): y"]}
    assert out["2.4"] == {"fields": {"user": "alice", "err": err, "esc": "a\x01tb"}, "log": ["e: x", "lua(alice): y"]}

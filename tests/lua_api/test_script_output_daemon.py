"""A real authd: what a script prints never lands among its log lines, unless asked for at debug.

chatmail's doveauth script print()s a hex-encoded password; Dovecot sends that to /dev/null.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire

SCRIPT = """
function auth_passdb_lookup(req)
  print("pw", (req.password:gsub(".", function(c) return string.format("%02x", c:byte()) end)))
  io.write("written\\n")
  io.stderr:write("to stderr\\n")
  io.popen("echo child says hello >&2"):read("a")
  return dovecot.auth.PASSDB_RESULT_OK, "password=right"
end
"""

HEX_PASSWORD = b"right".hex().encode()


def login(authd: AuthdProcess) -> str:
    resp = base64.b64encode(b"\0alice\0right").decode()
    with Wire.auth_client(authd.socket("auth-client"), timeout=20) as wire:
        wire.send("VERSION\t1\t2", "CPID\t1", f"AUTH\t1\tPLAIN\tservice=smtp\tresp={resp}")
        return wire.read_line()


@pytest.mark.parametrize("log_output", [False, True])
def test_script_output_and_child_stderr(tmp_path: Path, log_output: bool) -> None:
    config = (
        '[auth]\nfailure_delay = 0\ndebug = true\n[[passdb]]\ndriver = "lua"\nfile = "s.lua"\n'
        f'[lua]\nworkers = 1\nlog_script_output = {str(log_output).lower()}\n[log]\nlevel = "debug"\n' + LISTENERS
    )
    with AuthdProcess(tmp_path, config, {"s.lua": SCRIPT}) as authd:
        assert login(authd) == "OK\t1\tuser=alice"
        authd.wait_for_log(lambda e: e.get("event") == "lua.popen_stderr")
    raw = authd.log_path.read_bytes()
    for line in raw.splitlines():
        json.loads(line)  # every line authd wrote to stdout and stderr is a JSON event
    events = [json.loads(line) for line in raw.splitlines()]
    script = str(tmp_path / "s.lua")
    child = [(e["level"], e["script"], e["line"]) for e in events if e["event"] == "lua.popen_stderr"]
    assert child == [("error", script, "child says hello")]
    output = [(e["level"], e["script"], e["stream"], e["line"]) for e in events if e["event"] == "lua.output"]
    if log_output:
        assert output == [
            ("debug", script, "stdout", f"pw\t{HEX_PASSWORD.decode()}"),
            ("debug", script, "stdout", "written"),
            ("debug", script, "stderr", "to stderr"),
        ]
    else:
        assert output == []
        assert HEX_PASSWORD not in raw and b"written" not in raw and b"to stderr" not in raw

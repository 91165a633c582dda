"""[[dict]] driver = "file" (authd/state/dict_file.py): Dovecot's dict-file format, read and
written by Dovecot's own doveadm dict where it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from authd.state.dict_file import FileDict
from authd.state.dict_redis import open_dicts
from config.load import parse_config
from lua_api.dict import DictExtension
from lua_api.runtime import LuaState, StateOptions, drive, run_in_loop
from tests.lua_api.conftest import RecordingHost

DOVEADM = shutil.which("doveadm")


def state_for(path: Path) -> LuaState:
    return LuaState(RecordingHost(), StateOptions(extensions=(DictExtension({"f": FileDict(path)}),)))


def python(state: LuaState, value: Any) -> Any:
    if state.module.lua_type(value) == "table":
        return [python(state, value[i]) for i in range(1, len(value) + 1)]
    return value


async def lua(state: LuaState, code: str) -> list[Any]:
    fn = state.lua.eval(f"function() d = authd.dict('f') result = table.pack((function() {code} end)()) end".encode())
    outcome = await drive(state, fn, b"none", run_in_loop)
    assert outcome.ok, outcome.error
    packed = state.lua.globals()[b"result"]
    return [python(state, packed[i]) for i in range(1, packed[b"n"] + 1)]


async def test_file_format_and_changes(tmp_path: Path) -> None:
    path = tmp_path / "d.dict"
    state = state_for(path)
    assert await lua(state, "return d:lookup('shared/x')") == [None]
    await lua(
        state,
        "local t = d:transaction_begin('bob') t:set('shared/x', 'a\\tb\\n\\1') t:set('priv/last_login', '17') "
        "t:atomic_inc('shared/n', 3) t:commit() return",
    )
    assert path.read_bytes() == b"shared/x\na\x01tb\x01n\x011\npriv/last_login\n17\nshared/n\n3\n"
    assert await lua(state, "return d:lookup('shared/x'), d:lookup('priv/last_login', 'bob')") == [
        [b"a\tb\n\x01"],
        [b"17"],
    ]
    # another writer (another authd process): the file is read again
    path.write_bytes(b"shared/x\nnew\n")
    assert await lua(state, "return d:lookup('shared/x'), d:lookup('shared/n')") == [[b"new"], None]
    await lua(state, "local t = d:transaction_begin() t:atomic_inc('shared/x', 1) t:unset('shared/none') return")
    assert await lua(
        state, "return pcall(function() local t = d:transaction_begin() t:atomic_inc('shared/x', 1) t:commit() end)"
    ) == [False, b"dict transaction commit failed: Key shared/x is not a number"]
    assert await lua(
        state, "local out = {} for k, v in d:iterate('shared/', 0) do out[#out + 1] = k .. '=' .. v[1] end return out"
    ) == [[b"shared/x=new"]]


async def test_expiry_is_not_supported_as_in_dovecot(tmp_path: Path) -> None:
    state = state_for(tmp_path / "d.dict")
    message = b"dict transaction commit failed: Expiration not supported by dict driver"
    assert await lua(
        state, "return pcall(function() local t = d:transaction_begin('u', 5) t:set('shared/a', '1') t:commit() end)"
    ) == [False, message]
    assert await lua(
        state, "return pcall(function() local t = d:transaction_begin() t:atomic_inc('shared/a', 1, 5) t:commit() end)"
    ) == [False, message]
    assert not (tmp_path / "d.dict").exists()


@pytest.mark.skipif(DOVEADM is None, reason="Dovecot's doveadm is not installed")
async def test_dovecots_file_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "d.dict"

    def doveadm(*args: str) -> str:
        done = subprocess.run([DOVEADM or "doveadm", "-O", "dict", *args], capture_output=True, text=True, timeout=20)
        return done.stdout

    doveadm("set", f"file:{path}", "shared/x", "a\tb")
    doveadm("set", "-u", "bob", f"file:{path}", "priv/last_login", "17")
    state = state_for(path)
    assert await lua(state, "return d:lookup('shared/x'), d:lookup('priv/last_login', 'bob')") == [
        [b"a\tb"],
        [b"17"],
    ]
    await lua(
        state,
        "local t = d:transaction_begin() t:set('shared/y', 'c\\nd') t:atomic_inc('shared/n', 2) t:commit() return",
    )
    assert doveadm("get", f"file:{path}", "shared/y").rstrip() == "c\nd"
    doveadm("inc", f"file:{path}", "shared/n", "5")
    assert await lua(state, "return d:lookup('shared/n')") == [[b"7"]]


def test_file_dict_config(tmp_path: Path) -> None:
    config = parse_config(
        {"dict": [{"name": "f", "driver": "file", "path": "d.dict"}]}, tmp_path / "authd.toml", require_listeners=False
    )
    assert config.dicts[0].path == tmp_path / "d.dict"
    assert isinstance(open_dicts(config.dicts)["f"], FileDict)
    with pytest.raises(Exception, match=r"dict\[0\]\.path: a file dict needs the path of its file"):
        parse_config({"dict": [{"name": "f", "driver": "file"}]}, require_listeners=False)

"""`authd try` on every compat fixture: the same script, request and backend as the daemon's."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.authd_process import REPO
from tests.http_backend import HttpBackend

from .harness import NEXTCLOUD_APP_PASSWORD, USERLI_TOKEN, backends_for_scripts, render_scripts

#: script -> (user, password that works, password that does not)
CASES = {
    "nextcloud.lua": ("alice", NEXTCLOUD_APP_PASSWORD, "Abcde-Fghij-Klmno-Pqrst-Uvwxz"),
    "json_cjson.lua": ("alice@example.org", "alicepass", "wrong"),
    "json_purelua.lua": ("alice@example.org", "alicepass", "wrong"),
    "proxy.lua": ("alice@example.org", "alicepass", "wrong"),
    "userli.lua": ("alice@example.org", "alicepass", "wrong"),
    "users_file.lua": ("alice", "alicepass", "wrong"),
    "request_api.lua": ("alice@example.org", "pw-SSHA256", "wrong"),
}


@dataclass
class Scripts:
    """The fixtures rendered for `try`, with backends of their own (the daemons' count their requests)."""

    lua_dir: Path
    backends: dict[str, HttpBackend]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scripts]:
    lua_dir = tmp_path_factory.mktemp("try-scripts")
    with ExitStack() as stack:
        backends = {name: stack.enter_context(HttpBackend(b)) for name, b in backends_for_scripts().items()}
        render_scripts(lua_dir, {name: backend.url for name, backend in backends.items()})
        yield Scripts(lua_dir, backends)


def authd_try(scripts: Scripts, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        USERLI_API_URL=scripts.backends["userli.lua"].url,
        USERLI_API_ACCESS_TOKEN=USERLI_TOKEN,
    )
    command = [sys.executable, "-m", "authd.cli", "try", "--script", str(scripts.lua_dir / script)]
    command += ["--import-environment", "USERLI_API_URL", "--import-environment", "USERLI_API_ACCESS_TOKEN"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, env=env)


#: Fixtures that are passdb-only, as their real-world originals.
PASSDB_ONLY = {"nextcloud.lua", "proxy.lua"}


@pytest.mark.parametrize("script", sorted(CASES))
def test_try_runs_each_fixture(scripts: Scripts, script: str) -> None:
    user, good, bad = CASES[script]
    done = authd_try(scripts, script, *([] if script in PASSDB_ONLY else ["--userdb"]), user, good)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[0] == "passdb result: PASSDB_RESULT_OK"
    assert lines[1].startswith(f"auth reply: OK\\t1\\tuser={user}")
    if script not in PASSDB_ONLY:
        assert lines[2] == "userdb result: USERDB_RESULT_OK"
        assert lines[3].startswith(f"userdb reply: USER\\t1\\t{user}\\t")
    refused = authd_try(scripts, script, user, bad)
    assert refused.returncode == 77, refused.stdout + refused.stderr
    assert refused.stdout.splitlines()[1].startswith("auth reply: FAIL\\t1")

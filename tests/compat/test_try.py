"""`authd try` on every compat fixture: the same script, request and backend as the daemon's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.authd_process import REPO

from .harness import NEXTCLOUD_APP_PASSWORD, USERLI_TOKEN, CompatAuthd, Deployment

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


def authd_try(compat: Deployment[CompatAuthd], script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        USERLI_API_URL=compat.backends["userli.lua"].url,
        USERLI_API_ACCESS_TOKEN=USERLI_TOKEN,
    )
    command = [sys.executable, "-m", "authd.cli", "try", "--script", str(compat.script(script))]
    command += ["--import-environment", "USERLI_API_URL", "--import-environment", "USERLI_API_ACCESS_TOKEN"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, env=env)


#: Fixtures that are passdb-only, as their real-world originals.
PASSDB_ONLY = {"nextcloud.lua", "proxy.lua"}


@pytest.mark.parametrize("script", sorted(CASES))
def test_try_runs_each_fixture(compat: Deployment[CompatAuthd], script: str) -> None:
    user, good, bad = CASES[script]
    done = authd_try(compat, script, *([] if script in PASSDB_ONLY else ["--userdb"]), user, good)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[0] == "passdb result: PASSDB_RESULT_OK"
    assert lines[1].startswith(f"auth reply: OK\\t1\\tuser={user}")
    if script not in PASSDB_ONLY:
        assert lines[2] == "userdb result: USERDB_RESULT_OK"
        assert lines[3].startswith(f"userdb reply: USER\\t1\\t{user}\\t")
    refused = authd_try(compat, script, user, bad)
    assert refused.returncode == 77, refused.stdout + refused.stderr
    assert refused.stdout.splitlines()[1].startswith("auth reply: FAIL\\t1")

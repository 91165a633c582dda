"""Dovecot 2.4 scripts served by a real authd process, checked on the wire.

Every fixture under scripts/ is marked "dialect: 2.4". The docs' examples behave as
they do on Dovecot 2.4.1+, including the ones that do not work there (req.username is
nil, a syntax error, 2.3 HTTP client options); the Mailu-style script talks to a real
local HTTP server (tests/http_backend.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, REPO, AuthdProcess
from tests.compat24.conftest import SCRIPTS, auth, config, fields, listing, user
from tests.http_backend import Account, Backend, HttpBackend


def test_every_fixture_is_marked() -> None:
    for script in SCRIPTS.glob("*.lua"):
        assert "-- dialect: 2.4" in script.read_text().splitlines()[0], script


def serve(tmp: Path, script: str, toml: str, extra: dict[str, str] | None = None) -> AuthdProcess:
    files = {script: (SCRIPTS / script).read_text(), **(extra or {})}
    proc = AuthdProcess(tmp, toml + LISTENERS, files)
    proc.start(wait_for=("auth-client", "auth-userdb"))
    return proc


@pytest.fixture(scope="module")
def init_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    tmp = tmp_path_factory.mktemp("init")
    proc = serve(
        tmp,
        "docs_init_settings.lua",
        config("docs_init_settings.lua", settings={"password": "{PLAIN}test"}, userdb=False),
    )
    yield proc
    proc.stop()


def test_init_settings_reach_script_init(init_settings: AuthdProcess) -> None:
    client = init_settings.socket("auth-client")
    assert auth(client, "alice", "test") == b"OK\t1\tuser=alice"
    assert auth(client, "bob", "test", rip="192.0.2.7") == b"OK\t1\tuser=bob"
    assert auth(client, "alice", "nope") == b"FAIL\t1\tuser=alice"


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    proc = serve(tmp_path_factory.mktemp("examples"), "docs_examples.lua", config("docs_examples.lua"))
    yield proc
    proc.stop()


def test_docs_examples(examples: AuthdProcess) -> None:
    client, userdb = examples.socket("auth-client"), examples.socket("auth-userdb")
    assert auth(client, "testuser1", "pass") == b"OK\t1\tuser=testuser1"
    assert auth(client, "testuser1", "wrong") == b"FAIL\t1\tuser=testuser1"
    assert auth(client, "someone", "pass") == b"FAIL\t1\tuser=someone"
    assert fields(user(userdb, "testuser1")) == (b"USER\t1\ttestuser1", {b"uid=65534", b"gid=65534"})
    assert user(userdb, "someone") == b"NOTFOUND\t1"
    assert listing(userdb) == [b"testuser1", b"DONE\t1\t"]


def test_docs_file_db_never_matches_on_24(tmp_path: Path) -> None:
    # `user == req.username`: username is a 2.3 field, nil on 2.4
    proc = serve(
        tmp_path,
        "docs_file_db.lua",
        config("docs_file_db.lua", userdb=False),
        {"users.txt": "alice alicepass\nbob bobpass\n"},
    )
    try:
        assert auth(proc.socket("auth-client"), "alice", "alicepass") == b"FAIL\t1\tuser=alice"
    finally:
        proc.stop()


def check(tmp: Path, script: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`authd check` on a config serving `script`: a start-up failure without starting anything."""
    (tmp / script).write_text((SCRIPTS / script).read_text())
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    (tmp / "authd.toml").write_text(config(script) + LISTENERS)
    return subprocess.run(
        [sys.executable, "-m", "authd.cli", "check", "--config", str(tmp / "authd.toml")],
        capture_output=True,
        text=True,
        cwd=tmp,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )


def test_docs_syntax_error_is_a_clean_start_up_error(tmp_path: Path) -> None:
    # { uid = "vmail, gid = "vmail" }: the string ends at `"vmail, gid = "`
    done = check(tmp_path, "docs_file_db_iterate.lua", {"users.txt": "alice alicepass\n"})
    path = tmp_path / "docs_file_db_iterate.lua"
    assert done.returncode == 1
    prefix = f"authd: passdb-lua: Lua script '{path}': lua_load({path}) failed: "
    assert done.stderr.startswith(prefix)  # Lua shortens long chunk names in its own message
    assert done.stderr.endswith("docs_file_db_iterate.lua:30: '}' expected near 'vmail'\n")
    assert "\n" not in done.stderr[:-1]
    with pytest.raises(RuntimeError, match="expected near 'vmail'"):
        serve(tmp_path / "run", "docs_file_db_iterate.lua", config("docs_file_db_iterate.lua"))


def test_docs_http_example_fails_to_load_on_24(tmp_path: Path) -> None:
    done = check(tmp_path, "docs_http_client.lua")
    path = tmp_path / "docs_http_client.lua"
    assert done.returncode == 1
    first = done.stderr.splitlines()[0]
    # lua_next order decides which of the three 2.3 names is reported first
    assert re.fullmatch(
        rf"authd: passdb-lua: script_init\(\) failed: lua_pcall\({re.escape(str(path))}\) failed: "
        r"Invalid HTTP client setting: (timeout|max_attempts|debug) is unknown setting",
        first,
    ), first
    assert done.stderr.splitlines()[1] == "stack traceback:"


# --- the Mailu-style script against a real HTTP backend ------------------------------------


@pytest.fixture(scope="module")
def mailu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuthdProcess, Backend]]:
    backend = Backend(
        accounts={
            "alice@example.org": Account(
                "alicepass",
                userdb={"uid": 8, "gid": 12, "home": "/mail/alice@example.org", "quota_rule": "*:bytes=1000000"},
            ),
            "bob@example.org": Account(
                "bobpass", passdb={"password": "{PLAIN}bobpass", "nologin": "y", "reason": "moved to a new host"}
            ),
            "carol@example.org": Account("carolpass", state="broken"),
            "dave@example.org": Account("davepass", userdb={"home": "/mail/dave", "mail": None, "uid": "nobody"}),
        }
    )
    with HttpBackend(backend) as server:
        toml = config("mailu_style.lua", settings={"api_url": server.url})
        proc = serve(tmp_path_factory.mktemp("mailu"), "mailu_style.lua", toml)
        try:
            yield proc, backend
        finally:
            proc.stop()


def test_mailu_passdb(mailu: tuple[AuthdProcess, Backend]) -> None:
    proc, backend = mailu
    client = proc.socket("auth-client")
    assert auth(client, "alice@example.org", "alicepass", rip="192.0.2.10") == b"OK\t1\tuser=alice@example.org"
    seen = backend.seen[-1]
    # Dovecot re-encodes the decoded path: '@' is a path character, so it goes out as '@'
    assert (seen.method, seen.path) == ("POST", "/api/mailu/passdb/alice@example.org")
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["auth-user"] == "alice%40example.org" and headers["auth-pass"] == "alicepass"
    assert (headers["auth-protocol"], headers["auth-method"], headers["client-ip"]) == ("imap", "PLAIN", "192.0.2.10")
    assert (headers["auth-port"], headers["auth-ssl"]) == ("0", "")
    assert auth(client, "alice@example.org", "wrong") == b"FAIL\t1\tuser=alice@example.org"
    # the fields of a decoded JSON object come in lua_next() order, as in Dovecot
    assert fields(auth(client, "bob@example.org", "bobpass")) == (
        b"OK\t1\tuser=bob@example.org",
        {b"nologin", b"reason=moved to a new host"},
    )
    assert auth(client, "carol@example.org", "carolpass") == b"FAIL\t1\tuser=carol@example.org\tcode=temp_fail"
    assert auth(client, "nobody@example.org", "x") == b"FAIL\t1\tuser=nobody@example.org"
    proc.wait_for_log(lambda e: e.get("message") == "db-lua: backend answered 502 Bad Gateway")


def test_mailu_userdb_and_listing(mailu: tuple[AuthdProcess, Backend]) -> None:
    proc, _ = mailu
    userdb = proc.socket("auth-userdb")
    assert fields(user(userdb, "alice@example.org")) == (
        b"USER\t1\talice@example.org",
        {b"uid=8", b"gid=12", b"home=/mail/alice@example.org", b"quota_rule=*:bytes=1000000"},
    )
    # JSON null is cjson.null, a lightuserdata: 2.4 skips the field with a warning
    assert fields(user(userdb, "dave@example.org")) == (
        b"USER\t1\tdave@example.org",
        {b"home=/mail/dave", b"uid=65534"},
    )
    proc.wait_for_log(lambda e: e.get("message") == "db-lua: 'mail' has invalid value type no value - ignoring")
    assert user(userdb, "nobody@example.org") == b"NOTFOUND\t1"
    assert user(userdb, "carol@example.org") == b"FAIL\t1"
    assert listing(userdb) == [
        b"alice@example.org",
        b"bob@example.org",
        b"carol@example.org",
        b"dave@example.org",
        b"DONE\t1\t",
    ]

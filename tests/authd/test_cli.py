"""The `authd` command: serve (the bundled demo), check, test, lookup, list."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.authd_process import REPO, AuthdProcess, accepts


def authd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "authd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def test_demo_serves_and_the_test_command_authenticates(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "authd.cli", "serve"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        client = tmp_path / "run" / "authd-demo" / "auth-client"
        deadline = time.monotonic() + 30
        while not accepts(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        ok = authd("test", "--socket", str(client), "alice", "alicepass")
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout == "passdb: alice auth succeeded\nextra fields:\n  user=alice\n  \n"
        hashed = authd("test", "--socket", str(client), "-m", "LOGIN", "bob", "bobpass")
        assert hashed.returncode == 0, hashed.stderr
        wrong = authd("test", "--socket", str(client), "alice", "nope")
        assert wrong.returncode == 77
        assert wrong.stdout == "passdb: alice auth failed\nextra fields:\n  user=alice\n"
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "try: authd test --socket" in stderr
    assert "server.stopped" in stderr
    assert not client.exists()  # sockets are removed at exit


def test_check_accepts_a_good_config(tmp_path: Path) -> None:
    (tmp_path / "ok.lua").write_text("function auth_passdb_lookup(req) return 1, 'password=x' end\n")
    (tmp_path / "authd.toml").write_text(
        '[[listener]]\ntype = "client"\npath = "s"\n[[passdb]]\ndriver = "lua"\nfile = "ok.lua"\n'
    )
    done = authd("check", "--config", str(tmp_path / "authd.toml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'authd.toml'}: OK (1 listeners, 1 passdbs)\n"


def test_check_reports_config_errors(tmp_path: Path) -> None:
    (tmp_path / "authd.toml").write_text('[auth]\nfailure_delay = "soon"\n')
    done = authd("check", "--config", str(tmp_path / "authd.toml"))
    assert done.returncode == 2
    assert done.stderr == (
        f"authd: {tmp_path / 'authd.toml'}: auth.failure_delay: expected a number, got a string ('soon')\n"
    )


def test_test_against_missing_socket(tmp_path: Path) -> None:
    done = authd("test", "--socket", str(tmp_path / "nothing"), "alice", "x")
    assert done.returncode == 1
    assert done.stderr == f"authd: {tmp_path / 'nothing'}: No such file or directory\n"


def test_lookup_and_list(reference_authd: AuthdProcess) -> None:
    found = authd("lookup", "--socket", str(reference_authd.socket("auth-userdb")), "alice")
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == [
        "userdb: alice",
        "  uid       : 65534",
        "  gid       : 65534",
        "  home      : /srv/example/home/alice",
        "  quota_rule: *:storage=1G",
    ]
    missing = authd("lookup", "--socket", str(reference_authd.socket("auth-userdb")), "mallory")
    assert missing.returncode == 67
    listed = authd("list", "--socket", str(reference_authd.socket("auth-userdb")), "*a*")
    assert listed.stdout.split() == ["alice", "carol", "dave", "frank", "anonymous"]
    wrong_socket = authd("lookup", "--socket", str(reference_authd.socket("auth-client")), "alice")
    assert wrong_socket.returncode == 1
    assert "auth-client socket, not an auth-master/userdb socket" in wrong_socket.stderr


@pytest.mark.requires("doveadm")
@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SCRAM-SHA-256", "SSHA512", "CRAM-MD5"])
def test_pw_hashes_that_doveadm_verifies(scheme: str) -> None:
    made = authd("pw", "-s", scheme.lower(), "-p", "s3cret pass")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("{" + scheme + "}")
    checked = subprocess.run(
        ["doveadm", "pw", "-t", made.stdout.strip(), "-p", "s3cret pass"], capture_output=True, text=True
    )
    assert checked.stdout == made.stdout.strip() + " (verified)\n", checked.stderr
    theirs = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", "s3cret pass"], capture_output=True, text=True)
    ours = authd("pw", "-t", theirs.stdout.strip(), "-p", "s3cret pass")
    assert ours.stdout == theirs.stdout.strip() + " (verified)\n", ours.stderr


@pytest.mark.requires("doveadm")
@pytest.mark.parametrize("scheme", ["PLAIN-MD5", "SHA256", "CRAM-MD5", "PLAIN"])
def test_pw_unsalted_schemes_match_doveadm_exactly(scheme: str) -> None:
    theirs = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", "abc"], capture_output=True, text=True)
    assert authd("pw", "-s", scheme, "-p", "abc").stdout == theirs.stdout


def test_pw_errors() -> None:
    unknown = authd("pw", "-s", "NOPE", "-p", "x")
    assert (unknown.returncode, unknown.stderr) == (1, "authd pw: Unknown scheme: NOPE\n")
    wrong = authd("pw", "-t", "{PLAIN}y", "-p", "x")
    assert wrong.returncode == 1
    assert wrong.stderr == "authd pw: reverse password verification check failed: Password mismatch\n"
    bare = authd("pw", "-t", "nohash", "-p", "x")
    assert bare.stderr == "authd pw: Missing {scheme} prefix from hash\n"
    listed = authd("pw", "-l")
    assert {"SHA512-CRYPT", "SCRAM-SHA-256", "ARGON2ID", "CRAM-MD5"} <= set(listed.stdout.split())

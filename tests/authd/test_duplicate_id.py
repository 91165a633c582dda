"""A duplicate AUTH id while a SCRAM exchange waits for CONT: the client's fault, as in Dovecot.

Dovecot 2.3.19 logs "BUG: Authentication client <pid> sent a duplicate ID <id>" (pid 0 on
sockets that only authenticate) and closes the connection without another byte.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire
from tests.protocol.transcripts import capture

FIRST = base64.b64encode(b"n,,n=erin,r=abc").decode()
AUTH = f"AUTH\t1\tSCRAM-SHA-256\tservice=imap\tresp={FIRST}"


@pytest.mark.parametrize(("listener", "pid_in_message"), [("auth-client", 0), ("auth-login", 4242)])
def test_duplicate_id_during_scram_disconnects_and_logs_the_clients_bug(
    tmp_path: Path, listener: str, pid_in_message: int
) -> None:
    users = tmp_path / "users"
    users.write_text(capture.passwd_file())
    config = (
        '[auth]\nmechanisms = ["plain", "scram-sha-256"]\nfailure_delay = 0\npenalty = false\n'
        f'[[passdb]]\ndriver = "passwd-file"\nfile = "{users}"\n'
        '[[listener]]\ntype = "client"\npath = "auth-client"\n[[listener]]\ntype = "login"\npath = "auth-login"\n'
    )
    with AuthdProcess(tmp_path, config) as proc:
        with Wire.auth_client(proc.socket(listener)) as w:
            w.send("VERSION\t1\t2", "CPID\t4242", AUTH)
            challenge = w.read_line()
            assert challenge.startswith("CONT\t1\t")
            assert base64.b64decode(challenge.split("\t")[2]).startswith(b"r=abc")
            w.send(AUTH)
            assert w.read_until_eof() == []
        message = f"BUG: Authentication client {pid_in_message} sent a duplicate ID 1"
        event = proc.wait_for_log(lambda e: e.get("event") == "client.protocol_error")
        assert event["message"] == message
        assert event["level"] == "error"
        assert "exception" not in event
        assert not [e for e in proc.log_events() if e.get("event") == "auth.internal_error"]
        assert "Traceback" not in proc.log_text()
        # the daemon goes on serving
        with Wire.auth_client(proc.socket(listener)) as w:
            w.send("VERSION\t1\t2", "CPID\t4243", AUTH)
            assert w.read_line().startswith("CONT\t1\t")

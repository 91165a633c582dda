"""protocol.mechanisms.external: EXTERNAL as Dovecot 2.3 (protocol.md §2.5)."""

from __future__ import annotations

import pytest

from protocol.events import AuthFailed, CertUsernameWanted, PasswordReceived
from protocol.mechanisms import External
from protocol.mechanisms.base import Environment, Failure, NeedCertUsername, NeedPassword
from tests.protocol.replay import connect, replay


@pytest.mark.parametrize("name", ["doc-external", "external", "external-off"])
def test_transcripts(name: str) -> None:
    assert replay(name) > 0


def test_known_certificate_user_verifies_an_empty_password() -> None:
    mech = External(Environment())
    assert mech.step(b"boss") == NeedCertUsername()
    assert mech.cert_username_result(True) == NeedPassword(b"", b"", b"boss")


def test_unknown_certificate_user_fails() -> None:
    mech = External(Environment())
    mech.step(b"")
    assert mech.cert_username_result(False) == Failure("username not known")


def test_through_the_connection() -> None:
    conn = connect("EXTERNAL")
    conn.receive_data(b"AUTH\t1\tEXTERNAL\tservice=imap\tcert_username=certuser\n")
    assert conn.begin(1) == []
    assert conn.data_to_send() == b"CONT\t1\t\n"
    assert conn.receive_data(b"CONT\t1\t\n") == [CertUsernameWanted(1)]
    assert conn.cert_username_result(1, True) == [PasswordReceived(1, b"", b"", b"")]
    conn.receive_data(b"AUTH\t2\tEXTERNAL\tservice=imap\tresp=\n")
    assert conn.begin(2) == [CertUsernameWanted(2)]
    assert conn.cert_username_result(2, False) == [AuthFailed(2, "username not known")]
    conn.receive_data(b"AUTH\t3\tEXTERNAL\tservice=imap\tresp=YQBi\n")
    assert conn.begin(3) == [AuthFailed(3, "Unexpected NUL in auth data")]

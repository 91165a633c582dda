"""Every SASL mechanism through a real authd, against what Dovecot 2.3.19 answered.

The cases that captured tests/protocol/transcripts/ from a real Dovecot (capture.py)
are run again, unchanged, against authd with the same passwd-file passdb and settings.
The conversations must be the same byte for byte, except where Dovecot's randomness
enters (CRAM-MD5 challenges, SCRAM nonces and everything computed from them): those
payloads are compared as "some CONT" / "some resp=", everything else exactly.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from tests.authd_process import AuthdProcess
from tests.interop.wire import Wire
from tests.protocol.transcripts import capture

RANDOM = {"scram", "cram-md5"}


def authd_config(extra_config: str, users: Path) -> str:
    settings = dict(line.replace(" ", "").split("=", 1) for line in extra_config.splitlines() if line)
    mechanisms = ", ".join(f'"{m}"' for m in capture.MECHANISMS.split())
    auth = [f"mechanisms = [{mechanisms}]", "failure_delay = 0"]
    if "auth_anonymous_username" in settings:
        auth.append(f'anonymous_username = "{settings["auth_anonymous_username"]}"')
    if settings.get("auth_ssl_username_from_cert") == "yes":
        auth.append("ssl_username_from_cert = true")
    return (
        "[auth]\n" + "\n".join(auth) + "\n"
        f'[[passdb]]\ndriver = "passwd-file"\nfile = "{users}"\n'
        '[[userdb]]\ndriver = "static"\nargs = "uid=nobody gid=nogroup home=/tmp"\n'
        '[[listener]]\ntype = "client"\npath = "auth-client"\n'
    )


def normalise(lines: list[bytes], randomised: bool) -> list[bytes]:
    out = []
    for line in lines:
        if line.startswith(b"@") or line.startswith(b"#"):
            continue
        if randomised:  # lines are escaped: a TAB is the two characters \t
            line = re.sub(rb"^([CS]> CONT\\t\d+\\t).+$", rb"\1*", line)
            if line.startswith(b"S> OK"):
                line = re.sub(rb"\\tresp=.*?(?=\\t|\\n$)", rb"\\tresp=*", line)
        out.append(line)
    return out


def stored(name: str) -> list[bytes]:
    return [line.encode() for line in (capture.HERE / f"{name}.txt").read_text().splitlines()]


@pytest.mark.parametrize("case", capture.CAPTURES, ids=lambda case: case.name)
def test_mechanism_conversations_match_dovecot(case: capture.Capture, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(capture.passwd_file())
    with AuthdProcess(tmp_path, authd_config(case.extra_config, users)) as proc:
        conv = capture.connect(proc.socket("auth-client"))
        case.cases(conv)
        conv.sock.close()
    got = [line if line[:1] in (b"#", b"@") else capture._escape(line) for line in conv.lines]
    randomised = case.name in RANDOM
    assert normalise(got, randomised) == normalise(stored(case.name), randomised)


# Cases the captures do not cover.

CERT_CONFIG = """\
[auth]
mechanisms = ["plain", "external"]
failure_delay = 0
penalty = false
ssl_username_from_cert = true
ssl_require_client_cert = true
[[passdb]]
driver = "static"
args = "nopassword"
[[listener]]
type = "client"
path = "auth-client"
"""


def test_ssl_require_client_cert_refuses_at_once(tmp_path: Path) -> None:
    with AuthdProcess(tmp_path, CERT_CONFIG) as proc, Wire.auth_client(proc.socket("auth-client")) as w:
        w.send("VERSION\t1\t2", "CPID\t1", "AUTH\t1\tEXTERNAL\tservice=imap\tcert_username=certuser\tresp=")
        assert w.read_line() == "FAIL\t1\treason=Client didn't present valid SSL certificate"
        w.send("AUTH\t2\tEXTERNAL\tservice=imap\tvalid-client-cert\tresp=")
        assert w.read_line() == "FAIL\t2\treason=SSL certificate didn't contain username"
        w.send("AUTH\t3\tEXTERNAL\tservice=imap\tvalid-client-cert\tcert_username=CertUser\tresp=")
        assert w.read_line() == "OK\t3\tuser=certuser\toriginal_user="
        resp = base64.b64encode(b"\0alice\0whatever").decode()
        w.send(f"AUTH\t4\tPLAIN\tservice=imap\tvalid-client-cert\tcert_username=certuser\tresp={resp}")
        assert w.read_line() == "OK\t4\tuser=certuser\toriginal_user=alice"

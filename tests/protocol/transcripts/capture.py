"""Capture the mechanism transcripts in this directory from a throwaway Dovecot 2.3.

Run as root on a machine with Dovecot 2.3 installed (it is how the files were made):

    /work/venv/bin/python -m tests.protocol.transcripts.capture

Each case talks to the real auth-client socket; the server's random parts (SCRAM server
nonce, CRAM-MD5 challenge digits, time and host name) are read back from its replies and
written as `@random`/`@time`/`@hostname` lines, so a replay can inject them. The format is
described in README.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.interop.dovecot import ReferenceDovecot, db_block
from tests.interop.procs import make_workdir

HERE = Path(__file__).parent
MECHANISMS = "plain login cram-md5 scram-sha-1 scram-sha-256 oauthbearer xoauth2 external anonymous"

PASSDB = {
    b"alice": b"{PLAIN}alicepass",
    b"erin": b"{SCRAM-SHA-256}4096,8h0DZ4pyARdjelb8OYMOgg==,dKq3OAb78bdrpRZeTjqv/92Hn7RSLxX5heunb3fmUHE="
    b",SHI5o3Gqkyve0nIO7NJbouZNahHHu4YmvYxDSxawPpA=",
    b"sam": b"{SCRAM-SHA-1}4096,ZUCWFSOIGkgkDcPO/3n6Qw==,oePk8/IBAwJbvtsc6/MX42fqcUI=,xox5DPNIvlCB73WXdCHSG82gJeU=",
    b"frank": b"{CRAM-MD5}3325050039f67920243892fdaf38b2290d5fdcbd381c29e18964006d3bdf2abd",
    b"badscram": b"{SCRAM-SHA-256}10,c2FsdA==,AAAA,AAAA",
    b"certuser": b"",  # nopassword
}
PASSWORDS = {b"erin": b"erinpass", b"sam": b"sampass", b"frank": b"frankpass", b"alice": b"alicepass"}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def unb64(data: bytes) -> bytes:
    return base64.b64decode(data)


@dataclass
class Conversation:
    """One auth-client connection; records what the transcript file needs."""

    sock: socket.socket
    lines: list[bytes] = field(default_factory=list)
    buffer: bytes = b""

    def send(self, line: bytes) -> None:
        self.lines.append(b"C> " + line)
        self.sock.sendall(line + b"\n")

    def read(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.lines.append(b"S> EOF")
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.lines.append(b"S> " + line)
        return line

    def note(self, text: bytes) -> None:
        self.lines.append(text)


def connect(path: Path) -> Conversation:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(str(path))
    conv = Conversation(sock)
    while b"DONE\n" not in conv.buffer:
        conv.buffer += sock.recv(4096)
    conv.buffer = conv.buffer.split(b"DONE\n", 1)[1]
    sock.sendall(b"VERSION\t1\t2\nCPID\t4242\n")
    return conv


# --- per-mechanism helpers ---------------------------------------------------------------------


def scram_nonce_random(server_first: bytes, client_nonce: bytes) -> bytes:
    """The random bytes that make Dovecot's nonce generator produce this server nonce."""
    nonce = server_first.split(b",")[0][2 + len(client_nonce) :]
    return bytes((ord(",") if char == ord("~") else char) - 33 for char in nonce)


def scram_final(
    hash_name: str, password: bytes, first_bare: bytes, server_first: bytes, gs2: bytes, extension: bytes
) -> tuple[bytes, bytes]:
    """client-final-message without proof, and the proof (RFC 5802)."""
    attrs = dict(item.split(b"=", 1) for item in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(hash_name, password, unb64(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    without_proof = b"c=" + b64(gs2) + b",r=" + attrs[b"r"] + extension
    auth_message = first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.digest(hashlib.new(hash_name, client_key).digest(), auth_message, hash_name)
    return without_proof, bytes(a ^ b for a, b in zip(client_key, signature, strict=True))


def scram(
    conv: Conversation,
    mech: bytes,
    first: bytes,
    *,
    params: bytes = b"",
    password: bytes = b"",
    extension: bytes = b"",
    final: Callable[[bytes, bytes], bytes] | None = None,
    ack: bytes | None = b"",
) -> None:
    """AUTH with client-first; if a server-first comes, answer with a client-final.

    `extension` goes into the client-final message before the proof is computed; `final`
    builds a (broken) message from the correct proof-less part and proof.
    """
    hash_name = "sha1" if mech == b"SCRAM-SHA-1" else "sha256"
    conv.send(b"AUTH\t1\t" + mech + b"\tservice=imap\tno-penalty" + params + b"\tresp=" + b64(first))
    reply = conv.read()
    if not reply.startswith(b"CONT"):
        return
    server_first = unb64(reply.split(b"\t")[2])
    bare = first[first.index(b",", first.index(b",") + 1) + 1 :]
    client_nonce = bare.split(b"r=", 1)[1].split(b",")[0]
    conv.lines.insert(-2, b"@random " + scram_nonce_random(server_first, client_nonce).hex().encode())
    gs2 = first[: len(first) - len(bare)]
    without_proof, proof = scram_final(hash_name, password, bare, server_first, gs2, extension)
    message = without_proof + b",p=" + b64(proof) if final is None else final(without_proof, b64(proof))
    conv.send(b"CONT\t1\t" + b64(message))
    reply = conv.read()
    if reply.startswith(b"CONT") and ack is not None:
        conv.send(b"CONT\t1\t" + ack)
        conv.read()


def cram(conv: Conversation, response: Callable[[bytes], bytes], *, resp: bytes | None = None) -> None:
    conv.send(b"AUTH\t1\tCRAM-MD5\tservice=imap\tno-penalty" + (b"" if resp is None else b"\tresp=" + resp))
    challenge = unb64(conv.read().split(b"\t")[2])
    match = re.fullmatch(rb"<([0-9]{16})\.([0-9]+)@(.+)>", challenge)
    assert match is not None, challenge
    conv.lines.insert(-2, b"@random " + bytes(int(d) for d in match.group(1).decode()).hex().encode())
    conv.lines.insert(-2, b"@time " + match.group(2))
    conv.lines.insert(-2, b"@hostname " + match.group(3))
    conv.send(b"CONT\t1\t" + b64(response(challenge)))
    conv.read()


def cram_digest(user: bytes, challenge: bytes) -> bytes:
    return hmac.digest(PASSWORDS[user], challenge, "md5").hex().encode()


def auth(conv: Conversation, mech: bytes, resp: bytes | None, *conts: bytes, params: bytes = b"") -> None:
    """AUTH then CONTs, each sent only while the server keeps answering CONT."""
    line = b"AUTH\t1\t" + mech + b"\tservice=imap\tno-penalty" + params
    conv.send(line if resp is None else line + b"\tresp=" + b64(resp))
    reply = conv.read()
    for cont in conts:
        if not reply.startswith(b"CONT"):
            break
        conv.send(b"CONT\t1\t" + b64(cont))
        reply = conv.read()


# --- the cases ---------------------------------------------------------------------------------

ERIN_FIRST = b"n,,n=erin,r=rOprNGfwEbeRWgbNEkqO"


def scram_cases(conv: Conversation) -> None:
    conv.note(b"# success, the final message as an extra CONT round, then with final-resp-ok")
    scram(conv, b"SCRAM-SHA-256", ERIN_FIRST, password=b"erinpass")
    scram(conv, b"SCRAM-SHA-256", ERIN_FIRST, password=b"erinpass", params=b"\tfinal-resp-ok")
    conv.note(b"# the final round's CONT is answered with OK whatever it contains")
    scram(conv, b"SCRAM-SHA-256", ERIN_FIRST, password=b"erinpass", ack=b"Zm9v")
    scram(conv, b"SCRAM-SHA-1", b"n,,n=sam,r=fyko+d2lbbFgONRv9qkxdawL", password=b"sampass")
    conv.note(b"# gs2 flag y, extensions in both messages")
    scram(conv, b"SCRAM-SHA-256", b"y,,n=erin,r=abc,x=ext", password=b"erinpass")
    scram(conv, b"SCRAM-SHA-256", ERIN_FIRST, password=b"erinpass", extension=b",x=ext")
    conv.note(b"# a gs2 flag is judged by its first letter; c= must repeat the header as sent")
    scram(conv, b"SCRAM-SHA-256", b"nonsense,,n=erin,r=abc", password=b"erinpass")
    conv.note(b"# a login-as authzid equal to the user is no master login")
    scram(conv, b"SCRAM-SHA-256", b"n,a=erin,n=erin,r=abc", password=b"erinpass")
    conv.note(b"# wrong password")
    scram(conv, b"SCRAM-SHA-256", ERIN_FIRST, password=b"wrongpass")
    conv.note(b"# unknown user, scheme not available, broken stored secret")
    scram(conv, b"SCRAM-SHA-256", b"n,,n=nobody,r=abc", password=b"x")
    scram(conv, b"SCRAM-SHA-1", ERIN_FIRST, password=b"erinpass")
    scram(conv, b"SCRAM-SHA-256", b"n,,n=badscram,r=abc", password=b"x")
    conv.note(b"# malformed client-first messages")
    for first in (
        b"p=tls-unique,,n=erin,r=abc",
        b"x,,n=erin,r=abc",
        b"n,,n=erin",
        b"n,n=erin,r=abc",
        b"n",
        b"",
        b"n,,m=ext,n=erin,r=abc",
        b"n,,n=er=2Xin,r=abc",
        b"n,,r=abc,n=erin",
        b"n,b=x,n=erin,r=abc",
        b"n,a=bo=3Ds,n=erin,r=abc",
        b"n,,n=erin,x=abc",
        b"n,,n=,r=abc",
        b"n,,n=er=2Cin,r=abc",
    ):
        scram(conv, b"SCRAM-SHA-256", first, password=b"erinpass")
    conv.note(b"# NUL in the client-first message")
    auth(conv, b"SCRAM-SHA-256", b"n,,n=erin,r=a\x00bc")
    conv.note(b"# malformed client-final messages")
    for final in (
        lambda without, proof: b"c=eSws," + without[7:] + b",p=" + proof,
        # a changed last nonce byte (not "X" to "X": the random nonce may end in X)
        lambda without, proof: without[:-1] + (b"Y" if without.endswith(b"X") else b"X") + b",p=" + proof,
        lambda without, proof: without + b",p=" + proof[:-8] + b"====",
        lambda without, proof: without + b",p=" + proof + b",x=y",
        lambda without, proof: without + b",p=!!" + proof,
        lambda without, proof: without,
        lambda without, proof: without + b",p",
    ):
        scram(conv, b"SCRAM-SHA-256", ERIN_FIRST, password=b"erinpass", final=final)


def oauth_cases(conv: Conversation) -> None:
    conv.note(b"# protocol.md 2.8")
    host = b"\x01host=imap.example.com\x01port=143"
    auth(conv, b"OAUTHBEARER", b"n,a=alice," + host + b"\x01auth=Bearer alicepass\x01\x01")
    auth(conv, b"OAUTHBEARER", b"n,a=alice,\x01auth=Bearer badtoken\x01\x01", b"\x01")
    auth(conv, b"XOAUTH2", b"user=alice\x01auth=Bearer badtoken\x01\x01", b"")
    auth(conv, b"XOAUTH2", b"user=alice\x01auth=Bearer alicepass\x01\x01")
    conv.note(b"# the error round happens with final-resp-ok too; any CONT content ends it")
    auth(conv, b"OAUTHBEARER", b"n,a=alice,\x01auth=Bearer badtoken\x01\x01", b"xyz", params=b"\tfinal-resp-ok")
    conv.note(b"# without initial response")
    auth(conv, b"OAUTHBEARER", None, b"y,a=alice,\x01auth=bEaReR alicepass\x01\x01")
    conv.note(b"# malformed OAUTHBEARER")
    for message in (
        b"n,,\x01auth=Bearer alicepass\x01\x01",
        b"n,a=alice,\x01\x01",
        b"n,a=alice,\x01auth=Basic alicepass\x01\x01",
        b"n,a=alice,\x01auth=Bearer \x01\x01",
        b"n,a=alice,\x01auth=Bearer alice\rpass\x01\x01",
        b"p=tls-unique,a=alice,\x01auth=Bearer alicepass\x01\x01",
        b"f,n,a=alice,\x01auth=Bearer alicepass\x01\x01",
        b"n,a=al=3Dice,\x01auth=Bearer alicepass\x01\x01",
        b"n,a=al=41ice,\x01auth=Bearer alicepass\x01\x01",
        b"n, a=alice,\x01auth=Bearer alicepass\x01\x01",
        b"\x01auth=Bearer alicepass\x01\x01",
        b"",
        b"n,a=alice,\x01auth=Bearer alicepass",
        b"n,a=nobody,\x01auth=Bearer alicepass\x01\x01",
        b"n,a=alice,\x01auth=Bearer alicepass\x01auth=Bearer x\x01\x01",
    ):
        auth(conv, b"OAUTHBEARER", message, b"")
    conv.note(b"# malformed XOAUTH2")
    for message in (
        b"user=alice\x01\x01",
        b"auth=Bearer alicepass\x01\x01",
        b"user=alice\x01auth=Bearer\x01\x01",
        b"user=alice\x01auth=bearer alicepass",
        b"user=\x01auth=Bearer alicepass\x01\x01",
        b"user=al=2Cice\x01auth=Bearer alicepass\x01\x01",
    ):
        auth(conv, b"XOAUTH2", message, b"")
    auth(conv, b"XOAUTH2", b"user=alice\x01auth=Bearer alice\x00pass\x01\x01")


def cram_cases(conv: Conversation) -> None:
    conv.note(b"# stored {CRAM-MD5} context and a plaintext password")
    cram(conv, lambda c: b"frank " + cram_digest(b"frank", c))
    cram(conv, lambda c: b"alice " + cram_digest(b"alice", c))
    conv.note(b"# an initial response is ignored")
    cram(conv, lambda c: b"frank " + cram_digest(b"frank", c), resp=b64(b"frank 0123"))
    conv.note(b"# only the first 32 characters after the last space are compared")
    cram(conv, lambda c: b"frank " + cram_digest(b"frank", c) + b"trailing")
    conv.note(b"# upper-case hex, wrong digest, short digest")
    cram(conv, lambda c: b"frank " + cram_digest(b"frank", c).upper())
    cram(conv, lambda c: b"frank " + cram_digest(b"alice", c))
    cram(conv, lambda c: b"frank " + cram_digest(b"frank", c)[:31])
    conv.note(b"# unknown user, scheme not available")
    cram(conv, lambda c: b"nobody " + cram_digest(b"frank", c))
    cram(conv, lambda c: b"erin " + cram_digest(b"erin", c))
    conv.note(b"# no space, space first")
    cram(conv, lambda c: b"frank" + cram_digest(b"frank", c))
    cram(conv, lambda c: b" frank" + cram_digest(b"frank", c))
    cram(conv, lambda c: b"frank\x00 " + cram_digest(b"frank", c))
    conv.note(b"# the user name may contain spaces (then Dovecot's username_chars refuse it)")
    cram(conv, lambda c: b"frank x " + cram_digest(b"frank", c))


def external_cases(conv: Conversation) -> None:
    conv.note(b"# protocol.md 2.5: no certificate user name")
    auth(conv, b"EXTERNAL", b"")
    conv.note(b"# user name from the certificate; the passdb allows an empty password")
    auth(conv, b"EXTERNAL", b"", params=b"\tcert_username=certuser")
    auth(conv, b"EXTERNAL", None, b"", params=b"\tcert_username=certuser")
    auth(conv, b"EXTERNAL", b"", params=b"\tcert_username=Alice")
    auth(conv, b"EXTERNAL", b"", params=b"\tcert_username=")
    auth(conv, b"EXTERNAL", b"certuser", params=b"\tcert_username=certuser")
    auth(conv, b"EXTERNAL", b"other", params=b"\tcert_username=certuser")
    auth(conv, b"EXTERNAL", b"a\x00b", params=b"\tcert_username=certuser")
    conv.note(b"# the certificate user name also overrides other mechanisms' user names")
    auth(conv, b"PLAIN", b"\x00alice\x00alicepass", params=b"\tcert_username=certuser")


def external_off_cases(conv: Conversation) -> None:
    conv.note(b"# auth_ssl_username_from_cert = no: cert_username is ignored")
    auth(conv, b"EXTERNAL", b"", params=b"\tcert_username=certuser")


def anonymous_cases(conv: Conversation) -> None:
    conv.note(b"# protocol.md 2.4")
    auth(conv, b"ANONYMOUS", b"trace-info@example")
    auth(conv, b"ANONYMOUS", None, b"")
    conv.note(b"# anything goes, NULs included; the user name never changes")
    auth(conv, b"ANONYMOUS", b"a\x00b\x01c\tx")
    auth(conv, b"ANONYMOUS", b"", params=b"\tcert_username=certuser")


@dataclass(frozen=True)
class Capture:
    name: str
    title: str
    cases: Callable[[Conversation], None]
    extra_config: str = "auth_anonymous_username = anon\nauth_ssl_username_from_cert = yes\n"


def base64_cases(conv: Conversation) -> None:
    conv.note(b"# padding must complete the last quantum; blanks are allowed anywhere, even inside it")
    conv.send(b"AUTH\t1\tPLAIN\tservice=imap\tno-penalty\tresp=AGFsaWNlAGFsaWNlcGFz=")
    conv.read()
    conv.send(b"AUTH\t1\tPLAIN\tservice=imap\tno-penalty\tresp=AGFsaWNlAGFsaWNlcGFz==")
    conv.read()
    conv.send(b"AUTH\t1\tPLAIN\tservice=imap\tno-penalty\tresp=AGFsaWNlAGFsaW NlcGFzcw= = ")
    conv.read()
    conv.send(b"AUTH\t1\tPLAIN\tservice=imap\tno-penalty\tresp=AGFsaWNlAGFsaWNlcGFzcw=")
    conv.read()
    conv.send(b"AUTH\t1\tPLAIN\tservice=imap\tno-penalty\tresp=AGFsaWNlAGFsaWNlcGFzcx==")
    conv.read()


CAPTURES = (
    Capture("scram", "SCRAM-SHA-1 / SCRAM-SHA-256 (protocol.md 2.7)", scram_cases),
    Capture("oauth", "OAUTHBEARER and XOAUTH2 (protocol.md 2.8)", oauth_cases),
    Capture("cram-md5", "CRAM-MD5 (protocol.md 2.6)", cram_cases),
    Capture("external", "EXTERNAL (protocol.md 2.5)", external_cases),
    Capture("external-off", "EXTERNAL without auth_ssl_username_from_cert", external_off_cases, ""),
    Capture("anonymous", "ANONYMOUS (protocol.md 2.4)", anonymous_cases),
    Capture("base64", "Dovecot's base64 decoder on the wire (protocol.md 1.4)", base64_cases),
)


def passwd_file() -> str:
    lines = []
    for user, password in PASSDB.items():
        extra = "nopassword" if not password else ""
        lines.append(f"{user.decode()}:{password.decode()}::::::{extra}")
    return "\n".join(lines) + "\n"


def run(capture: Capture) -> bytes:
    workdir = make_workdir("mechs")
    users = workdir / "users"
    users.write_text(passwd_file())
    users.chmod(0o644)
    databases = db_block("passdb", "passwd-file", str(users)) + db_block(
        "userdb", "static", "uid=nobody gid=nogroup home=/tmp"
    )
    with ReferenceDovecot(workdir, databases, mechanisms=MECHANISMS, extra_config=capture.extra_config) as dovecot:
        conv = connect(dovecot.socket("auth-client"))
        capture.cases(conv)
        conv.sock.close()
    header = [b"# " + capture.title.encode(), b"# captured from Dovecot 2.3.19.1 by capture.py"]
    header += [(b"@passdb " + user + b" " + password).strip() for user, password in PASSDB.items()]
    for line in capture.extra_config.splitlines():
        header.append(b"@setting " + line.replace(" ", "").encode())
    body = [line if line[:1] in (b"#", b"@") else _escape(line) for line in conv.lines]
    return b"\n".join(header + body) + b"\n"


def _escape(line: bytes) -> bytes:
    """`C> ` / `S> ` stay, the rest in Python bytes-literal escapes (\\t, \\x01, ...)."""
    return line[:3] + repr(line[3:])[2:-1].encode() + (b"\\n" if line[3:] != b"EOF" else b"")


def main() -> None:
    wanted = set(sys.argv[1:])
    for capture in CAPTURES:
        if not wanted or capture.name in wanted:
            (HERE / f"{capture.name}.txt").write_bytes(run(capture))


if __name__ == "__main__":
    main()

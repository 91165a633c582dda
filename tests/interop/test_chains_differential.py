"""Issue 7: passdb/userdb chains, master users and the simple drivers, authd vs Dovecot 2.3.

Each scenario defines one chain once; it is rendered as Dovecot config and as authd
TOML, the same requests go to a throwaway Dovecot and to authd, and the replies must
be identical byte for byte (only SPID/CUID/COOKIE differ, and they are not compared).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.authd_process import LISTENERS, AuthdProcess

from .dovecot import ReferenceDovecot
from .procs import make_workdir, running, subdir
from .wire import Wire

pytestmark = pytest.mark.requires("dovecot", "doveadm", "dovecot-lua")


@dataclass
class Db:
    driver: str
    file: str = ""  # a users-file name (passwd-file)
    args: str = ""  # static template
    settings: dict[str, str] = field(default_factory=dict)  # Dovecot spelling: result_success=continue ...

    def dovecot(self, kind: str, workdir: Path) -> str:
        lines = [f"{kind} {{", f"  driver = {self.driver}"]
        if self.driver == "passwd-file":
            scheme = "scheme=PLAIN " if kind == "passdb" else ""
            lines.append(f"  args = {scheme}{workdir / self.file}")
        elif self.args:
            lines.append(f"  args = {self.args}")
        lines += [f"  {key} = {value}" for key, value in self.settings.items()]
        return "\n".join([*lines, "}", ""])

    def authd(self, kind: str, workdir: Path) -> str:
        lines = [f"[[{kind}]]", f'driver = "{self.driver}"']
        if self.driver == "passwd-file":
            lines += [f'file = "{workdir / self.file}"']
            if kind == "passdb":
                lines += ['scheme = "PLAIN"']
        elif self.args:
            lines.append(f'args = "{self.args}"')
        for key, value in self.settings.items():
            if key in ("username_filter", "mechanisms"):
                lines.append(f"{key} = {value.split()!r}".replace("'", '"'))
                continue
            toml_value = {"yes": "true", "no": "false"}.get(value)
            lines.append(f"{key} = {toml_value}" if toml_value else f'{key} = "{value}"')
        return "\n".join(lines) + "\n"


@dataclass
class Scenario:
    name: str
    passdbs: list[Db]
    userdbs: list[Db]
    files: dict[str, str]
    requests: list[str]
    auth: dict[str, str] = field(default_factory=dict)


def plain(request_id: int, user: str, password: str, authzid: str = "") -> str:
    resp = base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()
    return f"AUTH\t{request_id}\tPLAIN\tservice=imap\tno-penalty\tresp={resp}"


USERS = "alice:{PLAIN}alicepass:65534:65534::/home/alice::userdb_quota_rule=*:storage=1G\nbob:{PLAIN}bobpass::::::\n"

SCENARIOS = [
    Scenario(
        "app-passwords-first",
        passdbs=[Db("passwd-file", "apps"), Db("passwd-file", "users")],
        userdbs=[Db("passwd-file", "users")],
        files={"apps": "alice:{PLAIN}apppass::::::\n", "users": USERS},
        requests=[
            plain(1, "alice", "apppass"),
            plain(2, "alice", "alicepass"),
            plain(3, "alice", "wrong"),
            plain(4, "bob", "bobpass"),
            plain(5, "nobody", "x"),
            "PASS\t6\talice\tservice=doveadm",
            "USER\t7\talice\tservice=lmtp",
            "USER\t8\tnobody\tservice=lmtp",
        ],
    ),
    Scenario(
        "deny",
        passdbs=[Db("passwd-file", "denied", settings={"deny": "yes"}), Db("passwd-file", "users")],
        userdbs=[Db("static", args="uid=65534 gid=65534 allow_all_users=yes")],
        files={"denied": "bob\n", "users": USERS},
        requests=[plain(1, "bob", "bobpass"), plain(2, "alice", "alicepass"), "PASS\t3\tbob\tservice=doveadm"],
    ),
    Scenario(
        "master-users",
        passdbs=[
            Db("passwd-file", "masters", settings={"master": "yes", "pass": "yes"}),
            Db("passwd-file", "users"),
        ],
        userdbs=[Db("passwd-file", "users")],
        files={"masters": "boss:{PLAIN}bosspass::::::\n", "users": USERS},
        auth={"master_user_separator": "*"},
        requests=[
            plain(1, "alice*boss", "bosspass"),
            plain(2, "alice*boss", "wrong"),
            plain(3, "nobody*boss", "bosspass"),
            plain(4, "boss", "bosspass", authzid="alice"),
            plain(5, "alice", "alicepass"),
            plain(6, "alice*nosuchmaster", "x"),
        ],
    ),
    Scenario(
        "rules-and-filters",
        passdbs=[
            Db(
                "static",
                args="nopassword=y",
                settings={"username_filter": "*@trusted.example", "result_success": "continue-ok"},
            ),
            Db("passwd-file", "users", settings={"skip": "authenticated"}),
            Db("static", args="password=fallback", settings={"mechanisms": "login"}),
        ],
        userdbs=[Db("static", args="uid=65534 gid=65534 home=/home/%n", settings={})],
        files={"users": USERS},
        requests=[
            plain(1, "carol@trusted.example", "anything"),
            plain(2, "alice", "alicepass"),
            plain(3, "alice", "fallback"),
            plain(4, "nobody", "x"),
            "USER\t5\talice\tservice=lmtp",
            "USER\t6\tnobody\tservice=lmtp",
        ],
    ),
    Scenario(
        "static-and-prefetch",
        passdbs=[Db("passwd-file", "users"), Db("static", args="password=%n-pw")],
        userdbs=[Db("prefetch"), Db("passwd-file", "users")],
        files={"users": USERS},
        requests=[
            plain(1, "alice", "alicepass"),
            plain(2, "dave", "dave-pw"),
            plain(3, "dave", "x"),
            "PASS\t4\tdave\tservice=doveadm",
            "USER\t5\talice\tservice=lmtp",
        ],
    ),
]


def exchange(socket_path: Path, requests: list[str], *, master: bool) -> list[str]:
    replies = []
    opener = Wire.auth_master if master else Wire.auth_client
    with opener(socket_path, timeout=10) as w:
        w.send("VERSION\t1\t0" if master else "VERSION\t1\t2")
        if not master:
            w.send("CPID\t4242")
        for request in requests:
            w.send(request)
            replies.append(w.read_line())
    return replies


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = make_workdir("chains")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_chain_matches_dovecot(workdir: Path, scenario: Scenario) -> None:
    base = subdir(workdir, scenario.name)
    for name, text in scenario.files.items():
        (base / name).write_text(text)
        (base / name).chmod(0o644)
    databases = "".join(db.dovecot("passdb", base) for db in scenario.passdbs) + "".join(
        db.dovecot("userdb", base) for db in scenario.userdbs
    )
    auth_dovecot = "".join(f"auth_{key} = {value}\n" for key, value in scenario.auth.items())
    auth_toml = "".join(f'{key} = "{value}"\n' for key, value in scenario.auth.items())
    config = (
        f"[auth]\nfailure_delay = 0\npenalty = false\n{auth_toml}"
        + "".join(db.authd("passdb", base) for db in scenario.passdbs)
        + "".join(db.authd("userdb", base) for db in scenario.userdbs)
        + "[lua]\nworkers = 1\n"
        + LISTENERS
    )
    client = [r for r in scenario.requests if r.startswith("AUTH")]
    master = [r for r in scenario.requests if not r.startswith("AUTH")]
    reference = ReferenceDovecot(subdir(base, "dovecot"), databases, extra_config=auth_dovecot)
    with running(f"dovecot {scenario.name}", reference):
        expected = exchange(reference.socket("auth-client"), client, master=False)
        expected += exchange(reference.socket("auth-master"), master, master=True) if master else []
    authd = AuthdProcess(subdir(base, "authd"), config)
    with running(f"authd {scenario.name}", authd):  # start() waits for auth-client, opened with auth-master
        got = exchange(authd.socket("auth-client"), client, master=False)
        got += exchange(authd.socket("auth-master"), master, master=True) if master else []
    assert got == expected, "\n".join(
        f"{'  ' if g == e else '!!'} {request!r}\n     dovecot {e!r}\n     authd   {g!r}"
        for request, e, g in zip(client + master, expected, got, strict=True)
    )

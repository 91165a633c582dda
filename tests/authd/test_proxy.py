"""proxy / proxy_maybe on logins: auth_request_proxy_finish's decisions."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator

import pytest

from authd.auth_request import AuthRequest, UsernameRules
from authd.proxy import drop_proxy_fields, proxy_finish
from tests.authd_process import LISTENERS, AuthdProcess
from tests.interop.wire import Wire


def request(fields: str, *, lip: str = "192.0.2.1", lport: int = 143) -> AuthRequest:
    req = AuthRequest(UsernameRules(), id=1)
    req.local_ip = req.real_local_ip = lip
    req.local_port = lport
    for item in fields.split():
        key, sep, value = item.partition("=")
        req.extra_fields.add(key.encode(), value.encode() if sep else None)
    return req


def shown(req: AuthRequest) -> str:
    return " ".join(f.key.decode() + ("" if f.value is None else "=" + f.value.decode()) for f in req.extra_fields)


@pytest.mark.parametrize(
    ("fields", "after"),
    [
        # proxy_maybe to another host: proxy
        ("proxy_maybe host=192.0.2.9 port=143", "host=192.0.2.9 port=143 proxy"),
        # ... to ourselves on the client's port: a local login, every proxy field dropped
        ("proxy_maybe host=192.0.2.1 port=143 destuser=bob x=1", "x=1"),
        ("proxy_maybe host=192.0.2.1", ""),
        # ... to ourselves on another port: proxy
        ("proxy_maybe host=192.0.2.1 port=993", "host=192.0.2.1 port=993 proxy"),
        # proxy_always: "self" is the local director cluster, which still proxies
        ("proxy_maybe proxy_always host=192.0.2.1", "proxy"),
        # plain proxy is never second-guessed
        ("proxy host=192.0.2.1 port=143", "proxy host=192.0.2.1 port=143"),
        # no host: a director decides, and gets lip/lport for it
        ("proxy", "proxy lip=192.0.2.1 lport=143"),
        # a hostip given by the passdb saves the lookup
        ("proxy_maybe host=imap.example hostip=192.0.2.1", "hostip=192.0.2.1"),
        ("nothing=here", "nothing=here"),
    ],
)
async def test_decisions(fields: str, after: str) -> None:
    req = request(fields)
    assert await proxy_finish(req) is True
    assert shown(req) == after


async def test_proxy_self_addresses_count_as_ours() -> None:
    req = request("proxy_maybe host=198.51.100.7")
    assert await proxy_finish(req, ["198.51.100.7"]) is True
    assert shown(req) == ""


async def test_host_names_are_resolved() -> None:
    # localhost is us: log in locally, keeping the address it resolved to (::1 on some hosts)
    req = request("proxy_maybe host=localhost", lip="127.0.0.1")
    assert await proxy_finish(req, ["::1"]) is True
    assert shown(req) in ("hostip=127.0.0.1", "hostip=::1")
    other = request("proxy_maybe host=localhost", lip="192.0.2.1")
    assert await proxy_finish(other) is True
    assert shown(other) in ("host=localhost hostip=127.0.0.1 proxy", "host=localhost hostip=::1 proxy")


async def test_unresolvable_host_is_a_temporary_failure() -> None:
    req = request("proxy_maybe host=nonexistent.invalid proxy_timeout=5 port=143")
    assert await proxy_finish(req) is False
    assert req.internal_failure and shown(req) == "proxy_timeout=5"


async def test_invalid_hostip_fails() -> None:
    req = request("proxy host=imap.example hostip=not-an-ip")
    assert await proxy_finish(req) is False
    assert not req.internal_failure


def test_failed_logins_lose_every_proxy_field() -> None:
    req = request("proxy proxy_maybe proxy_always host=h port=1 destuser=d hostip=192.0.2.3 pass=x")
    drop_proxy_fields(req)
    assert shown(req) == "hostip=192.0.2.3 pass=x"


PROXY_SCRIPT = """\
local fields = {
  here = "proxy_maybe host=127.0.0.1 port=143 destuser=x",
  elsewhere = "proxy_maybe host=192.0.2.9 port=143",
  claimed = "proxy_maybe host=198.51.100.7",
  nowhere = "proxy host=nonexistent.invalid proxy_timeout=3",
  wrong = "proxy host=192.0.2.9 port=143",
}
function auth_passdb_lookup(req)
  local extra = fields[req.user]
  if extra == nil then return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "" end
  return dovecot.auth.PASSDB_RESULT_OK, "password=p " .. extra
end
"""


@pytest.fixture(scope="module")
def proxy_authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthdProcess]:
    config = (
        '[auth]\nfailure_delay = 0\npenalty = false\nproxy_self = ["198.51.100.7"]\n'
        '[[passdb]]\ndriver = "lua"\nfile = "p.lua"\n[[userdb]]\ndriver = "prefetch"\n' + LISTENERS
    )
    proc = AuthdProcess(tmp_path_factory.mktemp("proxy"), config, {"p.lua": PROXY_SCRIPT})
    proc.start(wait_for=("auth-login", "auth-client", "auth-master"))
    yield proc
    proc.stop()


#: Login sockets refuse a CPID still in use: each connection gets its own.
CPIDS = itertools.count(4711)


def login(proc: AuthdProcess, user: str, password: str = "p", socket: str = "auth-login") -> str:
    resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with Wire.auth_client(proc.socket(socket)) as wire:
        auth = f"AUTH\t1\tPLAIN\tservice=imap\tlip=127.0.0.1\tlport=143\tresp={resp}"
        wire.send("VERSION\t1\t2", f"CPID\t{next(CPIDS)}", auth)
        return wire.read_line(timeout=10)


@pytest.mark.parametrize(
    ("user", "reply"),
    [
        # proxy_maybe to this very server: a local login, no proxy fields left
        ("here", "OK\t1\tuser=here"),
        # ... to another host: the login process proxies, with the client's password
        ("elsewhere", "OK\t1\tuser=elsewhere\thost=192.0.2.9\tport=143\tproxy\tpass=p"),
        # [auth] proxy_self counts as this server
        ("claimed", "OK\t1\tuser=claimed"),
        # a host that does not resolve is a temporary failure, without proxy fields
        ("nowhere", "FAIL\t1\tuser=nowhere\tcode=temp_fail\tproxy_timeout=3"),
        # a failed login loses every proxy field
        ("wrong:bad", "FAIL\t1\tuser=wrong"),
    ],
)
def test_login_socket_settles_proxy_fields(proxy_authd: AuthdProcess, user: str, reply: str) -> None:
    name, _, password = user.partition(":")
    assert login(proxy_authd, name, password or "p") == reply


def test_plain_client_sockets_keep_proxy_fields_untouched(proxy_authd: AuthdProcess) -> None:
    # auth_only requests (no login process behind them) skip proxy_finish, as in Dovecot
    assert login(proxy_authd, "here", socket="auth-client") == (
        "OK\t1\tuser=here\tproxy_maybe\thost=127.0.0.1\tport=143\tdestuser=x"
    )


def test_pass_lookups_settle_proxy_fields(proxy_authd: AuthdProcess) -> None:
    with Wire.auth_master(proxy_authd.socket("auth-master")) as wire:
        wire.send("VERSION\t1\t1", "PASS\t1\telsewhere\tservice=imap", "PASS\t2\tnowhere\tservice=imap")
        replies = sorted([wire.read_line(timeout=10), wire.read_line(timeout=10)])
    assert replies == ["FAIL\t2", "PASS\t1\tuser=elsewhere\thost=192.0.2.9\tport=143\tproxy"]

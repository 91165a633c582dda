"""Route B's reading of Dovecot's listener hand-over: fds, names and socket types.

Dovecot 2.3 passes listeners from fd 7 as bare names; 2.4 from fd 8 as `NAME<TAB>type=TYPE`.
"""

from __future__ import annotations

import pytest

from authd.dovecot_service import ListenerSpec, first_listener_fd, listener_specs

# What Debian 12's Dovecot 2.3.19 hands its auth service (tests/interop/README.md).
ENV_23 = {
    "SOCKET_COUNT": "6",
    "SOCKET0_SETTINGS": "login",
    "SOCKET1_SETTINGS": "tokenlogin",
    "SOCKET2_SETTINGS": "auth-login",
    "SOCKET3_SETTINGS": "auth-client",
    "SOCKET4_SETTINGS": "auth-userdb",
    "SOCKET5_SETTINGS": "auth-master",
    "DOVECOT_VERSION": "2.3.19",
}

# What Debian 13's Dovecot 2.4.1 hands it (research/dovecot24.md, route B).
ENV_24 = {
    "SOCKET_COUNT": "6",
    "SOCKET0_SETTINGS": "auth-client\ttype=auth",
    "SOCKET1_SETTINGS": "auth-login\ttype=login",
    "SOCKET2_SETTINGS": "auth-master\ttype=master",
    "SOCKET3_SETTINGS": "auth-userdb\ttype=userdb",
    "SOCKET4_SETTINGS": "login\ttype=login",
    "SOCKET5_SETTINGS": "tokenlogin\ttype=token-login",
    "DOVECOT_VERSION": "2.4.1-4",
}


def test_dovecot_23_layout() -> None:
    assert listener_specs(ENV_23) == [
        ListenerSpec(0, 7, "login", "login"),
        ListenerSpec(1, 8, "tokenlogin", "token"),
        ListenerSpec(2, 9, "auth-login", "login"),
        ListenerSpec(3, 10, "auth-client", "client"),
        ListenerSpec(4, 11, "auth-userdb", "userdb"),
        ListenerSpec(5, 12, "auth-master", "master"),
    ]


def test_dovecot_24_layout() -> None:
    assert listener_specs(ENV_24) == [
        ListenerSpec(0, 8, "auth-client", "client"),
        ListenerSpec(1, 9, "auth-login", "login"),
        ListenerSpec(2, 10, "auth-master", "master"),
        ListenerSpec(3, 11, "auth-userdb", "userdb"),
        ListenerSpec(4, 12, "login", "login"),
        ListenerSpec(5, 13, "tokenlogin", "token"),
    ]


def test_24_type_wins_over_the_name() -> None:
    env = {"SOCKET_COUNT": "2", "SOCKET0_SETTINGS": "weird-master\ttype=userdb", "SOCKET1_SETTINGS": "x\ttype=auth"}
    assert [spec.type for spec in listener_specs(dict(env, DOVECOT_VERSION="2.4.1"))] == ["userdb", "client"]


def test_24_without_type_uses_the_name_rule() -> None:
    """2.4 omits `type=` for a listener configured without one; auth then goes by the name."""
    env = {"SOCKET_COUNT": "1", "SOCKET0_SETTINGS": "/run/x/auth-userdb", "DOVECOT_VERSION": "2.4.1-4"}
    assert listener_specs(env) == [ListenerSpec(0, 8, "/run/x/auth-userdb", "userdb")]


@pytest.mark.parametrize(
    ("version", "first"),
    [("2.2.36", 7), ("2.3.19", 7), ("2.3.21.1", 7), ("2.4.0", 8), ("2.4.1-4", 8), ("2.5.0", 8), ("3.0.0", 8)],
)
def test_first_fd_from_dovecot_version(version: str, first: int) -> None:
    assert first_listener_fd({"DOVECOT_VERSION": version}, ["auth-login\ttype=login"]) == first


def test_first_fd_without_version() -> None:
    """`version_ignore = yes` drops DOVECOT_VERSION: a `type=` field still marks 2.4 (2.3 never sends one)."""
    without_version_23 = {k: v for k, v in ENV_23.items() if k != "DOVECOT_VERSION"}
    without_version_24 = {k: v for k, v in ENV_24.items() if k != "DOVECOT_VERSION"}
    assert [spec.fd for spec in listener_specs(without_version_23)] == list(range(7, 13))
    assert [spec.fd for spec in listener_specs(without_version_24)] == list(range(8, 14))
    assert first_listener_fd({}, ["inet\tssl\thaproxy"]) == 7


def test_tab_escaped_names() -> None:
    env = {"SOCKET_COUNT": "1", "SOCKET0_SETTINGS": "a\x01tb-master\ttype=master", "DOVECOT_VERSION": "2.4.1"}
    assert listener_specs(env) == [ListenerSpec(0, 8, "a\tb-master", "master")]


@pytest.mark.parametrize("count", [None, "0", "six", "1001"])
def test_bad_socket_count(count: str | None) -> None:
    env = {} if count is None else {"SOCKET_COUNT": count}
    with pytest.raises(RuntimeError, match="SOCKET_COUNT"):
        listener_specs(env)

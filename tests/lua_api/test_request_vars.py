"""Dovecot 2.3's auth variable table and the Lua fields derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from lua_api.request_vars import RequestVars, Secured, VarEntry, lua_fields_23, var_table_23

LONG_ONLY_NAMES = [
    "login_user", "login_username", "login_domain", "session", "real_lip", "real_rip", "real_lport",
    "real_rport", "domain_first", "domain_last", "master_user", "session_pid", "orig_user", "orig_username",
    "orig_domain", "auth_user", "auth_username", "auth_domain", "local_name", "client_id",
    # aliases
    "local_ip", "remote_ip", "local_port", "remote_port", "real_local_ip", "real_remote_ip",
    "real_local_port", "real_remote_port", "mechanism", "original_user", "original_username",
    "original_domain",
]  # fmt: skip

# Order of auth_request_var_expand_static_tab (src/auth/auth-request-var-expand.c, 2.3.19).
DOVECOT_ORDER = [
    ("u", "user"),
    ("n", "username"),
    ("d", "domain"),
    ("s", "service"),
    ("h", "home"),
    ("l", "lip"),
    ("r", "rip"),
    ("p", "pid"),
    ("w", "password"),
    ("!", None),
    ("m", "mech"),
    ("c", "secured"),
    ("a", "lport"),
    ("b", "rport"),
    ("k", "cert"),
    *[(None, name) for name in LONG_ONLY_NAMES],
]

# The request of lua_api.md §4.2's verified dump (doveadm auth test -x service=imap -x lip=127.0.0.1
# -x rip=10.1.2.3 -x lport=143 -x rport=55555 -x session=abc123 -x secured dump@lookup secret);
# doveadm sets the real_* addresses from lip/rip.
DUMP_REQUEST = RequestVars(
    user=b"dump@lookup",
    original_user=b"dump@lookup",
    service=b"imap",
    mechanism=b"PLAIN",
    mech_password=b"secret",
    local_ip=b"127.0.0.1",
    remote_ip=b"10.1.2.3",
    local_port=143,
    remote_port=55555,
    real_local_ip=b"127.0.0.1",
    real_remote_ip=b"10.1.2.3",
    real_local_port=143,
    real_remote_port=55555,
    session_id=b"abc123",
    secured=Secured.SECURED,
    db_id=1,
)

DUMP_FIELDS: dict[bytes, bytes | None] = {
    b"user": b"dump@lookup",
    b"username": b"dump",
    b"domain": b"lookup",
    b"service": b"imap",
    b"home": None,
    b"lip": b"127.0.0.1",
    b"rip": b"10.1.2.3",
    b"pid": b"0",
    b"password": b"secret",
    b"mech": b"PLAIN",
    b"secured": b"secured",
    b"lport": b"143",
    b"rport": b"55555",
    b"cert": b"",
    b"login_user": None,
    b"login_username": None,
    b"login_domain": None,
    b"session": b"abc123",
    b"real_lip": b"127.0.0.1",
    b"real_rip": b"10.1.2.3",
    b"real_lport": b"143",
    b"real_rport": b"55555",
    b"domain_first": b"lookup",
    b"domain_last": b"lookup",
    b"master_user": None,
    b"session_pid": None,
    b"orig_user": b"dump@lookup",
    b"orig_username": b"dump",
    b"orig_domain": b"lookup",
    b"auth_user": b"dump@lookup",
    b"auth_username": b"dump",
    b"auth_domain": b"lookup",
    b"local_name": None,
    b"client_id": None,
    b"local_ip": b"127.0.0.1",
    b"remote_ip": b"10.1.2.3",
    b"local_port": b"143",
    b"remote_port": b"55555",
    b"real_local_ip": b"127.0.0.1",
    b"real_remote_ip": b"10.1.2.3",
    b"real_local_port": b"143",
    b"real_remote_port": b"55555",
    b"mechanism": b"PLAIN",
    b"original_user": b"dump@lookup",
    b"original_username": b"dump",
    b"original_domain": b"lookup",
}


def entry(table: tuple[VarEntry, ...], long: str) -> bytes | None:
    [value] = [e.value for e in table if e.long == long]
    return value


def test_table_has_dovecots_47_entries_in_dovecots_order() -> None:
    table = var_table_23(RequestVars())
    assert [(e.short, e.long) for e in table] == DOVECOT_ORDER
    assert len(table) == 47


def test_lua_fields_match_the_verified_dump() -> None:
    assert lua_fields_23(DUMP_REQUEST) == DUMP_FIELDS


def test_short_keys_of_the_verified_dump() -> None:
    short = {e.short: e.value for e in var_table_23(DUMP_REQUEST) if e.short is not None}
    assert short == {
        "u": b"dump@lookup",
        "n": b"dump",
        "d": b"lookup",
        "s": b"imap",
        "h": None,
        "l": b"127.0.0.1",
        "r": b"10.1.2.3",
        "p": b"0",
        "w": b"secret",
        "!": b"1",
        "m": b"PLAIN",
        "c": b"secured",
        "a": b"143",
        "b": b"55555",
        "k": b"",
    }


def test_empty_request_values() -> None:
    """Unset data: user "" (never nil), ports "0", mech "", %! "", most others nil."""
    fields = lua_fields_23(RequestVars())
    assert {k: v for k, v in fields.items() if v is not None} == {
        b"user": b"",
        b"username": b"",
        b"pid": b"0",
        b"mech": b"",
        b"secured": b"",
        b"lport": b"0",
        b"rport": b"0",
        b"cert": b"",
        b"real_lport": b"0",
        b"real_rport": b"0",
        b"orig_user": b"",
        b"orig_username": b"",
        b"auth_user": b"",
        b"auth_username": b"",
        b"local_port": b"0",
        b"remote_port": b"0",
        b"real_local_port": b"0",
        b"real_remote_port": b"0",
        b"mechanism": b"",
        b"original_user": b"",
        b"original_username": b"",
    }
    assert entry(var_table_23(RequestVars()), "domain") is None
    assert [e.value for e in var_table_23(RequestVars()) if e.short == "!"] == [b""]


@pytest.mark.parametrize(
    ("user", "username", "domain", "domain_first", "domain_last"),
    [
        (b"a@b@c", b"a", b"b@c", b"b", b"c"),
        (b"a@b", b"a", b"b", b"b", b"b"),
        (b"plain", b"plain", None, None, None),
        (b"a@", b"a", b"", b"", b""),
        (b"@x", b"", b"x", b"x", b"x"),
        (b"\xff\xfe@d\xe9", b"\xff\xfe", b"d\xe9", b"d\xe9", b"d\xe9"),
    ],
)
def test_user_splitting(
    user: bytes, username: bytes, domain: bytes | None, domain_first: bytes | None, domain_last: bytes | None
) -> None:
    fields = lua_fields_23(RequestVars(user=user))
    assert (fields[b"user"], fields[b"username"], fields[b"domain"]) == (user, username, domain)
    assert (fields[b"domain_first"], fields[b"domain_last"]) == (domain_first, domain_last)


@pytest.mark.parametrize(
    ("secured", "text"), [(Secured.NONE, b""), (Secured.SECURED, b"secured"), (Secured.TLS, b"TLS")]
)
def test_secured(secured: Secured, text: bytes) -> None:
    assert lua_fields_23(RequestVars(secured=secured))[b"secured"] == text


def test_cert_pid_session_pid_and_db_id() -> None:
    v = RequestVars(valid_client_cert=True, client_pid=4242, session_pid=77, db_id=3)
    fields = lua_fields_23(v)
    assert (fields[b"cert"], fields[b"pid"], fields[b"session_pid"]) == (b"valid", b"4242", b"77")
    assert [e.value for e in var_table_23(v) if e.short == "!"] == [b"3"]


def test_orig_and_auth_user_derivation() -> None:
    renamed = RequestVars(user=b"new@x", original_user=b"Old@Y")
    fields = lua_fields_23(renamed)
    orig = (fields[b"orig_user"], fields[b"orig_username"], fields[b"orig_domain"])
    auth = (fields[b"auth_user"], fields[b"auth_username"], fields[b"auth_domain"])
    assert orig == auth == (b"Old@Y", b"Old", b"Y")
    fields = lua_fields_23(dataclasses.replace(renamed, master_user=b"admin"))
    auth = (fields[b"auth_user"], fields[b"auth_username"], fields[b"auth_domain"])
    assert auth == (b"admin", b"admin", None)
    assert fields[b"master_user"] == b"admin"
    # without original_user the orig_* fields follow user
    fields = lua_fields_23(RequestVars(user=b"u@d"))
    assert (fields[b"orig_user"], fields[b"original_domain"]) == (b"u@d", b"d")


def test_login_user_fields() -> None:
    fields = lua_fields_23(RequestVars(user=b"master", login_user=b"target@example.org"))
    assert (fields[b"login_user"], fields[b"login_username"], fields[b"login_domain"]) == (
        b"target@example.org",
        b"target",
        b"example.org",
    )
    fields = lua_fields_23(RequestVars(login_user=b"target"))
    assert (fields[b"login_username"], fields[b"login_domain"]) == (b"target", None)


def test_aliases_share_values_with_their_short_names() -> None:
    v = RequestVars(
        local_ip=b"::1",
        remote_ip=b"192.0.2.1",
        local_port=1,
        remote_port=2,
        real_local_ip=b"192.0.2.3",
        real_remote_ip=b"192.0.2.4",
        real_local_port=3,
        real_remote_port=4,
        mechanism=b"CRAM-MD5",
        original_user=b"o@d",
    )
    fields = lua_fields_23(v)
    pairs = {
        b"lip": b"local_ip",
        b"rip": b"remote_ip",
        b"lport": b"local_port",
        b"rport": b"remote_port",
        b"real_lip": b"real_local_ip",
        b"real_rip": b"real_remote_ip",
        b"real_lport": b"real_local_port",
        b"real_rport": b"real_remote_port",
        b"mech": b"mechanism",
        b"orig_user": b"original_user",
        b"orig_username": b"original_username",
        b"orig_domain": b"original_domain",
    }
    assert [fields[a] for a in pairs] == [fields[b] for b in pairs.values()]
    assert [fields[a] for a in pairs] == [
        b"::1",
        b"192.0.2.1",
        b"1",
        b"2",
        b"192.0.2.3",
        b"192.0.2.4",
        b"3",
        b"4",
        b"CRAM-MD5",
        b"o@d",
        b"o",
        b"d",
    ]


def test_other_text_fields_pass_through() -> None:
    v = RequestVars(local_name=b"mail.example.org", client_id=b"x y", session_id=b"s", service=b"pop3")
    fields = lua_fields_23(v)
    assert (fields[b"local_name"], fields[b"client_id"], fields[b"session"], fields[b"service"]) == (
        b"mail.example.org",
        b"x y",
        b"s",
        b"pop3",
    )


def test_2_4_only_names_are_not_fields() -> None:
    fields = lua_fields_23(DUMP_REQUEST)
    for name in (b"protocol", b"client_pid", b"session_id", b"ssl_ja3_hash", b"owner_user", b"id"):
        assert name not in fields


@pytest.mark.parametrize(
    "variables",
    [
        RequestVars(),
        DUMP_REQUEST,
        dataclasses.replace(
            DUMP_REQUEST,
            user=b"a@b@c",
            original_user=b"orig@x",
            master_user=b"boss@y",
            login_user=b"target@z",
            session_pid=77,
            client_pid=12,
            valid_client_cert=True,
            secured=Secured.TLS,
            mechanism=None,
            local_name=b"imap.example.org",
            client_id=b"client",
            db_id=None,
        ),
        RequestVars(user=b"@", login_user=b"", original_user=b""),
    ],
)
def test_lua_fields_are_the_first_long_name_match(variables: RequestVars) -> None:
    # lua_fields_23 answers each name alone; Dovecot walks the table for the first match.
    expected: dict[bytes, bytes | None] = {}
    for e in var_table_23(variables):
        if e.long is not None:
            expected.setdefault(e.long.encode(), e.value)
    assert lua_fields_23(variables) == expected

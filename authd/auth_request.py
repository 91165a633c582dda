"""One authentication or lookup request and Dovecot's rules for changing it.

This mirrors the parts of Dovecot's auth_request that decide what clients see:
how request parameters are imported, how user names are checked and rewritten,
and what each passdb/userdb field does when a backend sets it
(auth_request_set_field / auth_request_set_userdb_field in 2.3.19).
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import pwd
import random
import time
from dataclasses import dataclass, field
from functools import cached_property

import structlog

from authd.fields import AuthFields
from authd.username_format import Formatter, compile_username_format
from lua_api.request_vars import RequestVars, Secured, var_table_23
from lua_api.var_expand import ExpandContext, expand, expand_username_format
from protocol.events import Field, Params

log = structlog.get_logger("authd.request")

#: AUTH_REQUEST_MAX_DELAY_SECS: delay_until may not be further away than this.
MAX_DELAY_SECS = 60 * 5


@dataclass(frozen=True)
class UsernameRules:
    """auth_username_chars/translation/format, auth_default_realm, master user separator."""

    chars: str = ""
    translation: str = ""
    format: str = "%Lu"
    default_realm: str = ""
    master_user_separator: str = ""
    anonymous_username: str = "anonymous"
    #: auth_ssl_username_from_cert: the login process's cert_username overrides the mechanism's.
    ssl_username_from_cert: bool = False
    #: Whether any master passdb is configured (master logins need one).
    master_passdbs: bool = False
    #: lua_api.var_expand.ExpandContext for %{env:...} and friends in username_format.
    expand_context: object = None

    # Derived once per rules object (a config generation), not per request.

    @cached_property
    def allowed_chars(self) -> bytes | None:
        """auth_username_chars as bytes; None allows everything."""
        return self.chars.encode("latin-1") if self.chars else None

    @cached_property
    def translation_table(self) -> bytes | None:
        """auth_username_translation as a bytes.translate() table (later pairs win); None: no-op."""
        raw = self.translation.encode("latin-1")
        if len(raw) < 2:
            return None
        table = bytearray(range(256))
        for i in range(0, len(raw) - 1, 2):
            table[raw[i]] = raw[i + 1]
        return bytes(table)

    @cached_property
    def formatter(self) -> Formatter | None:
        """username_format without var_expand, when it is one of the simple formats."""
        return compile_username_format(self.format.encode())


class UsernameError(Exception):
    """The user name cannot be used (bad characters, empty...)."""


def parse_ip(value: bytes) -> str | None:
    """net_addr2ip: an IPv4/IPv6 literal (brackets allowed), canonical text, or None."""
    text = value.decode("latin-1")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_port(value: bytes) -> int | None:
    if not value.isdigit() or len(value) > 5:
        return None
    port = int(value)
    return port if port <= 65535 else None


@dataclass(eq=False)
class AuthRequest:
    """Everything Dovecot's auth_request tracks that matters on the wire or to scripts."""

    rules: UsernameRules
    id: int = 0
    service: bytes | None = None
    mech: bytes | None = None
    user: bytes | None = None
    original_user: bytes | None = None
    translated_user: bytes | None = None
    login_user: bytes | None = None
    master_user: bytes | None = None
    local_ip: str | None = None
    remote_ip: str | None = None
    local_port: int = 0
    remote_port: int = 0
    real_local_ip: str | None = None
    real_remote_ip: str | None = None
    real_local_port: int = 0
    real_remote_port: int = 0
    local_name: bytes | None = None
    session: bytes | None = None
    client_id: bytes | None = None
    client_pid: int = 0
    session_pid: int | None = None
    secured: bytes | None = None  # None, b"" (trusted) or b"tls"
    valid_client_cert: bool = False
    cert_username: bool = False
    no_penalty: bool = False
    final_resp_ok: bool = False
    debug: bool = False
    request_auth_token: bool = False
    extra_fields: AuthFields = field(default_factory=AuthFields)
    userdb_reply: AuthFields | None = None
    passdb_password: bytes | None = None
    mech_password: bytes | None = None
    skip_password_check: bool = False
    passdb_success: bool = False
    successful: bool = False
    failed: bool = False
    internal_failure: bool = False
    passdbs_seen_user_unknown: bool = False
    passdbs_seen_internal_failure: bool = False
    userdbs_seen_internal_failure: bool = False
    userdb_prefetch_set: bool = False
    userdb_lookup: bool = False
    userdb_lookup_tempfailed: bool = False
    userdb_success: bool = False
    user_changed_by_lookup: bool = False
    #: The address's penalty when this request started (Dovecot's last_penalty).
    last_penalty: int = 0
    snapshot_prefetch: bool = False
    passdb_result: int | None = None
    delay_until: float = 0.0
    started: float = field(default_factory=time.monotonic)

    # --- request parameters --------------------------------------------------------

    def import_params(self, params: Params, *, auth: bool) -> None:
        """auth_request_import_info (+ import_auth for auth-client requests)."""
        for key, value in params.items:
            if not self.import_info(key, value) and auth:
                self.import_auth(key, value)

    def import_info(self, key: bytes, value: bytes) -> bool:
        if key in (b"service", b"protocol"):
            self.service = value
        elif key in (b"lip", b"rip"):
            ip = parse_ip(value)
            if ip is not None:
                if key == b"lip":
                    self.local_ip = ip
                    self.real_local_ip = self.real_local_ip or ip
                else:
                    self.remote_ip = ip
                    self.real_remote_ip = self.real_remote_ip or ip
        elif key in (b"lport", b"rport"):
            port = parse_port(value)
            if port is not None:
                if key == b"lport":
                    self.local_port = port
                    self.real_local_port = self.real_local_port or port
                else:
                    self.remote_port = port
                    self.real_remote_port = self.real_remote_port or port
        elif key in (b"real_lip", b"real_rip"):
            ip = parse_ip(value)
            if ip is not None:
                if key == b"real_lip":
                    self.real_local_ip = ip
                else:
                    self.real_remote_ip = ip
        elif key in (b"real_lport", b"real_rport"):
            port = parse_port(value)
            if port is not None:
                if key == b"real_lport":
                    self.real_local_port = port
                else:
                    self.real_remote_port = port
        elif key == b"local_name":
            self.local_name = value
        elif key == b"session":
            self.session = value
        elif key == b"debug":
            self.debug = True
        elif key == b"client_id":
            self.client_id = value
        elif key == b"forward_fields":
            for item in value.split(b"\t"):
                name, sep, val = item.partition(b"=")
                self.extra_fields.add(b"forward_" + name if sep else name, val if sep else None)
            self.extra_fields.snapshot()
        else:
            return False
        return True

    def import_auth(self, key: bytes, value: bytes) -> bool:
        if key == b"secured":
            self.secured = b"tls" if value == b"tls" else b""
        elif key == b"final-resp-ok":
            self.final_resp_ok = True
        elif key == b"no-penalty":
            self.no_penalty = True
        elif key == b"valid-client-cert":
            self.valid_client_cert = True
        elif key == b"cert_username":
            if self.rules.ssl_username_from_cert and value:
                # The certificate's name overrides the mechanism's, unchecked here and
                # put through the username rules by set_username() later.
                self.user = value
                self.cert_username = True
        else:
            return False
        return True

    # --- user names ---------------------------------------------------------------

    def fix_username(self, username: bytes) -> bytes:
        """auth_request_fix_username: realm, translation, allowed chars, username_format."""
        rules = self.rules
        if rules.default_realm and b"@" not in username:
            username = username + b"@" + rules.default_realm.encode()
        table = rules.translation_table
        result = username.translate(table) if table is not None else username
        allowed = rules.allowed_chars
        if allowed is not None:
            disallowed = result.translate(None, allowed)  # the bytes not allowed, in order
            if disallowed:
                shown = username[:128].decode("utf-8", "replace")
                raise UsernameError(
                    f"Username character disallowed by auth_username_chars: 0x{disallowed[0]:02x} (username: {shown})"
                )
        if rules.format:
            formatter = rules.formatter
            if formatter is not None:
                result = formatter(result)
            else:
                context = rules.expand_context
                if not isinstance(context, ExpandContext):
                    context = ExpandContext()
                result = expand_username_format(rules.format.encode(), result, self.vars(), context)
        if not result:
            raise UsernameError("Empty username")
        return result

    def set_username(self, username: bytes) -> None:
        """auth_request_set_username; raises UsernameError (the request then fails)."""
        separator = self.rules.master_user_separator.encode()
        login_username = None
        if separator and not self.userdb_lookup and separator in username:
            login_username, _, username = username.partition(separator)
        if self.original_user is None:
            self.original_user = username
        if self.cert_username and self.user is not None:
            username = self.user
        try:
            self.user = self.fix_username(username)
        except UsernameError:
            self.user = None
            raise
        if self.translated_user is None:
            self.translated_user = self.user
        if login_username is not None:
            self.set_login_username(login_username)

    def set_login_username(self, username: bytes) -> None:
        """auth_request_set_login_username: a master user asks to log in as `username`."""
        if not username:
            raise UsernameError("Master user login attempted to use empty login username")
        if username == self.user:
            return  # the same user: not a master login at all
        if not self.rules.master_passdbs:
            raise UsernameError("Master user login attempted without master passdbs")
        self.login_user = self.fix_username(username)

    def _updated_username(self, name: bytes, value: bytes) -> bytes | None:
        current = self.user or b""
        if name == b"user":
            return value
        at = current.find(b"@")
        if name == b"username":
            if b"@" in value:
                return value
            return value + (current[at:] if at >= 0 else b"")
        if name == b"domain":
            if at < 0:
                return current + b"@" + value
            return current[: at + 1] + value
        return None

    def try_update_username(self, name: bytes, value: bytes) -> bool:
        new = self._updated_username(name, value)
        if new is None:
            return False
        if not new:
            log.error("auth.field", message="username attempted to be changed to empty", **self.log_context())
            self.failed = True
            return True
        if new != self.user:
            self.user = new
            self.user_changed_by_lookup = True
        return True

    # --- passdb fields -------------------------------------------------------------

    def set_password(self, value: bytes, default_scheme: str, *, noscheme: bool = False) -> None:
        if self.passdb_password is not None:
            log.error("auth.field", message="Multiple password values not supported", **self.log_context())
            return
        if value.startswith(b"{") and not noscheme and b"}" in value:
            self.passdb_password = value
        else:
            self.passdb_password = b"{" + default_scheme.encode() + b"}" + value

    def set_field(self, name: bytes, value: bytes, default_scheme: str = "PLAIN") -> None:
        """auth_request_set_field: what a passdb field does to the request."""
        if name.endswith(b":protected") and len(name) > 10:
            name = name[:-10]
            if name in self.extra_fields:
                return
        elif name.endswith(b":remove") and len(name) > 7:
            self.extra_fields.remove(name[:-7])
            return
        if name == b"password":
            self.set_password(value, default_scheme)
            return
        if name == b"password_noscheme":
            self.set_password(value, default_scheme, noscheme=True)
            return
        if self.try_update_username(name, value):
            pass
        elif name == b"login_user":
            self.login_user = value
        elif name in (b"allow_nets", b"allow_real_nets"):
            remote = self.remote_ip if name == b"allow_nets" else self.real_remote_ip
            self.validate_networks(name, value, remote)
        elif name == b"fail":
            self.failed = True
        elif name == b"delay_until":
            self._set_delay_until(value)
        elif name.startswith(b"userdb_"):
            self.userdb_prefetch_set = True
            if self.userdb_reply is None:
                self.userdb_reply = AuthFields()
            if name == b"userdb_userdb_import":
                for item in value.split(b"\t"):
                    key, _, val = item.partition(b"=")
                    if key:
                        self.set_field(b"userdb_" + key, val, default_scheme)
                return
            self.set_userdb_field(name[7:], value)
        elif name == b"noauthenticate":
            self.extra_fields.add(name, value)
            self.extra_fields.add(b"nopassword", None)
            return
        elif name == b"nopassword":
            password = self.passdb_password
            if password is not None and b"noauthenticate" not in self.extra_fields and _strip_scheme(password):
                log.error("auth.field", message="nopassword set but password is non-empty", **self.log_context())
                return
            self.passdb_password = None
            self.extra_fields.add(name, value)
            return
        elif name == b"passdb_import":
            for item in value.split(b"\t"):
                key, sep, val = item.partition(b"=")
                if key:
                    self.set_field(key, val if sep else b"", default_scheme)
            return
        else:
            self.extra_fields.add(name, value)
            return
        # Kept hidden so :protected checks and caching see it (Dovecot does the same).
        self.extra_fields.add(name, value, hidden=True)

    def _set_delay_until(self, value: bytes) -> None:
        stamp, _, extra = value.partition(b"+")
        now = time.time()
        if extra and not extra.isdigit():
            log.error(
                "auth.field",
                message=f"Invalid delay_until randomness number '{_text(extra)}'",
                **self.log_context(),
            )
            self.failed = True
            return
        if not stamp.isdigit():
            log.error("auth.field", message=f"Invalid delay_until timestamp '{_text(stamp)}'", **self.log_context())
            self.failed = True
            return
        until = int(stamp)
        if until <= now:
            return
        if until - now > MAX_DELAY_SECS:
            log.error(
                "auth.field",
                message=f"delay_until timestamp {_text(stamp)} is too much in the future, failing",
                **self.log_context(),
            )
            self.failed = True
            return
        until += random.randrange(int(extra)) if extra and int(extra) > 0 else 0
        self.delay_until = min(until, now + MAX_DELAY_SECS)

    def validate_networks(self, name: bytes, networks: bytes, remote: str | None) -> None:
        """allow_nets: the client IP must be in one of the listed networks."""
        found = False
        for item in networks.replace(b",", b" ").split():
            net = item.decode("latin-1")
            if net == "local":
                if remote is None:
                    found = True
                    break
                continue
            try:
                network = ipaddress.ip_network(net, strict=False)
            except ValueError:
                log.info(
                    "auth.allow_nets",
                    message=f"{name.decode()}: Invalid network '{net}'",
                    **self.log_context(),
                )
                continue
            if remote is not None and ipaddress.ip_address(remote) in network:
                found = True
                break
        if not found:
            if remote is None:
                log.info(
                    "auth.allow_nets",
                    message=f"{name.decode()} check failed: Remote IP not known and 'local' missing",
                    **self.log_context(),
                )
            else:
                log.info(
                    "auth.allow_nets",
                    message=f"{name.decode()} check failed: IP {remote} not in allowed networks",
                    **self.log_context(),
                )
            self.failed = True

    # --- userdb fields ---------------------------------------------------------------

    def set_fields(self, fields: list[bytes]) -> None:
        """auth_request_set_fields: `key=value` items (from the cache), empty ones skipped."""
        for item in fields:
            if item:
                key, _, value = item.partition(b"=")
                self.set_field(key, value, "PLAIN")

    def set_userdb_field(self, name: bytes, value: bytes) -> None:
        """auth_request_set_userdb_field."""
        if self.userdb_reply is None:
            self.userdb_reply = AuthFields()
        reply = self.userdb_reply
        if name.endswith(b":protected") and len(name) > 10:
            name = name[:-10]
            if name in reply:
                return
        elif name.endswith(b":remove") and len(name) > 7:
            reply.remove(name[:-7])
            return
        if name in (b"uid", b"gid"):
            number = resolve_id(name, value)
            if number is None:
                log.error(
                    "userdb.field",
                    message=f"Invalid {name.decode().upper()} value '{_text(value)}'",
                    **self.log_context(),
                )
                self.userdb_lookup_tempfailed = True
                return
            value = number
        elif name == b"tempfail":
            self.userdb_lookup_tempfailed = True
            return
        elif self.try_update_username(name, value):
            return
        elif name == b"uidgid_file":
            self._set_uidgid_file(value)
            return
        elif name == b"userdb_import":
            for item in value.split(b"\t"):
                key, _, val = item.partition(b"=")
                self.set_userdb_field(key, val)
            return
        elif name == b"system_user":
            name = b"system_groups_user"
        reply.add(name, value)

    def _set_uidgid_file(self, path: bytes) -> None:
        assert self.userdb_reply is not None
        try:
            st = os.stat(path)
        except OSError as exc:
            log.error("userdb.field", message=f"stat({_text(path)}) failed: {exc.strerror}", **self.log_context())
            self.userdb_lookup_tempfailed = True
            return
        self.userdb_reply.add(b"uid", b"%d" % st.st_uid)
        self.userdb_reply.add(b"gid", b"%d" % st.st_gid)

    # --- replies ----------------------------------------------------------------------

    def reply_trailer(self, *, login: bool) -> list[Field]:
        """The fields Dovecot appends after the passdb's extra fields in OK/FAIL."""
        trailer = []
        extra = self.extra_fields
        if self.original_user is not None and self.original_user != self.user and b"original_user" not in extra:
            trailer.append(Field(b"original_user", self.original_user))
        if self.master_user is not None and b"auth_user" not in extra:
            trailer.append(Field(b"auth_user", self.master_user))
        anonymous = self.rules.anonymous_username.encode()
        if anonymous and self.user == anonymous:
            trailer.append(Field(b"anonymous"))
        if login and b"proxy" in extra:
            if b"pass" not in extra and self.mech_password is not None:
                trailer.append(Field(b"pass", self.mech_password))
            if self.master_user and b"master" not in extra:
                trailer.append(Field(b"master", self.master_user))
        return trailer

    def vars(self, *, db_id: int | None = None) -> RequestVars:
        """The request as lua_api sees it (script variables, %-expansion)."""
        secured = Secured.NONE
        if self.secured == b"tls":
            secured = Secured.TLS
        elif self.secured is not None:
            secured = Secured.SECURED
        return RequestVars(
            user=self.user,
            original_user=self.original_user,
            login_user=self.login_user,
            master_user=self.master_user,
            service=self.service,
            mechanism=self.mech,
            mech_password=self.mech_password,
            local_ip=_ip(self.local_ip),
            remote_ip=_ip(self.remote_ip),
            local_port=self.local_port,
            remote_port=self.remote_port,
            real_local_ip=_ip(self.real_local_ip),
            real_remote_ip=_ip(self.real_remote_ip),
            real_local_port=self.real_local_port,
            real_remote_port=self.real_remote_port,
            local_name=self.local_name,
            session_id=self.session,
            session_pid=self.session_pid,
            client_pid=self.client_pid,
            client_id=self.client_id,
            secured=secured,
            valid_client_cert=self.valid_client_cert,
            db_id=db_id,
        )

    def expand(self, template: bytes) -> bytes:
        """%-expand a template with this request's variables (raises VarExpandError)."""
        context = self.rules.expand_context
        if not isinstance(context, ExpandContext):
            context = ExpandContext()
        context = dataclasses.replace(
            context,
            passdb_field=self.extra_fields.find,
            userdb_field=lambda name: self.userdb_reply.find(name) if self.userdb_reply is not None else None,
        )
        return expand(template, var_table_23(self.vars()), context)

    def log_context(self) -> dict[str, str]:
        context = {"user": _text(self.user or self.original_user)}
        if self.service:
            context["service"] = _text(self.service)
        if self.remote_ip:
            context["rip"] = self.remote_ip
        if self.session:
            context["session"] = _text(self.session)
        return context


def _ip(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _strip_scheme(password: bytes) -> bytes:
    if password.startswith(b"{"):
        end = password.find(b"}")
        if end > 0:
            return password[end + 1 :]
    return password


def resolve_id(kind: bytes, value: bytes) -> bytes | None:
    """userdb_parse_uid/gid: a number that fits a signed 32-bit id, else a user/group name.

    Like Dovecot, a number of 2^31 or more (so also a negative one printed unsigned) is not
    an id: it is looked up as a name, which fails.
    """
    if value.isdigit() and int(value) < 2**31:
        return b"%d" % int(value)
    try:
        name = value.decode()
        if kind == b"uid":
            return b"%d" % pwd.getpwnam(name).pw_uid
        return b"%d" % grp.getgrnam(name).gr_gid
    except (KeyError, UnicodeDecodeError):
        return None


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")

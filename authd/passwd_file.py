"""The passwd-file passdb and userdb: Dovecot's `user:password:uid:gid:gecos:home:shell:extra` files.

Files are read once and re-read when they change on disk; the path may contain
%-variables (one file per domain). Extra fields are %-expanded; the userdb takes
only the `userdb_*` ones (db-passwd-file.c, passdb-/userdb-passwd-file.c).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import structlog

from authd.auth_request import AuthRequest, resolve_id
from authd.password_check import handle_credentials, verify_password_off_loop
from authd.passwords import split_scheme
from lua_api.results import IterateResult, PassdbResult, UserdbResult
from lua_api.var_expand import VarExpandError

log = structlog.get_logger("authd.passwd_file")


@dataclass
class PasswdUser:
    password: bytes | None = None
    uid: bytes | None = None
    gid: bytes | None = None
    home: bytes | None = None
    extra_fields: tuple[bytes, ...] = ()
    #: A line with too few fields has no userdb data (Dovecot refuses userdb lookups).
    no_userdb: bool = False


@dataclass
class _Loaded:
    mtime_ns: int
    size: int
    users: dict[bytes, PasswdUser] = field(default_factory=dict)


def parse_line(line: bytes, path: str) -> tuple[bytes, PasswdUser] | None:
    """One passwd-file line, or None for comments, blank and broken lines."""
    if not line.strip() or line.startswith(b"#"):
        return None
    parts = line.split(b":")
    username, password = parts[0], (parts[1] if len(parts) > 1 else None)
    user = PasswdUser(password=_pam_pwdfile_password(password))
    args = parts[2:]
    if args:
        if args[0]:
            user.uid = resolve_id(b"uid", args[0])
            if user.uid in (None, b"0"):
                log.error(
                    "passwd_file.line",
                    message=f"User {username.decode('utf-8', 'replace')} has invalid UID",
                    file=path,
                )
                return None
        args = args[1:]
        if not args:
            user.no_userdb = True
        else:
            if args[0]:
                user.gid = resolve_id(b"gid", args[0])
                if user.gid in (None, b"0"):
                    log.error(
                        "passwd_file.line",
                        message=f"User {username.decode('utf-8', 'replace')} has invalid GID",
                        file=path,
                    )
                    return None
            args = args[1:]
            args = args[1:]  # gecos
            if args:
                user.home = args[0] or None
                args = args[1:]
            args = args[1:]  # shell
            if args and args[0] == b"":
                # old format: an empty field, then the mail location
                rest = b":".join(args[1:])
                if rest:
                    user.extra_fields = (b"userdb_mail=" + rest,)
            elif args:
                user.extra_fields = tuple(f for f in b":".join(args).split(b" ") if f)
    return username, user


def _pam_pwdfile_password(password: bytes | None) -> bytes | None:
    """libpam-pwdfile's `password[NN]` suffix: 34 = MD5, 56 = DIGEST-MD5, else CRYPT."""
    if password is None or len(password) <= 4:
        return password
    if password[:1] not in (b"{", b"$") and password.endswith(b"]") and password[-4:-3] == b"[":
        kind, plain = password[-3:-1], password[:-4]
        if kind == b"34":
            return b"{PLAIN-MD5}" + plain
        if kind == b"56":
            return b"{DIGEST-MD5}" + plain
        return b"{CRYPT}" + plain
    return password


class PasswdFile:
    """The users of one passwd-file (or of one %-expanded path each)."""

    def __init__(self, path_template: str, *, username_format: str = "%u") -> None:
        self.path_template = path_template.encode()
        self.username_format = username_format.encode()
        self._files: dict[bytes, _Loaded] = {}

    def users(self, path: bytes) -> list[bytes]:
        loaded = self._load(path)
        return list(loaded.users) if loaded is not None else []

    def _load(self, path: bytes) -> _Loaded | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        loaded = self._files.get(path)
        if loaded is not None and (loaded.mtime_ns, loaded.size) == (st.st_mtime_ns, st.st_size):
            return loaded
        fresh = _Loaded(st.st_mtime_ns, st.st_size)
        with open(path, "rb") as f:
            for raw in f:
                parsed = parse_line(raw.rstrip(b"\r\n"), path.decode("utf-8", "replace"))
                if parsed is None:
                    continue
                name, user = parsed
                if name in fresh.users:
                    log.error(
                        "passwd_file.line",
                        message=f"User {name.decode('utf-8', 'replace')} exists more than once",
                    )
                    continue
                fresh.users[name] = user
        self._files[path] = fresh
        return fresh

    def lookup(self, req: AuthRequest) -> PasswdUser | None:
        """db_passwd_file_lookup; raises OSError / VarExpandError for internal failures."""
        path = req.expand(self.path_template) if b"%" in self.path_template else self.path_template
        loaded = self._load(path)
        if loaded is None:
            return None
        user = loaded.users.get(req.expand(self.username_format))
        if user is None:
            log.info("passdb.unknown_user", message="unknown user", **req.log_context())
        return user


def _expand_extra(req: AuthRequest, field_text: bytes) -> tuple[bytes, bytes]:
    key, sep, value = field_text.partition(b"=")
    return key, (req.expand(value) if sep else b"")


class PasswdFilePassdb:
    def __init__(self, path: str, *, scheme: str = "CRYPT", username_format: str = "%u") -> None:
        self.file = PasswdFile(path, username_format=username_format)
        self.scheme = scheme

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _save(self, req: AuthRequest) -> tuple[int, bytes | None, str]:
        try:
            user = self.file.lookup(req)
            if user is None:
                return PassdbResult.USER_UNKNOWN, None, self.scheme
            scheme, password = split_scheme(user.password or b"")
            scheme = scheme or self.scheme
            req.set_field(b"password", password, scheme)
            for extra in user.extra_fields:
                key, value = _expand_extra(req, extra)
                req.set_field(key, value, "PLAIN")
        except (OSError, VarExpandError) as exc:
            log.error("passdb.passwd_file", message=str(exc), **req.log_context())
            return PassdbResult.INTERNAL_FAILURE, None, self.scheme
        return PassdbResult.OK, password, scheme

    async def verify_plain(self, req: AuthRequest, password: bytes) -> int:
        code, stored, scheme = self._save(req)
        if code != PassdbResult.OK:
            return code
        if await verify_password_off_loop(req, password, stored, scheme) <= 0:
            return PassdbResult.PASSWORD_MISMATCH
        return PassdbResult.OK

    async def lookup_credentials(self, req: AuthRequest, scheme: str) -> tuple[int, bytes | None]:
        code, stored, stored_scheme = self._save(req)
        return handle_credentials(req, code, stored, stored_scheme, scheme)


class PasswdFileUserdb:
    def __init__(self, path: str, *, username_format: str = "%u") -> None:
        self.file = PasswdFile(path, username_format=username_format)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def lookup(self, req: AuthRequest) -> int:
        try:
            user = self.file.lookup(req)
            if user is None or user.no_userdb:
                return UserdbResult.USER_UNKNOWN
            if user.uid is not None:
                req.set_userdb_field(b"uid", user.uid)
            if user.gid is not None:
                req.set_userdb_field(b"gid", user.gid)
            if user.home is not None:
                req.set_userdb_field(b"home", user.home)
            for extra in user.extra_fields:
                if extra.startswith(b"userdb_"):
                    key, value = _expand_extra(req, extra[7:])
                    req.set_userdb_field(key, value)
        except (OSError, VarExpandError) as exc:
            log.error("userdb.passwd_file", message=str(exc), **req.log_context())
            return UserdbResult.INTERNAL_FAILURE
        return UserdbResult.OK

    async def iterate(self) -> IterateResult:
        """Every user of the file (only for a fixed path, as in Dovecot)."""
        if b"%" in self.file.path_template:
            log.error("userdb.passwd_file", message="Can't iterate users of a passwd-file path with %variables")
            return IterateResult((), failed=True)
        try:
            users = self.file.users(self.file.path_template)
        except OSError as exc:
            log.error("userdb.passwd_file", message=str(exc))
            return IterateResult((), failed=True)
        return IterateResult(tuple(users))

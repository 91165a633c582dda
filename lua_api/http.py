"""`dovecot.http` for auth scripts, behaving like Dovecot 2.3.19's lib-http client.

The Lua side (http.lua) checks arguments and options exactly as dlua-dovecot-http.c
does and hands a submitted request to this module as plain data. Here it is sent
the way Dovecot's http-client sends it: the same implicit headers, retries,
redirect rules, timeouts, and the same 9000-9008 statuses with Dovecot's reason
texts for failures (a failed request never raises in Lua).

The transport is httpcore, the engine under httpx, used directly: httpx's client
layer would add its own headers, cookies, redirect and decoding rules, all of
which differ from Dovecot's, and its transport cannot take the network backend
that reproduces Dovecot's connection handling (DNS errors, one address after the
other, connect attempts with backoff, its error texts).

`send_request()` and `new_connection_pool()` work on `ClientSettings`: 2.3 option
tables come in through `ClientSettings.from_lua()`, 2.4 ones (setting names,
values parsed like configuration) through `parse_client_settings_24()`.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import ipaddress
import itertools
import math
import os
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from importlib import resources
from typing import TYPE_CHECKING, Any

import httpcore
import trio

if TYPE_CHECKING:
    from lua_api.runtime import LuaState


class RequestError(IntEnum):
    """Dovecot's internal response statuses (enum http_client_request_error, http-client.h)."""

    ABORTED = 9000
    INVALID_URL = 9001
    HOST_LOOKUP_FAILED = 9002
    CONNECT_FAILED = 9003
    INVALID_REDIRECT = 9004
    CONNECTION_LOST = 9005
    BROKEN_PAYLOAD = 9006
    BAD_RESPONSE = 9007
    TIMED_OUT = 9008


# --- URLs: http_url_parse() (lib-http/http-url.c, lib/uri-util.c) -------------------

_ALPHA = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DIGIT = frozenset(b"0123456789")
_ALNUM = _ALPHA | _DIGIT
_HEXDIG = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = _ALNUM | frozenset(b"-._~")
_SUB_DELIMS = frozenset(b"!$&'()*+,;=")
_USERINFO_CHAR = _UNRESERVED | _SUB_DELIMS | frozenset(b":")
_PCHAR = _UNRESERVED | _SUB_DELIMS | frozenset(b":@")
_PATH_CHAR = _PCHAR | frozenset(b"/")
_QUERY_CHAR = _PCHAR | frozenset(b"/?")
_HOST_CHAR = _UNRESERVED | _SUB_DELIMS
_MAX_SCHEME_LEN = 64


class UrlError(ValueError):
    """A URL Dovecot's parser rejects; the message is Dovecot's error text."""


def _text(data: bytes | int) -> str:
    """Raw bytes inside an error message, byte for byte (messages go back to Lua as latin-1)."""
    return chr(data) if isinstance(data, int) else data.decode("latin-1")


def _encode(data: bytes, allowed: frozenset[int]) -> bytes:
    """uri_data_encode(): everything else as lower-case %xx."""
    return b"".join(bytes((c,)) if c in allowed else b"%%%02x" % c for c in data)


@dataclass(frozen=True)
class HttpUrl:
    """A parsed http(s) URL as Dovecot keeps it (struct http_url)."""

    host_name: bytes
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    port: int  # 0: not given
    have_ssl: bool
    path: bytes | None  # decoded, dot segments removed
    query: bytes | None  # still encoded
    user: bytes | None = None
    password: bytes | None = None

    @property
    def authority(self) -> bytes:
        """host[:port] as sent in Host (http_url_create_authority)."""
        host = self.host_name if self.host_name.startswith(b"[") else _encode(self.host_name, _HOST_CHAR)
        return host + (b":%d" % self.port if self.port else b"")

    @property
    def target(self) -> bytes:
        """The request target: re-encoded path and the query as given (http_url_create_target)."""
        target = _encode(self.path, _PATH_CHAR) if self.path else b"/"
        return target if self.query is None else target + b"?" + self.query

    @property
    def absolute(self) -> bytes:
        """scheme://authority/target (http_url_create_host() + target)."""
        return b"%s://%s%s" % (b"https" if self.have_ssl else b"http", self.authority, self.target)

    @property
    def connect_host(self) -> bytes:
        """Where to connect: the IP the URL names (IPv6 in brackets), else the host name."""
        if isinstance(self.ip, ipaddress.IPv6Address):
            return b"[%s]" % self.ip.compressed.encode()
        return self.ip.compressed.encode() if self.ip is not None else self.host_name


class _UrlParser:
    """One pass over a URL with Dovecot's grammar, checks and error texts."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def at(self, chars: bytes) -> bool:
        return self.pos < len(self.data) and self.data[self.pos] in chars

    def pct(self, data: bytes, pos: int) -> int:
        """Decode the %xx at data[pos] (uri_parse_pct_encoded_data)."""
        if pos + 2 >= len(data):
            raise UrlError("Unexpected URI boundary after '%'")
        high, low = data[pos + 1], data[pos + 2]
        if high not in _HEXDIG:
            raise UrlError(f"Expecting hex digit after '%', but found '{_text(high)}'")
        if low not in _HEXDIG:
            raise UrlError(f"Expecting hex digit after '%{_text(high)}', but found '{_text(low)}'")
        value = int(data[pos + 1 : pos + 3], 16)
        if value == 0:
            raise UrlError("Percent encoding is not allowed to encode NUL character")
        return value

    def decode(self, data: bytes, start: int = 0, stop: int | None = None) -> bytes:
        """uri_data_decode(): %xx may look past `stop`, as in Dovecot."""
        stop = len(data) if stop is None else stop
        out = bytearray()
        pos = start
        while pos < stop:
            if data[pos] == ord("%"):
                out.append(self.pct(data, pos))
                pos += 3
            else:
                out.append(data[pos])
                pos += 1
        return bytes(out)

    def scan(self, allowed: frozenset[int]) -> None:
        """Skip characters from `allowed` and valid %xx."""
        data = self.data
        while self.pos < len(data):
            if data[self.pos] == ord("%"):
                self.pct(data, self.pos)
                self.pos += 3
            elif data[self.pos] in allowed:
                self.pos += 1
            else:
                return

    def parse(self, allow_userinfo: bool) -> HttpUrl:
        scheme = self.scheme()
        if scheme is not None and scheme.lower() not in (b"http", b"https"):
            raise UrlError("Not an HTTP URL")
        if self.data.startswith(b"//", self.pos):  # also without a scheme: then it is http
            self.pos += 2
            url = self.authority(allow_userinfo)
        elif scheme is not None:
            raise UrlError("Absolute HTTP URL requires `//' after `http:'")
        else:
            raise UrlError("Relative HTTP URL not allowed")
        path = self.path()
        query = self.query()
        if self.at(b"#"):
            self.pos += 1
            self.scan(_QUERY_CHAR)
            if self.pos < len(self.data):
                raise UrlError("Fragment component contains invalid character")
            raise UrlError("URL fragment not allowed for HTTP URL in this context")
        have_ssl = scheme is not None and scheme.lower() == b"https"
        return replace(url, have_ssl=have_ssl, path=path, query=query)

    def scheme(self) -> bytes | None:
        data = self.data
        if not data or data[0] not in _ALPHA:
            return None
        end = 1
        while end < _MAX_SCHEME_LEN and end < len(data) and (data[end] in _ALNUM or data[end] in b"+-."):
            end += 1
        if end >= len(data) or data[end] != ord(":"):
            return None  # "Invalid URI scheme", always overridden: the URL is relative then
        self.pos = end + 1
        return data[:end]

    def authority(self, allow_userinfo: bool) -> HttpUrl:
        data = self.data
        end = self.pos
        while end < len(data) and (data[end] == ord("%") or data[end] in _USERINFO_CHAR):
            end += 1
        userinfo = None
        if end < len(data) and data[end] == ord("@"):
            userinfo = data[self.pos : end]
            self.pos = end + 1
        host_name, ip = self.host()
        port = 0
        if self.pos < len(data):
            if not self.at(b":/?#"):
                raise UrlError("Invalid host identifier")
            if self.at(b":"):
                self.pos += 1
                port = self.port()
                if self.pos < len(data) and not self.at(b"/?#"):
                    raise UrlError("Invalid host port")
        if not host_name:
            raise UrlError("HTTP URL does not allow empty host identifier")
        user = password = None
        if userinfo is not None:
            if not allow_userinfo:
                raise UrlError("HTTP URL does not allow `userinfo@' part")
            colon = userinfo.find(b":")
            if colon < 0:
                user = self.decode(userinfo)
            else:
                user = self.decode(userinfo, 0, colon)
                password = self.decode(userinfo, colon + 1)
        return HttpUrl(host_name, ip, port, False, None, None, user, password)

    def host(self) -> tuple[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
        if self.at(b"["):
            return self.ip_literal()
        start = self.pos
        ip = self.ipv4()
        if ip is not None:
            return self.data[start : self.pos], ipaddress.IPv4Address(ip)
        self.pos = start
        return self.host_name(), None

    def ip_literal(self) -> tuple[bytes, ipaddress.IPv6Address]:
        end = self.data.find(b"]", self.pos + 1)
        if end < 0:
            raise UrlError("Expecting ']' at end of IP-literal")
        literal = self.data[self.pos : end + 1]
        address = literal[1:-1]
        self.pos = end + 1
        if not address:
            raise UrlError("Empty IPv6 host address")
        if address.startswith(b"v"):
            raise UrlError(f"Future IP host address '{_text(address)}' not supported")
        try:
            ip = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, address.decode("latin-1")))
        except (OSError, ValueError):
            raise UrlError(f"Invalid IPv6 host address '{_text(address)}'") from None
        return literal, ip

    def dec_octet(self) -> int | None:
        value = None
        while self.at(b"0123456789"):
            value = (value or 0) * 10 + self.data[self.pos] - ord("0")
            if value > 255:
                return None
            self.pos += 1
        return value

    def ipv4(self) -> int | None:
        """uri_parse_ipv4address(): like Dovecot, "1.2" at the end of the URL is the IP 0.0.1.2."""
        ip = self.dec_octet()
        if ip is None:
            return None
        for _ in range(3):
            if self.pos >= len(self.data):
                break
            if not self.at(b"."):
                return None
            self.pos += 1
            octet = self.dec_octet()
            if octet is None:
                return None
            ip = (ip << 8) + octet
        return ip

    def host_char(self) -> tuple[int, int, bool]:
        """The character at pos (decoded if %xx), where the next one starts, whether it was %xx."""
        if self.data[self.pos] == ord("%"):
            return self.pct(self.data, self.pos), self.pos + 3, True
        return self.data[self.pos], self.pos + 1, False

    def host_name(self) -> bytes:
        """Dot-separated labels of letters, digits and inner dashes (uri_parse_host_name)."""
        name = bytearray()
        while self.pos < len(self.data):
            char, after, encoded = self.host_char()
            if char not in _ALNUM:
                if encoded:
                    raise UrlError("(null)")  # Dovecot fails here without setting an error text
                break
            name.append(char)
            self.pos = after
            last = char
            while self.pos < len(self.data):
                char, after, _ = self.host_char()
                if char not in _ALNUM and char != ord("-"):
                    break
                name.append(char)
                self.pos = after
                last = char
            if last not in _ALNUM:
                raise UrlError("Invalid domain label in hostname")
            if not self.at(b"."):
                break
            name.append(ord("."))
            self.pos += 1
        return bytes(name[:-1] if name.endswith(b".") else name)

    def port(self) -> int:
        start = self.pos
        while self.at(b"0123456789"):
            self.pos += 1
        if self.pos == start:
            return 0
        port = int(self.data[start : self.pos])
        if not 0 < port < 65536:
            raise UrlError("Invalid port number")
        return port

    def segment(self) -> bytes | None:
        start = self.pos
        self.scan(_PCHAR)
        if self.pos < len(self.data) and not self.at(b"/?#"):
            raise UrlError("Path component contains invalid character")
        return self.data[start : self.pos] or None

    def path(self) -> bytes | None:
        """The decoded path with "." and ".." resolved (uri_parse_path, http_url_parse_path)."""
        begin = self.pos
        if self.at(b"/"):
            self.pos += 1
        segments: list[bytes] = []
        segment = self.segment()
        while True:
            if segment in (b".", b".."):
                if segment == b".." and segments:
                    segments.pop()
                segment = None
            else:
                segment = segment or b""
                segments.append(segment)
            if not self.at(b"/"):
                break
            self.pos += 1
            segment = self.segment()
        if self.pos == begin:
            return None
        if segment is None:
            segments.append(b"")
        return b"".join(b"/" + self.decode(s) for s in segments)

    def query(self) -> bytes | None:
        if not self.at(b"?"):
            return None
        start = self.pos + 1
        self.pos = start
        self.scan(_QUERY_CHAR)
        if self.pos < len(self.data) and not self.at(b"#"):
            raise UrlError("Query component contains invalid character")
        return self.data[start : self.pos]


def parse_http_url(url: bytes, *, allow_userinfo: bool) -> HttpUrl:
    """Parse an absolute http(s) URL like Dovecot's http_url_parse(); raises UrlError."""
    return _UrlParser(url).parse(allow_userinfo)


# --- what the script asked for ------------------------------------------------------


@dataclass(frozen=True)
class ClientSettings:
    """The http_client_settings that change how authd sends, with Dovecot's defaults for zeros."""

    user_agent: bytes | None = None
    max_idle_time_msecs: int = 0
    no_auto_redirect: bool = False
    no_auto_retry: bool = False
    max_redirects: int = 0
    max_attempts: int = 0
    max_connect_attempts: int = 0
    connect_backoff_time_msecs: int = 100
    connect_backoff_max_time_msecs: int = 60_000
    request_absolute_timeout_msecs: int = 0
    request_timeout_msecs: int = 60_000
    connect_timeout_msecs: int = 0
    max_auto_retry_delay_secs: int = 0
    proxy_url: HttpUrl | None = None

    @classmethod
    def from_lua(cls, options: Mapping[bytes, Any]) -> ClientSettings:
        """Options as http.lua checked them; zero means the default, as in http_client_init()."""
        defaults = cls()
        numbers = {
            option.name: int(options.get(option.name.encode(), 0)) or getattr(defaults, option.name)
            for option in fields(cls)
            if option.type == "int"
        }
        proxy = options.get(b"proxy_url")
        return cls(
            user_agent=options.get(b"user_agent") or None,
            no_auto_redirect=options.get(b"no_auto_redirect") is True,
            no_auto_retry=options.get(b"no_auto_retry") is True,
            proxy_url=parse_http_url(proxy, allow_userinfo=True) if proxy is not None else None,
            **numbers,
        )


# --- Dovecot 2.4's option names (http_client_init_auto() with settings overrides) ----------

#: http_client_* settings (http-client-settings.c, 2.4) by value type, named without the prefix.
_HTTP_SETTINGS_24 = {
    "dns_client_socket_path": "str",
    "dns_ttl": "msecs",
    "user_agent": "str",
    "proxy_socket_path": "str",
    "proxy_url": "str",
    "proxy_username": "str",
    "proxy_password": "str",
    "rawlog_dir": "str",
    "max_idle_time": "msecs",
    "max_parallel_connections": "uint",
    "max_pipelined_requests": "uint",
    "auto_redirect": "bool",
    "auto_retry": "bool",
    "proxy_ssl_tunnel": "bool",
    "request_max_redirects": "uint",
    "request_max_attempts": "uint",
    "read_request_max_attempts": "uint",
    "write_request_max_attempts": "uint",
    "delete_request_max_attempts": "uint",
    "max_connect_attempts": "uint",
    "connect_backoff_time": "msecs",
    "connect_backoff_max_time": "msecs",
    "response_hdr_max_size": "size",
    "response_hdr_max_field_size": "size",
    "response_hdr_max_fields": "uint",
    "request_absolute_timeout": "msecs",
    "request_timeout": "msecs",
    "read_request_timeout": "msecs",
    "write_request_timeout": "msecs",
    "delete_request_timeout": "msecs",
    "connect_timeout": "msecs",
    "soft_connect_timeout": "msecs",
    "max_auto_retry_delay": "secs",
    "socket_send_buffer_size": "size",
    "socket_recv_buffer_size": "size",
}

#: Names the ssl and dns_client settings accept too (2.4.4). Dovecot reads them only when
#: it connects, so their values are not checked here; authd leaves TLS and DNS as they are.
_OTHER_SETTINGS_24 = frozenset(
    (
        "ssl_client",
        "ssl_server",
        "ssl_client_ca_file",
        "ssl_client_ca_dir",
        "ssl_client_cert_file",
        "ssl_client_key_file",
        "ssl_client_key_password",
        "ssl_cipher_list",
        "ssl_cipher_suites",
        "ssl_curve_list",
        "ssl_min_protocol",
        "ssl_crypto_device",
        "ssl_client_require_valid_cert",
        "ssl_options",
        "ssl_peer_certificate_fingerprint_hash",
        "base_dir",
        "dns_client_timeout",
    )
)

_UINT_MAX = 0xFFFFFFFF
_UINTMAX_MAX = 0xFFFFFFFFFFFFFFFF


class SettingsError(ValueError):
    """A Dovecot 2.4 option table Dovecot rejects; the message follows "Invalid HTTP client setting: "."""


def _leading_number(text: str) -> tuple[int, str] | None:
    """str_parse_uintmax(): the leading decimal digits (None if none or too large) and the rest."""
    digits = len(text) - len(text.lstrip("0123456789"))
    if digits == 0 or not text[:digits].isascii() or int(text[:digits]) > _UINTMAX_MAX:
        return None
    return int(text[:digits]), text[digits:]


def _prefix_of(text: str, *words: str) -> bool:
    """str_begins_icase_with(word, text): `text` is a (case-insensitive) prefix of a word."""
    return any(word.startswith(text.lower()) for word in words)


def parse_interval(text: str, *, milliseconds: bool) -> int:
    """str_parse_get_interval(_msecs)(): "2s", "100ms", "5 mins"... in seconds or msecs."""
    parsed = _leading_number(text)
    if parsed is None:
        raise SettingsError(f"Invalid time interval: {text}")
    number, rest = parsed
    rest = rest.lstrip(" ")
    if rest == "" and number != 0:
        raise SettingsError(f"Time interval '{text}' is missing units (add e.g. 's' for seconds)")
    multiply = 1000 if milliseconds else 1
    unit = rest[:1].upper()
    if unit == "S":
        rest = "" if _prefix_of(rest, "secs", "seconds") else rest
    elif unit == "M":
        multiply *= 60
        if _prefix_of(rest, "mins", "minutes"):
            rest = ""
        elif _prefix_of(rest, "msecs", "mseconds", "millisecs", "milliseconds"):
            if not milliseconds and number % 1000 != 0:
                raise SettingsError(f"Milliseconds not supported for this setting: {text}")
            number = number if milliseconds else number // 1000
            multiply, rest = 1, ""
    elif unit == "H":
        multiply *= 60 * 60
        rest = "" if _prefix_of(rest, "hours") else rest
    elif unit == "D":
        multiply *= 60 * 60 * 24
        rest = "" if _prefix_of(rest, "days") else rest
    elif unit == "W":
        multiply *= 60 * 60 * 24 * 7
        rest = "" if _prefix_of(rest, "weeks") else rest
    if rest != "":
        raise SettingsError(f"Invalid time interval: {text}")
    if number > _UINT_MAX // multiply:
        raise SettingsError(f"Time interval is too large: {text}")
    return number * multiply


def _parse_size(text: str) -> int:
    """str_parse_get_size(): "10k", "2 MiB", "512"."""
    parsed = _leading_number(text)
    if parsed is None:
        raise SettingsError(f"Invalid size: {text}")
    number, rest = parsed
    rest = rest.lstrip(" ")
    multiply = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(rest[:1].upper())
    if multiply is not None:
        rest = rest[1:]
        if multiply > 1:
            rest = rest[1:] if rest[:1].upper() == "I" else rest
            rest = rest[1:] if rest[:1].upper() == "B" else rest
    if rest != "":
        raise SettingsError(f"Invalid size: {text}")
    if number > _UINTMAX_MAX // (multiply or 1):
        raise SettingsError(f"Size is too large: {text}")
    return number * (multiply or 1)


def _parse_value(kind: str, text: str) -> Any:
    """settings_parse() for one value: a str, an int (uint, msecs, secs, size) or a bool."""
    if kind == "str":
        return text
    if kind == "bool":
        if text.lower() in ("yes", "y") or text == "1":
            return True
        if text.lower() == "no":
            return False
        raise SettingsError(f"Invalid boolean value: {text} (use yes or no)")
    if text in ("unlimited", "infinite"):
        return _UINT_MAX if kind != "size" else _UINTMAX_MAX
    if kind == "uint":
        if not (text.isascii() and text.isdigit()):
            raise SettingsError(f"Invalid number {text}: Not a valid number")
        if int(text) > _UINT_MAX:
            raise SettingsError(f"Invalid number {text}: Number too large")
        return int(text)
    if kind == "size":
        return _parse_size(text)
    return parse_interval(text, milliseconds=kind == "msecs")


@dataclass(frozen=True)
class ClientSettings24:
    """A 2.4 client's settings: Dovecot's http_client_settings, with its per-method overrides."""

    settings: ClientSettings
    #: method -> (max_attempts, request timeout msecs); 0 keeps the client-wide value.
    per_method: tuple[tuple[frozenset[bytes], int, int], ...] = ()

    def for_method(self, method: bytes) -> ClientSettings:
        """http_client_request_new(): GET/HEAD, PUT/POST and DELETE may have their own limits."""
        for methods, attempts, timeout in self.per_method:
            if method.upper() in methods:
                return replace(
                    self.settings,
                    max_attempts=attempts or self.settings.max_attempts,
                    request_timeout_msecs=timeout or self.settings.request_timeout_msecs,
                )
        return self.settings


def parse_client_settings_24(options: list[tuple[str, str | None]]) -> ClientSettings24:
    """dovecot.http.client{} in 2.4: names, then values, then http_client_settings_check().

    `options` are the table's (key, tostring(value)) pairs in lua_next() order, value
    None where Lua has no string for it. Raises SettingsError with Dovecot's text.
    """
    wanted = [(key, value) for key, value in options if key != "event_parent"]
    for key, _ in wanted:
        if key not in _HTTP_SETTINGS_24 and key not in _OTHER_SETTINGS_24:
            raise SettingsError(f"{key} is unknown setting")
    values: dict[str, Any] = {}
    for key, text in wanted:
        if text is None:
            raise TypeError(f"the HTTP client setting {key} is not a string or number")
        kind = _HTTP_SETTINGS_24.get(key)
        if kind is None:
            continue
        try:
            values[key] = _parse_value(kind, text)
        except SettingsError as exc:
            raise SettingsError(f"{key}={text}: {exc}") from None
    return _settings_24(values)


def _settings_24(values: dict[str, Any]) -> ClientSettings24:
    def get(name: str, default: Any) -> Any:
        return values.get(name, default)

    invalid = "http_client settings: Invalid settings: "
    proxy = None
    if get("proxy_url", ""):
        try:
            proxy = parse_http_url(values["proxy_url"].encode("latin-1"), allow_userinfo=False)
        except UrlError as exc:
            raise SettingsError(f"{invalid}Invalid http_client_proxy_url: {exc}") from None
        if get("proxy_username", ""):
            user = values["proxy_username"].encode("latin-1")
            proxy = replace(proxy, user=user, password=get("proxy_password", "").encode("latin-1"))
    checks = (
        ("request_max_attempts", 1, "request_max_attempts must not be 0"),
        ("max_pipelined_requests", 1, "http_client_max_pipelined_requests must not be 0"),
        ("max_parallel_connections", 1, "http_client_max_parallel_connections must not be 0"),
        ("connect_backoff_time", 100, "http_client_connect_backoff_time_msecs must not be 0"),
    )
    for name, default, text in checks:
        if get(name, default) == 0:
            raise SettingsError(invalid + text)
    backoff, backoff_max = get("connect_backoff_time", 100), get("connect_backoff_max_time", 60_000)
    if backoff_max < backoff:
        raise SettingsError(
            f"{invalid}http_client_connect_backoff_time_msecs ({backoff_max}) must not be smaller than "
            f"http_client_connect_backoff_max_time_msecs ({backoff})"
        )
    if get("request_timeout", 60_000) == 0:
        raise SettingsError(invalid + "http_client_request_timeout_msecs must not be 0")
    settings = ClientSettings(
        user_agent=get("user_agent", "").encode("latin-1") or None,
        max_idle_time_msecs=get("max_idle_time", 0),
        no_auto_redirect=not get("auto_redirect", True),
        no_auto_retry=not get("auto_retry", True),
        max_redirects=get("request_max_redirects", 0),
        max_attempts=get("request_max_attempts", 1),
        max_connect_attempts=get("max_connect_attempts", 0),
        connect_backoff_time_msecs=backoff,
        connect_backoff_max_time_msecs=backoff_max,
        request_absolute_timeout_msecs=get("request_absolute_timeout", 0),
        request_timeout_msecs=get("request_timeout", 60_000),
        connect_timeout_msecs=get("connect_timeout", 0),
        max_auto_retry_delay_secs=get("max_auto_retry_delay", 0),
        proxy_url=proxy,
    )
    per_method = tuple(
        (frozenset(methods), get(f"{prefix}_request_max_attempts", 0), get(f"{prefix}_request_timeout", 0))
        for prefix, methods in (("read", (b"GET", b"HEAD")), ("write", (b"PUT", b"POST")), ("delete", (b"DELETE",)))
    )
    return ClientSettings24(settings, per_method)


@dataclass(frozen=True)
class HttpRequest:
    """One request as the script built it."""

    method: bytes
    url: HttpUrl
    headers: tuple[tuple[bytes, bytes], ...] = ()  # the script's own, in order
    headers_ever_set: frozenset[bytes] = frozenset()  # lower-case names; removing one keeps it here
    payload: bytes | None = None
    #: Send a payload with Expect: 100-continue (2.3 always; 2.4 when set_payload's 3rd arg is true).
    expect_continue: bool = True

    @classmethod
    def from_lua(cls, spec: Mapping[bytes, Any]) -> HttpRequest:
        return cls(
            method=spec[b"method"],
            url=parse_http_url(spec[b"url"], allow_userinfo=True),
            headers=tuple((pair[1], pair[2]) for pair in _lua_array(spec.get(b"headers"))),
            headers_ever_set=frozenset(_lua_array(spec.get(b"headers_ever_set"))),
            payload=spec.get(b"payload"),
            expect_continue=spec.get(b"sync") is not False,
        )


@dataclass(frozen=True)
class HttpResponse:
    """What the script's response object shows; failures carry status 9000-9008."""

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    payload: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The first header of that name, compared case-insensitively."""
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)

    def to_lua(self) -> dict[bytes, Any]:
        return {
            b"status": self.status,
            b"reason": self.reason,
            b"headers": [[key, value] for key, value in self.headers],
            b"payload": self.payload,
        }


def _lua_array(table: Mapping[int, Any] | None) -> list[Any]:
    """A Lua array as LuaState.to_python() delivers it: a dict keyed 1..n (empty tables: {})."""
    return [table[index] for index in range(1, len(table) + 1)] if table else []


def _failure(status: RequestError, reason: str) -> HttpResponse:
    return HttpResponse(int(status), reason.encode("latin-1", "replace"))


# --- Dovecot's reason texts: timings, errors --------------------------------------------


def _msecs(seconds: float) -> int:
    return max(0, int(seconds * 1000))


def _secs(msecs: int) -> str:
    """Dovecot's "%u.%03u" seconds."""
    return f"{msecs // 1000}.{msecs % 1000:03d}"


def _causes(exc: BaseException) -> list[BaseException]:
    """exc, what it was raised from, and the members of exception groups on the way."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


def _os_error(exc: BaseException) -> int | None:
    return next((e.errno for e in _causes(exc) if isinstance(e, OSError) and e.errno), None)


def _os_error_text(exc: BaseException) -> str:
    """The %m of a failed system call behind an httpcore error."""
    code = _os_error(exc)
    return os.strerror(code) if code is not None else str(exc)


def _tls_error_text(exc: BaseException) -> str:
    """Dovecot's wording for a failed TLS handshake, with Python's description of the cause."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = f"Received invalid SSL certificate: {cause.verify_message}"
            return f"{reason} (check ssl_client_ca_* settings?)"
        if isinstance(cause, ssl.SSLError):
            return str(cause)
    return "Connection closed"


@dataclass
class _Progress:
    """A request's history for Dovecot's statistics texts (http_client_request_append_stats_text)."""

    submitted: float
    retries: int = 0
    send_attempts: int = 0
    first_sent: float | None = None
    last_sent: float | None = None

    def sent(self) -> None:
        self.last_sent = time.monotonic()
        self.first_sent = self.first_sent or self.last_sent
        self.send_attempts += 1

    def retry(self, max_attempts: int) -> bool:
        """http_client_request_try_retry(): count one more attempt if the limit allows it."""
        if self.retries + 1 >= max_attempts:
            return False
        self.retries += 1
        return True

    def stats(self, connected: float | None = None) -> str:
        now = time.monotonic()
        text = f"Request queued {_secs(_msecs(now - self.submitted))} secs ago"
        if self.retries:
            text += f", {self.retries} times retried"
        if self.first_sent is None or self.last_sent is None:
            text += ", not yet sent"
        else:
            text += f", {self.send_attempts} send attempts in {_secs(_msecs(now - self.first_sent))} secs"
            if self.send_attempts > 1:
                text += f", {_secs(_msecs(now - self.last_sent))} in last attempt"
            waited = math.ceil((now - self.last_sent) * 1000)  # rounded up, as Dovecot does
            if waited > 0:
                text += f", {_secs(waited)} in http ioloop"
        text += ", 0.000 in other ioloops"
        if connected is not None:
            text += f", connected {_secs(_msecs(now - connected))} secs ago"
        return text

    def retried(self, reason: bytes) -> bytes:
        """The reason of a response that came after retries (http_client_request_callback)."""
        if not self.retries:
            return reason
        total = _secs(_msecs(time.monotonic() - self.submitted))
        return reason + f" ({self.retries} retries in {total} secs)".encode()


class _Failure(Exception):
    """A request that ends with an internal status; `retryable` if Dovecot may try again."""

    def __init__(self, status: RequestError, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable


# --- connections the way Dovecot makes them ---------------------------------------------


@dataclass
class _Exchange:
    """One send of a request; the network layer reports into it."""

    settings: ClientSettings
    progress: _Progress
    stream: _Stream | None = None  # the connection it went out on
    eof: bool = False  # the server closed that connection

    @property
    def label(self) -> str:
        return self.stream.label if self.stream else "(conn)"

    def failed(self, status: RequestError, text: str) -> _Failure:
        """A failure Dovecot may retry, with its statistics (http_client_connection_abort_temp_error)."""
        connected = self.stream.connected if self.stream else None
        return _Failure(status, f"{text} ({self.progress.stats(connected)})", retryable=True)

    def lost(self, detail: str) -> _Failure:
        return self.failed(RequestError.CONNECTION_LOST, f"Connection lost: {detail}")


#: The exchange running in the current task; httpcore has no other way to pass it down.
_current_exchange: ContextVar[_Exchange | None] = ContextVar("authd_http_exchange", default=None)


class _Stream(httpcore.AsyncNetworkStream):
    """A connection with Dovecot's name for it and its age, telling the current exchange what it sees."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, name: str, conn_id: int, connected: float) -> None:
        self._inner = inner
        self.name = name  # ip:port, as in connect(...) failed
        self.label = f"(conn:{name},id={conn_id})"  # as in read(...) failed
        self._conn_id = conn_id
        self.connected = connected

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        exchange = _current_exchange.get()
        if not data and exchange is not None:
            exchange.eof = True
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        exchange = _current_exchange.get()
        if exchange is not None and exchange.stream is None:
            exchange.stream = self
            exchange.progress.sent()
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        started = time.monotonic()
        hostname = server_hostname.strip("[]") if server_hostname else None
        try:
            inner = await self._inner.start_tls(ssl_context, hostname, timeout)
        except httpcore.ConnectTimeout:
            spent = _secs(_msecs(time.monotonic() - started))
            raise _Failure(
                RequestError.CONNECT_FAILED,
                f"SSL handshaking with {self.name} failed: Connection timed out in {spent} secs",
            ) from None
        except httpcore.ConnectError as exc:
            raise _Failure(
                RequestError.CONNECT_FAILED,
                f"SSL handshaking with {self.name} failed: read(SSL {self.label}) failed: {_tls_error_text(exc)}",
            ) from None
        return _Stream(inner, self.name, self._conn_id, self.connected)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _address_name(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class _Network(httpcore.AsyncNetworkBackend):
    """Dovecot's connection setup: its DNS errors, one address after the other, connect
    attempts with backoff (max_connect_attempts), and its texts for every failure."""

    def __init__(self) -> None:
        self._trio = httpcore.TrioBackend()
        self._conn_ids = itertools.count(1)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        exchange = _current_exchange.get()
        settings = exchange.settings if exchange is not None else ClientSettings()
        addresses = await self._resolve(host, timeout)
        first_attempt = time.monotonic()
        backoff: dict[str, tuple[float, int]] = {}  # address -> (last failure, backoff msecs)
        attempts = index = 0
        while True:
            address = addresses[index]
            name = _address_name(address, port)
            if address in backoff:
                failed, msecs = backoff[address]
                await trio.sleep(max(0.0, failed + msecs / 1000 - time.monotonic()))
            conn_id = next(self._conn_ids)
            attempts += 1
            started = time.monotonic()
            try:
                stream = await self._trio.connect_tcp(
                    address, port, timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectTimeout:
                spent = _secs(_msecs(time.monotonic() - started))
                reason = f"connect({name}) failed: Connection timed out in {spent} secs"
            except httpcore.ConnectError as exc:
                reason = f"connect({name}) failed: {_os_error_text(exc)}"
            else:
                return _Stream(stream, name, conn_id, time.monotonic())
            msecs = backoff[address][1] * 2 if address in backoff else settings.connect_backoff_time_msecs
            backoff[address] = (time.monotonic(), min(msecs, settings.connect_backoff_max_time_msecs))
            limit = settings.max_connect_attempts
            last_address = (index + 1) % len(addresses) == 0 or (limit > 1 and attempts >= limit)
            if last_address and (limit == 0 or attempts >= limit):
                if attempts > 1:
                    spent = _secs(_msecs(time.monotonic() - first_attempt))
                    reason += f" ({attempts} attempts in {spent} secs)"
                raise _Failure(RequestError.CONNECT_FAILED, reason)
            index = (index + 1) % len(addresses)

    async def _resolve(self, host: str, timeout: float | None) -> list[str]:
        """The addresses to try, in getaddrinfo's order, as Dovecot's dns-client returns them."""
        literal = host[1:-1] if host.startswith("[") else host
        try:
            return [ipaddress.ip_address(literal).compressed]
        except ValueError:
            pass
        with trio.move_on_after(timeout if timeout else float("inf")):
            try:
                found = await trio.socket.getaddrinfo(host.encode(), None, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise _Failure(
                    RequestError.HOST_LOOKUP_FAILED, f"Failed to lookup host {host}: {exc.strerror}"
                ) from None
            return list(dict.fromkeys(str(info[4][0]) for info in found))
        raise _Failure(RequestError.HOST_LOOKUP_FAILED, f"Failed to lookup host {host}: Lookup timed out")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def new_connection_pool(settings: ClientSettings, ssl_context: ssl.SSLContext) -> httpcore.AsyncConnectionPool:
    """Keep-alive connections for clients that share a proxy and an idle time."""
    proxy = None
    if settings.proxy_url is not None:
        url = settings.proxy_url
        scheme = b"https" if url.have_ssl else b"http"
        proxy = httpcore.Proxy(
            url=httpcore.URL(scheme=scheme, host=url.connect_host, port=url.port or None, target=b"/"),
            auth=(url.user, url.password) if url.user and url.password is not None else None,
            ssl_context=ssl_context if url.have_ssl else None,
        )
    return httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        proxy=proxy,
        max_connections=None,
        keepalive_expiry=settings.max_idle_time_msecs / 1000 or None,
        network_backend=_Network(),
    )


# --- sending: http-client-request.c, http-client-connection.c -------------------------

_BODY_SPEC = frozenset((b"content-length", b"transfer-encoding"))


def _basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


def _headers(
    settings: ClientSettings,
    request: HttpRequest,
    method: bytes,
    url: HttpUrl,
    payload: bytes | None,
    expect_continue: bool,
    date: bytes,
) -> list[tuple[bytes, bytes]]:
    """Dovecot's implicit headers (unless the script set them), then the script's own.

    One difference: when the script removed its own Host, Dovecot sends none; HTTP/1.1
    (and httpcore) require one, so authd sends the URL's.
    """
    ever_set = request.headers_ever_set
    own = request.headers
    proxy = settings.proxy_url if not url.have_ssl else None  # https goes through a CONNECT tunnel
    headers = []
    if not any(name.lower() == b"host" for name, _ in own):
        headers.append((b"Host", url.authority))
    if b"date" not in ever_set:
        headers.append((b"Date", date))
    user, password = request.url.user, request.url.password
    if b"authorization" not in ever_set and user and password is not None:
        headers.append((b"Authorization", _basic(user, password)))
    if proxy is not None and proxy.user and proxy.password is not None:
        # Here rather than first, where httpcore would put its copy for the proxy.
        headers.append((b"Proxy-Authorization", _basic(proxy.user, proxy.password)))
    if b"user-agent" not in ever_set and settings.user_agent:
        headers.append((b"User-Agent", settings.user_agent))
    if b"expect" not in ever_set and expect_continue:
        headers.append((b"Expect", b"100-continue"))
    if (payload is not None or method.upper() in (b"POST", b"PUT")) and not ever_set & _BODY_SPEC:
        headers.append((b"Content-Length", b"%d" % len(payload or b"")))
    if b"connection" not in ever_set and proxy is None:
        headers.append((b"Connection", b"Keep-Alive"))
    # Surrounding blanks are no part of a header value (RFC 9110 5.5); h11 refuses to send them.
    return headers + [(name, value.strip(b" \t")) for name, value in own]


async def _send_once(
    pool: httpcore.AsyncConnectionPool,
    exchange: _Exchange,
    method: bytes,
    url: HttpUrl,
    headers: list[tuple[bytes, bytes]],
    payload: bytes | None,
    redirected: bool,
) -> HttpResponse:
    """One send and its response, or a _Failure with Dovecot's status and text.

    After a redirect, 2.3 treats the new origin like a proxy and sends the request
    target in absolute form (http_client_request_do_submit()); authd does the same.
    """
    settings = exchange.settings
    attempt_timeout = settings.request_timeout_msecs / 1000
    timeouts = {
        "connect": (settings.connect_timeout_msecs or settings.request_timeout_msecs) / 1000,
        "read": attempt_timeout,
        "write": attempt_timeout,
        "pool": None,
    }
    scheme = b"https" if url.have_ssl else b"http"
    proxied = settings.proxy_url is not None and not url.have_ssl  # httpcore makes the target absolute
    request_target = url.absolute if redirected and not proxied else url.target
    wire_url = httpcore.URL(scheme=scheme, host=url.connect_host, port=url.port or None, target=request_target)
    extensions = {"timeout": timeouts}
    wire = httpcore.Request(method, wire_url, headers=headers, content=payload or b"", extensions=extensions)
    try:
        response = await pool.handle_async_request(wire)
    except (httpcore.ReadTimeout, httpcore.WriteTimeout):
        raise exchange.failed(RequestError.TIMED_OUT, "Request timed out") from None
    except httpcore.RemoteProtocolError as exc:
        if exchange.eof:
            raise exchange.lost(f"read({exchange.label}) failed: EOF") from None
        raise _Failure(RequestError.BAD_RESPONSE, str(exc)) from None
    except httpcore.ReadError as exc:
        raise exchange.lost(f"read({exchange.label}) failed: {_os_error_text(exc)}") from None
    except httpcore.WriteError as exc:
        if _os_error(exc) in (errno.EPIPE, errno.ECONNRESET):
            raise exchange.lost("Remote disconnected") from None
        raise exchange.lost(f"write({exchange.label}) failed: {_os_error_text(exc)}") from None
    except httpcore.ProxyError as exc:
        proxy = settings.proxy_url.authority.decode("latin-1") if settings.proxy_url else ""
        raise _Failure(RequestError.CONNECT_FAILED, f"Tunnel connect({proxy}) failed: {exc}") from None
    except httpcore.LocalProtocolError as exc:
        raise _Failure(RequestError.ABORTED, f"Cannot send this request: {exc}") from None
    body = bytearray()
    try:
        async for chunk in response.aiter_stream():
            body += chunk
    except (httpcore.ReadError, httpcore.ReadTimeout, httpcore.RemoteProtocolError):
        pass  # like Dovecot, the script gets what arrived (Dovecot only logs the read error)
    finally:
        await response.aclose()
    reason = response.extensions.get("reason_phrase", b"")
    return HttpResponse(response.status, reason, tuple(response.headers), bytes(body))


def _http_date(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return email.utils.parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError):
        return None


def _retry_delay(response: HttpResponse, settings: ClientSettings) -> tuple[int, float]:
    """Retry-After as Dovecot reads it (http_client_request_delay_from_response).

    (0, 0) no usable delay, (-1, 0) a delay longer than allowed, (1, seconds) wait that long.
    """
    value = response.header(b"retry-after")
    if value is None:
        return 0, 0.0
    if value.isdigit():
        date = _http_date(response.header(b"date"))  # delta-seconds count from the Date header
        retry_after = None if date is None else date + int(value)
    else:
        retry_after = _http_date(value)
    now = time.time()
    if retry_after is None or int(retry_after) < int(now):
        return 0, 0.0
    limit = settings.max_auto_retry_delay_secs or settings.request_timeout_msecs // 1000
    if int(retry_after) - int(now) > limit:
        return -1, 0.0
    return 1, max(0.0, int(retry_after) - now)


async def _run(
    pool: httpcore.AsyncConnectionPool, settings: ClientSettings, request: HttpRequest, progress: _Progress
) -> HttpResponse:
    """Send until there is an answer for the script: retries and redirects as Dovecot does them."""
    method, url, payload = request.method, request.url, request.payload
    expect_continue = bool(payload) and request.expect_continue
    date = email.utils.formatdate(usegmt=True).encode()
    redirects = 0
    while True:
        headers = _headers(settings, request, method, url, payload, expect_continue, date)
        exchange = _Exchange(settings, progress)
        token = _current_exchange.set(exchange)
        try:
            response = await _send_once(pool, exchange, method, url, headers, payload, redirects > 0)
        except _Failure as failure:
            if failure.retryable and not settings.no_auto_retry and progress.retry(settings.max_attempts):
                continue
            return _failure(failure.status, failure.reason)
        finally:
            _current_exchange.reset(token)
        status = response.status
        location = response.header(b"location")
        if status == 417 and expect_continue:
            expect_continue = False
            if progress.retry(settings.max_attempts):
                continue
        elif not settings.no_auto_redirect and status // 100 == 3 and status != 304 and location is not None:
            delay_kind, delay = _retry_delay(response, settings)
            if delay_kind >= 0:
                try:
                    url = parse_http_url(location, allow_userinfo=False)
                except UrlError as exc:
                    return _failure(RequestError.INVALID_REDIRECT, f"Invalid redirect location: {exc}")
                redirects += 1
                if redirects > settings.max_redirects:
                    if settings.max_redirects:
                        text = f"Redirected more than {settings.max_redirects} times"
                    else:
                        text = "Redirect refused"
                    return _failure(RequestError.INVALID_REDIRECT, text)
                await trio.sleep(delay)
                if status == 303 and method.upper() not in (b"HEAD", b"GET"):
                    method, payload = b"GET", None  # 2.3 still sends its Expect: 100-continue
                continue
        elif status == 503:
            delay_kind, delay = _retry_delay(response, settings)
            if delay_kind > 0 and progress.retry(settings.max_attempts):
                await trio.sleep(delay)
                continue
        elif status == 408 and progress.retry(settings.max_attempts):
            continue
        return replace(response, reason=progress.retried(response.reason))


async def send_request(
    pool: httpcore.AsyncConnectionPool, settings: ClientSettings, request: HttpRequest
) -> HttpResponse:
    """Send a request the way Dovecot 2.3's http-client does; failures become 9000-9008 responses."""
    progress = _Progress(time.monotonic())
    absolute = settings.request_absolute_timeout_msecs / 1000
    with trio.move_on_after(absolute or float("inf")):
        return await _run(pool, settings, request, progress)
    return _failure(RequestError.TIMED_OUT, f"Absolute request timeout expired ({progress.stats()})")


# --- the extension ----------------------------------------------------------------------


def _url_problems(url: bytes) -> tuple[bytes | None, bytes | None]:
    """For http.lua: why Dovecot rejects this URL, and why it would crash sending it."""
    try:
        parsed = parse_http_url(url, allow_userinfo=True)
    except UrlError as exc:
        return str(exc).encode("latin-1"), None
    if parsed.user and parsed.password is not None and b":" in parsed.user:
        return None, b"a user name with ':' cannot be sent in Basic authentication"
    return None, None


def _settings(payload: Mapping[bytes, Any]) -> ClientSettings:
    """The settings a submitted request goes out with: 2.3 option tables or 2.4 parsed settings."""
    raw = payload[b"settings"]
    if isinstance(raw, ClientSettings24):
        return raw.for_method(payload[b"method"])
    return ClientSettings.from_lua(raw)


_PoolKey = tuple[HttpUrl | None, int]


class HttpExtension:
    """`dovecot.http` for every Lua state of a daemon, with the connection pools they share.

    Pools are made on first use, one per proxy and idle time (Dovecot, too, shares
    connections between all clients of a process), in the trio run that calls
    perform(); aclose() closes them.
    """

    kind = b"http"

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context
        self._pools: dict[_PoolKey, httpcore.AsyncConnectionPool] = {}

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The system's CA store unless one was given (Dovecot uses its ssl_client_ca_* settings)."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def install(self, state: LuaState) -> None:
        def client_settings_24(options: Any) -> tuple[Any, bytes | None, bytes | None]:
            """For http.lua: (settings, None, None), (None, Dovecot's error, None) or (None, None, crash)."""
            pairs = [
                (key.decode("latin-1"), value.decode("latin-1") if isinstance(value, bytes) else None)
                for key, value in (state.to_python(options[i]).values() for i in range(1, len(options) + 1))
            ]
            try:
                return parse_client_settings_24(pairs), None, None
            except SettingsError as exc:
                return None, str(exc).encode("latin-1"), None
            except TypeError as exc:
                return None, None, str(exc).encode("latin-1")

        state.lua.execute(
            _lua_code(),
            state.api[b"yield_io"],
            self.kind,
            _url_problems,
            state.options.dialect.encode(),
            client_settings_24,
            name="=authd-http",
        )

    async def perform(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        settings = _settings(payload)
        key = (settings.proxy_url, settings.max_idle_time_msecs)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = new_connection_pool(settings, self.ssl_context)
        response = await send_request(pool, settings, HttpRequest.from_lua(payload))
        return response.to_lua()

    def perform_blocking(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """submit() where Lua cannot yield: wait here, as Dovecot's submit() always does.

        From a trio worker thread the request still goes through the daemon's loop and
        pools. On the loop's own thread (blocking = no) the loop has to stand still, as
        Dovecot's auth process does: a private loop on a helper thread does the request.
        Without any trio loop (tools, tests) a private loop runs right here.
        """
        if trio.lowlevel.in_trio_run():
            with ThreadPoolExecutor(max_workers=1) as helper:
                return helper.submit(trio.run, self._perform_alone, payload).result()
        started = False

        async def in_daemon_loop() -> dict[bytes, Any]:
            nonlocal started
            started = True
            return await self.perform(payload)

        try:
            return trio.from_thread.run(in_daemon_loop)
        except RuntimeError:
            if started:
                raise
        return trio.run(self._perform_alone, payload)

    async def _perform_alone(self, payload: Mapping[bytes, Any]) -> dict[bytes, Any]:
        """One request on a connection of its own (a private loop cannot use the daemon's)."""
        settings = _settings(payload)
        pool = new_connection_pool(settings, self.ssl_context)
        try:
            response = await send_request(pool, settings, HttpRequest.from_lua(payload))
        finally:
            await pool.aclose()
        return response.to_lua()

    async def aclose(self) -> None:
        """Close every pooled connection (call from the trio run that used them)."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


#: Read once at import: a service that drops privileges later may not read it again.
_LUA_CODE = resources.files("lua_api").joinpath("http.lua").read_bytes()


def _lua_code() -> bytes:
    return _LUA_CODE

"""`dovecot.http` for auth scripts, behaving like Dovecot 2.3.19's lib-http client.

The Lua side (http.lua) checks arguments and options exactly as dlua-dovecot-http.c
does and hands a submitted request to this module as plain data. Here it is sent
the way Dovecot's http-client sends it: the same implicit headers, retries,
redirect rules, timeouts, and the same 9000-9008 statuses with Dovecot's reason
texts for failures (a failed request never raises in Lua).

The transport is h11 (the HTTP/1.1 state machine under httpx and httpcore) over
trio streams, with a keep-alive pool of its own: httpx's client layer would add its
own headers, cookies, redirect and decoding rules, all of which differ from
Dovecot's; httpcore's pool scans (and polls) every pooled connection on every
request, which made it most of the CPU an HTTP-backed login cost (bench/http_client.py
measures it). Connections are made as Dovecot makes them (DNS errors, one address
after the other, connect attempts with backoff, its error texts).

`send_request()` and `ConnectionPool` work on `ClientSettings`: 2.3 option
tables come in through `ClientSettings.from_lua()`, 2.4 ones (setting names,
values parsed like configuration) through `parse_client_settings_24()`.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import ipaddress
import itertools
import math
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from importlib import resources
from typing import TYPE_CHECKING, Any

import h11
import structlog
import trio

from lua_api.blocking import wait_for

if TYPE_CHECKING:
    from lua_api.runtime import LuaState


log = structlog.get_logger("lua_api.http")


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


def _run_of(chars: frozenset[int]) -> re.Pattern[bytes]:
    """A regex for a run of `chars`: the parser's loops over plain characters, done in C."""
    return re.compile(b"[" + b"".join(re.escape(bytes((c,))) for c in sorted(chars)) + b"]*")


def _skip(run: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where the run of `run`'s characters that starts at `pos` ends."""
    match = run.match(data, pos)
    return match.end() if match else pos


_PCHAR_RUN = _run_of(_PCHAR)
_QUERY_RUN = _run_of(_QUERY_CHAR)
_AUTHORITY_RUN = _run_of(_USERINFO_CHAR | {ord("%")})
_DIGIT_RUN = _run_of(_DIGIT)
#: The usual IPv4 host: four octets of 1-3 digits (the parser checks them for <= 255).
_IPV4 = re.compile(rb"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})(?![0-9])")
#: The usual host name: labels of letters and digits with inner dashes, maybe a final dot.
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST_NAME = re.compile(_LABEL + rb"(?:\." + _LABEL + rb")*\.?")
#: Characters that, right after a _HOST_NAME match, mean the slow path must decide.
_HOST_NAME_MORE = _ALNUM | frozenset(b"-.%")
#: The usual path: segments without %xx, "." or ".." (then it stays as it is).
_PLAIN_PATH = re.compile(b"(?:/" + _PCHAR_RUN.pattern + b")+")
_DOT_SEGMENT = re.compile(rb"/\.\.?(?:/|\Z)")
_HOST_BYTES = bytes(sorted(_HOST_CHAR))
_PATH_BYTES = bytes(sorted(_PATH_CHAR))


class UrlError(ValueError):
    """A URL Dovecot's parser rejects; the message is Dovecot's error text."""


def _text(data: bytes | int) -> str:
    """Raw bytes inside an error message, byte for byte (messages go back to Lua as latin-1)."""
    return chr(data) if isinstance(data, int) else data.decode("latin-1")


def _encode(data: bytes, allowed: bytes) -> bytes:
    """uri_data_encode(): everything else as lower-case %xx."""
    if not data.translate(None, allowed):
        return data  # nothing to encode
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

    # Cached: each is asked for more than once per request (headers, connection, retries).

    @functools.cached_property
    def authority(self) -> bytes:
        """host[:port] as sent in Host (http_url_create_authority)."""
        host = self.host_name if self.host_name.startswith(b"[") else _encode(self.host_name, _HOST_BYTES)
        return host + (b":%d" % self.port if self.port else b"")

    @functools.cached_property
    def target(self) -> bytes:
        """The request target: re-encoded path and the query as given (http_url_create_target)."""
        target = _encode(self.path, _PATH_BYTES) if self.path else b"/"
        return target if self.query is None else target + b"?" + self.query

    @functools.cached_property
    def absolute(self) -> bytes:
        """scheme://authority/target (http_url_create_host() + target)."""
        return b"%s://%s%s" % (b"https" if self.have_ssl else b"http", self.authority, self.target)

    @functools.cached_property
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
        if data.find(b"%", start, stop) < 0:
            return data[start:stop]
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

    def scan(self, run: re.Pattern[bytes]) -> None:
        """Skip the characters `run` matches (a _run_of()) and valid %xx."""
        data = self.data
        pos = _skip(run, data, self.pos)
        while pos < len(data) and data[pos] == ord("%"):
            self.pct(data, pos)
            pos = _skip(run, data, pos + 3)
        self.pos = pos

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
            self.scan(_QUERY_RUN)
            if self.pos < len(self.data):
                raise UrlError("Fragment component contains invalid character")
            raise UrlError("URL fragment not allowed for HTTP URL in this context")
        have_ssl = scheme is not None and scheme.lower() == b"https"
        host_name, ip, port, user, password = url
        return HttpUrl(host_name, ip, port, have_ssl, path, query, user, password)

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

    def authority(
        self, allow_userinfo: bool
    ) -> tuple[bytes, ipaddress.IPv4Address | ipaddress.IPv6Address | None, int, bytes | None, bytes | None]:
        """host name, IP, port, user, password."""
        data = self.data
        end = _skip(_AUTHORITY_RUN, data, self.pos)
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
        return host_name, ip, port, user, password

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
        match = _IPV4.match(self.data, self.pos)
        if match:
            a, b, c, d = (int(octet) for octet in match.groups())
            if max(a, b, c, d) <= 255:
                self.pos = match.end()
                return a << 24 | b << 16 | c << 8 | d
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
        match = _HOST_NAME.match(self.data, self.pos)
        if match and (match.end() == len(self.data) or self.data[match.end()] not in _HOST_NAME_MORE):
            self.pos = match.end()
            plain = match.group()
            return plain[:-1] if plain.endswith(b".") else plain
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
        self.pos = _skip(_DIGIT_RUN, self.data, start)
        if self.pos == start:
            return 0
        port = int(self.data[start : self.pos])
        if not 0 < port < 65536:
            raise UrlError("Invalid port number")
        return port

    def segment(self) -> bytes | None:
        start = self.pos
        self.scan(_PCHAR_RUN)
        if self.pos < len(self.data) and not self.at(b"/?#"):
            raise UrlError("Path component contains invalid character")
        return self.data[start : self.pos] or None

    def path(self) -> bytes | None:
        """The decoded path with "." and ".." resolved (uri_parse_path, http_url_parse_path)."""
        plain = _PLAIN_PATH.match(self.data, self.pos)
        ends = plain is not None and (plain.end() == len(self.data) or self.data[plain.end()] in b"?#")
        if plain is not None and ends and not _DOT_SEGMENT.search(plain.group()):
            self.pos = plain.end()
            return plain.group()
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
        self.scan(_QUERY_RUN)
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
    #: The client's `debug` option (2.3): log each request's progress at debug level.
    debug: bool = False
    #: The script whose client this is, for log events (set by HttpExtension.install).
    script: str = ""

    @classmethod
    def from_lua(cls, options: Mapping[bytes, Any]) -> ClientSettings:
        """Options as http.lua checked them; zero means the default, as in http_client_init()."""
        defaults = cls()
        numbers: dict[str, Any] = {
            option.name: int(options.get(option.name.encode(), 0)) or getattr(defaults, option.name)
            for option in fields(cls)
            if option.type == "int"
        }
        proxy = options.get(b"proxy_url")
        return cls(
            user_agent=options.get(b"user_agent") or None,
            no_auto_redirect=options.get(b"no_auto_redirect") is True,
            no_auto_retry=options.get(b"no_auto_retry") is True,
            debug=options.get(b"debug") is True,
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


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request as the script built it."""

    method: bytes
    url: HttpUrl
    headers: tuple[tuple[bytes, bytes], ...] = ()  # the script's own, in order
    headers_ever_set: frozenset[bytes] = frozenset()  # lower-case names; removing one keeps it here
    payload: bytes | None = None
    #: Send a payload with Expect: 100-continue (2.3 always; 2.4 when set_payload's 3rd arg is true).
    expect_continue: bool = True


@dataclass(frozen=True, slots=True)
class Submission:
    """What submit() hands to HttpExtension.perform(): the request and its client's settings."""

    settings: ClientSettings | ClientSettings24
    request: HttpRequest

    @classmethod
    def from_lua(cls, spec: Mapping[int, Any]) -> Submission:
        """http.lua's array, as LuaState.to_python() delivers it (a dict keyed 1..n).

        In order: settings, method, url (both as http.lua got them from here), payload or
        False, sync, how many header names were ever set, those names, then the headers
        (name, value, ...).
        """
        values = [spec[index] for index in range(1, len(spec) + 1)]
        settings, method, url, payload, sync, n_ever_set = values[:6]
        flat = values[6 + n_ever_set :]
        request = HttpRequest(
            method,
            url,
            tuple(zip(flat[::2], flat[1::2], strict=True)),
            frozenset(values[6 : 6 + n_ever_set]),
            payload if payload is not False else None,
            sync,
        )
        return cls(settings, request)

    @property
    def client_settings(self) -> ClientSettings:
        """The settings this request goes out with (2.4 may have some per method)."""
        if isinstance(self.settings, ClientSettings24):
            return self.settings.for_method(self.request.method)
        return self.settings


@dataclass(frozen=True, slots=True)
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

    def to_lua(self) -> list[Any]:
        """What http.lua's response object keeps: [status, reason, payload, name, value, ...]."""
        flat: list[Any] = [self.status, self.reason, self.payload]
        for field in self.headers:
            flat += field
        return flat


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
    """The %m of a failed system call behind a trio error."""
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
    #: The client's debug log of this request (debug = true), else None.
    trace: _Trace | None = None

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
        total = _secs(_msecs(time.monotonic() - self.submitted))
        return reason + f" ({self.retries} retries in {total} secs)".encode()


_request_ids = itertools.count(1)


class _Trace:
    """A debug = true client's request as Dovecot's http-client logs it, one debug event a line.

    Lines read like Dovecot's ("http-client: request [Req1: GET http://host/path]: Sent
    header"); the URL shows no user, password or query, and no header is logged.
    """

    __slots__ = ("label", "script")

    def __init__(self, script: str, method: bytes, url: HttpUrl) -> None:
        self.script = script
        self.label = f"[Req{next(_request_ids)}: {_text(method)} {_url_for_log(url)}]"

    def request(self, message: str, **fields: Any) -> None:
        log.debug(
            "lua.http_debug",
            script=self.script,
            request=self.label,
            message=f"http-client: request {self.label}: {message}",
            **fields,
        )

    def connection(self, conn: _Connection, message: str, **fields: Any) -> None:
        log.debug(
            "lua.http_debug",
            script=self.script,
            request=self.label,
            connection=conn.name,
            message=f"http-client: conn {conn.name} [{conn.conn_id}]: {message}",
            **fields,
        )


def _url_for_log(url: HttpUrl) -> str:
    """scheme://host[:port]/path: no userinfo, no query (either may hold a password)."""
    path = _encode(url.path, _PATH_BYTES) if url.path else b"/"
    return _text(b"%s://%s%s" % (b"https" if url.have_ssl else b"http", url.authority, path))


class _Failure(Exception):
    """A request that ends with an internal status; `retryable` if Dovecot may try again."""

    def __init__(self, status: RequestError, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retryable = retryable


# --- connections the way Dovecot makes them ---------------------------------------------

#: Bytes asked for per read, and the largest response head: httpcore's sizes, which authd used before.
_READ_SIZE = 65536
_MAX_HEAD_SIZE = 100 * 1024

#: Seconds between checks of all idle connections (see ConnectionPool).
_SWEEP_INTERVAL = 1.0

#: Where a connection goes for a request URL: (https, host to connect to, port).
_Origin = tuple[bool, bytes, int]


def _http11() -> h11.Connection:
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_SIZE)


#: TCP_QUICKACK where the platform has it (Linux).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _Connection:
    """An HTTP/1.1 connection: h11's state over a trio stream, with Dovecot's name for it and its age.

    As Dovecot's (http_client_connection_connected, o_stream_file_cork): TCP_NODELAY, so
    that nothing authd writes waits for the server's ACK, and TCP_QUICKACK after each
    request, so that the server's ACKs are not delayed either. Without the latter, a
    server that writes its response head and body in two segments has its second write
    held back by Nagle until authd's delayed ACK (about 40 ms on Linux) per request.
    """

    __slots__ = ("conn_id", "connected", "h11", "idle_since", "label", "name", "socket", "stream")

    def __init__(self, sock: trio.socket.SocketType, name: str, conn_id: int) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock  # the TCP socket under any TLS, to see whether an idle connection was closed
        self.stream: trio.abc.Stream = trio.SocketStream(sock)
        self.h11 = _http11()
        self.name = name  # ip:port, as in connect(...) failed
        self.label = f"(conn:{name},id={conn_id})"  # as in read(...) failed
        self.conn_id = conn_id
        self.connected = time.monotonic()
        self.idle_since = 0.0

    def quick_ack(self) -> None:
        """ACK what arrives next at once (Linux resets this by itself, so once per request)."""
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def close(self) -> None:
        """Drop the connection (no TLS close_notify: nobody waits for its end)."""
        self.socket.close()


@dataclass
class _Exchange:
    """One send of a request: its settings, its history, and the connection it went out on."""

    settings: ClientSettings
    progress: _Progress
    conn: _Connection | None = None

    def sending(self, conn: _Connection) -> None:
        """The first write of this send (a tunnel's CONNECT included) counts as an attempt."""
        if self.conn is None:
            self.conn = conn
            self.progress.sent()

    def failed(self, status: RequestError, text: str) -> _Failure:
        """A failure Dovecot may retry, with its statistics (http_client_connection_abort_temp_error)."""
        connected = self.conn.connected if self.conn else None
        return _Failure(status, f"{text} ({self.progress.stats(connected)})", retryable=True)

    def lost(self, detail: str) -> _Failure:
        return self.failed(RequestError.CONNECTION_LOST, f"Connection lost: {detail}")


def _address_name(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


async def _resolve(host: str, timeout: float) -> list[str]:
    """The addresses to try, in getaddrinfo's order, as Dovecot's dns-client returns them."""
    literal = host[1:-1] if host.startswith("[") else host
    try:
        return [ipaddress.ip_address(literal).compressed]
    except ValueError:
        pass
    with trio.move_on_after(timeout):
        try:
            found = await trio.socket.getaddrinfo(host.encode(), None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _Failure(RequestError.HOST_LOOKUP_FAILED, f"Failed to lookup host {host}: {exc.strerror}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in found))
    raise _Failure(RequestError.HOST_LOOKUP_FAILED, f"Failed to lookup host {host}: Lookup timed out")


class ConnectionPool:
    """Keep-alive connections of the clients that share a proxy and an idle time.

    Like Dovecot's http-client, one request at a time per connection (no pipelining): a
    request takes its origin's most recently used idle connection or opens a new one, and
    gives it back when the response ended cleanly. The connection taken is checked first:
    past max_idle_time, or readable while idle (the server closed it), it is closed
    instead of used. The others are checked the same way once a second, so that those no
    request needs any more are closed too, at no cost per request.
    """

    def __init__(self, settings: ClientSettings, ssl_context: ssl.SSLContext) -> None:
        self.proxy = settings.proxy_url
        self._max_idle = settings.max_idle_time_msecs / 1000 or math.inf
        self._ssl_context = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._conn_ids = itertools.count(1)
        self._next_sweep = 0.0

    def _usable(self, conn: _Connection, now: float) -> bool:
        return now - conn.idle_since <= self._max_idle and not conn.socket.is_readable()

    def take_idle(self, origin: _Origin) -> _Connection | None:
        """The origin's most recently used idle connection that is still good, if any."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if self._usable(conn, now):
                return conn
            conn.close()
        return None

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_INTERVAL
        for idle in self._idle.values():
            usable = []
            for conn in idle:
                if self._usable(conn, now):
                    usable.append(conn)
                else:
                    conn.close()
            idle[:] = usable

    def give_back(self, origin: _Origin, conn: _Connection) -> None:
        conn.h11.start_next_cycle()
        conn.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(conn)

    async def aclose(self) -> None:
        """Close every idle connection (busy ones close when their request ends)."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        await trio.lowlevel.checkpoint()

    async def connect(self, url: HttpUrl, exchange: _Exchange) -> _Connection:
        """A new connection for `url`: direct, through the proxy, or tunnelled (https via a proxy)."""
        settings = exchange.settings
        timeout = (settings.connect_timeout_msecs or settings.request_timeout_msecs) / 1000
        proxy = self.proxy
        via = proxy or url
        conn = await self._open(via.connect_host.decode("ascii"), via.port or (443 if via.have_ssl else 80), exchange)
        try:
            if via.have_ssl:
                await self._start_tls(conn, via.connect_host, timeout)
            if proxy is not None and url.have_ssl:
                await _tunnel(conn, url, proxy, exchange)
                await self._start_tls(conn, url.connect_host, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _open(self, host: str, port: int, exchange: _Exchange) -> _Connection:
        """Dovecot's connection setup: its DNS errors, one address after the other, connect
        attempts with backoff (max_connect_attempts), and its texts for every failure."""
        settings = exchange.settings
        timeout = (settings.connect_timeout_msecs or settings.request_timeout_msecs) / 1000
        addresses = await _resolve(host, timeout)
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
            sock = trio.socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            try:
                with trio.fail_after(timeout):
                    await sock.connect((address, port))
            except trio.TooSlowError:
                sock.close()
                spent = _secs(_msecs(time.monotonic() - started))
                reason = f"connect({name}) failed: Connection timed out in {spent} secs"
            except OSError as exc:
                sock.close()
                reason = f"connect({name}) failed: {_os_error_text(exc)}"
            except BaseException:
                sock.close()
                raise
            else:
                return _Connection(sock, name, conn_id)
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

    async def _start_tls(self, conn: _Connection, host: bytes, timeout: float) -> None:
        """TLS on the connection, checked against the CA store with `host` as the name."""
        started = time.monotonic()
        hostname = host.decode("ascii").strip("[]")
        stream = trio.SSLStream(conn.stream, self._ssl_context, server_hostname=hostname, https_compatible=True)
        try:
            with trio.fail_after(timeout):
                await stream.do_handshake()
        except trio.TooSlowError:
            spent = _secs(_msecs(time.monotonic() - started))
            raise _Failure(
                RequestError.CONNECT_FAILED,
                f"SSL handshaking with {conn.name} failed: Connection timed out in {spent} secs",
            ) from None
        except trio.BrokenResourceError as exc:
            raise _Failure(
                RequestError.CONNECT_FAILED,
                f"SSL handshaking with {conn.name} failed: read(SSL {conn.label}) failed: {_tls_error_text(exc)}",
            ) from None
        conn.stream = stream


async def _tunnel(conn: _Connection, url: HttpUrl, proxy: HttpUrl, exchange: _Exchange) -> None:
    """CONNECT host:port through the proxy; any answer but 2xx fails the request."""
    authority = b"%s:%d" % (url.connect_host, url.port or 443)
    headers = [(b"Host", authority), (b"Accept", b"*/*")]
    if proxy.user and proxy.password is not None:
        headers.append((b"Proxy-Authorization", _basic(proxy.user, proxy.password)))
    timeout = exchange.settings.request_timeout_msecs / 1000
    response = await _roundtrip(conn, exchange, b"CONNECT", authority, headers, None, timeout)
    if not 200 <= response.status_code <= 299:
        reason = f"{response.status_code} {response.reason.decode('ascii', 'ignore')}"
        raise _Failure(
            RequestError.CONNECT_FAILED, f"Tunnel connect({proxy.authority.decode('latin-1')}) failed: {reason}"
        )
    conn.h11 = _http11()  # what follows is TLS, then HTTP/1.1 on the tunnel


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
    (and h11) require one, so authd sends the URL's.
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
        # The proxy's credentials: it reads this request itself (only https is tunnelled).
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


async def _roundtrip(
    conn: _Connection,
    exchange: _Exchange,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    payload: bytes | None,
    timeout: float,
) -> h11.Response | h11.InformationalResponse:
    """Send one request and read its response head; each read or write may take `timeout`.

    A failed write is not the end: the server may have answered before it closed (say
    413 to a large payload), so the response, or the read that fails, decides.
    """
    state = conn.h11
    try:
        data = state.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if payload:
            data += state.send(h11.Data(data=payload)) or b""
        data += state.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as exc:
        raise _Failure(RequestError.ABORTED, f"Cannot send this request: {exc}") from None
    exchange.sending(conn)
    with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
        with contextlib.suppress(trio.BrokenResourceError):
            await conn.stream.send_all(data)
            conn.quick_ack()
        trace = exchange.progress.trace
        if trace is not None and method != b"CONNECT":
            trace.request("Sent header")
            if payload:
                trace.request("Finished sending payload")
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Failure(RequestError.BAD_RESPONSE, str(exc)) from None
            if event is h11.NEED_DATA:
                scope.deadline = trio.current_time() + timeout
                try:
                    data = bytes(await conn.stream.receive_some(_READ_SIZE))
                except trio.BrokenResourceError as exc:
                    raise exchange.lost(f"read({conn.label}) failed: {_os_error_text(exc)}") from None
                if not data:
                    raise exchange.lost(f"read({conn.label}) failed: EOF")
                state.receive_data(data)
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                return event  # the exchange ends here: nothing is read after a 101
            # else 100 Continue (or another 1xx): the final response follows
    raise exchange.failed(RequestError.TIMED_OUT, "Request timed out")


@dataclass(frozen=True, slots=True)
class _Body:
    """A response body as far as it arrived, and why it ended early (Dovecot's istream error), if it did."""

    data: bytes
    error: str | None = None


async def _read_body(conn: _Connection, timeout: float, response: h11.Response | h11.InformationalResponse) -> _Body:
    """The response body as far as it arrives; each read may take `timeout`.

    Like Dovecot 2.3's Lua binding, the script gets what came, with the response's
    status, when the body ends early: the caller logs the error.
    """
    state = conn.h11
    chunks: list[bytes] = []
    received = 0
    eof = False
    error: str | None = None
    with trio.CancelScope() as scope:
        try:
            while True:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    scope.deadline = trio.current_time() + timeout
                    data = bytes(await conn.stream.receive_some(_READ_SIZE))
                    eof = not data
                    state.receive_data(data)
                elif type(event) is h11.Data:
                    chunks.append(event.data)
                    received += len(event.data)
                else:
                    break  # EndOfMessage
        except trio.BrokenResourceError as exc:
            error = _payload_lost(response, received, f"Connection closed: {_os_error_text(exc)}")
        except h11.RemoteProtocolError as exc:
            error = _payload_lost(response, received, "Connection closed") if eof else str(exc)
    if scope.cancelled_caught:
        error = f"Read timeout in {_secs(int(timeout * 1000))} s after {received} bytes"
    return _Body(b"".join(chunks), error)


def _payload_lost(response: h11.Response | h11.InformationalResponse, received: int, reason: str) -> str:
    """Dovecot's texts for a body cut short (http_istream_error_callback, the chunked istream)."""
    headers = {name.lower(): value for name, value in response.headers}
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        return "Unexpected end of payload" if reason == "Connection closed" else reason
    wanted = headers.get(b"content-length", b"").strip()
    return f"Disconnected while reading message payload at offset {received} (wanted {_text(wanted)}): {reason}"


async def _send_once(
    pool: ConnectionPool,
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
    Through a proxy (http URLs) the target is always absolute.
    """
    timeout = exchange.settings.request_timeout_msecs / 1000
    origin = (url.have_ssl, url.connect_host, url.port or (443 if url.have_ssl else 80))
    target = url.absolute if redirected or (pool.proxy is not None and not url.have_ssl) else url.target
    conn = pool.take_idle(origin) or await pool.connect(url, exchange)
    try:
        response = await _roundtrip(conn, exchange, method, target, headers, payload, timeout)
        body = await _read_body(conn, timeout, response)
    except BaseException:
        conn.close()
        raise
    if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
        pool.give_back(origin, conn)
    else:
        conn.close()
    progress = exchange.progress
    if progress.trace is not None and isinstance(response, h11.Response):
        took = _msecs(time.monotonic() - (progress.last_sent or progress.submitted))
        queued = _msecs((progress.last_sent or progress.submitted) - progress.submitted)
        progress.trace.connection(
            conn,
            f"Got {response.status_code} response for request {progress.trace.label}: "
            f"{_text(response.reason)} (took {took} ms + {queued} ms in queue)",
            status=response.status_code,
        )
    if body.error is not None:
        log.error(
            "lua.http_payload_error",
            script=exchange.settings.script,
            url=_url_for_log(url),
            status=response.status_code,
            received=len(body.data),
            message=f"Response payload read error: {body.error}",
        )
    return HttpResponse(response.status_code, response.reason, tuple(response.headers), body.data)


class _DateHeader:
    """The Date header's value, made once a second: formatting it costs more than a request's other headers."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = email.utils.formatdate(second, usegmt=True).encode()
            self._second = second
        return self._value


_date = _DateHeader()


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
    pool: ConnectionPool, settings: ClientSettings, request: HttpRequest, progress: _Progress
) -> HttpResponse:
    """Send until there is an answer for the script: retries and redirects as Dovecot does them."""
    method, url, payload = request.method, request.url, request.payload
    expect_continue = bool(payload) and request.expect_continue
    date = _date.now()
    redirects = 0
    while True:
        headers = _headers(settings, request, method, url, payload, expect_continue, date)
        exchange = _Exchange(settings, progress)
        try:
            response = await _send_once(pool, exchange, method, url, headers, payload, redirects > 0)
        except _Failure as failure:
            if failure.retryable and not settings.no_auto_retry and progress.retry(settings.max_attempts):
                if progress.trace is not None:
                    progress.trace.request(f"Retrying (attempts={progress.retries + 1})")
                continue
            return _failure(failure.status, failure.reason)
        status = response.status
        if status == 417 and expect_continue:
            expect_continue = False
            if progress.retry(settings.max_attempts):
                continue
        elif (
            not settings.no_auto_redirect
            and status // 100 == 3
            and status != 304
            and (location := response.header(b"location")) is not None
        ):
            delay_kind, delay = _retry_delay(response, settings)
            if delay_kind >= 0:
                try:
                    url = parse_http_url(location, allow_userinfo=False)
                except UrlError as exc:
                    return _failure(RequestError.INVALID_REDIRECT, f"Invalid redirect location: {exc}")
                redirects += 1
                if progress.trace is not None:
                    progress.trace.request(f"Redirecting to {_url_for_log(url)} (redirects={redirects})")
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
        return replace(response, reason=progress.retried(response.reason)) if progress.retries else response


async def send_request(pool: ConnectionPool, settings: ClientSettings, request: HttpRequest) -> HttpResponse:
    """Send a request the way Dovecot 2.3's http-client does; failures become 9000-9008 responses."""
    progress = _Progress(time.monotonic())
    trace = progress.trace = _Trace(settings.script, request.method, request.url) if settings.debug else None
    if trace is not None:
        trace.request("Submitted")
    response = await _run_within(pool, settings, request, progress)
    if trace is not None:
        if response.status >= min(RequestError):
            trace.request(f"Error: {response.status} {_text(response.reason)}", status=response.status)
        else:
            trace.request("Finished", status=response.status)
    return response


async def _run_within(
    pool: ConnectionPool, settings: ClientSettings, request: HttpRequest, progress: _Progress
) -> HttpResponse:
    if not settings.request_absolute_timeout_msecs:
        return await _run(pool, settings, request, progress)
    with trio.move_on_after(settings.request_absolute_timeout_msecs / 1000):
        return await _run(pool, settings, request, progress)
    return _failure(RequestError.TIMED_OUT, f"Absolute request timeout expired ({progress.stats()})")


# --- the extension ----------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _check_url(url: bytes) -> tuple[HttpUrl | None, bytes | None, bytes | None]:
    """For http.lua: the parsed URL, or why Dovecot rejects it; and why it would crash sending it.

    Cached: scripts request the same few URLs (per user at most) again and again, and
    an HttpUrl is immutable (its derived forms are computed once, on first use).
    """
    try:
        parsed = parse_http_url(url, allow_userinfo=True)
    except UrlError as exc:
        return None, str(exc).encode("latin-1"), None
    if parsed.user and parsed.password is not None and b":" in parsed.user:
        return None, None, b"a user name with ':' cannot be sent in Basic authentication"
    return parsed, None, None


_PoolKey = tuple[HttpUrl | None, int]


class HttpExtension:
    """`dovecot.http` for every Lua state of a daemon, with the connection pools they share.

    Pools are made on first use, one per proxy and idle time (Dovecot, too, shares
    connections between all clients of a process), in the trio run that calls
    perform(); aclose() closes them.
    """

    kind = b"http"

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._ssl_context = ssl_context
        self._pools: dict[_PoolKey, ConnectionPool] = {}
        #: Called with (status, seconds) when a script's request ends (for metrics);
        #: status 9000-9008 is a request that got no HTTP response.
        self.on_response: Callable[[int, float], None] | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The system's CA store unless one was given (Dovecot uses its ssl_client_ca_* settings).

        It offers ALPN "http/1.1", so that servers that also speak HTTP/2 answer in HTTP/1.1.
        """
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context

    def install(self, state: LuaState) -> None:
        def client_settings_24(options: Any) -> tuple[Any, bytes | None, bytes | None]:
            """For http.lua: (settings, None, None), (None, Dovecot's error, None) or (None, None, crash)."""
            pairs = [
                (key.decode("latin-1"), value.decode("latin-1") if isinstance(value, bytes) else None)
                for key, value in (state.to_python(options[i]).values() for i in range(1, len(options) + 1))
            ]
            try:
                settings = parse_client_settings_24(pairs)
            except SettingsError as exc:
                return None, str(exc).encode("latin-1"), None
            except TypeError as exc:
                return None, None, str(exc).encode("latin-1")
            return replace(settings, settings=replace(settings.settings, script=state.name)), None, None

        def client_settings_23(options: Any) -> ClientSettings:
            """For http.lua: a 2.3 client's checked options, parsed once for all its requests."""
            return replace(ClientSettings.from_lua(state.to_python(options)), script=state.name)

        state.lua.execute(
            _lua_code(),
            state.api[b"yield_io"],
            self.kind,
            _check_url,
            state.options.dialect.encode(),
            client_settings_23,
            client_settings_24,
            state.api[b"checks"],
            name="=authd-http",
        )

    async def perform(self, spec: Mapping[int, Any]) -> list[Any]:
        """Send what submit() yielded (see Submission.from_lua); the response as http.lua keeps it."""
        payload = Submission.from_lua(spec)
        settings = payload.client_settings
        key = (settings.proxy_url, settings.max_idle_time_msecs)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ConnectionPool(settings, self.ssl_context)
        started = trio.current_time()
        response = await send_request(pool, settings, payload.request)
        if self.on_response is not None:
            self.on_response(response.status, trio.current_time() - started)
        return response.to_lua()

    def perform_blocking(self, spec: Mapping[int, Any]) -> list[Any]:
        """submit() where Lua cannot yield: wait here, as Dovecot's submit() always does.

        From a trio worker thread the request still goes through the daemon's loop and
        pools; elsewhere it runs on a connection of its own (lua_api.blocking.wait_for).
        """
        return wait_for(self.perform, self._perform_alone, spec)

    async def _perform_alone(self, spec: Mapping[int, Any]) -> list[Any]:
        """One request on a connection of its own (a private loop cannot use the daemon's)."""
        payload = Submission.from_lua(spec)
        settings = payload.client_settings
        pool = ConnectionPool(settings, self.ssl_context)
        try:
            response = await send_request(pool, settings, payload.request)
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

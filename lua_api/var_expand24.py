"""Dovecot 2.4's ``%{...}`` expansion language (src/lib-var-expand), as of tag 2.4.1.

``req:var_expand(tpl)`` in a 2.4 auth script must give Dovecot's exact bytes or fail with
Dovecot's exact error, so this re-implements 2.4.1's flex lexer, bison grammar (including
where its LALR automaton detects errors and what its verbose messages list) and filter
semantics. Dovecot works on C strings in the "C" locale: templates and values are cut at
the first NUL. Where 2.4.1 crashes, hangs or reads uninitialised memory, no faithful
result exists; those inputs raise VarExpandError with a message saying so. Behaviour that
later tags changed is noted at the place it happens.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import struct
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from lua_api.posix_regex import POSIX_REGEX
from lua_api.var_expand import _HASH_METHODS, ExpandContext, VarExpandError, _no_field, _wildcard_match

__all__ = ["ExpandContext24", "VarExpandError", "expand24"]


def _affinity_cpu_count() -> int:
    """What Dovecot's cpu_count_get reports on Linux: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True, slots=True)
class ExpandContext24(ExpandContext):
    """2.3's providers' data (env, passdb, userdb, hostname, pid, uid, gid) and 2.4's additions.

    `env` also answers ``%{system:cpu_count}`` when it holds NCPU.
    """

    cpu_count: int = field(default_factory=_affinity_cpu_count)
    os_name: bytes = field(default_factory=lambda: os.uname().sysname.encode())
    """uname's sysname, for ``%{system:os}``."""
    os_version: bytes = field(default_factory=lambda: os.uname().release.encode())
    """uname's release, for ``%{system:os-version}``."""
    dovecot_version: bytes = b"2.4.1"
    dovecot_revision: bytes = b"7d8c0e5759"
    event_field: Callable[[bytes], bytes | None] = _no_field
    """Field of the request's event (or its parents), for ``%{event:NAME}``; None if absent."""
    clock_ns: Callable[[], int] = time.time_ns
    """Wall clock for ``date:``, ``time:`` and ``generate:guid*`` (local time zone applies)."""


def expand24(template: bytes, variables: Mapping[bytes, bytes | None], context: ExpandContext24) -> bytes:
    """Expand *template* like 2.4.1's ``var_expand`` with the auth request's table and providers.

    *variables* is the auth variable table (a None value expands to ""). Raises VarExpandError
    with Dovecot's message whenever var_expand returns -1.
    """
    programs = _Parser(_Lexer(_cstr(template))).parse()
    return _Execution(variables, context).run(programs)


def _cstr(value: bytes) -> bytes:
    """What C sees of *value*: everything before the first NUL."""
    return value.split(b"\0", 1)[0]


def _crash(what: str) -> NoReturn:
    """2.4.1 has no result here (it crashes or never returns); refuse the template instead."""
    raise VarExpandError(f"Dovecot 2.4.1 would {what}; refusing this template")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64_MAX = 2**64 - 1
_INT_MAX = 2**31 - 1
# Padding/fill beyond this would exceed the auth process's default 256 MiB vsz_limit
_MAX_RESULT = 256 << 20


def _parse_intmax(text: bytes) -> int | None:
    """Dovecot's str_to_intmax: optional '-', decimal digits, within int64."""
    digits = text[1:] if text.startswith(b"-") else text
    if not digits or not digits.isdigit():
        return None
    number = -int(digits) if text.startswith(b"-") else int(digits)
    return number if _INT64_MIN <= number <= _INT64_MAX else None


def _parse_uintmax(text: bytes) -> int | None:
    """Dovecot's str_to_uintmax: decimal digits only, within uint64."""
    if not text or not text.isdigit():
        return None
    number = int(text)
    return number if number <= _UINT64_MAX else None


def _wrap64(number: int) -> int:
    """Wrap like intmax_t arithmetic does on the machines Dovecot runs on."""
    return (number - _INT64_MIN) % 2**64 + _INT64_MIN


# --- lexer (var-expand-lexer.l) ---------------------------------------------------------

# Token kinds are bison's token names, as its verbose syntax errors print them
_EOF = "end of file"
_PERC, _OCBRACE, _CCBRACE, _PIPE, _OBRACE, _CBRACE = "PERC", "OCBRACE", "CCBRACE", "PIPE", "OBRACE", "CBRACE"
_COMMA, _EQ, _PLUS, _MINUS, _STAR, _SLASH = "COMMA", "EQ", "PLUS", "MINUS", "STAR", "SLASH"
_NAME, _VALUE, _NUMBER = "NAME", "VALUE", "NUMBER"

_LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NAME_START = _LETTERS | frozenset(range(0x80, 0x100))
_NAME_REST = _NAME_START | frozenset(b"0123456789_/;:.-")
_DIGITS = frozenset(b"0123456789")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_PUNCTUATION = {
    ord("%"): _PERC,
    ord("|"): _PIPE,
    ord("("): _OBRACE,
    ord(")"): _CBRACE,
    ord(","): _COMMA,
    ord("="): _EQ,
    ord("+"): _PLUS,
    ord("-"): _MINUS,
    ord("*"): _STAR,
    ord("/"): _SLASH,
}
_SIMPLE_ESCAPES = {
    ord("\\"): b"\\",
    ord("t"): b"\t",
    ord("r"): b"\r",
    ord("n"): b"\n",
    ord('"'): b'"',
    ord("'"): b"'",
}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: bytes = b""


class _ScanError(Exception):
    """The lexer rejected its input; bison then recovers silently, keeping this message."""

    def __init__(self, message: bytes) -> None:
        super().__init__(message)
        self.message = message


def _check_utf8(data: bytes) -> bytes:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _ScanError(b"Invalid UTF-8 string") from None
    return data


class _Lexer:
    """The flex scanner: outside ``%{`` only ``%`` matters; inside, names, numbers, strings and operators.

    Two 2.4.1 quirks are kept: a text run that is exactly "y" between ``%`` tokens is dropped
    (a stray rule, removed in 2.4.3), and bytes no rule matches inside ``%{...}`` are skipped
    (flex echoes them to stdout; 2.4.3 made that "Premature program end").
    """

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.pos = 0
        self.in_expression = False

    def next(self) -> _Token:
        return self._expression_token() if self.in_expression else self._text_token()

    def _text_token(self) -> _Token:
        text = self.text
        while self.pos < len(text):
            start = self.pos
            if text[start] == ord("%"):
                if text.startswith(b"%%{", start):
                    self.pos += 3
                    return _Token(_VALUE, b"%{")
                if text.startswith(b"%{", start):
                    self.pos += 2
                    self.in_expression = True
                    return _Token(_OCBRACE)
                self.pos += 1
                return _Token(_PERC)
            end = text.find(b"%", start)
            self.pos = len(text) if end < 0 else end
            if text[start : self.pos] != b"y":
                return _Token(_VALUE, text[start : self.pos])
        return _Token(_EOF)

    def _expression_token(self) -> _Token:
        text = self.text
        while self.pos < len(text):
            start = self.pos
            char = text[start]
            self.pos += 1
            if char == ord("}"):
                self.in_expression = False
                return _Token(_CCBRACE)
            if char in _NAME_START:
                while self.pos < len(text) and text[self.pos] in _NAME_REST:
                    self.pos += 1
                return _Token(_NAME, _check_utf8(text[start : self.pos]))
            if char in _DIGITS:
                while self.pos < len(text) and text[self.pos] in _DIGITS:
                    self.pos += 1
                return _Token(_NUMBER, text[start : self.pos])
            kind = _PUNCTUATION.get(char)
            if kind is not None:
                return _Token(kind)
            if char in b"'\"":
                return self._string(char)
            # blanks are ignored; any other unmatched byte is echoed by flex and lost
        return _Token(_EOF)

    def _string(self, quote: int) -> _Token:
        """A quoted string; each raw run must be UTF-8, escapes may produce any byte."""
        text = self.text
        value = bytearray()
        while self.pos < len(text):
            char = text[self.pos]
            if char == quote:
                self.pos += 1
                return _Token(_VALUE, bytes(value))
            if char == ord("\\"):
                self.pos += 1
                escaped = self._escape()
                if escaped is None:
                    break
                value += escaped
                continue
            end = self.pos
            while end < len(text) and text[end] != quote and text[end] != ord("\\"):
                end += 1
            value += _check_utf8(text[self.pos : end])
            self.pos = end
        return _Token(_EOF)  # the input ended inside the string

    def _escape(self) -> bytes | None:
        """The byte after a backslash, or None at end of input; newlines here are skipped."""
        text = self.text
        while self.pos < len(text) and text[self.pos] == ord("\n"):
            self.pos += 1
        if self.pos >= len(text):
            return None
        char = text[self.pos]
        simple = _SIMPLE_ESCAPES.get(char)
        if simple is not None:
            self.pos += 1
            return simple
        hex_digits = text[self.pos + 1 : self.pos + 3]
        if char == ord("x") and len(hex_digits) == 2 and all(byte in _HEX_DIGITS for byte in hex_digits):
            self.pos += 3
            return bytes([int(hex_digits, 16)])
        if char in _DIGITS:
            end = self.pos
            while end < len(text) and end - self.pos < 3 and text[end] in _DIGITS:
                end += 1
            digits = text[self.pos : end]
            self.pos = end
            if all(byte in b"01234567" for byte in digits) and int(digits, 8) <= 255:
                return bytes([int(digits, 8)])
        raise _ScanError(b"Invalid character escape")


# --- parser (var-expand-parser.y) --------------------------------------------------------

_STRING, _INT, _VARIABLE = 0, 1, 2
_OPERATORS = {_PLUS: 0, _MINUS: 1, _STAR: 2, _SLASH: 3, _PERC: 4}  # as the calculate filter numbers them


@dataclass(frozen=True, slots=True)
class _Param:
    """One filter argument: positional (idx >= 0, key None) or named (idx -1, key lower-cased)."""

    key: bytes | None
    idx: int
    kind: int
    text: bytes = b""
    number: int = 0


@dataclass(slots=True)
class _Statement:
    function: bytes
    params: list[_Param]


@dataclass(slots=True)
class _Program:
    """What one ``%{...}`` or one run of plain text compiles to."""

    statements: list[_Statement] = field(default_factory=list)
    only_literal: bool = False


class _ParamList:
    """Arguments in Dovecot's order: positional by position, then named by key.

    A named argument goes before the first named one whose key is not smaller, so of
    repeated keys the last one written comes first.
    """

    def __init__(self) -> None:
        self.params: list[_Param] = []
        self._next_idx = 0

    def add(self, kind: int, text: bytes = b"", number: int = 0, key: bytes | None = None) -> None:
        text = _cstr(text)  # parameters are kept as C strings
        if key is None:
            param = _Param(None, self._next_idx, kind, text, number)
            self._next_idx += 1
        else:
            key = key.lower()
            param = _Param(key, -1, kind, text, number)
        position = len(self.params)
        for index, other in enumerate(self.params):
            if other.key is not None and (key is None or other.key >= key):
                position = index
                break
        self.params.insert(position, param)


class _Parser:
    """Recursive descent over bison's automaton for the grammar.

    Lookaheads are read, statements pushed and errors detected in the order the LALR(1)
    parser does (it reduces by default rules before checking a token), because that order
    decides which of a lexer error, a syntax error and the 2.4.1 crash below comes first.
    """

    def __init__(self, lexer: _Lexer) -> None:
        self.lexer = lexer
        self.programs = [_Program()]
        self.current: _Program | None = self.programs[0]
        self.previous: _Program | None = None

    def parse(self) -> list[_Program]:
        try:
            while True:
                token = self.lexer.next()
                if token.kind == _EOF:
                    return self.programs
                if token.kind == _OCBRACE:
                    self._expression()
                else:  # outside %{...} the lexer yields only text and lone '%'
                    params = _ParamList()
                    params.add(_STRING, token.text if token.kind == _VALUE else b"%")
                    self._push(b"literal", params).only_literal = True
                self.previous, self.current = self.current, None
        except _ScanError as error:
            raise VarExpandError(error.message) from None

    def _push(self, function: bytes, params: _ParamList) -> _Program:
        if self.current is None:
            if self.previous is None:
                # 2.4.1 links the new program to a NULL "previous" after an empty %{} that
                # followed another expression (fixed in 2.4.3)
                _crash("crash (NULL dereference after an empty %{})")
            self.current = _Program()
            self.programs.append(self.current)
        self.current.statements.append(_Statement(function, params.params))
        return self.current

    def _expression(self) -> None:
        """After ``%{``: filters separated by '|' (any may be empty), then '}'."""
        token = self.lexer.next()
        while True:
            if token.kind == _NAME:
                token = self._filter(token.text)
            elif token.kind not in (_CCBRACE, _PIPE):
                self._syntax_error(token, (_CCBRACE, _PIPE, _NAME))
            if token.kind == _CCBRACE:
                return
            if token.kind != _PIPE:
                self._syntax_error(token, (_CCBRACE, _PIPE))
            token = self.lexer.next()

    def _filter(self, name: bytes) -> _Token:
        """``name``, ``name(args)``, either optionally followed by one ``<op> operand``."""
        params = _ParamList()
        token = self.lexer.next()
        if token.kind == _OBRACE:
            self._arguments(params)
            self._push(name, params)
            token = self.lexer.next()
        else:
            self._push(name, params)
        operator = _OPERATORS.get(token.kind)
        if operator is None:
            return token
        calculate = _ParamList()
        calculate.add(_INT, number=operator)
        token = self.lexer.next()
        if token.kind == _NAME:
            calculate.add(_VARIABLE, token.text)
        elif token.kind in (_MINUS, _NUMBER):
            calculate.add(_INT, number=self._number(token, in_arguments=False))
        else:
            self._syntax_error(token, (_MINUS, _NAME, _NUMBER))
        self._push(b"calculate", calculate)
        return self.lexer.next()

    def _arguments(self, params: _ParamList) -> None:
        """After '(': values, variable names, numbers or ``key=...``, up to ')'."""
        while True:
            token = self.lexer.next()
            if token.kind == _VALUE:
                params.add(_STRING, token.text)
                token = self.lexer.next()
            elif token.kind == _NAME:
                following = self.lexer.next()
                if following.kind == _EQ:
                    self._named_argument(params, token.text)
                    token = self.lexer.next()
                else:
                    params.add(_VARIABLE, token.text)
                    token = following
            elif token.kind in (_MINUS, _NUMBER):
                params.add(_INT, number=self._number(token, in_arguments=True))
                token = self.lexer.next()
            else:
                self._syntax_error(token, (_MINUS, _NAME, _VALUE, _NUMBER))
            if token.kind == _CBRACE:
                return
            if token.kind != _COMMA:
                self._syntax_error(token, (_CBRACE, _COMMA))

    def _named_argument(self, params: _ParamList, key: bytes) -> None:
        token = self.lexer.next()
        if token.kind == _NAME:
            params.add(_VARIABLE, token.text, key=key)
        elif token.kind == _VALUE:
            params.add(_STRING, token.text, key=key)
        elif token.kind in (_MINUS, _NUMBER):
            params.add(_INT, number=self._number(token, in_arguments=True), key=key)
        else:
            self._syntax_error(token, (_MINUS, _NAME, _VALUE, _NUMBER))

    def _number(self, token: _Token, *, in_arguments: bool) -> int:
        """``NUMBER`` or ``MINUS NUMBER`` (*token* is the first of them), within int64."""
        text = token.text
        if token.kind == _MINUS:
            token = self.lexer.next()
            if token.kind != _NUMBER:
                self._syntax_error(token, (_NUMBER,))
            text = b"-" + token.text
        number = _parse_intmax(text)
        if number is None:
            if in_arguments:
                # error recovery reaches a state that reads one more token, and in 2.4.1 a
                # lexer error there replaces the message (2.4.3 keeps the first one)
                self.lexer.next()
            raise VarExpandError(b"Not a number")
        return number

    @staticmethod
    def _syntax_error(token: _Token, expected: tuple[str, ...]) -> NoReturn:
        raise VarExpandError(f"syntax error, unexpected {token.kind}, expecting {' or '.join(expected)}")


# --- execution (expansion-program.c, expansion-statement.c, var-expand.c) --------------


class _FilterError(Exception):
    """A filter or lookup failed with *message*; the statement logic decides what survives."""

    def __init__(self, message: bytes) -> None:
        super().__init__(message)
        self.message = message


class _LostError(_FilterError):
    """2.4.1's regexp stores a parameter error in a local variable and never reports it.

    The caller then prints whatever its own error variable last held in this program (an
    earlier lookup or filter error); with nothing there it reads uninitialised memory.
    """


def _fail(message: bytes | str) -> NoReturn:
    raise _FilterError(message.encode() if isinstance(message, str) else message)


class _Execution:
    """Runs programs over the shared "transfer" value, like var_expand_program_execute.

    ``transfer`` is None when unset. ``binary`` marks data to hexlify at the end of the
    program; as in Dovecot only some setters clear it, so it survives e.g. reverse or concat.
    """

    def __init__(self, variables: Mapping[bytes, bytes | None], context: ExpandContext24) -> None:
        self.variables = variables
        self.context = context
        self.transfer: bytes | None = None
        self.binary = False
        self.delayed_error: bytes | None = None
        # the statement runner's error variable, which keeps its last value within a program
        self.last_error: bytes | None = None

    def run(self, programs: list[_Program]) -> bytes:
        output = bytearray()
        for program in programs:
            self.last_error = None
            for index, statement in enumerate(program.statements):
                self._execute(statement, first=index == 0)
            if not program.statements:
                continue
            if self.binary:
                # even an unset value is hexlified, so a filter failing after binary data
                # leaves "" and no error
                self.set_text((self.transfer or b"").hex().encode())
            if self.transfer is None:
                assert self.delayed_error is not None  # every way to unset the value records one
                raise VarExpandError(self.delayed_error)
            # only non-literal output goes through the (identity) escape function, as a C string
            output += self.transfer if program.only_literal else _cstr(self.transfer)
            self.transfer = None
        return bytes(output)

    def _execute(self, statement: _Statement, *, first: bool) -> None:
        """A program's first statement is a variable if one has that name, else a filter.

        A failing filter leaves the value unset and its error "delayed", so a later
        ``default`` can still supply a value; a second failure reports the first error.
        """
        delayed: bytes | None = None
        if first:
            try:
                value = self.lookup(statement.function)
            except _FilterError as error:
                self.transfer = None
                delayed = self.last_error = error.message
            else:
                self.set_text(value)
                return
        filter_function = _FILTERS.get(statement.function)
        if filter_function is not None:
            delayed = None
            try:
                filter_function(self, statement.params)
            except _FilterError as error:
                self.transfer = None
                if self.delayed_error is not None:
                    raise VarExpandError(self.delayed_error) from None
                if not isinstance(error, _LostError):
                    self.last_error = error.message
                elif self.last_error is None:
                    _crash("crash (uninitialised error message)")
                delayed = statement.function + b": " + self.last_error
        elif not first:
            raise VarExpandError(b"No such function '" + statement.function + b"'")
        self.delayed_error = delayed

    # transfer setters: set_text clears the binary mark, set_data keeps it
    def set_text(self, value: bytes) -> None:
        self.transfer = _cstr(value)
        self.binary = False

    def set_data(self, value: bytes) -> None:
        self.transfer = value

    def set_binary(self, value: bytes) -> None:
        self.transfer = value
        self.binary = True

    def require(self, action: str) -> bytes:
        if self.transfer is None:
            _fail(f"No value to {action}")
        return self.transfer

    # lookups
    def lookup(self, name: bytes) -> bytes:
        """A table variable, or ``provider:key`` (built-in providers first, then passdb/userdb)."""
        prefix, colon, key = name.partition(b":")
        if not colon:
            if name not in self.variables:
                _fail(b"Unknown variable '" + name + b"'")
            return _cstr(self.variables[name] or b"")
        provider = _PROVIDERS.get(prefix)
        if provider is None:
            _fail(b"Unsupported prefix '" + prefix + b"'")
        try:
            return _cstr(provider(self.context, key))
        except _FilterError as error:
            _fail(prefix + b": " + error.message)

    def number_or_var(self, param: _Param) -> int:
        if param.kind == _VARIABLE:
            value = self.lookup(param.text)
            number = _parse_intmax(value)
            if number is None:
                _fail(b"'" + value + b"' (in " + param.text + b") is not a number")
            return number
        if param.kind != _INT:
            _fail(b"'" + param.text + b"' is not a number")
        return param.number

    def bool_or_var(self, param: _Param) -> bool:
        number = self.number_or_var(param)
        if number not in (0, 1):
            if param.kind == _INT:
                # 2.4.1 prints the number as a string pointer (2.4.3: "'N' is not 0 or 1")
                _crash("crash (formats an integer as a string)")
            _fail(b"'" + param.text + b"' is not 0 or 1")
        return number == 1

    def string_or_var(self, param: _Param) -> bytes:
        if param.kind == _VARIABLE:
            return self.lookup(param.text)
        if param.kind == _INT:
            _fail(b"%d is not a string" % param.number)
        return param.text

    def any_or_var(self, param: _Param) -> bytes:
        if param.kind == _VARIABLE:
            return self.lookup(param.text)
        if param.kind == _INT:
            return b"%d" % param.number
        return param.text


_Filter = Callable[[_Execution, list[_Param]], None]


# --- providers (var-expand.c, auth-request-var-expand.c) --------------------------------


def _unsupported_field(key: bytes) -> NoReturn:
    _fail(b"Unsupported field '" + key + b"'")


def _unsupported_key(key: bytes) -> NoReturn:
    _fail(b"Unsupported key '" + key + b"'")


def _process_provider(context: ExpandContext24, key: bytes) -> bytes:
    values = {b"pid": context.pid, b"uid": context.uid, b"gid": context.gid}
    if key not in values:
        _unsupported_field(key)
    return b"%d" % values[key]


def _system_provider(context: ExpandContext24, key: bytes) -> bytes:
    if key == b"cpu_count":
        override = context.env.get(b"NCPU")
        return override if override is not None else b"%d" % context.cpu_count
    values = {b"hostname": context.hostname, b"os": context.os_name, b"os-version": context.os_version}
    if key not in values:
        _unsupported_field(key)
    return values[key]


def _dovecot_provider(context: ExpandContext24, key: bytes) -> bytes:
    values = {
        b"name": b"Dovecot",
        b"version": context.dovecot_version,
        b"support-url": b"https://www.dovecot.org/",
        b"support-email": b"dovecot@dovecot.org",
        b"revision": context.dovecot_revision,
    }
    if key not in values:
        _unsupported_field(key)
    return values[key]


def _env_provider(context: ExpandContext24, key: bytes) -> bytes:
    if not key:
        _fail(b"Missing field")
    return context.env.get(key, b"")


def _event_provider(context: ExpandContext24, key: bytes) -> bytes:
    value = context.event_field(key)
    if value is None:
        _fail(b"No such field '" + key + b"' in event")
    return value


def _local_time(context: ExpandContext24) -> tuple[time.struct_time, int]:
    nanoseconds = context.clock_ns()
    return time.localtime(nanoseconds // 10**9), nanoseconds % 10**9 // 1000


def _date_provider(context: ExpandContext24, key: bytes) -> bytes:
    formats = {b"year": "%Y", b"month": "%m", b"day": "%d"}
    if key not in formats:
        _unsupported_key(key)
    return time.strftime(formats[key], _local_time(context)[0]).encode()


def _time_provider(context: ExpandContext24, key: bytes) -> bytes:
    now, microseconds = _local_time(context)
    formats = {b"hour": "%H", b"min": "%M", b"minute": "%M", b"sec": "%S", b"second": "%S"}
    if key in (b"us", b"usec"):
        return b"%d" % microseconds
    if key not in formats:
        _unsupported_key(key)
    return time.strftime(formats[key], now).encode()


def _generate_provider(context: ExpandContext24, key: bytes) -> bytes:
    """GUIDs as Dovecot's guid.c lays them out, and random (version 4) UUIDs."""
    seconds, nanoseconds = divmod(context.clock_ns(), 10**9)
    if key == b"guid":
        return b"%08x%08x.%x.%s" % (nanoseconds, seconds, context.pid, context.hostname)
    if key == b"guid128":
        # Dovecot hashes the host's FQDN here; the hostname is the closest thing at hand
        host_hash = hashlib.sha1(context.hostname).digest()[-4:]
        layout = struct.pack("<III", nanoseconds, seconds & 0xFFFFFFFF, context.pid & 0xFFFFFFFF)
        return (layout + host_hash).hex().encode()
    if not key.startswith(b"uuid"):
        _unsupported_key(key)
    form = key[4:]  # 2.4.1 reports only this remainder as the unsupported key
    value = uuid.uuid4()
    formats = {b"": str(value), b":record": str(value), b":compact": value.hex, b":microsoft": f"{{{value}}}"}
    if form not in formats:
        _unsupported_key(form)
    return formats[form].encode()


def _passdb_provider(context: ExpandContext24, key: bytes) -> bytes:
    return context.passdb_field(key) or b""


def _userdb_provider(context: ExpandContext24, key: bytes) -> bytes:
    return context.userdb_field(key) or b""


_PROVIDERS: dict[bytes, Callable[[ExpandContext24, bytes], bytes]] = {
    b"process": _process_provider,
    b"system": _system_provider,
    b"dovecot": _dovecot_provider,
    b"env": _env_provider,
    b"event": _event_provider,
    b"date": _date_provider,
    b"time": _time_provider,
    b"generate": _generate_provider,
    b"passdb": _passdb_provider,
    b"userdb": _userdb_provider,
}


# --- filters (expansion-filter.c, expansion-filter-if.c) --------------------------------


def _no_params(params: list[_Param]) -> None:
    """ERROR_IF_ANY_PARAMETERS: named first reports the key, else too many positionals."""
    if params:
        if params[0].key is not None:
            _unsupported_key(params[0].key)
        _fail(b"Too many positional parameters")


def _need_params(params: list[_Param]) -> None:
    if not params:
        _fail(b"Missing parameters")


def _fn_lookup(run: _Execution, params: list[_Param]) -> None:
    if not params:
        _fail(b"Missing name to lookup")
    if params[0].key is not None:
        _unsupported_key(params[0].key)
    run.transfer = None
    run.set_text(run.lookup(run.string_or_var(params[0])))


def _case_filter(convert: Callable[[bytes], bytes], action: str) -> _Filter:
    """upper/lower change the C string in place: bytes after a NUL keep their case."""

    def apply(run: _Execution, params: list[_Param]) -> None:
        _no_params(params)
        value = run.require(action)
        head = _cstr(value)
        run.transfer = convert(head) + value[len(head) :]

    return apply


def _fn_default(run: _Execution, params: list[_Param]) -> None:
    if run.transfer:
        return
    value = b""
    if params:
        if params[0].key is not None:
            _unsupported_key(params[0].key)
        value = run.any_or_var(params[0])
        if len(params) > 1:
            _fail(b"Too many positional parameters")
    run.set_text(value)


def _fn_literal(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    if params[0].key is not None:
        _unsupported_key(params[0].key)
    run.set_text(run.any_or_var(params[0]))


def _c_divide(left: int, right: int) -> tuple[int, int]:
    """C's truncating division and remainder."""
    quotient = abs(left) // abs(right)
    if (left < 0) != (right < 0):
        quotient = -quotient
    return quotient, left - right * quotient


def _fn_calculate(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    operator = right = 0  # always set: the first parameter is positional, as named ones fail
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        if param.idx == 0:
            if param.kind != _INT:
                _fail(b"Missing operator")
            # Dovecot reads the operator through the operand's variable, so calculate(N)
            # alone uses N as both
            operator = right = param.number
        elif param.idx == 1:
            right = run.number_or_var(param)
        else:
            _fail(b"Too many positional parameters")
    value = run.require("calculate")
    if run.binary and operator == 4:
        # binary input: modulo over its last 8 bytes as an unsigned big-endian number
        if right < 0:
            _fail(b"Binary modulo must be positive integer")
        if right == 0:
            _crash("crash (division by zero)")
        run.set_text(b"%d" % (int.from_bytes(value[-8:], "big") % right))
        return
    left = _parse_intmax(_cstr(value))
    if left is None:
        _fail(b"Input is not a number")
    if operator == 0:
        result = left + right
    elif operator == 1:
        result = left - right
    elif operator == 2:
        result = left * right
    elif operator in (3, 4):
        if right == 0:
            _fail(b"Division by zero" if operator == 3 else b"Modulo by zero")
        if left == _INT64_MIN and right == -1:
            _crash("crash (integer overflow trap)")
        result = _c_divide(left, right)[operator - 3]
    else:
        _crash("abort (unknown calculate operator)")
    run.transfer = b"%d" % _wrap64(result)  # the binary mark stays as it was


def _fn_concat(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    result = run.transfer or b""
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        result += run.any_or_var(param)
    run.set_data(result)


def _hash(run: _Execution, params: list[_Param], algorithm: bytes, from_param: bool) -> None:
    method = _HASH_METHODS.get(algorithm)
    if method is None:
        _fail(b"Unsupported algorithm '" + algorithm + b"'")
    digest = method[0]
    rounds = 1
    salt = b""
    for param in params:
        if param.key is None:
            if not from_param or param.idx > 0:
                _fail(b"Too many positional parameters")
            continue
        if param.key == b"rounds":
            rounds = run.number_or_var(param)
        elif param.key == b"salt":
            salt = run.string_or_var(param)
        else:
            _unsupported_key(param.key)
    data = run.require("hash" if from_param else algorithm.decode())
    if rounds > _INT_MAX:
        _crash("loop forever (int round counter overflows)")
    for _ in range(rounds):
        data = digest(salt + data)
    run.set_binary(data)


def _fn_hash(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    if params[0].idx == -1:
        _fail(b"No algorithm as first parameter")
    _hash(run, params, run.string_or_var(params[0]), True)


def _hash_filter(algorithm: bytes) -> _Filter:
    return lambda run, params: _hash(run, params, algorithm, False)


def _base64_flags(run: _Execution, params: list[_Param], *, decode: bool) -> tuple[bool, bool]:
    """(pad, url) from ``pad=0|1`` and ``url=0|1``."""
    pad, url = True, False
    for param in params:
        if param.key is None:
            _fail(b"Too many positional parameters")
        if param.key not in (b"pad", b"url"):
            _unsupported_key(param.key)
        if decode:
            number = run.number_or_var(param)
            if number not in (0, 1):
                _fail(b"Supported values for %s are 0 or 1" % param.key)
            flag = number == 1
        else:
            flag = run.bool_or_var(param)
        if param.key == b"pad":
            pad = flag
        else:
            url = flag
    return pad, url


def _fn_base64(run: _Execution, params: list[_Param]) -> None:
    pad, url = _base64_flags(run, params, decode=False)
    value = run.require("base64")
    encoded = base64.b64encode(value)
    if url:
        encoded = encoded.translate(bytes.maketrans(b"+/", b"-_"))
    run.set_text(encoded if pad else encoded.rstrip(b"="))


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _fn_unbase64(run: _Execution, params: list[_Param]) -> None:
    """Decodes up to the first byte that is not base64 (errors are ignored, output kept).

    ``pad=0`` passes an *encoder* flag to the decoder, where the same bit means "no
    whitespace allowed"; so it makes whitespace end the data instead of being skipped.
    """
    pad, url = _base64_flags(run, params, decode=True)
    value = run.require("unbase64")
    alphabet = _B64_ALPHABET + (b"-_" if url else b"+/")
    output = bytearray()
    bits = count = 0
    for byte in value:
        index = alphabet.find(bytes([byte]))
        if index < 0:
            if not pad or byte not in b"\n\r \t":
                break
            continue
        bits = (bits << 6) | index
        count += 1
        if count >= 2:
            output.append((bits >> (2 * (4 - count))) & 0xFF)
            bits &= (1 << (2 * (4 - count))) - 1
        if count == 4:
            bits = count = 0
    run.set_binary(bytes(output))


def _pad_limit(size: int) -> None:
    if size > _MAX_RESULT:
        _crash("run out of memory")


def _fn_hex(run: _Execution, params: list[_Param]) -> None:
    width = 0
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        if param.idx != 0:
            _fail(b"Too many positional parameters")
        width = run.number_or_var(param)
    value = run.require("hex")
    number = _parse_uintmax(_cstr(value))
    if number is None:
        _fail(b"Input is not a number")
    digits = b"%x" % number
    if width == _INT64_MIN:
        _crash("run out of memory (negating INTMAX_MIN)")
    _pad_limit(abs(width))
    # 2.4.3 fails with "Excessive padding" beyond 256
    if width < 0:
        digits = digits.ljust(-width, b"0")[:-width]
    elif width > 0:
        digits = digits.rjust(width, b"0")[-width:]
    run.transfer = digits


def _fn_unhex(run: _Execution, params: list[_Param]) -> None:
    _no_params(params)
    value = _cstr(run.require("unhex"))
    if not value or any(byte not in _HEX_DIGITS for byte in value) or int(value, 16) > _UINT64_MAX:
        _fail(b"Input is not a hex number")
    run.set_text(b"%d" % int(value, 16))


def _fn_hexlify(run: _Execution, params: list[_Param]) -> None:
    width = 0
    if params:
        if params[0].key is not None:
            _unsupported_key(params[0].key)
        width = run.number_or_var(params[0])
        if width < 0:
            _fail(b"Width must be positive")
    digits = run.require("hexlify").hex().encode()
    if width:
        _pad_limit(width)
        digits = digits.rjust(width, b"0")[:width]
    run.set_text(digits)


def _fn_unhexlify(run: _Execution, params: list[_Param]) -> None:
    _no_params(params)
    value = run.require("unhexlify")
    text = _cstr(value)
    if len(value) % 2 != 0 or len(text) % 2 != 0 or any(byte not in _HEX_DIGITS for byte in text):
        _fail(b"Not a hex value")
    run.set_binary(bytes.fromhex(text.decode()))


def _fn_reverse(run: _Execution, params: list[_Param]) -> None:
    _no_params(params)
    run.set_data(run.require("reverse")[::-1])


def _truncate_bits(data: bytes, bits: int) -> bytes:
    """Keep the first *bits* bits, right-aligned; shorter input is left alone."""
    if len(data) * 8 < bits:
        return data
    kept = data[: (bits + 7) // 8]
    return (int.from_bytes(kept, "big") >> (-bits % 8)).to_bytes(len(kept), "big")


def _fn_truncate(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    length = 0  # always set: the first parameter is positional, as named ones fail
    bits = False
    for param in params:
        if param.key == b"bits" or param.idx == 0:
            length = run.number_or_var(param)
            if length < 0:
                _fail(b"Value of out of bounds")
            bits = param.key == b"bits"
        elif param.key is not None:
            _unsupported_key(param.key)
        else:
            _fail(b"Too many positional parameters")
    value = run.require("truncate")
    if bits:
        run.set_data(_truncate_bits(value, length))
    elif length <= len(value) + 1:
        # the copy has one spare zeroed byte, so one byte past the end reads a NUL
        run.set_data((value + b"\0")[:length])
    else:
        _crash("abort (buffer size assertion)")  # 2.4.3 leaves the value alone


def _fn_substr(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    offset = 0  # always set: the first parameter is positional, as named ones fail
    length: int | None = None
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        value = run.number_or_var(param)
        if param.idx == 0:
            offset = value
        elif param.idx == 1:
            length = value
        else:
            _fail(b"Too many positional parameters")
    data = run.require("substring")
    size = len(data)
    if not -size <= offset <= size:
        _fail(b"Offset out of bounds")
    if length is not None and not -size <= length <= size:
        _fail(b"Length out of bounds")
    if length == 0:
        run.set_data(b"")
        return
    if offset < 0:
        offset += size
    if length is None:
        length = size - offset
    elif length < 0:
        length += size
        if length < offset:
            _fail(b"Length out of bounds")
        length -= offset
    if length + offset > size:
        _fail(b"Length out of bounds")
    run.set_data(data[offset : offset + length])


def _fn_ldap_dn(run: _Execution, params: list[_Param]) -> None:
    _no_params(params)
    run.set_data(_cstr(run.require("convert to ldap_dn")).replace(b".", b",dc="))


#: Offsets regexec() reports: the match and groups \1 to \9.
_REGEX_GROUPS = 10


def _fn_regexp(run: _Execution, params: list[_Param]) -> None:
    """Replaces the *whole* value by the replacement, with ``\\N`` groups filled in.

    2.4.2 switched to PCRE-style dregex_replace, which substitutes only the matched part.
    """
    _need_params(params)
    pattern = b""  # always set: the first parameter is positional, as named ones fail
    replacement: bytes | None = None
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        try:
            value = run.string_or_var(param)
        except _FilterError:
            raise _LostError(b"") from None
        if param.idx == 0:
            pattern = value
        elif param.idx == 1:
            replacement = value
        else:
            _fail(b"Too many positional parameters")
    if replacement is None:
        _fail(b"Missing replacement parameter")
    subject = _cstr(run.require("regexp"))
    found = POSIX_REGEX.search(pattern, subject, _REGEX_GROUPS)
    if isinstance(found, bytes):
        _fail(found)
    if found is None:
        return
    output = bytearray()
    position = 0
    while (backslash := replacement.find(b"\\", position)) >= 0:
        group = replacement[backslash + 1 : backslash + 2]
        if not group.isdigit():
            _crash("loop forever (backslash not followed by a digit in the replacement)")
        output += replacement[position:backslash]
        start, end = found[int(group)]
        if start == -1:
            _fail(b"Invalid capture group")
        output += subject[start:end]
        position = backslash + 2
    run.set_data(bytes(output + replacement[position:]))


def _number_filter(byteorder: Literal["little", "big"]) -> _Filter:
    def apply(run: _Execution, params: list[_Param]) -> None:
        _no_params(params)
        value = run.require("convert to number")
        if len(value) not in (1, 2, 4, 8):
            _fail(b"Cannot convert '%d' bytes to number" % len(value))
        run.set_text(b"%d" % int.from_bytes(value, byteorder))

    return apply


def _split_index(run: _Execution, index: int, separator: bytes) -> None:
    if not separator:
        _crash("loop forever (empty separator)")
    tokens = _cstr(run.transfer or b"").split(separator)
    if index < 0:
        index += len(tokens)
    if not 0 <= index < len(tokens):
        _fail(b"Position out of bounds")
    run.set_text(tokens[index])


def _fn_index(run: _Execution, params: list[_Param]) -> None:
    _need_params(params)
    separator = b""  # always set: the first parameter is positional, as named ones fail
    index: int | None = None
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        if param.idx == 0:
            separator = run.string_or_var(param)
        elif param.idx == 1:
            index = run.number_or_var(param)
            if not -(2**31) <= index <= _INT_MAX:
                _fail(b"Position out of bounds")
        else:
            _fail(b"Too many positional parameters")
    if index is None:
        _fail(b"Missing index parameter")
    run.require("index")
    _split_index(run, index, separator)


def _fn_username(run: _Execution, params: list[_Param]) -> None:
    _no_params(params)
    run.require("get username from")
    _split_index(run, 0, b"@")


def _fn_domain(run: _Execution, params: list[_Param]) -> None:
    """Everything after the first '@' (which may contain more '@'), else empty."""
    _no_params(params)
    value = _cstr(run.require("get domain from"))
    run.set_text(value.partition(b"@")[2])


def _tab_unescape(element: bytes) -> bytes:
    """str_tabunescape: \\x01 escapes the next byte (0, 1, t, r, n or itself); as a C string."""
    output = bytearray()
    position = 0
    while (escape := element.find(b"\x01", position)) >= 0:
        output += element[position:escape]
        code = element[escape + 1 : escape + 2]
        if not code:
            break
        output += {b"0": b"\0", b"1": b"\x01", b"t": b"\t", b"r": b"\r", b"n": b"\n"}.get(code, code)
        position = escape + 2
    else:
        output += element[position:]
    return _cstr(bytes(output))


def _fn_list(run: _Execution, params: list[_Param]) -> None:
    """Tab-separated (tab-escaped) values joined by a separator, "," by default."""
    separator = b","
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        if param.idx > 0:
            _fail(b"Too many positional parameters")
        separator = run.string_or_var(params[0])
    value = _cstr(run.require("generate list from"))
    elements = [_tab_unescape(element) for element in value.split(b"\t")] if value else []
    run.set_text(separator.join(elements))


def _fill_filter(left: bool) -> _Filter:
    def apply(run: _Execution, params: list[_Param]) -> None:
        _need_params(params)
        amount = 0  # always set: the first parameter is positional, as named ones fail
        filler = b"0"
        for param in params:
            if param.key is not None:
                _unsupported_key(param.key)
            if param.idx == 0:
                amount = run.number_or_var(param)
                if not 1 <= amount <= _INT_MAX:
                    _fail(b"Fill length out of bounds")
            elif param.idx == 1:
                filler = run.string_or_var(param)
            else:
                _fail(b"Too many positional parameters")
        value = run.require("fill")
        if len(value) >= amount:
            return
        if not filler:
            _crash("loop forever (empty filler)")
        copies = math.ceil((amount - len(value)) / len(filler))  # whole fillers, may overshoot
        _pad_limit(copies * len(filler))
        run.transfer = filler * copies + value if left else value + filler * copies

    return apply


def _fn_text(run: _Execution, params: list[_Param]) -> None:
    """str_sanitize_append_utf8: control bytes and invalid UTF-8 become U+FFFD.

    A sequence cut short by the end of the string also drops the character before it and
    appends "…" (Dovecot treats it as truncated input).
    """
    _no_params(params)
    value = _cstr(run.require("text"))
    output = bytearray()
    previous_end = 0
    position = 0
    while position < len(value):
        length = _utf8_char_length(value, position)
        if length == 0:
            del output[previous_end:]
            output += "\u2026".encode()
            break
        previous_end = len(output)
        if length < 0 or value[position] < 0x20 or value[position] == 0x7F:
            output += "\ufffd".encode()
            position += 1 if length < 0 else length
        else:
            output += value[position : position + length]
            position += length
    run.set_text(bytes(output))


def _utf8_char_length(data: bytes, position: int) -> int:
    """Length of the UTF-8 character at *position*; -1 if invalid, 0 if the string ends inside it."""
    lead = data[position]
    if lead < 0x80:
        return 1
    if lead < 0xC2 or lead > 0xFD:
        return -1
    length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 5 if lead < 0xFC else 6
    chunk = data[position : position + length]
    for byte in chunk[1:]:
        if byte & 0xC0 != 0x80:
            return -1
    if len(chunk) < length:
        return 0
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return -1
    return length


def _fn_crypt(run: _Execution, params: list[_Param]) -> None:
    raise VarExpandError(b"encrypt/decrypt filters (Dovecot's var_expand_crypt plugin) are not supported")


_IF_NUMERIC = {
    b"==": int.__eq__,
    b"<": int.__lt__,
    b"<=": int.__le__,
    b">": int.__gt__,
    b">=": int.__ge__,
    b"!=": int.__ne__,
}
_IF_STRING: dict[bytes, Callable[[bytes, bytes], bool]] = {
    b"eq": bytes.__eq__,
    b"lt": bytes.__lt__,
    b"le": bytes.__le__,
    b"gt": bytes.__gt__,
    b"ge": bytes.__ge__,
    b"ne": bytes.__ne__,
    b"*": _wildcard_match,
    b"!*": lambda data, mask: not _wildcard_match(data, mask),
}


def _fn_if(run: _Execution, params: list[_Param]) -> None:
    """``if(lhs, op, rhs, then, else)``; with a value set, that value is lhs and is left out."""
    lhs_from_value = run.transfer is not None
    slots: list[_Param] = []
    operator = b""
    for param in params:
        if param.key is not None:
            _unsupported_key(param.key)
        slot = len(slots) + lhs_from_value
        if slot == 5:
            _fail(b"Too many positional parameters")
        if slot == 1:
            try:
                operator = run.string_or_var(param)
            except _FilterError as error:
                _fail(b"Comparator: " + error.message)
        slots.append(param)
    if len(slots) + lhs_from_value != 5:
        _fail(b"Missing parameters")
    numeric = operator in _IF_NUMERIC
    if operator not in _IF_STRING and operator not in (b"~", b"!~") and not numeric:
        _fail(b"Unsupported comparator '" + operator + b"'")
    if lhs_from_value:
        value = _cstr(run.transfer or b"")
        if numeric and _parse_intmax(value) is None:
            _fail(b"Input is not a number")
        lhs = _Param(None, -1, _INT if numeric else _STRING, value, _parse_intmax(value) or 0)
        slots.insert(0, lhs)
    left, _, right, if_true, if_false = slots
    outcome = _if_compare(run, left, operator, right)
    try:
        run.set_text(run.any_or_var(if_true if outcome else if_false))
    except _FilterError as error:
        _fail((b"True branch: " if outcome else b"False branch: ") + error.message)


def _if_compare(run: _Execution, left: _Param, operator: bytes, right: _Param) -> bool:
    numeric = _IF_NUMERIC.get(operator)
    if numeric is not None:
        numbers = []
        for label, param in ((b"Left-hand side: ", left), (b"Right-hand side: ", right)):
            try:
                numbers.append(run.number_or_var(param))
            except _FilterError as error:
                _fail(label + error.message)
        return numeric(*numbers)
    operands = []
    # no colon after "side" here, unlike the numeric case
    for label, param in ((b"Left-hand side ", left), (b"Right-hand side ", right)):
        try:
            operands.append(run.string_or_var(param))
        except _FilterError as error:
            _fail(label + error.message)
    lhs, rhs = operands
    compare = _IF_STRING.get(operator)
    if compare is not None:
        return compare(lhs, rhs)
    found = POSIX_REGEX.search(rhs, lhs, _REGEX_GROUPS)
    if isinstance(found, bytes):
        _fail(b"regexp() failed: " + found)
    return (found is not None) != (operator == b"!~")


_FILTERS: dict[bytes, _Filter] = {
    b"lookup": _fn_lookup,
    b"literal": _fn_literal,
    b"calculate": _fn_calculate,
    b"concat": _fn_concat,
    b"upper": _case_filter(bytes.upper, "upper"),
    b"lower": _case_filter(bytes.lower, "lower"),
    b"hash": _fn_hash,
    b"md5": _hash_filter(b"md5"),
    b"sha1": _hash_filter(b"sha1"),
    b"sha256": _hash_filter(b"sha256"),
    b"sha384": _hash_filter(b"sha384"),
    b"sha512": _hash_filter(b"sha512"),
    b"base64": _fn_base64,
    b"unbase64": _fn_unbase64,
    b"hex": _fn_hex,
    b"unhex": _fn_unhex,
    b"hexlify": _fn_hexlify,
    b"unhexlify": _fn_unhexlify,
    b"default": _fn_default,
    b"reverse": _fn_reverse,
    b"truncate": _fn_truncate,
    b"substr": _fn_substr,
    b"ldap_dn": _fn_ldap_dn,
    b"if": _fn_if,
    b"regexp": _fn_regexp,
    b"lenumber": _number_filter("little"),
    b"benumber": _number_filter("big"),
    b"index": _fn_index,
    b"username": _fn_username,
    b"domain": _fn_domain,
    b"list": _fn_list,
    b"lfill": _fill_filter(True),
    b"rfill": _fill_filter(False),
    b"text": _fn_text,
    b"encrypt": _fn_crypt,
    b"decrypt": _fn_crypt,
}

"""glibc's POSIX extended regular expressions in the "C" locale, as Dovecot uses them.

Dovecot never calls setlocale(), and Python's re differs in syntax and in its error
texts, so var_expand's regex comparisons (2.3 `%{if;...;~;...}`, 2.4 `~` and the
regexp filter) call the C library directly.
"""

from __future__ import annotations

import ctypes


class PosixRegex:
    _REG_EXTENDED = 1
    _REG_NOMATCH = 1
    _REGEX_T_SIZE = 256  # glibc's regex_t is 64 bytes on 64-bit; leave headroom
    _LC_CTYPE_MASK, _LC_COLLATE_MASK, _LC_MESSAGES_MASK = 1 << 0, 1 << 3, 1 << 5

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self._regcomp = libc.regcomp
        self._regcomp.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        self._regcomp.restype = ctypes.c_int
        self._regexec = libc.regexec
        self._regexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int]
        self._regexec.restype = ctypes.c_int
        self._regerror = libc.regerror
        self._regerror.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        self._regerror.restype = ctypes.c_size_t
        self._regfree = libc.regfree
        self._regfree.argtypes = [ctypes.c_void_p]
        self._regfree.restype = None
        self._uselocale = libc.uselocale
        self._uselocale.argtypes = [ctypes.c_void_p]
        self._uselocale.restype = ctypes.c_void_p
        newlocale = libc.newlocale
        newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
        newlocale.restype = ctypes.c_void_p
        mask = self._LC_CTYPE_MASK | self._LC_COLLATE_MASK | self._LC_MESSAGES_MASK
        self._c_locale = newlocale(mask, b"C", None)

    def search(self, pattern: bytes, subject: bytes, groups: int = 0) -> list[tuple[int, int]] | bytes | None:
        """None if *subject* does not match; regerror's text if *pattern* does not compile;
        else (start, end) of the match and of groups 1 .. groups-1 (-1, -1 when unset)."""
        regex = ctypes.create_string_buffer(self._REGEX_T_SIZE)
        matches = (ctypes.c_int * (2 * groups))()
        previous = self._uselocale(self._c_locale)
        try:
            code = self._regcomp(regex, pattern, self._REG_EXTENDED)
            if code != 0:
                size = self._regerror(code, regex, None, 0)
                text = ctypes.create_string_buffer(size)
                self._regerror(code, regex, text, size)
                return text.value
            try:
                if self._regexec(regex, subject, groups, matches if groups else None, 0) == self._REG_NOMATCH:
                    return None
                return [(matches[2 * i], matches[2 * i + 1]) for i in range(groups)]
            finally:
                self._regfree(regex)
        finally:
            self._uselocale(previous)


POSIX_REGEX = PosixRegex()

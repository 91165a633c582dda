"""The `[[dict]]` driver = "file": Dovecot's dict-file format, so either can read what the other wrote.
File work runs in trio worker threads; a commit locks the file (fcntl), writes PATH.tmp and renames it.

The format (src/lib-dict/dict-file.c): a key line then a value line per entry, each
tab-escaped (\\001 as \\0011, TAB as \\001t, CR as \\001r, LF as \\001n). Keys are stored as
they are (`priv/` keys are not told apart by username: point `path` at a per-user file for
that, as Dovecot does). Like Dovecot's, the driver has no expiry: a commit asking for one
fails with "Expiration not supported by dict driver".
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

import trio

from lua_api.dict import ChangeOp, DictChange, DictError, DictRow, select_rows

EXPIRY_UNSUPPORTED = "Expiration not supported by dict driver"
_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}
_UNESCAPES = {"1": b"\x01", "t": b"\t", "r": b"\r", "n": b"\n"}


def tabescape(value: bytes) -> bytes:
    for char, escaped in _ESCAPES.items():
        value = value.replace(char.encode(), escaped.encode())
    return value


def tabunescape(value: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == 1 and i + 1 < len(value):
            out += _UNESCAPES.get(chr(value[i + 1]), value[i + 1 : i + 2])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return bytes(out)


def parse(data: bytes) -> dict[bytes, bytes]:
    lines = data.split(b"\n")
    entries: dict[bytes, bytes] = {}
    for i in range(0, len(lines) - 1, 2):
        entries[tabunescape(lines[i])] = tabunescape(lines[i + 1])
    return entries


def render(entries: dict[bytes, bytes]) -> bytes:
    return b"".join(tabescape(key) + b"\n" + tabescape(value) + b"\n" for key, value in entries.items())


class FileDict:
    """A `driver = "file"` dict at `path` (read again whenever the file changes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int, int] | None = None
        self._entries: dict[bytes, bytes] = {}

    def _read(self) -> dict[bytes, bytes]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._identity, self._entries = None, {}
            return self._entries
        except OSError as exc:
            raise DictError(f"dict-file: stat({self.path}) failed: {exc.strerror}") from None
        identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        if identity != self._identity:
            try:
                self._entries = parse(self.path.read_bytes())
            except OSError as exc:
                raise DictError(f"dict-file: open({self.path}) failed: {exc.strerror}") from None
            self._identity = identity
        return self._entries

    async def lookup(self, key: bytes, username: bytes | None) -> tuple[bytes, ...] | None:
        value = (await trio.to_thread.run_sync(self._read)).get(key)
        return None if value is None else (value,)

    async def iterate(self, path: bytes, flags: int, username: bytes | None) -> list[DictRow]:
        entries = await trio.to_thread.run_sync(self._read)
        return select_rows(list(entries.items()), path, flags)

    async def commit(self, changes: Sequence[DictChange], username: bytes | None, expire_secs: int) -> None:
        if expire_secs > 0 or any(change.expire_secs > 0 for change in changes):
            raise DictError(EXPIRY_UNSUPPORTED)
        if changes:
            await trio.to_thread.run_sync(self._write, list(changes))

    def _locked_fd(self) -> int:
        """The dict file, created if need be, locked; the file at the path (not one renamed over)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _write(self, changes: list[DictChange]) -> None:
        try:
            fd = self._locked_fd()
        except OSError as exc:
            raise DictError(f"dict-file: open({self.path}) failed: {exc.strerror}") from None
        try:
            entries = dict(self._read())
            for change in changes:
                if change.op is ChangeOp.SET:
                    entries[change.key] = change.value
                elif change.op is ChangeOp.UNSET:
                    entries.pop(change.key, None)
                else:
                    old = entries.get(change.key, b"0")
                    try:
                        entries[change.key] = str(int(old) + change.diff).encode()
                    except ValueError:
                        raise DictError(f"Key {change.key.decode('utf-8', 'replace')} is not a number") from None
            temp = self.path.with_name(self.path.name + ".tmp")
            try:
                temp.write_bytes(render(entries))
                os.chmod(temp, os.fstat(fd).st_mode & 0o777)
                os.rename(temp, self.path)
            except OSError as exc:
                raise DictError(f"dict-file: write({temp}) failed: {exc.strerror}") from None
        finally:
            os.close(fd)

    async def aclose(self) -> None:
        return None

"""Route-B stand-in: a foreign "auth service" that relays Dovecot's auth listeners elsewhere.

Dovecot's master runs it as `service auth { executable = PYTHON relay_auth.py TARGET_DIR }`
(see dovecot.AuthCommand) and hands it the already-listening auth sockets as fds 7.. (2.4: 8..),
with SOCKET_COUNT and SOCKETn_SETTINGS (the listener names; 2.4 adds `<TAB>type=...`) in the
environment. Each accepted connection is relayed byte for byte to
TARGET_DIR/auth-{login,master,userdb,client}, chosen by the listener's type (2.4) or Dovecot
2.3's listener-name suffix rule. It exists to validate the route-B configuration
before authd can take inherited fds itself.

One limit: a relay on the master socket breaks the REQUEST of a real IMAP login, because
Dovecot's auth compares `session_pid` with the peer credentials of the connection (which are
this relay's); tests keep `imap -a` pointed at the real master socket for that.

It logs one line per listener in Dovecot's internal log format (stderr is the master's log
pipe: plain lines would be logged as errors) and exits when the master dies. Two traps: the
inherited listeners are non-blocking, and fd 6 is the *write* end of a pipe whose read end the
master holds, so its death shows as POLLERR on fd 6 (read() on it fails with EBADF).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
from pathlib import Path

MASTER_DEAD_FD = 6
FIRST_LISTENER_FD = 7  # Dovecot 2.3; 2.4 passes its config fd there and listeners from 8
LOG_INFO = b"\x01\x02"  # 0x01, then log type + 1 (info = 1)
TARGETS = {"login": "auth-login", "master": "auth-master", "userdb": "auth-userdb"}
TYPES_24 = {"auth": "auth-client", **TARGETS}  # token-login: not relayed


def log_info(text: str) -> None:
    os.write(2, LOG_INFO + f"{os.getpid()} {text}\n".encode())


def target_for(listener_path: str) -> str | None:
    """Dovecot 2.3's socket type rule: the part after the last '/', then after the last '-'."""
    kind = listener_path.rsplit("/", 1)[-1].rsplit("-", 1)[-1]
    if kind in ("token", "tokenlogin"):
        return None
    return TARGETS.get(kind, "auth-client")


def target_for_settings(settings: str, listener_path: str) -> str | None:
    """2.4's `NAME<TAB>type=TYPE` settings, else the 2.3 rule on the path."""
    for field in settings.split("\t")[1:]:
        if field.startswith("type="):
            return TYPES_24.get(field.removeprefix("type="))
    return target_for(listener_path)


def pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def relay(client: socket.socket, target: Path) -> None:
    with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
        try:
            upstream.connect(str(target))
        except OSError:
            return
        back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        back.start()
        pump(client, upstream)
        back.join()


def serve(listener: socket.socket, target: Path) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, target), daemon=True).start()


def main() -> None:
    target_dir = Path(sys.argv[1])
    first = FIRST_LISTENER_FD if os.environ.get("DOVECOT_VERSION", "2.3").startswith(("2.2.", "2.3.")) else 8
    for index in range(int(os.environ["SOCKET_COUNT"])):
        listener = socket.socket(fileno=first + index)
        listener.setblocking(True)
        name = os.environ.get(f"SOCKET{index}_SETTINGS", "")
        target = target_for_settings(name, listener.getsockname())
        log_info(f"relay_auth: fd {first + index} {name} {listener.getsockname()} -> {target}")
        if target is not None:
            threading.Thread(target=serve, args=(listener, target_dir / target), daemon=True).start()
    master_dead = select.poll()
    master_dead.register(MASTER_DEAD_FD, select.POLLERR)
    master_dead.poll()


if __name__ == "__main__":
    main()

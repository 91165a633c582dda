"""A request dropped while its passdb lookup runs: the lookup is cancelled and its slot freed.

Dovecot's answer to the client is the same either way (nothing for a CANCEL); authd also stops
the waiting step, so a hung backend cannot keep [limits] requests_total filled by dead requests.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tests.authd.flood_helpers import basic, in_flight, plain, wait_in_flight
from tests.authd.test_flood import good_login, start_authd
from tests.http_backend import HttpBackend


def test_a_cancelled_requests_lookup_stops_and_frees_its_slot(
    tmp_path: Path, slow_and_fast: tuple[HttpBackend, HttpBackend]
) -> None:
    # requests_total must be at least requests_per_connection, and a connection at its cap is not
    # read (so its CANCEL would wait): two connections with one hung request each fill the total
    proc = start_authd(tmp_path, slow_and_fast, per_conn=2, total=2)
    try:
        with socket.socket(socket.AF_UNIX) as sock, socket.socket(socket.AF_UNIX) as other:
            resp = plain("flood", basic("flood", "x"))
            for n, conn in enumerate((sock, other)):
                conn.connect(str(proc.socket("auth-client")))
                conn.settimeout(10)
                conn.sendall(
                    b"VERSION\t1\t2\nCPID\t%d\nAUTH\t1\tPLAIN\tservice=imap\tresp=%s\n" % (4242 + n, resp.encode())
                )
            wait_in_flight(proc, lambda v: v == 2, 10, proc.pid)  # both lookups hang on the backend
            assert good_login(proc)[0] == "FAIL\t1\tcode=temp_fail"  # requests_total is full
            sock.sendall(b"CANCEL\t1\n")
            wait_in_flight(proc, lambda v: v == 1, 10, proc.pid)
            assert good_login(proc)[0] == "OK\t1\tuser=good"
            assert in_flight(proc) == 1
            sock.sendall(b"CONT\t1\tAA==\n")  # request 1 is gone: Dovecot's words for it
            data = b""
            while b"FAIL" not in data or not data.endswith(b"\n"):
                data += sock.recv(65536)
            assert data.split(b"DONE\n")[-1] == b"FAIL\t1\treason=Authentication request timed out\n"
    finally:
        proc.stop()
    assert "internal_error" not in proc.log_text()

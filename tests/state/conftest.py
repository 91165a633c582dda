"""Throwaway redis-server processes for the [state] redis tests: own port, own directory, stopped by PID.

Redis cannot listen on port 0, so a free port is found by binding a socket first.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, as Redis fixes it) is a valid, free port too."""
    for _ in range(1000):
        with socket.socket() as sock, socket.socket() as bus:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port + 10000 > 65535:
                continue
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server on 127.0.0.1:`port` with its data in `workdir` (no persistence)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None and self.popen is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--save", "", "--appendonly", "no", "--logfile", str(self.workdir / "redis.log")]
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.popen.returncode}")
            if self.command(b"PING") == b"+PONG":
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.port} within {timeout}s")

    def command(self, *parts: bytes) -> bytes | None:
        """One command over RESP; the first reply line, or None if the server is not there."""
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(request)
                return sock.recv(65536).split(b"\r\n")[0]
        except OSError:
            return None

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.kill()  # abrupt, like a crash: no chance to say goodbye to clients
        self.popen.wait(10)
        self.popen = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (scripts/bootstrap installs it)")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Sentinel(RedisServer):
    """A redis-server in Sentinel mode watching `master` as "authd-master"."""

    def __init__(self, workdir: Path, master: RedisServer) -> None:
        super().__init__(workdir)
        self.master = master

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None and self.popen is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites its file: its own copy
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\nlogfile {self.workdir / 'sentinel.log'}\n"
            f"sentinel monitor authd-master 127.0.0.1 {self.master.port} 1\n"
        )
        self.popen = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.command(b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", b"authd-master") != b"*2":
            assert time.monotonic() < deadline and self.popen.poll() is None, "sentinel did not start"
            time.sleep(0.05)


@pytest.fixture
def sentinel(tmp_path: Path, redis_server: RedisServer) -> Iterator[Sentinel]:
    server = Sentinel(tmp_path / "sentinel", redis_server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ClusterNode]]:
    """Three cluster-enabled masters sharing the 16384 slots (redis-cli --cluster create)."""
    redis_cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if REDIS_SERVER is None or redis_cli is None:
        pytest.skip("redis-server and redis-cli are not installed (scripts/bootstrap installs them)")
    nodes = [ClusterNode(tmp_path / f"cluster{i}", free_cluster_port()) for i in range(3)]
    try:
        for node in nodes:
            node.start()
        created = subprocess.run(
            [redis_cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in (n.info(b"CLUSTER", b"INFO")) for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not settle"
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


class ClusterNode(RedisServer):
    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None and self.popen is None
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.command(b"PING") != b"+PONG":
            assert time.monotonic() < deadline and self.popen.poll() is None, "cluster node did not start"
            time.sleep(0.02)

    def info(self, *parts: bytes) -> bytes:
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(request)
            return sock.recv(65536)

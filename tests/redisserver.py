"""A real redis-server for the tests (Debian package redis-server; .ci/run installs it): one per
test on a free loopback port, no persistence, which a test may kill, restart empty or freeze;
optionally a replica of another, and a real Sentinel (``redis-server --sentinel``, the same
binary, so no other package) watching them."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_until

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed "
                                 "(Debian package redis-server; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProc:
    """One redis-server on a fixed free port: kill, start again empty, freeze and thaw."""

    def __init__(self, replica_of: RedisProc | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.replica_of = replica_of
        self.p: subprocess.Popen[bytes] | None = None
        # a replica's full sync writes an RDB file: into a directory of its own, not the cwd
        self.dir = tempfile.TemporaryDirectory(prefix="redis-test-")

    def start(self) -> RedisProc:
        extra = [] if self.replica_of is None else [
            "--replicaof", "127.0.0.1", str(self.replica_of.port)]
        self.p = subprocess.Popen([REDIS or "redis-server", "--port", str(self.port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no",
                                   "--repl-diskless-sync-delay", "0", "--dir", self.dir.name,
                                   *extra],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self._answers, timeout=5), "redis-server did not start"
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        assert self.p is not None
        self.p.kill()
        self.p.wait(5)

    def freeze(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
            self.p.wait(5)
        self.dir.cleanup()


class SentinelProc(RedisProc):
    """``redis-server CONF --sentinel`` monitoring ``master`` as MASTER_NAME, quorum 1.

    Sentinel rewrites its config file (what it learnt of replicas and failovers), so the
    file is its own, in ``workdir``. Short down-after and failover timeouts: a test's
    failover takes about a second, not the production default of half a minute.
    """

    MASTER_NAME = "lbstate"

    def __init__(self, master: RedisProc, workdir: Path) -> None:
        super().__init__()
        self.master = master
        self.conf = workdir / f"sentinel-{self.port}.conf"
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/{self.MASTER_NAME}/0"

    def start(self) -> SentinelProc:
        name = self.MASTER_NAME
        self.conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.conf.parent}",
            f"sentinel monitor {name} 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 3000",
            f"sentinel parallel-syncs {name} 1", ""]))
        self.p = subprocess.Popen([REDIS or "redis-server", str(self.conf), "--sentinel"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self._answers, timeout=5), "redis-server --sentinel did not start"
        return self

    def command(self, *args: str) -> bytes:
        """One command in RESP, its whole reply as bytes (enough for the tests' checks)."""
        wire = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(wire.encode())
            return s.recv(65536)

    def failover(self, timeout: float = 10.0) -> bool:
        """``SENTINEL FAILOVER``, once the sentinel takes it: it answers -NOGOODSLAVE until it
        has seen a replica fit to promote (just after a start, or a failover before)."""
        return wait_until(lambda: self.command("SENTINEL", "FAILOVER", self.MASTER_NAME)
                          == b"+OK\r\n", timeout=timeout, step=0.1)

    def master_port(self) -> int:
        """The port of the master this sentinel names now."""
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
        return int(reply.split(b"\r\n")[4])


@pytest.fixture
def redis_proc() -> Iterator[RedisProc]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run "
                    "installs it)")
    proc = RedisProc().start()
    yield proc
    proc.stop()

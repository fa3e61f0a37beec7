"""A real redis-server for the tests (Debian package redis-server; .ci/run installs it): one per
test on a free loopback port, no persistence, which a test may kill, restart empty or freeze."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator

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

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisProc:
        self.p = subprocess.Popen([REDIS or "redis-server", "--port", str(self.port), "--bind",
                                   "127.0.0.1", "--save", "", "--appendonly", "no"],
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


@pytest.fixture
def redis_proc() -> Iterator[RedisProc]:
    if REDIS is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run "
                    "installs it)")
    proc = RedisProc().start()
    yield proc
    proc.stop()

"""``server.workers: N``: a pre-fork master and N worker processes on one port (app/master.py).

Run as an operator runs it, ``python -m app CONFIG``, against a real ``redis-server`` (the
workers share node caps through it) and a simulated node that counts the concurrency it
really receives. The test stands in for systemd: it gives the master a ``NOTIFY_SOCKET`` and a
``WATCHDOG_USEC`` and reads what the master reports. Every worker's log line carries its pid
(``"worker"``), which is how the test sees which worker served a request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests
import yaml
from gevent import socket as gsocket

from tests.redisserver import RedisProc
from tests.waiting import wait_until

SHARED = {"leaseTtlMs": 2000, "heartbeatMs": 250, "timeoutMs": 200, "localGraceMs": 1000}


@pytest.fixture
def redis_url(redis_proc: RedisProc) -> str:
    return redis_proc.url


class Notified:
    """A stand-in for systemd's notify socket: every datagram the master sends, in order."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.lines: list[str] = []
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        while True:
            self.lines.extend(self.sock.recv(4096).decode().splitlines())

    def close(self) -> None:
        self.reader.kill()
        self.sock.close()


class Master:
    """``python -m app CONFIG`` with workers; its log (every process's) in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items()
                if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.log, self.out = log, open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen([sys.executable, "-m", "app", str(config)],
                                  env={**base, **(env or {})}, stdout=subprocess.DEVNULL,
                                  stderr=self.out)
        self.url = ""

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name and all(event.get(k) == v for k, v in match.items()):
                out.append(event)
        return out

    def workers(self) -> set[int]:
        """Pids of the workers started and not reported exited, per the master's log."""
        started = {e["worker"] for e in self.events("worker_started")}
        return started - {e["worker"] for e in self.events("worker_exited")}

    def wait_started(self, n: int) -> None:
        assert wait_until(lambda: self.p.poll() is not None or len(
            {e.get("worker") for e in self.events("started")}) >= n, timeout=30)
        master = self.events("master_started")
        assert master, self.log.read_text()[-3000:]
        self.url = f"http://127.0.0.1:{master[0]['port']}"

    def served_by(self) -> set[int]:
        return {e["worker"] for e in self.events("request") if "worker" in e}

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()  # the workers get SIGTERM from the kernel (PDEATHSIG) and drain
        self.p.wait(10)
        self.out.close()


def _config(path: Path, node: Any, redis_url: str | None, workers: int, cap: int = 2) -> Path:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drainSeconds": 2, "workers": workers},
        "nodes": [{"id": "n0", "url": node.url, "maxConcurrentRequests": cap}],
        "healthCheck": {"intervalMs": 500, "modelRefreshMs": 1000},
        "timeouts": {"requestTimeoutMs": 10000},
        "retry": {"initialBackoffMs": 5, "maxBackoffMs": 20},
        "logging": {"level": "INFO"}}
    if redis_url:
        cfg["sharedState"] = {"redisUrl": redis_url, **SHARED}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _generate(url: str) -> int:
    """One request on a fresh connection (a kept-alive one would stay on one worker)."""
    return requests.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi",
                                                       "stream": False},
                         headers={"Connection": "close"}, timeout=15).status_code


def _batch(url: str, n: int) -> list[int]:
    jobs = [gevent.spawn(_generate, url) for _ in range(n)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    return [j.value for j in jobs]


def test_more_than_one_worker_without_redis_is_refused(fake_node, tmp_path):
    node = fake_node(["tiny"], profile="fast")
    config = _config(tmp_path / "lb.yaml", node, None, workers=2)
    run = subprocess.run([sys.executable, "-m", "app", str(config)], capture_output=True,
                         timeout=30, env={k: v for k, v in os.environ.items()
                                          if k != "NOTIFY_SOCKET"})
    assert run.returncode == 2
    assert b"server.workers: 2 workers need sharedState.redisUrl" in run.stderr


def test_one_worker_is_the_single_process_as_before(fake_node, tmp_path):
    node = fake_node(["tiny"], profile="fast")
    proc = Master(_config(tmp_path / "lb.yaml", node, None, workers=1), tmp_path / "lb.log")
    try:
        assert wait_until(lambda: proc.events("started") or proc.p.poll() is not None, 30)
        started = proc.events("started")
        assert started and "worker" not in started[0], proc.log.read_text()[-2000:]
        url = f"http://127.0.0.1:{started[0]['port']}"
        assert _generate(url) == 200
        assert proc.events("master_started") == [] and proc.events("worker_started") == []
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(15) == 0
    finally:
        proc.stop()


def test_two_workers_share_the_port_the_cap_and_the_signals(fake_node, redis_url, tmp_path):
    node = fake_node(["tiny"], profile="fast", decode_tps=100.0)  # 8 tokens: ~80 ms each
    notified = Notified(tmp_path / "notify.sock")
    proc = Master(_config(tmp_path / "lb.yaml", node, redis_url, workers=2), tmp_path / "lb.log",
                  env={"NOTIFY_SOCKET": notified.path, "WATCHDOG_USEC": "4000000"})
    try:
        proc.wait_started(2)
        first = proc.workers()
        assert len(first) == 2 and proc.p.pid not in first
        # READY once both workers are; then the watchdog is fed
        assert wait_until(lambda: "READY=1" in notified.lines, timeout=15), notified.lines
        assert len(proc.events("workers_ready")) == 1
        assert wait_until(lambda: "WATCHDOG=1" in notified.lines, timeout=10), notified.lines
        # both workers serve; the node never gets more than its cap across the two
        for _ in range(20):
            assert _batch(proc.url, 8) == [200] * 8
            if proc.served_by() >= first:
                break
        assert proc.served_by() == first, proc.served_by()
        assert _batch(proc.url, 16) == [200] * 16
        assert node.stats.max_active == 2  # one worker alone allows 2: together still 2
        _reload_reaches_every_worker(proc, notified, first)
        _killed_worker_is_replaced(proc, first)
        assert node.stats.max_active == 2
        # SIGTERM: every worker drains, the master exits 0 and leaves nothing behind
        proc.p.send_signal(signal.SIGTERM)
        assert proc.p.wait(30) == 0
        assert "STOPPING=1" in notified.lines
        assert {e["worker"] for e in proc.events("stopped", exit_status=0)} >= proc.workers()
        assert all(not _alive(pid) for pid in proc.workers())
    finally:
        proc.stop()
        notified.close()


def _reload_reaches_every_worker(proc: Master, notified: Notified, pids: set[int]) -> None:
    before = len(notified.lines)
    proc.p.send_signal(signal.SIGHUP)
    assert wait_until(lambda: {e["worker"] for e in proc.events(
        "config_reload", trigger="SIGHUP")} == pids, timeout=15), proc.events("config_reload")
    assert wait_until(lambda: proc.events("workers_reloaded"), timeout=15)
    assert set(proc.events("workers_reloaded")[0]["workers"]) == pids
    # the master logs workers_reloaded, then notifies READY=1: wait for it, not a snapshot
    def ready_after_reload() -> bool:
        after = notified.lines[before:]
        return "RELOADING=1" in after and "READY=1" in after[after.index("RELOADING=1"):]

    assert wait_until(ready_after_reload, timeout=5), notified.lines[before:]


def _killed_worker_is_replaced(proc: Master, pids: set[int]) -> None:
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: proc.events("worker_exited", worker=victim), timeout=10)
    # the survivor takes every new connection meanwhile: nothing is refused or lost
    assert [_generate(proc.url) for _ in range(10)] == [200] * 10
    assert wait_until(lambda: len(proc.workers()) == 2 and victim not in proc.workers(),
                      timeout=15), proc.events("worker_started")
    (fresh,) = proc.workers() - pids
    assert wait_until(lambda: proc.events("started", worker=fresh), timeout=30)
    for _ in range(20):  # the replacement serves too
        assert _batch(proc.url, 8) == [200] * 8
        if fresh in proc.served_by():
            break
    assert fresh in proc.served_by()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

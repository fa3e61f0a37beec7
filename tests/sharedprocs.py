"""Appliance processes sharing one Redis under load, for the cap-invariant tests.

``ApplianceProc`` runs ``python -m app CONFIG`` as an operator does (one process, or a
pre-fork master with ``server.workers`` workers) with its log in a file; the instances' shared
modes are read from that log (every worker logs its own ``shared_mode`` changes, with its
instance id), so a test knows each worker's mode whichever worker answers ``/health``.
``Load`` is closed-loop clients, bounded by ``stop()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import requests
import yaml

from tests.waiting import wait_until

SHARED = {"leaseTtlMs": 2000, "heartbeatMs": 250, "timeoutMs": 100, "localGraceMs": 1000}


class ApplianceProc:
    """``python -m app CONFIG`` with its log in a file (an unread pipe would block it)."""

    def __init__(self, config: Path, log: Path, workers: int = 1) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.log = log
        self.workers = workers
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen([sys.executable, "-m", "app", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=self.out)
        self.url = ""
        self.killed = False

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                out.append(event)
        return out

    def wait_started(self) -> None:
        """Every process serves: the one appliance, or the master and all its workers."""
        event = "started" if self.workers == 1 else "master_started"
        assert wait_until(lambda: self.p.poll() is not None or (
            self.events(event) and len(self.events("started")) >= self.workers), 30)
        started = self.events(event)
        assert started, f"appliance did not start: {self.log.read_text()[-2000:]}"
        self.url = f"http://127.0.0.1:{started[0]['port']}"

    def worker_pids(self) -> set[int]:
        """The master's workers started and not reported exited, per its log."""
        started = {e["worker"] for e in self.events("worker_started")}
        return started - {e["worker"] for e in self.events("worker_exited")}

    def modes(self) -> dict[str, str]:
        """Each instance's (worker's) shared mode, from the changes it logged."""
        return {e["instance"]: e["to"] for e in self.events("shared_mode")}

    def all_in(self, mode: str) -> bool:
        """Every worker (at least ``workers`` instances) is in ``mode``."""
        modes = self.modes()
        return len(modes) >= self.workers and set(modes.values()) == {mode}

    def mode(self) -> str:
        return requests.get(f"{self.url}/health", timeout=2).json()["sharedState"]["mode"]

    def held(self) -> dict[str, int]:
        return requests.get(f"{self.url}/health", timeout=2).json()["sharedState"]["leasesHeld"]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self.out.close()


def served(nodes: list[Any]) -> int:
    """Requests the simulated nodes received, all of them."""
    return sum(n.stats.requests for n in nodes)


def more_traffic(nodes: list[Any], n: int = 15) -> bool:
    """Wait until the nodes served ``n`` more requests: the phase ran under load."""
    start = served(nodes)
    return wait_until(lambda: served(nodes) >= start + n, timeout=5, step=0.02)


def write_config(path: Path, nodes: list[Any], caps: list[int], redis_url: str,
                 workers: int = 1) -> Path:
    cfg = {"server": {"host": "127.0.0.1", "port": 0, "drainSeconds": 1, "workers": workers},
           "nodes": [{"id": f"n{i}", "url": n.url, "maxConcurrentRequests": c}
                     for i, (n, c) in enumerate(zip(nodes, caps, strict=True))],
           "healthCheck": {"intervalMs": 500, "modelRefreshMs": 1000},
           "disruptor": {"queueTimeoutMs": 5000},
           "timeouts": {"requestTimeoutMs": 8000},
           "retry": {"initialBackoffMs": 5, "maxBackoffMs": 20},
           "logging": {"level": "WARNING"},
           "sharedState": {"redisUrl": redis_url, **SHARED}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Load:
    """Closed-loop clients, each on its own appliance until that one is gone."""

    def __init__(self, procs: list[ApplianceProc], clients: int) -> None:
        self.procs = procs
        self.outcomes: Counter[str] = Counter()
        self.running = True
        self.worker_killed = False  # set while a test kills a worker: its clients may drop
        self.group = gevent.pool.Group()
        for k in range(clients):
            self.group.spawn(self._client, k)

    def _client(self, k: int) -> None:
        session = requests.Session()
        while self.running:
            alive = [p for p in self.procs if not p.killed]
            target = alive[k % len(alive)]
            try:
                status = session.post(f"{target.url}/api/generate", json={
                    "model": "tiny", "prompt": "hi", "stream": False}, timeout=10).status_code
                self.outcomes[str(status)] += 1
            except requests.ConnectionError:
                # only a killed appliance (or worker) may drop a connection
                self.outcomes["killed" if target.killed else "worker killed"
                              if self.worker_killed else "dropped"] += 1
                gevent.sleep(0.01)
            except requests.Timeout:
                self.outcomes["unanswered"] += 1

    def stop(self) -> None:
        self.running = False
        self.group.join(timeout=15)
        self.group.kill()


def _epoch(ts: str) -> float:
    import calendar
    import time as _time
    whole, ms = ts.rstrip("Z").split(".")
    return calendar.timegm(_time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


def over_cap_report(nodes: list[Any], caps: list[int], procs: list[ApplianceProc]) -> str:
    """For a failed cap: when each node went over, and every mode change within 2 s of it."""
    lines = []
    for i, (node, cap) in enumerate(zip(nodes, caps, strict=True)):
        for at, active in node.stats.peaks:
            if active <= cap:
                continue
            lines.append(f"n{i} (cap {cap}) reached {active} at {at:.3f}")
            for k, p in enumerate(procs):
                for e in p.events("shared_mode"):
                    t = _epoch(e["ts"])
                    if abs(t - at) < 2:
                        lines.append(f"  proc{k} {e['instance'][-10:]} {t - at:+.3f} s "
                                     f"{e['from']}->{e['to']} ({e['reason'][:60]}) "
                                     f"{len(e['instances'])} instances")
    return "\n".join(lines)

"""The cap invariant with ``server.workers: 2``: one appliance of two worker processes and a
second, single-process appliance share one real ``redis-server`` under load while Redis is
SIGKILLed, restarted empty, SIGSTOPped and SIGCONTed, while the second appliance is
SIGKILLed, then while one of the workers is (the master starts another). The simulated nodes
are the judge (``stats.max_active``: the concurrency they really received). Each worker is an
instance of its own in Redis, with its own id and mode, read from the shared log (whichever
worker answers ``/health``).
"""

from __future__ import annotations

import os
import signal
import time

import redis

from tests.redisserver import needs_redis
from tests.sharedprocs import (
    SHARED,
    ApplianceProc,
    Load,
    more_traffic,
    over_cap_report,
    write_config,
)
from tests.waiting import wait_until


def _newest(proc: ApplianceProc) -> str:
    """The instance id of the worker started last (ids carry the pid)."""
    pid = proc.events("worker_started")[-1]["worker"]
    return next((i for i in proc.modes() if f"-{pid}-" in i), "")


def _only_alive_hold(url: str, caps: list[int], dead: set[str]) -> bool:
    """Redis's leases: every slot taken again, and none by a dead instance."""
    client = redis.Redis.from_url(url, socket_timeout=1)
    try:
        for i, cap in enumerate(caps):
            holders = [m.decode().split("/")[0] for m in client.zrange(
                "{lb}:node:" + f"n{i}:leases", 0, -1)]
            if len(holders) != cap or dead & set(holders):
                return False
        return True
    finally:
        client.close()


@needs_redis
def test_no_node_gets_more_than_its_cap_with_two_workers_and_a_peer_while_redis_fails(
        redis_proc, fake_node, tmp_path):
    caps = [3, 2]
    nodes = [fake_node(["tiny"], profile="fast", decode_tps=100.0) for _ in caps]
    procs = [ApplianceProc(write_config(tmp_path / "workers.yaml", nodes, caps, redis_proc.url,
                                        workers=2), tmp_path / "workers.log", workers=2),
             ApplianceProc(write_config(tmp_path / "single.yaml", nodes, caps, redis_proc.url),
                           tmp_path / "single.log")]

    def everyone(mode: str) -> bool:
        return all(p.all_in(mode) for p in procs)

    load = None
    try:
        for p in procs:
            p.wait_started()
        assert wait_until(lambda: everyone("shared"), timeout=10)
        first_workers = set(procs[0].modes())
        assert len(first_workers) == 2  # each worker is an instance of its own
        load = Load(procs, clients=12)
        assert more_traffic(nodes, 30)  # in shared mode first
        redis_proc.kill()
        assert wait_until(lambda: everyone("local"), timeout=3)
        assert more_traffic(nodes)
        redis_proc.start()  # empty: every lease and the epoch are gone
        assert wait_until(lambda: everyone("shared"), timeout=5)
        assert more_traffic(nodes)
        redis_proc.freeze()
        assert wait_until(lambda: everyone("local"), timeout=3)
        assert more_traffic(nodes)
        redis_proc.thaw()
        assert wait_until(lambda: everyone("shared"), timeout=5)
        assert more_traffic(nodes)
        dead = set(procs[1].modes())
        procs[1].killed = True
        procs[1].p.kill()  # its leases stay in Redis until their TTL
        killed_at = time.monotonic()
        back = wait_until(lambda: _only_alive_hold(redis_proc.url, caps, dead), timeout=5,
                          step=0.02)  # the workers hold every slot: the dead one's expired
        recovered_s = time.monotonic() - killed_at
        assert back, "the dead peer's slots did not come back"
        # a worker dies: the master starts another, a new instance; the dead one's slots expire
        pid = min(procs[0].worker_pids())
        load.worker_killed = True
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        dead_worker = {i for i in first_workers if f"-{pid}-" in i}
        assert dead_worker
        back = wait_until(lambda: _only_alive_hold(redis_proc.url, caps, dead | dead_worker),
                          timeout=5, step=0.02)  # the other worker takes every slot
        worker_recovered_s = time.monotonic() - killed_at
        assert wait_until(lambda: len(procs[0].events("worker_started")) >= 3, timeout=10)
        assert wait_until(lambda: len(procs[0].modes()) >= 3 and procs[0].modes()[
            _newest(procs[0])] == "shared", timeout=10)  # the master's new worker joined
        load.worker_killed = False
        assert more_traffic(nodes)
        load.stop()
    finally:
        if load is not None:
            load.stop()
        for p in procs:
            p.stop()
    assert [n.stats.max_active for n in nodes] == caps, over_cap_report(nodes, caps, procs)
    print(f"capacity back {recovered_s:.2f} s after the peer was killed, "
          f"{worker_recovered_s:.2f} s after a worker was; {load.outcomes}")
    assert recovered_s < SHARED["leaseTtlMs"] / 1000 + 1.5, recovered_s
    assert back and worker_recovered_s < SHARED["leaseTtlMs"] / 1000 + 1.5, worker_recovered_s
    assert load.outcomes["dropped"] == 0 and load.outcomes["unanswered"] == 0, load.outcomes
    ok = load.outcomes["200"]  # 150-310 here (2 cores); the ratio is what is judged
    assert ok > 60 and ok > 0.9 * (ok + load.outcomes["503"]), load.outcomes
    for instance in first_workers:  # both workers went through both outages
        went = [e["to"] for e in procs[0].events("shared_mode") if e["instance"] == instance]
        assert went.count("local") >= 2, went

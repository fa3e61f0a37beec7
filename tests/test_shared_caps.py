"""Shared node caps in Redis (``sharedState.redisUrl``): exact across instances, and safe
while Redis dies, restarts empty, freezes, and while an instance dies.

A real ``redis-server`` (Debian package) runs on a free port with no persistence; without it
these tests skip and say why (in CI that skip fails). The simulated nodes are the judge: their
``stats.max_active`` is the concurrency they actually received, whatever the appliances
believe.
"""

from __future__ import annotations

import statistics
import time

import gevent
import requests

from pipeline.shared.fallback import allowance, share
from pipeline.shared.leases import FULL, GRANTED, RedisLeases
from tests.redisserver import free_port, needs_redis
from tests.sharedprocs import (
    SHARED,
    ApplianceProc,
    Load,
    more_traffic,
    over_cap_report,
    served,
    write_config,
)
from tests.waiting import wait_until

# --- local shares ------------------------------------------------------------------------------

def test_local_shares_add_up_exactly_to_the_cap_for_every_instance_set():
    for cap in range(12):
        for n in range(1, 6):
            ids = [f"i{k}" for k in range(n)]
            for node in ("n0", "n1", "gpu-17"):
                parts = [share(cap, ids, me, node) for me in ids]
                assert sum(parts) == cap and max(parts) - min(parts) <= 1


def test_right_after_an_outage_an_instance_keeps_at_most_what_it_held():
    ids = ["a", "b"]
    assert allowance(3, ids, "a", "n0", held_then=1, in_grace=True) <= 1
    assert allowance(3, ids, "a", "n0", held_then=None, in_grace=True) == share(3, ids, "a",
                                                                                 "n0")
    assert allowance(3, ids, "a", "n0", held_then=0, in_grace=False) == share(3, ids, "a",
                                                                               "n0")


# --- the Redis side ----------------------------------------------------------------------------

def _epoch(store: RedisLeases) -> str:
    epoch, _, _ = store.renew("e1", "x", 1000, 1000, True, [], 0)
    assert epoch is not None
    return epoch


def test_a_dead_instances_leases_come_back_after_their_ttl(redis_proc):
    store = RedisLeases(redis_proc.url, "t", 0.2)
    try:
        epoch = _epoch(store)
        assert store.acquire(epoch, "n0", "dead/1", 600, 2)[0] == GRANTED
        assert store.acquire(epoch, "n0", "dead/2", 600, 2)[0] == GRANTED
        assert store.acquire(epoch, "n0", "alive/1", 600, 2) == (FULL, 2)
        t0 = time.monotonic()
        assert wait_until(lambda: store.acquire(epoch, "n0", "alive/1", 600, 2)[0] == GRANTED,
                          timeout=3)
        assert time.monotonic() - t0 < 1.0
    finally:
        store.close()


def test_acquire_is_atomic_across_instances_hammering_one_node(redis_proc):
    stores = [RedisLeases(redis_proc.url, "t", 0.5) for _ in range(4)]
    epoch = _epoch(stores[0])
    holding: set[str] = set()
    peak = [0]

    def worker(k: int, store: RedisLeases) -> None:
        for i in range(40):
            lease = f"i{k}/{i}"
            if store.acquire(epoch, "n0", lease, 5000, 3)[0] == GRANTED:
                holding.add(lease)
                peak[0] = max(peak[0], len(holding))
                gevent.sleep(0.001)
                holding.discard(lease)
                store.release([("n0", lease)])

    try:
        gevent.joinall([gevent.spawn(worker, k * 4 + j, s) for k, s in enumerate(stores)
                        for j in range(4)], timeout=20, raise_error=True)
        assert peak[0] == 3
    finally:
        for s in stores:
            s.close()


def test_redis_acquire_and_release_cost_on_loopback(redis_proc):
    """Measured, not judged: printed for the report (a hang or a pathological cost fails)."""
    store = RedisLeases(redis_proc.url, "t", 0.2)
    try:
        epoch = _epoch(store)
        costs = []
        for i in range(300):
            t0 = time.perf_counter()
            assert store.acquire(epoch, "n0", f"m/{i}", 5000, 4)[0] == GRANTED
            store.release([("n0", f"m/{i}")])
            costs.append(time.perf_counter() - t0)
        costs.sort()
        med, p99 = statistics.median(costs), costs[int(len(costs) * 0.99)]
        print(f"acquire+release on loopback: median {med * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us")
        assert med < 0.05
    finally:
        store.close()


# --- two appliances in this process ------------------------------------------------------------

def _generate(url: str, timeout: float = 10.0) -> int:
    r = requests.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi",
                                                    "stream": False}, timeout=timeout)
    return r.status_code


def test_two_appliances_share_one_cap_exactly(redis_proc, fake_node, appliance):
    node = fake_node(["tiny"], profile="fast", decode_tps=200.0)
    shared = {"redisUrl": redis_proc.url, **SHARED}
    apps = [appliance([node], sharedState=shared,
                      node_overrides={0: {"maxConcurrentRequests": 2}}) for _ in range(2)]
    urls = [f"http://127.0.0.1:{a.port}" for a in apps]
    assert wait_until(lambda: all(a.factory.shared.mode == "shared" for a in apps), timeout=5)
    jobs = [gevent.spawn(_generate, urls[i % 2]) for i in range(16)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert [j.value for j in jobs] == [200] * 16
    assert node.stats.max_active == 2  # one instance alone would have allowed 2 each: 4
    health = requests.get(f"{urls[0]}/health", timeout=5).json()
    assert health["sharedState"]["mode"] == "shared"
    assert len(health["sharedState"]["instancesAlive"]) == 2
    metrics = requests.get(f"{urls[0]}/metrics", timeout=5).text
    assert 'ollama_lb_shared_mode{mode="shared"} 1.0' in metrics
    assert 'ollama_lb_redis_seconds_count{op="acquire"}' in metrics


def test_unreachable_redis_falls_back_to_local_caps_without_hanging(fake_node, appliance):
    node = fake_node(["tiny"], profile="fast")
    app = appliance([node], sharedState={"redisUrl": f"redis://127.0.0.1:{free_port()}/0",
                                         **SHARED})
    url = f"http://127.0.0.1:{app.port}"
    t0 = time.monotonic()
    assert [_generate(url) for _ in range(5)] == [200] * 5
    assert time.monotonic() - t0 < 3
    shared = requests.get(f"{url}/health", timeout=5).json()["sharedState"]
    assert shared["mode"] == "local"
    assert 'ollama_lb_redis_errors_total{op="renew"}' in requests.get(f"{url}/metrics").text


def test_one_appliance_without_redis_has_no_shared_state(fake_node, appliance):
    node = fake_node(["tiny"], profile="fast")
    app = appliance([node])
    assert app.factory.shared is None and app.factory.pipeline.dispatcher.admit is None
    health = requests.get(f"http://127.0.0.1:{app.port}/health", timeout=5).json()
    assert "sharedState" not in health


# --- the invariant: two appliance processes, Redis failing under load --------------------------

@needs_redis
def test_no_node_ever_gets_more_than_its_cap_while_redis_and_an_instance_fail(
        redis_proc, fake_node, tmp_path):
    caps = [3, 2]
    nodes = [fake_node(["tiny"], profile="fast", decode_tps=100.0) for _ in caps]
    config = write_config(tmp_path / "lb.yaml", nodes, caps, redis_proc.url)
    procs = [ApplianceProc(config, tmp_path / f"a{i}.log") for i in range(2)]
    load = None
    try:
        for p in procs:
            p.wait_started()
        assert wait_until(lambda: all(p.mode() == "shared" for p in procs), timeout=10)
        load = Load(procs, clients=12)
        assert more_traffic(nodes, 30)  # traffic in shared mode: what the phases below start from
        redis_proc.kill()
        assert wait_until(lambda: all(p.mode() == "local" for p in procs), timeout=3)
        assert more_traffic(nodes)
        redis_proc.start()  # empty: every lease and the epoch are gone
        assert wait_until(lambda: all(p.mode() == "shared" for p in procs), timeout=5)
        assert more_traffic(nodes)
        redis_proc.freeze()
        assert wait_until(lambda: all(p.mode() == "local" for p in procs), timeout=3)
        assert more_traffic(nodes)
        redis_proc.thaw()
        assert wait_until(lambda: all(p.mode() == "shared" for p in procs), timeout=5)
        served_before = served(nodes)
        procs[1].killed = True
        procs[1].p.kill()  # its leases stay in Redis until their TTL
        killed_at = time.monotonic()
        back = wait_until(lambda: procs[0].held() == {"n0": caps[0], "n1": caps[1]}, timeout=5,
                          step=0.02)  # the survivor alone holds every slot: the dead one's expired
        recovered_s = time.monotonic() - killed_at
        load.stop()
    finally:
        if load is not None:
            load.stop()
        for p in procs:
            p.stop()
    assert [n.stats.max_active for n in nodes] == caps, over_cap_report(nodes, caps, procs)
    print(f"capacity back {recovered_s:.2f} s after an instance was killed; {load.outcomes}")
    assert back and recovered_s < SHARED["leaseTtlMs"] / 1000 + 1.5, recovered_s
    assert served(nodes) > served_before
    assert load.outcomes["dropped"] == 0 and load.outcomes["unanswered"] == 0, load.outcomes
    ok = load.outcomes["200"]
    assert ok > 100 and ok > 0.9 * (ok + load.outcomes["503"]), load.outcomes
    changes = procs[0].events("shared_mode")
    assert [e["to"] for e in changes].count("local") >= 2, changes

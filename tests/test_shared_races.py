"""Races between an instance's heartbeat and its own requests, forced at the exact point.

A heartbeat reads the instance's holdings (its leases held and on their way), then sends
them to Redis, whose renewal deletes the instance's leases that were in neither list
(releases that never reached Redis). Between the read and Redis running the renewal there
can be a yield (a new connection, a script reloaded after a restart) and the requests run
on other connections: a request can acquire its lease in that gap. The cap-invariant test
caught it under CPU contention (a node of cap 3 got 4); here the gap is held open by a hook
at that point, so the order is certain rather than likely. Real ``redis-server``, real
appliances in this process, the official ``ollama`` client, the simulated node as judge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import ollama
import pytest

from app.keys import hash_key, new_key
from app.security import Security
from tests.redisserver import needs_redis
from tests.sharedprocs import SHARED
from tests.waiting import wait_until


def _generate(url: str, key: str | None = None, tokens: int = 30) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return ollama.Client(host=url, headers=headers).generate(
        model="tiny", prompt="hi", options={"num_predict": tokens}).response


def _hold_heartbeat_open(store: Any, meanwhile: Callable[[], None], attr: str) -> list[str]:
    """Wrap ``store.<attr>`` (the renewal) once: its arguments are the holdings already
    read; ``meanwhile`` runs to completion before Redis gets them. Returns the phases seen:
    "gap" once ``meanwhile`` ran, then "renewed" once Redis answered that renewal."""
    real = getattr(store, attr)
    phases: list[str] = []

    def renew(*args: Any, **kwargs: Any) -> Any:
        if phases:
            return real(*args, **kwargs)
        meanwhile()
        phases.append("gap")
        try:
            return real(*args, **kwargs)
        finally:
            phases.append("renewed")

    setattr(store, attr, renew)
    return phases


@needs_redis
def test_a_heartbeat_never_deletes_a_node_lease_acquired_while_it_was_on_its_way(
        redis_proc, fake_node, appliance):
    node = fake_node(["tiny"], profile="fast", decode_tps=20.0)  # 30 tokens: 1.5 s
    shared = {"redisUrl": redis_proc.url, **SHARED}
    apps = [appliance([node], sharedState=shared,
                      node_overrides={0: {"maxConcurrentRequests": 1}}) for _ in range(2)]
    assert wait_until(lambda: all(a.factory.shared.mode == "shared" for a in apps), timeout=5)
    first = apps[0].factory.shared
    nid = first.registry.all_nodes()[0].id
    urls = [f"http://127.0.0.1:{a.port}" for a in apps]
    jobs: list[gevent.Greenlet] = []

    def request_in_the_gap() -> None:
        jobs.append(gevent.spawn(_generate, urls[0]))
        assert wait_until(lambda: node.stats.active == 1 and first.held, timeout=5, step=0.01)

    phases = _hold_heartbeat_open(first.store, request_in_the_gap, "renew")
    assert wait_until(lambda: "renewed" in phases, timeout=5, step=0.01)
    assert node.stats.active == 1 and first.held  # the request is still on the node ...
    assert first.counts[nid] == 1  # ... and Redis still counts its lease
    jobs.append(gevent.spawn(_generate, urls[1]))  # the other instance: must wait its turn
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert all(j.value for j in jobs)
    assert node.stats.max_active == 1  # had the renewal deleted the lease: 2


@needs_redis
def test_a_heartbeat_never_deletes_a_keys_place_taken_while_it_was_on_its_way(
        redis_proc, fake_node, appliance):
    """Limits renew only while a place is held: one request runs through the whole test,
    the second takes its place in the gap, a third (on the other instance) must be refused."""
    key = new_key()
    node = fake_node(["tiny"], profile="fast", decode_tps=20.0)  # 20 tokens a second
    security = {"apiKeys": [{"name": "team", "hash": hash_key(key), "maxConcurrent": 2}]}
    apps = [appliance([node], security=security,
                      sharedState={"redisUrl": redis_proc.url, **SHARED}) for _ in range(2)]
    limits = [Security.of(a.factory).shared_limits for a in apps]
    assert wait_until(lambda: all(s.mode == "shared" for s in limits), timeout=5)
    urls = [f"http://127.0.0.1:{a.port}" for a in apps]
    jobs = [gevent.spawn(_generate, urls[0], key, 80)]  # 4 s: held throughout
    assert wait_until(lambda: node.stats.active == 1, timeout=5, step=0.01)

    def request_in_the_gap() -> None:
        jobs.append(gevent.spawn(_generate, urls[0], key))
        assert wait_until(lambda: node.stats.active == 2, timeout=5, step=0.01)

    phases = _hold_heartbeat_open(limits[0].store, request_in_the_gap, "renew")
    assert wait_until(lambda: "renewed" in phases, timeout=5, step=0.01)
    assert node.stats.active == 2  # both still running: the key's two places are taken
    with pytest.raises(ollama.ResponseError) as refused:
        _generate(urls[1], key)
    assert refused.value.status_code == 429
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert all(j.value for j in jobs) and node.stats.max_active == 2

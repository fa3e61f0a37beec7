"""``sharedState.redisUrl`` through Redis Sentinel: ``redis+sentinel://host[:port],.../MASTER/DB``.

Real parts only: a real ``redis-server`` master and replica and a real Sentinel
(``redis-server --sentinel``, the same Debian package) on free loopback ports. The appliance
asks the sentinel for the master; the test makes the sentinel fail over to the replica and
checks, under load, that both appliances follow the master the sentinel names, with the cap
still exact and every request answered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import ollama
import pytest
import redis
import requests

from app.keys import hash_key, new_key
from app.security import Security
from pipeline.config import ConfigError, parse_config
from pipeline.config_shared import parse_sentinel_url
from pipeline.shared.connect import CLIENT_NAME
from pipeline.shared.leases import GRANTED, RedisLeases
from tests.redisserver import RedisProc, SentinelProc
from tests.waiting import wait_until

SHARED = {"leaseTtlMs": 2000, "heartbeatMs": 250, "timeoutMs": 200, "localGraceMs": 1000}


@pytest.fixture
def sentinel(redis_proc: RedisProc, tmp_path: Path) -> Iterator[SentinelProc]:
    proc = SentinelProc(redis_proc, tmp_path).start()
    yield proc
    proc.stop()


def _config(url: str) -> dict:
    return {"nodes": [{"id": "n0", "url": "http://127.0.0.1:1"}], "sharedState": {
        "redisUrl": url}}


# --- the URL form ------------------------------------------------------------------------------

def test_a_sentinel_url_names_its_members_master_database_and_credentials():
    url = parse_sentinel_url("redis+sentinel://app:s%3Acret@s1:26380,s2,10.0.0.9:5000"
                             "/lb-state/3?sentinel_password=sp")
    assert url.sentinels == (("s1", 26380), ("s2", 26379), ("10.0.0.9", 5000))
    assert (url.master, url.db, url.username, url.password) == ("lb-state", 3, "app", "s:cret")
    assert (url.sentinel_username, url.sentinel_password) == (None, "sp")
    assert parse_sentinel_url("redis+sentinel://:pw@s1/m").password == "pw"
    assert parse_sentinel_url("redis+sentinel://s1/m").db == 0
    cfg = parse_config(_config("redis+sentinel://s1:26379,s2:26379/mymaster/0"))
    assert cfg.sharedState.redisUrl == "redis+sentinel://s1:26379,s2:26379/mymaster/0"


@pytest.mark.parametrize("url, says", [
    ("redis+sentinel://s1:26379", "/MASTERNAME"),
    ("redis+sentinel://s1:26379/", "/MASTERNAME"),
    ("redis+sentinel:///mymaster", "at least one sentinel"),
    ("redis+sentinel://s1:26379,/mymaster", "sentinel member ''"),
    ("redis+sentinel://s1:0/mymaster", "1-65535"),
    ("redis+sentinel://s1:port/mymaster", "1-65535"),
    ("redis+sentinel://s1/mymaster/zero", "must be a number"),
    ("redis+sentinel://s1/mymaster/0/extra", "/MASTERNAME or /MASTERNAME/DB"),
    ("redis+sentinel://s1/mymaster?socket_timeout=5", "unknown option(s) socket_timeout"),
    ("sentinel://s1:26379/mymaster", "redis+sentinel://host[:port][,...]/MASTER[/DB]"),
])
def test_a_bad_sentinel_url_is_a_config_error_that_says_what_is_wrong(url, says):
    with pytest.raises(ConfigError) as err:
        parse_config(_config(url))
    assert any(p.startswith("sharedState.redisUrl:") and says in p
               for p in err.value.problems), err.value.problems


# --- leases through a real sentinel ------------------------------------------------------------

def test_leases_go_to_the_master_the_sentinel_names(redis_proc, sentinel):
    store = RedisLeases(sentinel.url, "t", 0.2)
    direct = redis.Redis.from_url(redis_proc.url)
    try:
        epoch, _, _ = store.renew("e1", "x", 5000, 5000, True, [], 0)
        assert epoch is not None
        assert store.acquire(epoch, "n0", "x/1", 5000, 2)[0] == GRANTED
        assert direct.zcard(store.node_key("n0")) == 1  # written on the master itself
        store.release([("n0", "x/1")])
        assert direct.zcard(store.node_key("n0")) == 0
    finally:
        store.close()
        direct.close()


def test_no_sentinel_answering_is_an_outage_bounded_by_the_timeout(redis_proc, tmp_path):
    from tests.redisserver import free_port
    store = RedisLeases(f"redis+sentinel://127.0.0.1:{free_port()}/lbstate/0", "t", 0.1)
    try:
        with pytest.raises(redis.ConnectionError):
            store.renew("e1", "x", 5000, 5000, True, [], 0)
    finally:
        store.close()


def _generate(url: str) -> int:
    return requests.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi",
                                                       "stream": False},
                         timeout=10).status_code


def _batch(urls: list[str], n: int) -> list[int]:
    jobs = [gevent.spawn(_generate, urls[i % len(urls)]) for i in range(n)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    return [j.value for j in jobs]


class _Load:
    """Closed-loop clients on both appliances until ``stop()`` (bounded: 10 s a request)."""

    def __init__(self, urls: list[str], clients: int) -> None:
        self.statuses: list[int | str] = []
        self.running = True
        self.jobs = [gevent.spawn(self._client, urls[k % len(urls)]) for k in range(clients)]

    def _client(self, url: str) -> None:
        with requests.Session() as session:
            while self.running:
                try:
                    self.statuses.append(session.post(f"{url}/api/generate", json={
                        "model": "tiny", "prompt": "hi", "stream": False},
                        timeout=10).status_code)
                except requests.RequestException as exc:
                    self.statuses.append(type(exc).__name__)

    def stop(self) -> None:
        self.running = False
        gevent.joinall(self.jobs, timeout=15)


def test_two_appliances_follow_a_sentinel_failover_with_the_cap_exact(
        fake_node, appliance, replicated):
    replica, sentinel = replicated
    node = fake_node(["tiny"], profile="fast", decode_tps=200.0)
    apps = [appliance([node], sharedState={"redisUrl": sentinel.url, **SHARED},
                      node_overrides={0: {"maxConcurrentRequests": 2}}) for _ in range(2)]
    urls = [f"http://127.0.0.1:{a.port}" for a in apps]
    assert wait_until(lambda: all(a.factory.shared.mode == "shared" for a in apps), 5)
    assert _batch(urls, 12) == [200] * 12
    assert node.stats.max_active == 2

    changes_before = [_changes(a) for a in apps]
    load = _Load(urls, clients=8)  # the failover happens under load
    new_master = redis.Redis(port=replica.port)
    try:
        t0 = time.monotonic()
        assert sentinel.failover()
        assert wait_until(lambda: sentinel.master_port() == replica.port, timeout=10)
        # both instances talk to the new master only, in shared mode again
        assert wait_until(lambda: all(
            a.factory.shared.store.pool.master_address == ("127.0.0.1", replica.port)
            and a.factory.shared.mode == "shared" for a in apps), timeout=10)
        followed_s = time.monotonic() - t0
        changes = [_changes(a) - b for a, b in zip(apps, changes_before, strict=True)]
        served = len(load.statuses)
        assert wait_until(lambda: len(load.statuses) >= served + 20, timeout=5)
        load.stop()
        print(f"both instances shared on the new master {followed_s:.2f} s after "
              f"SENTINEL FAILOVER; mode changes {changes}; {len(load.statuses)} requests")
        assert set(load.statuses) == {200}, load.statuses
        assert _batch(urls, 12) == [200] * 12
        assert node.stats.max_active == 2, "a node got more than its cap"
        assert new_master.exists("{lb}:epoch")
    finally:
        load.stop()
        new_master.close()


def _changes(app: object) -> float:
    """How many mode changes the instance made (its own metric)."""
    counter = app.factory.shared.metrics.mode_changes  # type: ignore[attr-defined]
    return sum(s.value for m in counter.collect() for s in m.samples
               if s.name.endswith("_total"))


def _link_up(port: int) -> bool:
    """The replica's link to its master is up (it has the master's data)."""
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def replicated(redis_proc: RedisProc, tmp_path: Path) -> Iterator[tuple[RedisProc, SentinelProc]]:
    """A replica of ``redis_proc`` and a sentinel that knows both: ready to fail over."""
    replica = RedisProc(replica_of=redis_proc).start()
    sentinel = SentinelProc(redis_proc, tmp_path).start()
    try:
        assert wait_until(lambda: _link_up(replica.port), timeout=10)
        assert wait_until(lambda: str(replica.port).encode() in sentinel.command(
            "SENTINEL", "REPLICAS", SentinelProc.MASTER_NAME), timeout=15)
        yield replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()


def test_an_instance_leaves_the_old_master_on_the_sentinels_switch_not_a_heartbeat_later(
        fake_node, appliance, replicated):
    replica, sentinel = replicated
    node = fake_node(["tiny"], profile="fast")
    slow = {**SHARED, "heartbeatMs": 5000}  # a heartbeat alone would notice up to 5 s later
    app = appliance([node], sharedState={"redisUrl": sentinel.url, **slow})
    caps = app.factory.shared
    assert wait_until(lambda: caps.mode == "rejoining", timeout=5)
    assert _generate(f"http://127.0.0.1:{app.port}") == 200  # a connection to the master
    assert caps.store.pool.master_address == ("127.0.0.1", sentinel.master.port)
    assert sentinel.failover()
    t0 = time.monotonic()
    assert wait_until(lambda: caps.store.pool.master_address == ("127.0.0.1", replica.port),
                      timeout=4.5, step=0.01)
    print(f"left the old master {time.monotonic() - t0:.2f} s after SENTINEL FAILOVER")
    assert caps.mode == "local"  # and rejoins on the new master at its next heartbeat


def _data_connections(port: int) -> int:
    """The appliance's connections on that Redis (it names them; the sentinel's and the
    replica's are not)."""
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return sum(1 for c in client.client_list() if c.get("name") == CLIENT_NAME)
    finally:
        client.close()


def _mode_changes(limits: Any) -> list[tuple[str, str]]:
    """(to, reason) of each mode change the limits make from now on."""
    changes: list[tuple[str, str]] = []
    enter = limits._enter

    def recorded(mode: Any, why: str) -> None:
        changes.append((mode.value, why))
        enter(mode, why)

    limits._enter = recorded
    return changes


def test_key_limits_leave_the_old_master_with_the_caps(fake_node, appliance, replicated):
    """Per-key limits count in the same Redis as the caps: when the caps see the sentinel
    name a new master, no limit is counted on the old one any more (not by a kept
    connection either), and the limits go local to rejoin on the new master, re-asserting
    their places (replication is asynchronous: the new master may lack the latest)."""
    replica, sentinel = replicated
    key = new_key()
    node = fake_node(["tiny"], profile="fast")
    slow = {**SHARED, "heartbeatMs": 5000}  # nothing periodic: the switch alone must do it
    app = appliance([node], sharedState={"redisUrl": sentinel.url, **slow}, security={
        "apiKeys": [{"name": "team", "hash": hash_key(key), "requestsPerMinute": 1000}]})
    caps, limits = app.factory.shared, Security.of(app.factory).shared_limits
    client = ollama.Client(host=f"http://127.0.0.1:{app.port}",
                           headers={"Authorization": f"Bearer {key}"})
    assert wait_until(lambda: limits.mode != "local", timeout=5)
    changes = _mode_changes(limits)
    assert client.generate(model="tiny", prompt="hi").done  # counted on the master
    old = sentinel.master.port
    assert _data_connections(old) >= 1
    assert sentinel.failover()
    assert wait_until(lambda: caps.store.pool.master_address == ("127.0.0.1", replica.port),
                      timeout=4.5, step=0.01)
    assert client.generate(model="tiny", prompt="hi").done
    assert wait_until(lambda: _data_connections(old) == 0, timeout=3), "still on the old master"
    assert ("local", "Sentinel failover: rejoining on the new master") in changes, changes

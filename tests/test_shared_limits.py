"""Per-key limits shared across instances through Redis (``sharedState.redisUrl``).

Two appliances in this process (and one in a process of its own, to be SIGKILLed) share a
real ``redis-server``: a key's requests per minute, requests in flight and tokens per day hold
across them; with Redis gone each falls back at once to its share and nothing hangs; a crashed
instance's places come back within the lease TTL. Real clients (``ollama`` with headers=,
``openai`` with api_key=) see the refusals.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import ollama
import openai
import pytest
import redis
import requests
import yaml

from app.keys import hash_key, new_key
from app.security import Security
from pipeline.shared.quotas import RedisQuotas
from tests.redisserver import free_port, needs_redis
from tests.sharedprocs import ApplianceProc
from tests.waiting import wait_until

TEAM, ROOT = new_key(), new_key()
# timeoutMs: short, but not so short that a loaded 2-core VM turns a slow reply into local mode
SHARED = {"leaseTtlMs": 1500, "heartbeatMs": 200, "timeoutMs": 300, "localGraceMs": 500}
HEALTH_PATHS = {"/api/version", "/api/tags", "/api/ps"}


def keys(**limits) -> dict:
    return {"apiKeys": [{"name": "team", "hash": hash_key(TEAM), **limits},
                        {"name": "root", "hash": hash_key(ROOT), "scopes": ["admin"]}]}


def bearer(key: str = TEAM) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pair(appliance, node, url: str, **limits):
    """Two appliances on one Redis, both in shared mode for limits."""
    apps = [appliance([node], security=keys(**limits),
                      sharedState={"redisUrl": url, **SHARED}) for _ in range(2)]
    assert wait_until(lambda: all(limits_mode(a) == "shared" for a in apps), timeout=5)
    return apps


def limits_mode(app) -> str:
    return requests.get(f"{app.url}/health", timeout=2).json()["sharedState"]["limits"]["mode"]


def traffic(node) -> int:
    return sum(n for p, n in node.stats.by_path.items() if p not in HEALTH_PATHS)


def generate(app, prompt: str = "x") -> requests.Response:
    return requests.post(f"{app.url}/api/generate", json={
        "model": "m", "prompt": prompt, "stream": False, "options": {"num_predict": 3}},
        headers=bearer(), timeout=5)


@needs_redis
def test_one_admission_script_is_atomic_across_stores(redis_proc):
    """Four stores (instances) hammering one principal: never more than the cap in flight,
    and exactly the bucket's tokens handed out."""
    stores = [RedisQuotas.from_url(redis_proc.url, "t", 0.5) for _ in range(4)]
    epoch = stores[0].renew("e1", True, 1000, "x/", [], 0)
    holding: set[str] = set()
    peak, granted, day = [0], [0], int(time.time() // 86400)

    def worker(k: int, store: RedisQuotas) -> None:
        for i in range(30):
            lease = f"i{k}/{i}"
            code, _ = store.admit(epoch, "k:c", lease, 5000, 0, 3, 0, True, day)
            if code == 1:
                holding.add(lease)
                peak[0] = max(peak[0], len(holding))
                gevent.sleep(0.001)
                holding.discard(lease)
                store.flush(epoch, {"k:c": [lease]}, {})
            if store.admit(epoch, "k:r", "", 5000, 50, 0, 0, True, day)[0] == 1:
                granted[0] += 1

    try:
        t0 = time.monotonic()
        gevent.joinall([gevent.spawn(worker, k * 3 + j, s) for k, s in enumerate(stores)
                        for j in range(3)], timeout=20, raise_error=True)
        refilled = (time.monotonic() - t0) * 50 / 60
        assert peak[0] == 3
        assert 50 <= granted[0] <= 50 + refilled + 1  # a minute's worth, and what refilled
    finally:
        for store in stores:
            store.close()


@needs_redis
def test_client_address_limits_without_keys_are_shared_too(redis_proc, fake_node, appliance):
    node = fake_node(["m"])
    apps = [appliance([node], security={"clientLimits": {"requestsPerMinute": 2}},
                      sharedState={"redisUrl": redis_proc.url, **SHARED}) for _ in range(2)]
    assert wait_until(lambda: all(limits_mode(a) == "shared" for a in apps), timeout=5)
    codes = [ollama_status(a) for a in (apps[0], apps[1], apps[1])]
    assert codes == [200, 200, 429]


def ollama_status(app) -> int:
    try:
        ollama.Client(host=app.url).generate(model="m", prompt="x", options={"num_predict": 2})
    except ollama.ResponseError as exc:
        return exc.status_code
    return 200


@needs_redis
def test_requests_per_minute_hold_across_two_instances(redis_proc, fake_node, appliance):
    node = fake_node(["m"])
    a, b = pair(appliance, node, redis_proc.url, requestsPerMinute=4)
    for app in (a, b):  # 2 + 2: one bucket of 4 for both, not 4 each
        client = ollama.Client(host=app.url, headers=bearer())
        assert client.generate(model="m", prompt="x").done
        assert client.generate(model="m", prompt="x").done
    before = traffic(node)
    r = generate(b)
    assert r.status_code == 429 and "4 requests per minute" in r.json()["error"]
    assert 1 <= int(r.headers["Retry-After"]) <= 15  # a token comes back every 15 s
    oa = openai.OpenAI(base_url=f"{a.url}/v1", api_key=TEAM, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "rate_limit_exceeded"
    assert traffic(node) == before  # refused before reaching the node
    metrics = requests.get(f"{a.url}/metrics", headers=bearer(ROOT), timeout=5).text
    assert 'ollama_lb_shared_limits_mode{mode="shared"} 1.0' in metrics
    assert 'ollama_lb_redis_seconds_count{op="limits_admit"}' in metrics


@needs_redis
def test_max_concurrent_holds_across_instances_and_places_come_back(redis_proc, fake_node,
                                                                   appliance):
    node = fake_node(["m"], decode_tps=20, tokens=10)  # a 0.5 s stream
    a, b = pair(appliance, node, redis_proc.url, maxConcurrent=1)
    stream = iter(ollama.Client(host=a.url, headers=bearer()).generate(
        model="m", prompt="x", stream=True))
    assert not next(stream).done
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=b.url, headers=bearer()).generate(model="m", prompt="y")
    assert err.value.status_code == 429 and "in flight" in err.value.error
    assert list(stream)[-1].done
    # the release reaches Redis behind the reply, in a batch: B admits soon after
    assert wait_until(lambda: generate(b, "y").status_code == 200, timeout=3)


@needs_redis
def test_tokens_per_day_are_counted_across_instances(redis_proc, fake_node, appliance):
    node = fake_node(["m"])
    a, b = pair(appliance, node, redis_proc.url, tokensPerDay=40)
    store = RedisQuotas(redis.Redis.from_url(redis_proc.url), "lb")
    day = int(time.time() // 86400)
    client = ollama.Client(host=a.url, headers=bearer())
    spent = 0
    for _ in range(20):  # bounded: each reply reports prompt + completion tokens
        reply = client.generate(model="m", prompt="why is the sky blue")
        spent += reply.prompt_eval_count + reply.eval_count
        if spent >= 40:
            break
    assert spent >= 40
    assert wait_until(lambda: store.used("k:team", day) == spent, timeout=3)  # written behind
    oa = openai.OpenAI(base_url=f"{b.url}/v1", api_key=TEAM, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:  # B itself never served a token
        oa.completions.create(model="m", prompt="x")
    assert err.value.body["type"] == "tokens"
    r = requests.post(f"{b.url}/api/embed", json={"model": "m", "input": "x"},
                      headers=bearer(), timeout=5)
    assert r.status_code == 429 and f"used {spent} of 40 tokens" in r.json()["error"]
    assert requests.get(f"{b.url}/admin/usage", headers=bearer(ROOT),
                        timeout=5).json()["keys"]["team"]["today"]["tokens"] == 0
    store.client.close()


@needs_redis
def test_without_redis_each_instance_limits_its_share_and_nothing_hangs(redis_proc, fake_node,
                                                                       appliance):
    node = fake_node(["m"])
    a, b = pair(appliance, node, redis_proc.url, requestsPerMinute=8, tokensPerDay=10**6)
    redis_proc.freeze()  # Redis stops answering: no request waits past the timeout
    t0 = time.monotonic()
    assert generate(a).status_code == 200
    assert time.monotonic() - t0 < 2.0  # caps and limits: one timeout (0.3 s) each at most
    assert limits_mode(a) == "local"
    redis_proc.kill()  # and now refuses connections
    codes, t0 = [], time.monotonic()
    for _ in range(6):
        codes.append(generate(b).status_code)
    assert time.monotonic() - t0 < 3
    assert codes == [200] * 4 + [429] * 2  # B's share: 8 split over the 2 instances alive
    metrics = requests.get(f"{b.url}/metrics", headers=bearer(ROOT), timeout=5).text
    assert 'ollama_lb_shared_limits_mode{mode="local"} 1.0' in metrics
    assert 'ollama_lb_redis_errors_total{op="limits_' in metrics  # admit or renew: first to fail
    redis_proc.start()  # back, empty: both rejoin, and the limits are shared again
    assert wait_until(lambda: all(limits_mode(x) == "shared" for x in (a, b)), timeout=5)
    # Redis lost today's count: each instance added its own usage back (5 replies in all)
    used = [requests.get(f"{x.url}/admin/usage", headers=bearer(ROOT), timeout=5).json()[
        "keys"]["team"]["today"]["tokens"] for x in (a, b)]
    store = RedisQuotas(redis.Redis.from_url(redis_proc.url), "lb")
    assert all(used) and store.used("k:team", int(time.time() // 86400)) == sum(used)
    store.client.close()
    assert generate(a).status_code == 200  # a shared bucket again: full after the restart


def test_redis_unreachable_from_the_start_limits_locally_at_once(fake_node, appliance):
    node = fake_node(["m"])
    app = appliance([node], security=keys(requestsPerMinute=2, maxConcurrent=1),
                    sharedState={"redisUrl": f"redis://127.0.0.1:{free_port()}/0", **SHARED})
    assert limits_mode(app) == "local"
    t0 = time.monotonic()
    assert [generate(app).status_code for _ in range(3)] == [200, 200, 429]
    assert time.monotonic() - t0 < 2  # no request waits on a Redis that is not there


def _config(path: Path, node, redis_url: str) -> Path:
    cfg = {"server": {"host": "127.0.0.1", "port": 0, "drainSeconds": 1},
           "nodes": [{"id": "n0", "url": node.url, "maxConcurrentRequests": 4}],
           "healthCheck": {"intervalMs": 500, "modelRefreshMs": 500},
           "logging": {"level": "WARNING"},
           "security": keys(maxConcurrent=1),
           "sharedState": {"redisUrl": redis_url, **SHARED}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stream_from(url: str) -> tuple[requests.Response, Iterator[bytes]]:
    """A stream that has started (the appliance may still be learning the node's models).
    Its line iterator is kept: a collected one closes the connection (urllib3)."""
    got: list[tuple[requests.Response, Iterator[bytes]]] = []

    def started() -> bool:
        r = requests.post(f"{url}/api/generate", json={"model": "m", "prompt": "x"},
                          headers=bearer(), stream=True, timeout=10)
        lines = r.iter_lines()
        if r.status_code == 200 and next(lines):
            got.append((r, lines))
            return True
        r.close()
        return False

    assert wait_until(started, timeout=10)
    return got[0]


@needs_redis
def test_a_crashed_instances_places_come_back_within_the_lease_ttl(redis_proc, fake_node,
                                                                   appliance, tmp_path):
    node = fake_node(["m"], decode_tps=10, tokens=200)  # a 20 s stream
    proc = ApplianceProc(_config(tmp_path / "a.yaml", node, redis_proc.url), tmp_path / "a.log")
    try:
        proc.wait_started()
        assert wait_until(lambda: requests.get(f"{proc.url}/health", timeout=2).json()[
            "sharedState"]["limits"]["mode"] == "shared", timeout=10)
        held, _lines = _stream_from(proc.url)  # its one place, held by a process about to die
        b = appliance([node], security=keys(maxConcurrent=1),
                      sharedState={"redisUrl": redis_proc.url, **SHARED})
        assert wait_until(lambda: limits_mode(b) == "shared", timeout=5)
        assert generate(b).status_code == 429  # the place is the other instance's
        proc.p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_until(lambda: generate(b).status_code == 200, timeout=5)
        assert time.monotonic() - t0 < SHARED["leaseTtlMs"] / 1000 + 1.0
        held.close()
    finally:
        proc.stop()


@needs_redis
def test_shared_admission_cost_on_loopback(redis_proc, fake_node, appliance):
    """Measured, not judged: admit + release per request, shared vs local (printed)."""
    node = fake_node(["m"])
    limits = {"requestsPerMinute": 10**6, "maxConcurrent": 100, "tokensPerDay": 10**9}
    local = appliance([node], security=keys(**limits))
    shared = appliance([node], security=keys(**limits),
                       sharedState={"redisUrl": redis_proc.url, **SHARED})
    assert wait_until(lambda: limits_mode(shared) == "shared", timeout=5)
    medians = {}
    for name, app in (("local", local), ("shared", shared)):
        sec = Security.of(app.factory)
        key = sec.keyring.by_name["team"]
        costs = []
        for _ in range(400):
            t0 = time.perf_counter()
            sec.admit_key(key, True).release()
            costs.append(time.perf_counter() - t0)
            gevent.sleep(0)  # the rest of a request: the writer sends the release
        medians[name] = statistics.median(costs)
    print(f"admission + release: local {medians['local'] * 1e6:.1f} us, shared "
          f"{medians['shared'] * 1e6:.1f} us (median of 400)")
    assert medians["shared"] < 0.05


def spend(app, until: int) -> int:
    """Small replies with the key until ``until`` tokens are spent, or a refusal."""
    client, spent = ollama.Client(host=app.url, headers=bearer()), 0
    for _ in range(40):  # bounded
        try:
            reply = client.generate(model="m", prompt="x", options={"num_predict": 3})
        except ollama.ResponseError as exc:
            assert exc.status_code == 429
            break
        spent += reply.prompt_eval_count + reply.eval_count
        if spent >= until:
            break
    return spent


@needs_redis
def test_a_new_utc_day_starts_from_zero_in_local_mode_too(redis_proc, fake_node, appliance,
                                                          monkeypatch):
    """What Redis last counted is yesterday's once the UTC day turns: an instance that lost
    Redis must not count tokens others spent yesterday against a key's quota today. (The day
    is the one clock a test cannot wait for: ``utc_day`` is moved on by one.)"""
    node = fake_node(["m"])
    a, b = pair(appliance, node, redis_proc.url, tokensPerDay=40)
    assert 28 <= spend(b, 28) < 40  # the other instance spends most of today's quota
    assert spend(a, 1) > 0  # A admits once: what Redis counted (28 or more) is what it saw
    tomorrow = int(time.time() // 86400) + 1
    for where in ("app.sharedlimits", "app.security", "app.usage", "app.usagestore"):
        monkeypatch.setattr(f"{where}.utc_day", lambda wall=None: tomorrow)
    redis_proc.kill()  # local mode: A's share of a fresh day is 20 tokens (40 over 2)
    assert spend(a, 20) >= 20  # yesterday's 28 counted against today would stop it at 12
    assert limits_mode(a) == "local"

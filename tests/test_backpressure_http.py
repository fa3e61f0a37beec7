"""Shedding over HTTP: 503 with Retry-After and an Ollama error, answered at once."""

from __future__ import annotations

import time

import gevent
import openai
import pytest
import requests
from waiting import wait_until


def test_queue_full_gives_503_retry_after_at_once(fake_node, appliance):
    node = fake_node(["m"], decode_tps=10, tokens=8)
    lb = appliance([node], node_overrides={0: {"maxConcurrentRequests": 1}},
                   disruptor={"queueSize": 1})
    body = {"model": "m", "prompt": "x", "stream": False}
    busy = [gevent.spawn(requests.post, f"{lb.url}/api/generate", json=body, timeout=10)
            for _ in range(2)]
    stats = lb.factory.pipeline.stats
    assert wait_until(lambda: stats()["globalInFlight"] == 2 and stats()["queued"] == 1)
    t0 = time.monotonic()
    r = requests.post(f"{lb.url}/api/generate", json=body, timeout=10)
    assert time.monotonic() - t0 < 0.5
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"].startswith("server busy, please try again.")
    assert all(g.get().status_code == 200 for g in busy)


def test_openai_clients_get_the_openai_error_shape_when_shed(fake_node, appliance):
    node = fake_node(["m"], decode_tps=10, tokens=8)
    lb = appliance([node], disruptor={"maxGlobalInFlight": 1})
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    first = gevent.spawn(requests.post, f"{lb.url}/v1/chat/completions", json=body, timeout=10)
    assert wait_until(lambda: lb.factory.pipeline.stats()["globalInFlight"] == 1)
    r = requests.post(f"{lb.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert r.json()["error"]["type"] == "api_error"
    client = openai.OpenAI(base_url=f"{lb.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as shed:
        client.chat.completions.create(**body)
    assert shed.value.status_code == 503 and shed.value.response.headers["Retry-After"]
    assert not first.ready()  # shed because the first one was still running
    assert first.get().status_code == 200


def test_health_and_metrics_stay_reachable_while_saturated(fake_node, appliance):
    node = fake_node(["m"], decode_tps=10, tokens=8)
    lb = appliance([node], disruptor={"maxGlobalInFlight": 1})
    first = gevent.spawn(requests.post, f"{lb.url}/api/generate",
                         json={"model": "m", "prompt": "x", "stream": False}, timeout=10)
    assert wait_until(lambda: lb.factory.pipeline.stats()["globalInFlight"] == 1)
    h = requests.get(f"{lb.url}/health", timeout=2).json()
    assert h["pipeline"]["globalInFlight"] == 1 and h["status"] == "UP"
    assert requests.get(f"{lb.url}/metrics", timeout=2).status_code == 200
    first.get()

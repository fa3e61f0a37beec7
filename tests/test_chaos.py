"""Chaos: nodes that refuse, hang, reset, fail, send garbage, load slowly or flap.

Every test drives real clients through the appliance and asserts that every request got
exactly one complete answer or one clear error; the fixture asserts that every node slot and
admission came back.
"""

from __future__ import annotations

import json
import time

import gevent
import ollama
import pytest
import requests

from pipeline.breaker import CircuitState
from pipeline.node import Health
from tests.waiting import wait_until

BODY = {"model": "m", "prompt": "hello", "stream": False}


def ask(lb, n, body=BODY, spawn=True):
    """n requests in parallel; returns (status, json or None) per request."""
    def one(_):
        r = requests.post(f"{lb.url}/api/generate", json=body, timeout=20)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, None
    if not spawn:
        return [one(i) for i in range(n)]
    jobs = [gevent.spawn(one, i) for i in range(n)]
    gevent.joinall(jobs, raise_error=True)
    return [j.value for j in jobs]


def all_complete(results):
    return all(s == 200 and body and body.get("done") is True for s, body in results)


@pytest.mark.parametrize("fault", ["reset", "503", "malformed"])
def test_failing_node_is_retried_on_another_and_every_client_succeeds(fault, fake_node,
                                                                      appliance):
    bad = fake_node(["m"], fault=fault)
    good = fake_node(["m"])
    lb = appliance([bad, good], strategy={"type": "round-robin"})
    results = ask(lb, 20)
    assert all_complete(results)
    assert bad.stats.by_path.get("/api/generate", 0) >= 1  # the fault was really hit
    node = lb.factory.node_registry.get("n0")
    assert node.last_error  # the failure was seen and recorded


def test_refused_node_traffic_moves_to_the_others(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], strategy={"type": "round-robin"},
                   healthCheck={"intervalMs": 60_000})
    assert all_complete(ask(lb, 4))
    a.refuse()  # the box dies
    results = ask(lb, 1, spawn=False)  # the very next request already succeeds
    assert all_complete(results)
    assert all_complete(ask(lb, 20))
    assert lb.factory.node_registry.get("n0").circuit is CircuitState.OPEN or \
        lb.factory.node_registry.get("n0").health.value == "DOWN"


def test_hung_node_is_cut_by_the_first_byte_timeout_and_retried(fake_node, appliance):
    """Streams: no first byte in time means a hung node. (A non-streamed reply's headers come
    only when generation ends, so those are bounded by the request deadline instead.)"""
    hung, good = fake_node(["m"], fault="hang"), fake_node(["m"])
    lb = appliance([hung, good], strategy={"type": "round-robin"},
                   timeouts={"firstByteTimeoutMs": 300})

    def streamed(_):
        r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                          timeout=20)
        return r.status_code, json.loads(r.text.splitlines()[-1])

    t0 = time.monotonic()
    jobs = [gevent.spawn(streamed, i) for i in range(6)]
    gevent.joinall(jobs, raise_error=True)
    assert all_complete([j.value for j in jobs])
    assert time.monotonic() - t0 < 5
    assert "first byte" in lb.factory.node_registry.get("n0").last_error


def test_frozen_node_is_found_by_its_probe_and_traffic_moves(fake_node, appliance):
    """A box that answers nothing at all (not even /api/version) goes DOWN on its probes."""
    import socket
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)
    try:
        good = fake_node(["m"])

        class Box:
            url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        lb = appliance([Box(), good], discover=False, node_overrides={0: {"models": ["m"]}},
                       strategy={"type": "round-robin"},
                       healthCheck={"intervalMs": 100, "downThreshold": 2},
                       timeouts={"healthCheckTimeoutMs": 200})
        node = lb.factory.node_registry.get("n0")
        deadline = time.monotonic() + 5
        while node.health is not Health.DOWN and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert node.health is Health.DOWN
        assert all_complete(ask(lb, 4))
        assert node.in_flight == 0
    finally:
        frozen.close()


def test_http_500_is_a_clear_error_counted_until_the_circuit_opens(fake_node, appliance):
    broken, good = fake_node(["m"], fault="500"), fake_node(["m"])
    lb = appliance([broken, good], strategy={"type": "round-robin"},
                   healthCheck={"circuitBreakerFailureThreshold": 3,
                                "circuitBreakerRecoveryMs": 60_000, "intervalMs": 60_000})
    results = ask(lb, 30, spawn=False)
    errors = [b for s, b in results if s != 200]
    assert len(errors) == 3  # not retried (a 500 may have done work), then the circuit opens
    assert all(s == 500 and "llama runner" in b["error"] for s, b in results if s != 200)
    assert all(b["done"] for s, b in results if s == 200)
    node = lb.factory.node_registry.get("n0")
    assert node.circuit is CircuitState.OPEN
    assert broken.stats.by_path["/api/generate"] == 3  # nothing reached the OPEN node


def test_half_open_trial_closes_the_circuit_when_the_node_recovers(fake_node, appliance):
    flaky, good = fake_node(["m"], fault="500"), fake_node(["m"])
    lb = appliance([flaky, good], strategy={"type": "round-robin"},
                   healthCheck={"circuitBreakerFailureThreshold": 1,
                                "circuitBreakerRecoveryMs": 300, "intervalMs": 60_000})
    ask(lb, 2, spawn=False)
    node = lb.factory.node_registry.get("n0")
    assert node.circuit is CircuitState.OPEN
    flaky.node.set_fault("none")
    assert wait_until(lambda: node.circuit is CircuitState.HALF_OPEN, 2)
    assert all_complete(ask(lb, 4, spawn=False))
    assert node.circuit is CircuitState.CLOSED


def test_reset_mid_stream_ends_with_one_error_line_and_is_not_retried(fake_node, appliance):
    bad, good = fake_node(["m"], fault="reset-mid-stream"), fake_node(["m"])
    lb = appliance([bad, good], strategy={"type": "round-robin"})
    client = ollama.Client(host=lb.url)
    got, errors = [], []
    for _ in range(2):  # one lands on each node
        try:
            got.append(list(client.generate(model="m", prompt="x", stream=True)))
        except ollama.ResponseError as exc:
            errors.append(exc)
    assert len(got) == 1 and got[0][-1].done
    assert len(errors) == 1 and errors[0].status_code == -1
    assert "during the stream" in errors[0].error
    assert good.stats.by_path["/api/generate"] == 1  # no retry after the first byte


def test_error_line_from_the_node_is_relayed_and_ends_the_stream(fake_node, appliance):
    node = fake_node(["m"], fault="error-mid-stream")
    lb = appliance([node])
    r = requests.post(f"{lb.url}/api/chat", json={"model": "m", "messages": [
        {"role": "user", "content": "x"}]}, timeout=10)
    lines = r.text.splitlines()
    assert r.status_code == 200 and len(lines) == 3
    assert lines[-1] == '{"error": "an error was encountered while running the model"}'


def test_malformed_stream_line_becomes_one_clear_error(fake_node, appliance):
    node = fake_node(["m"], fault="malformed")
    lb = appliance([node])
    r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"}, timeout=10)
    lines = r.text.splitlines()
    assert all(line.startswith("{") and line.endswith("}") for line in lines)
    assert "malformed line" in lines[-1]


def test_slow_cold_load_is_not_mistaken_for_a_dead_node(fake_node, appliance):
    cold = fake_node(["m"], load_s=1.0, decode_tps=50)
    lb = appliance([cold], timeouts={"streamIdleTimeoutMs": 300, "firstByteTimeoutMs": 5000})
    parts = list(ollama.Client(host=lb.url).generate(model="m", prompt="x", stream=True))
    assert parts[-1].done and parts[-1].load_duration >= 0.9e9
    node = lb.factory.node_registry.get("n0")
    assert node.failures == 0 and node.circuit is CircuitState.CLOSED


def test_flapping_node_never_loses_a_request(fake_node, appliance):
    flappy = fake_node(["m"], fault="flap")
    flappy.node.flap_period = 0.2
    good = fake_node(["m"])
    lb = appliance([flappy, good], strategy={"type": "least-in-flight"},
                   healthCheck={"intervalMs": 100, "circuitBreakerRecoveryMs": 200})
    results = []
    for _ in range(6):
        results += ask(lb, 5)
        gevent.sleep(0.1)
    assert all_complete(results)


def test_stale_model_list_404_is_retried_on_a_node_that_has_it(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], strategy={"type": "round-robin"}, healthCheck={
        "modelRefreshMs": 60_000, "intervalMs": 60_000})
    a.node.sim.installed.clear()  # deleted behind the appliance's back
    assert all_complete(ask(lb, 4, spawn=False))
    assert "registry.ollama.ai/library/m:latest" not in lb.factory.node_registry.get(
        "n0").installed


def test_all_nodes_down_gives_503_no_available_node(fake_node, appliance):
    a = fake_node(["m"])
    lb = appliance([a], healthCheck={"intervalMs": 100, "downThreshold": 1})
    a.refuse()
    deadline = time.monotonic() + 3
    while lb.factory.node_registry.get("n0").admits() and time.monotonic() < deadline:
        gevent.sleep(0.05)
    r = requests.post(f"{lb.url}/api/generate", json=BODY, timeout=5)
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert "no node available for model 'm'" in r.json()["error"]
    assert requests.get(f"{lb.url}/health", timeout=5).status_code == 503


def test_stalled_stream_is_cut_by_the_idle_timeout_with_an_error_line(fake_node, appliance):
    node = fake_node(["m"], fault="stall-mid-stream")
    lb = appliance([node], timeouts={"streamIdleTimeoutMs": 300, "firstByteTimeoutMs": 5000})
    t0 = time.monotonic()
    r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"}, timeout=10)
    lines = r.text.splitlines()
    assert time.monotonic() - t0 < 3
    assert len(lines) == 3 and "read timed out during the stream" in lines[-1]
    assert lb.factory.node_registry.get("n0").last_error.endswith("during the stream")

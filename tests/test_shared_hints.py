"""Circuit-open hints across instances sharing one Redis (``pipeline/shared/hints.py``).

Two appliances, a real ``redis-server``, two simulated nodes. Instance A's own traffic opens
its breaker for a failing node; instance B, which has sent that node nothing, probes it at
once (its periodic checks are a minute apart here, so only the hint explains the probe) and
decides by its own evidence: a node that is gone is DOWN on B before B sends it a request; a
node whose health check still answers keeps B's traffic. B's breaker is never opened by a
hint.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from tests.waiting import wait_until

SHARED = {"leaseTtlMs": 2000, "heartbeatMs": 250, "timeoutMs": 200, "localGraceMs": 1000}
CHECKS = {"intervalMs": 60_000, "circuitBreakerFailureThreshold": 2, "downThreshold": 3,
          "circuitBreakerRecoveryMs": 60_000}


def _generate(url: str) -> int:
    return requests.post(f"{url}/api/generate", json={"model": "tiny", "prompt": "hi",
                                                       "stream": False},
                         timeout=10).status_code


def _pair(redis_proc: Any, fake_node: Any, appliance: Any) -> tuple[list[Any], list[Any]]:
    nodes = [fake_node(["tiny"], profile="fast", decode_tps=500.0) for _ in range(2)]
    apps = [appliance(nodes, sharedState={"redisUrl": redis_proc.url, **SHARED},
                      healthCheck=CHECKS) for _ in range(2)]
    assert wait_until(lambda: all(a.factory.shared.mode == "shared" for a in apps), timeout=5)
    return nodes, apps


def _node(app: Any, nid: str) -> Any:
    return app.factory.node_registry.get(nid)


def _open_on(app: Any, nid: str) -> None:
    """Requests to ``app`` until its own breaker for ``nid`` opens (bounded)."""
    url = f"http://127.0.0.1:{app.port}"
    for _ in range(30):
        _generate(url)
        if _node(app, nid).circuit.value == "OPEN":
            return
    raise AssertionError(f"{nid}'s breaker never opened: {_node(app, nid).snapshot()}")


def _metric(app: Any, line_start: str) -> float:
    text = requests.get(f"http://127.0.0.1:{app.port}/metrics", timeout=5).text
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start)]
    return sum(values)


def test_a_node_gone_is_down_on_the_other_instance_before_it_sends_it_a_request(
        redis_proc, fake_node, appliance):
    nodes, (a, b) = _pair(redis_proc, fake_node, appliance)
    nodes[0].refuse()  # the box dies: inference and health checks alike
    _open_on(a, "n0")
    opened = time.monotonic()
    assert wait_until(lambda: _node(b, "n0").health.value == "DOWN", timeout=2, step=0.005)
    print(f"n0 DOWN on B {(time.monotonic() - opened) * 1000:.0f} ms after A's breaker opened")
    assert _node(b, "n0").requests_total == 0  # B found out without sending it a request
    assert _node(b, "n0").circuit.value == "CLOSED"  # the hint opened nothing on B
    shared = requests.get(f"http://127.0.0.1:{b.port}/health", timeout=5).json()["sharedState"]
    assert shared["circuitHints"]["received"] == {"n0": 1}
    assert shared["circuitHints"]["lastProbe"] == {"n0": "failed"}
    assert _metric(b, 'ollama_lb_shared_circuit_hints_total{direction="received",node="n0"}') \
        == 1
    assert _metric(b, 'ollama_lb_shared_hint_probes_total{node="n0",result="failed"}') == 1
    assert _metric(a, 'ollama_lb_shared_circuit_hints_total{direction="sent",node="n0"}') == 1
    # B's traffic goes to n1 only, and every request is answered
    burl = f"http://127.0.0.1:{b.port}"
    assert [_generate(burl) for _ in range(6)] == [200] * 6
    assert _node(b, "n0").requests_total == 0 and _node(b, "n0").failures == 3
    # the hint did not stick: when the node is back, B's own check brings it back
    nodes[0].resume()
    b.factory.health_checker.check_all()
    assert _node(b, "n0").health.value == "UP"


def test_a_node_that_answers_the_probe_keeps_the_other_instances_traffic(
        redis_proc, fake_node, appliance):
    nodes, (a, b) = _pair(redis_proc, fake_node, appliance)
    nodes[0].node.set_fault("500")  # inference fails, /api/version still answers
    _open_on(a, "n0")
    assert wait_until(lambda: b.factory.shared.hints.last_probe.get("n0") == "ok", timeout=2,
                      step=0.005)
    node = _node(b, "n0")
    assert (node.health.value, node.circuit.value) == ("UP", "CLOSED")
    assert node.admits()  # B decides by its own evidence: its breaker will judge the 500s
    nodes[0].node.set_fault("none")


def test_no_hint_is_sent_in_local_mode_and_a_node_unknown_here_is_ignored(
        redis_proc, fake_node, appliance):
    _, (a, b) = _pair(redis_proc, fake_node, appliance)
    hints = b.factory.shared.hints
    hints.received(f"{a.factory.shared.me} not-a-node-here")
    hints.received(f"{b.factory.shared.me} n0")  # its own echo
    assert hints.received_from == {} and hints.last_probe == {}
    redis_proc.kill()
    assert wait_until(lambda: a.factory.shared.mode == "local", timeout=3)
    a.factory.shared.hints.circuit_changed(_node(a, "n0"), *_states("CLOSED", "OPEN"))
    assert a.factory.shared.hints.jobs.join(timeout=2) and a.factory.shared.hints.sent == {}


def _states(old: str, new: str) -> tuple[Any, Any]:
    from pipeline.breaker import CircuitState
    return CircuitState(old), CircuitState(new)

"""Operating it: hot reload, admin API, health endpoints, metrics, structured logs."""

from __future__ import annotations

import io
import json
import logging
import os

import gevent
import ollama
import openai
import pytest
import requests
import yaml
from conftest import assert_no_leaks, lb_config
from waiting import wait_until

from app.logs import JsonFormatter
from app.server import OllamaLoadBalancerApplication
from app.web import create_app
from pipeline import PipelineFactory
from pipeline.config import parse_config
from pipeline.operations import UnknownActionError, UnknownNodeError


@pytest.fixture
def watched(tmp_path):
    """The appliance started from a config file it watches; ``(app, write)``."""
    started = []

    def make(nodes, **sections):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(lb_config(nodes, **sections)))
        app = OllamaLoadBalancerApplication(str(path), watch=True).start()
        app.factory.health_checker.check_all(discover=True)
        started.append(app)
        return app, path

    yield make
    for app in started:
        try:
            assert_no_leaks(app)
        finally:
            app.shutdown(drain_s=0)


def node_ids(app):
    return [n.id for n in app.factory.node_registry.all_nodes()]


def last_reload(app):
    return requests.get(f"{app.url}/admin/config", timeout=5).json()["lastReload"]


# --- hot reload -------------------------------------------------------------------------------

def test_edit_in_place_adds_a_node(fake_node, watched):
    a, b = fake_node(["m"]), fake_node(["m"])
    app, path = watched([a])
    path.write_text(yaml.safe_dump(lb_config([a, b])))
    assert wait_until(lambda: node_ids(app) == ["n0", "n1"])
    assert last_reload(app)["result"] == "applied"
    assert last_reload(app)["changes"]["added"] == ["n1"]


def test_replace_by_rename_reweights_a_node(fake_node, watched):
    a = fake_node(["m"])
    app, path = watched([a])
    tmp = path.with_suffix(".new")
    tmp.write_text(yaml.safe_dump(lb_config([a], node_overrides={0: {"weight": 7}})))
    os.replace(tmp, path)  # what editors and config management tools do
    assert wait_until(lambda: app.factory.node_registry.get("n0").weight == 7)


def test_symlink_swap_like_a_configmap(fake_node, tmp_path):
    a = fake_node(["m"])
    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(yaml.safe_dump(lb_config([a])))
    v2.write_text(yaml.safe_dump(lb_config([a], node_overrides={0: {
        "maxConcurrentRequests": 9}})))
    link = tmp_path / "config.yaml"
    link.symlink_to(v1)
    app = OllamaLoadBalancerApplication(str(link), watch=True).start()
    try:
        new = tmp_path / "config.yaml.tmp"
        new.symlink_to(v2)
        os.replace(new, link)
        assert wait_until(lambda: app.factory.node_registry.get("n0").max_concurrent == 9)
    finally:
        app.shutdown(drain_s=0)


@pytest.mark.parametrize("bad", ["nodes: [unclosed", "nodes:\n  - {id: n0, url: 42}\n",
                                 "timeouts: {requestTimeoutMs: soon}\n"])
def test_invalid_file_keeps_the_old_config_and_says_why(bad, fake_node, watched):
    a = fake_node(["m"])
    app, path = watched([a])
    path.write_text(bad)
    assert wait_until(lambda: last_reload(app)["result"] == "invalid")
    state = last_reload(app)
    assert state["problems"] and state["error"]
    assert node_ids(app) == ["n0"]
    health = requests.get(f"{app.url}/health", timeout=5).json()
    assert health["config"]["lastReload"]["result"] == "invalid"
    assert ollama.Client(host=app.url).generate(model="m", prompt="still works").done
    scrape = requests.get(f"{app.url}/metrics", timeout=5).text
    assert 'ollama_lb_config_reloads_total{result="invalid"} 1.0' in scrape
    path.write_text(yaml.safe_dump(lb_config([a])))  # fixed
    assert wait_until(lambda: last_reload(app)["result"] == "applied")


def test_restart_only_keys_are_reported_not_half_applied(fake_node, watched):
    a = fake_node(["m"])
    app, path = watched([a])
    cfg = lb_config([a])
    cfg["server"]["port"] = 1
    cfg["disruptor"] = {"ringBufferSize": 64}
    cfg["strategy"] = {"type": "round-robin"}
    path.write_text(yaml.safe_dump(cfg))
    assert wait_until(lambda: last_reload(app)["result"] == "applied")
    assert set(last_reload(app)["restartRequired"]) == {"server.port",
                                                        "disruptor.ringBufferSize"}
    assert app.factory.pipeline.ring.size == 1024 and app.factory.config.server.port == 0
    assert app.factory.pipeline.strategy.name == "round-robin"  # the rest applied


def test_removed_node_drains_its_streams_and_takes_no_new_requests(fake_node, watched):
    a = fake_node(["m"])
    b = fake_node(["m"], decode_tps=20, tokens=20)  # ~1 s streams
    app, path = watched([a, b], strategy={"type": "round-robin"})
    client = ollama.Client(host=app.url)
    streams = [client.generate(model="m", prompt=str(i), stream=True) for i in range(4)]
    firsts = [next(iter(s)) for s in streams]  # two of them run on n1
    assert b.stats.streams_open == 2 and all(not f.done for f in firsts)
    path.write_text(yaml.safe_dump(lb_config([a])))
    assert wait_until(lambda: node_ids(app) == ["n0"])
    before = b.stats.by_path["/api/generate"]
    assert all(client.generate(model="m", prompt="new").done for _ in range(4))
    assert b.stats.by_path["/api/generate"] == before  # nothing new on the removed node
    for s in streams:
        assert list(s)[-1].done  # every stream finished, none failed
    assert wait_until(lambda: not app.factory.node_registry.removed_nodes())


def test_admin_reload_takes_the_same_path(fake_node, tmp_path):
    a = fake_node(["m"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(lb_config([a])))
    app = OllamaLoadBalancerApplication(str(path), watch=False).start()
    try:
        path.write_text(yaml.safe_dump(lb_config([a], strategy={"type": "random"})))
        r = requests.post(f"{app.url}/admin/reload", timeout=5)
        assert r.status_code == 200 and r.json()["trigger"] == "admin"
        assert app.factory.pipeline.strategy.name == "random"
        path.write_text("nodes: 5")
        r = requests.post(f"{app.url}/admin/reload", timeout=5)
        assert r.status_code == 422 and r.json()["result"] == "invalid"
    finally:
        app.shutdown(drain_s=0)


# --- admin API --------------------------------------------------------------------------------

def test_admin_requires_the_token_when_one_is_set(fake_node, appliance):
    lb = appliance([fake_node(["m"])], admin={"token": "s3cret"})
    assert requests.get(f"{lb.url}/admin/nodes", timeout=5).status_code == 401
    bad = requests.get(f"{lb.url}/admin/nodes", headers={"Authorization": "Bearer nope"},
                       timeout=5)
    assert bad.status_code == 401
    ok = requests.get(f"{lb.url}/admin/nodes", headers={"Authorization": "Bearer s3cret"},
                      timeout=5)
    assert ok.status_code == 200 and ok.json()["nodes"][0]["id"] == "n0"
    cfg = requests.get(f"{lb.url}/admin/config", headers={"Authorization": "Bearer s3cret"},
                       timeout=5).json()
    assert cfg["config"]["admin"]["token"] == "***"  # redacted


def test_admin_token_from_the_environment(fake_node, appliance, monkeypatch):
    monkeypatch.setenv("OLLAMA_LB_ADMIN_TOKEN", "envtoken")
    lb = appliance([fake_node(["m"])])
    assert requests.get(f"{lb.url}/admin/nodes", timeout=5).status_code == 401
    assert requests.get(f"{lb.url}/admin/nodes", timeout=5,
                        headers={"Authorization": "Bearer envtoken"}).status_code == 200


def test_without_a_token_admin_answers_loopback_only(fake_node):
    cfg = parse_config(lb_config([fake_node(["m"])]))
    with PipelineFactory(cfg).start(health_checks=False) as factory:
        client = create_app(factory).test_client()
        assert client.get("/admin/nodes").status_code == 200  # 127.0.0.1 by default
        far = client.get("/admin/nodes", environ_base={"REMOTE_ADDR": "192.0.2.7"})
        assert far.status_code == 403
        assert "OLLAMA_LB_ADMIN_TOKEN" in far.get_json()["error"]
        v6 = client.get("/admin/nodes", environ_base={"REMOTE_ADDR": "::1"})
        assert v6.status_code == 200


def test_strategy_endpoint_switches_and_rejects_unknown_names(fake_node, appliance):
    lb = appliance([fake_node(["m"])])
    r = requests.post(f"{lb.url}/admin/strategy", json={"strategy": "least-in-flight"},
                      timeout=5)
    assert r.json()["strategy"] == "least-in-flight"
    assert requests.get(f"{lb.url}/admin/strategy", timeout=5).json()[
        "strategy"] == "least-in-flight"
    r = requests.post(f"{lb.url}/admin/strategy", json={"strategy": "fastest"}, timeout=5)
    assert r.status_code == 400 and "round-robin" in r.json()["error"]


def test_disable_enable_and_drain_steer_traffic(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], strategy={"type": "round-robin"})
    client = ollama.Client(host=lb.url)
    assert requests.post(f"{lb.url}/admin/nodes/n0/disable", timeout=5).json()[
        "enabled"] is False
    for _ in range(4):
        client.generate(model="m", prompt="x")
    assert a.stats.by_path.get("/api/generate", 0) == 0
    requests.post(f"{lb.url}/admin/nodes/n0/enable", timeout=5)
    requests.post(f"{lb.url}/admin/nodes/n1/drain", timeout=5)
    for _ in range(4):
        client.generate(model="m", prompt="x")
    assert a.stats.by_path["/api/generate"] == 4 and b.stats.by_path["/api/generate"] == 4
    assert requests.post(f"{lb.url}/admin/nodes/zz/enable", timeout=5).status_code == 404
    assert requests.post(f"{lb.url}/admin/nodes/n0/explode", timeout=5).status_code == 400


# --- pool operations as a library -------------------------------------------------------------

def test_pool_health_and_node_actions_work_without_http(fake_node):
    cfg = parse_config(lb_config([fake_node(["m"]), fake_node(["m"])]))
    with PipelineFactory(cfg).start(health_checks=False) as factory:
        ops = factory.operations
        assert ops.health()["status"] == "UP" and ops.ready()["servingNodes"] == ["n0", "n1"]
        assert ops.drain("n1").draining is True
        assert ops.health()["status"] == "DEGRADED"  # an enabled node cannot serve
        assert ops.ready()["servingNodes"] == ["n0"]
        assert ops.enable("n1").draining is False and ops.status() == "UP"
        assert ops.disable("n0").enabled is False
        assert ops.status() == "UP"  # a disabled node is not counted against the pool
        assert [n["enabled"] for n in ops.health()["nodes"]] == [False, True]
        ops.disable("n1")
        assert ops.status() == "DOWN" and ops.ready()["status"] == "DOWN"
        assert ops.live()["status"] == "UP"
        with pytest.raises(UnknownNodeError, match="no node 'zz'"):
            ops.act("explode", "zz")  # the node is checked first, as /admin answers 404
        with pytest.raises(UnknownActionError, match="valid: enable, disable, drain"):
            ops.act("explode", "n0")
    assert ops.live()["status"] == "DOWN" and ops.status() == "DOWN"  # stopped


def test_enabling_a_node_hands_it_the_queued_requests_at_once(fake_node, appliance):
    slow, spare = fake_node(["m"], decode_tps=10, tokens=30), fake_node(["m"])  # ~3 s on n0
    lb = appliance([slow, spare], strategy={"type": "round-robin"},
                   healthCheck={"intervalMs": 600_000},  # no health round wakes the queue
                   node_overrides={0: {"maxConcurrentRequests": 1},
                                   1: {"maxConcurrentRequests": 1, "enabled": False}})
    p, client = lb.factory.pipeline, ollama.Client(host=lb.url)
    first = gevent.spawn(client.generate, model="m", prompt="long")
    assert wait_until(lambda: lb.factory.node_registry.get("n0").in_flight == 1)
    queued = gevent.spawn(client.generate, model="m", prompt="queued")
    assert wait_until(lambda: p.stats()["queued"] == 1)
    lb.factory.operations.enable("n1")  # no poke by the caller: the operation wakes waiters
    assert wait_until(queued.ready, timeout=1.5), "the queued request waited for n0"
    assert queued.get().done and not first.ready()
    assert spare.stats.by_path["/api/generate"] == 1
    assert first.get().done


# --- health -----------------------------------------------------------------------------------

def test_health_is_up_degraded_then_down(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], healthCheck={"intervalMs": 100, "downThreshold": 1})
    h = requests.get(f"{lb.url}/health", timeout=5)
    assert h.status_code == 200 and h.json()["status"] == "UP"
    node = h.json()["nodes"][0]
    for key in ("id", "health", "enabled", "inFlight", "maxConcurrent", "circuitState"):
        assert key in node
    for key in ("globalInFlight", "ringBufferRemaining", "queued", "strategy"):
        assert key in h.json()["pipeline"]
    b.refuse()
    assert wait_until(lambda: requests.get(f"{lb.url}/health", timeout=5).json()[
        "status"] == "DEGRADED")
    assert requests.get(f"{lb.url}/health/ready", timeout=5).status_code == 200
    a.refuse()
    assert wait_until(lambda: requests.get(f"{lb.url}/health", timeout=5).status_code == 503)
    assert requests.get(f"{lb.url}/health/ready", timeout=5).status_code == 503
    assert requests.get(f"{lb.url}/health/live", timeout=5).status_code == 200


# --- metrics ----------------------------------------------------------------------------------

def metric(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_the_seeds_metric_names_exist_and_move_under_load(fake_node, appliance):
    lb = appliance([fake_node(["m"])])
    client = ollama.Client(host=lb.url)
    for _ in range(3):
        client.generate(model="m", prompt="x")
    list(client.generate(model="m", prompt="x", stream=True))
    text = requests.get(f"{lb.url}/metrics", timeout=5).text
    assert metric(text, "ollama_lb_requests_total", model="m:latest", status="200") == 4
    assert metric(text, "ollama_lb_request_latency_count", endpoint="/api/generate") == 4
    assert metric(text, "ollama_lb_node_inflight", node="n0") == 0
    assert metric(text, "ollama_lb_node_max_concurrent", node="n0") == 4
    assert metric(text, "ollama_lb_node_health", node="n0") == 1
    assert metric(text, "ollama_lb_ringbuffer_remaining") == 1024
    assert metric(text, "ollama_lb_tokens_generated_total", model="m:latest") == 32
    assert metric(text, "ollama_lb_tokens_per_second_count", model="m:latest") == 4
    assert metric(text, "ollama_lb_time_to_first_token_seconds_count", node="n0") == 4
    requests.post(f"{lb.url}/api/generate", json={"model": "zz", "prompt": "x"}, timeout=5)
    text = requests.get(f"{lb.url}/metrics", timeout=5).text
    assert metric(text, "ollama_lb_errors_total", code="MODEL_NOT_FOUND") == 1


def test_generated_tokens_are_counted_from_openai_and_anthropic_replies_too(fake_node,
                                                                            appliance):
    lb = appliance([fake_node(["m"])])
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key="unused", max_retries=0)
    done = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
    anthropic = requests.post(f"{lb.url}/v1/messages", timeout=5, json={
        "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "b"}]})
    assert anthropic.status_code == 200
    want = done.usage.completion_tokens + anthropic.json()["usage"]["output_tokens"]
    text = requests.get(f"{lb.url}/metrics", timeout=5).text
    assert want > 0
    assert metric(text, "ollama_lb_tokens_generated_total", model="m:latest") == want
    # their speed is Ollama's eval_duration, which only native replies report
    assert metric(text, "ollama_lb_tokens_per_second_count", model="m:latest") is None


def test_junk_model_names_create_no_new_series(fake_node, appliance):
    lb = appliance([fake_node(["m"])])
    for i in range(20):
        requests.post(f"{lb.url}/api/generate", json={"model": f"junk-{i}", "prompt": "x"},
                      timeout=5)
    text = requests.get(f"{lb.url}/metrics", timeout=5).text
    assert "junk-" not in text
    assert metric(text, "ollama_lb_requests_total", model="other") == 20


def test_metrics_prefix_is_configurable(fake_node, appliance):
    lb = appliance([fake_node(["m"])], metrics={"prefix": "pool7"})
    text = requests.get(f"{lb.url}/metrics", timeout=5).text
    assert "pool7_ringbuffer_remaining" in text and "ollama_lb_" not in text


# --- logs -------------------------------------------------------------------------------------

@pytest.fixture
def access_log():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ollama_lb.access")
    logger.addHandler(handler)
    yield buf
    logger.removeHandler(handler)


def test_one_json_access_line_per_request_without_the_prompt(fake_node, appliance,
                                                              access_log):
    lb = appliance([fake_node(["m"])])
    requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "TOP SECRET",
                                                  "stream": False},
                  headers={"X-Request-ID": "r-1", "X-Correlation-ID": "c-9"}, timeout=5)
    lines = [json.loads(line) for line in access_log.getvalue().splitlines()]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["request_id"] == "r-1" and entry["correlation_id"] == "c-9"
    assert (entry["method"], entry["path"], entry["model"], entry["node"], entry["status"]) \
        == ("POST", "/api/generate", "m", "n0", "200")
    assert entry["attempts"] == 1 and entry["tokens"] == 8
    for key in ("queue_wait_ms", "ttfb_ms", "duration_ms"):
        assert entry[key] >= 0
    assert "TOP SECRET" not in access_log.getvalue()

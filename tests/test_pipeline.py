"""The pipeline as a library: submit, stream, backpressure, timeouts, queueing, leaks."""

from __future__ import annotations

import json
import time

import gevent
import ollama
import pytest
import yaml
from conftest import lb_config

from pipeline import (
    BackpressureError,
    ErrorCode,
    InferenceRequest,
    PipelineError,
    PipelineFactory,
    StrategyFactory,
)
from pipeline.config import parse_config
from tests.waiting import wait_until


@pytest.fixture
def lib(fake_node):
    """Build a started PipelineFactory in front of simulated nodes; stopped afterwards."""
    made = []

    def make(nodes, **sections):
        f = PipelineFactory.create(parse_config(lb_config(nodes, **sections))).start(
            health_checks=False)
        f.health_checker.check_all(discover=True)
        made.append(f)
        return f

    yield make
    for f in made:
        assert f.pipeline.in_flight == 0, "admissions leaked"
        assert all(n.in_flight == 0 for n in f.node_registry.all_nodes()), "slots leaked"
        f.stop()


def test_readme_library_example_runs(fake_node, tmp_path):
    node = fake_node(["llama2"])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"nodes": [{"id": "gpu-1", "url": node.url}]}))
    # --- the README's example, verbatim apart from the config path ---
    with PipelineFactory.create(cfg).start() as factory:
        pipeline = factory.pipeline
        response = pipeline.submit(
            InferenceRequest.of_prompt("llama2", "Why is the sky blue?")).result()
        print(response.response)
        for node_ in factory.node_registry.all_nodes():
            print(node_.id, node_.health)
        text = factory.metrics_registry.scrape()
        pipeline.set_strategy(StrategyFactory.create("round-robin"))
    # ---
    assert response.response == ollama.Client(host=node.url).generate(  # the node's own reply
        model="llama2", prompt="Why is the sky blue?").response
    assert isinstance(text, str) and "ollama_lb_requests_total" in text
    assert pipeline.strategy.name == "round-robin"


def test_streaming_form_yields_chunks_and_releases_the_slot(fake_node, lib):
    f = lib([fake_node(["llama3.2"])])
    with f.pipeline.stream(InferenceRequest.of_chat(
            "llama3.2", [{"role": "user", "content": "hi"}], stream=True)) as stream:
        chunks = list(stream)
    assert chunks[-1]["done"] is True and len(chunks) == 9
    assert f.node_registry.get("n0").in_flight == 0


def test_global_in_flight_limit_sheds_at_once(fake_node, lib):
    f = lib([fake_node(["m"], decode_tps=10, tokens=5)],
            disruptor={"maxGlobalInFlight": 2})
    t1 = f.pipeline.submit(InferenceRequest.of_prompt("m", "a"))
    t2 = f.pipeline.submit(InferenceRequest.of_prompt("m", "b"))
    t0 = time.monotonic()
    with pytest.raises(BackpressureError) as err:
        f.pipeline.submit(InferenceRequest.of_prompt("m", "c"))
    assert time.monotonic() - t0 < 0.05 and err.value.retry_after
    assert t1.result().status == 200 and t2.result().status == 200


def test_full_capacity_queue_sheds_with_retry_after(fake_node, lib):
    f = lib([fake_node(["m"], decode_tps=10, tokens=5)],
            node_overrides={0: {"maxConcurrentRequests": 1}}, disruptor={"queueSize": 1})
    running = f.pipeline.submit(InferenceRequest.of_prompt("m", "a"))
    queued = f.pipeline.submit(InferenceRequest.of_prompt("m", "b"))
    shed = f.pipeline.submit(InferenceRequest.of_prompt("m", "c"))
    with pytest.raises(PipelineError) as err:
        shed.result()
    assert err.value.code is ErrorCode.BACKPRESSURE and err.value.retry_after >= 1
    assert running.result().status == 200 and queued.result().status == 200


def test_timeout_while_waiting_for_a_hung_node_releases_everything(fake_node, lib):
    f = lib([fake_node(["m"], fault="hang")], retry={"maxRetries": 0})
    req = InferenceRequest.of_prompt("m", "x")
    req.timeout_s = 0.3
    t0 = time.monotonic()
    with pytest.raises(PipelineError) as err:
        f.pipeline.submit(req).result()
    assert err.value.code is ErrorCode.TIMEOUT
    assert time.monotonic() - t0 < 2
    assert wait_until(lambda: f.pipeline.in_flight == 0
                      and f.node_registry.get("n0").in_flight == 0, 2)


def test_timeout_in_the_capacity_queue_releases_its_place(fake_node, lib):
    f = lib([fake_node(["m"], decode_tps=20, tokens=10)],
            node_overrides={0: {"maxConcurrentRequests": 1}})
    first = f.pipeline.submit(InferenceRequest.of_prompt("m", "a"))
    req = InferenceRequest.of_prompt("m", "b")
    req.timeout_s = 0.1
    with pytest.raises(PipelineError) as err:
        f.pipeline.submit(req).result()
    assert err.value.code is ErrorCode.TIMEOUT
    assert len(f.pipeline.queue) == 0
    assert first.result().status == 200


def test_no_head_of_line_blocking_across_models(fake_node, lib):
    busy = fake_node(["busy"], decode_tps=10, tokens=10)  # ~1 s per request
    free = fake_node(["free"])
    f = lib([busy, free], node_overrides={0: {"maxConcurrentRequests": 1}})
    slow = [f.pipeline.submit(InferenceRequest.of_prompt("busy", str(i))) for i in range(4)]
    assert wait_until(lambda: len(f.pipeline.queue) == 3, 2)  # busy's wait for its only slot
    t0 = time.monotonic()
    quick = f.pipeline.submit(InferenceRequest.of_prompt("free", "now")).result()
    assert quick.status == 200 and time.monotonic() - t0 < 0.5
    assert all(not t.done() for t in slow[1:])
    for t in slow:
        t.result()


def test_waiters_for_one_model_are_served_oldest_first(fake_node, lib):
    node = fake_node(["m"], decode_tps=100, tokens=3)
    f = lib([node], node_overrides={0: {"maxConcurrentRequests": 1}})
    done_order = []
    f.pipeline.ledger.finish_hooks.append(
        lambda t: done_order.append(json.loads(t.request.body)["prompt"]))
    tickets = [f.pipeline.submit(InferenceRequest.of_prompt("m", str(i))) for i in range(5)]
    for t in tickets:
        t.result()
    assert done_order == ["0", "1", "2", "3", "4"]


def test_a_burst_larger_than_the_ring_leaks_nothing(fake_node, lib):
    f = lib([fake_node(["m"]), fake_node(["m"])], disruptor={"ringBufferSize": 16})
    outcomes = {"ok": 0, "shed": 0}

    def one(i):
        try:
            assert f.pipeline.submit(InferenceRequest.of_prompt("m", str(i))).result().status \
                == 200
            outcomes["ok"] += 1
        except BackpressureError:
            outcomes["shed"] += 1

    gevent.joinall([gevent.spawn(one, i) for i in range(300)], raise_error=True)
    assert outcomes["ok"] + outcomes["shed"] == 300 and outcomes["ok"] >= 16
    assert f.pipeline.ring.remaining() == 16


def test_validation_rules_from_config(fake_node, lib):
    f = lib([fake_node(["llama3.2", "mistral"])],
            validation={"allowedModels": ["llama3.2"], "maxPromptLength": 10})
    with pytest.raises(PipelineError) as err:
        f.pipeline.call(InferenceRequest.of_prompt("mistral", "hi"))
    assert err.value.code is ErrorCode.VALIDATION and "not allowed" in err.value.message
    with pytest.raises(PipelineError) as err:
        f.pipeline.call(InferenceRequest.of_prompt("llama3.2:latest", "x" * 11))
    assert err.value.code is ErrorCode.VALIDATION and "too long" in err.value.message
    assert f.pipeline.call(InferenceRequest.of_prompt("llama3.2", "short")).status == 200


def test_a_crashed_stage_stops_admission_and_says_why(fake_node, lib, greenlet_errors):
    f = lib([fake_node(["m"])])

    class Bug(BaseException):
        pass

    f.pipeline.stages[2].greenlet.kill(Bug(), block=True)
    gevent.sleep(0)
    greenlet_errors.clear()
    with pytest.raises(PipelineError) as err:
        f.pipeline.submit(InferenceRequest.of_prompt("m", "x"))
    assert err.value.code is ErrorCode.INTERNAL and "capacity crashed" in err.value.message
    assert f.pipeline.stats()["running"] is False


def test_strategy_can_change_while_requests_are_in_flight(fake_node, lib):
    f = lib([fake_node(["m"], decode_tps=50, tokens=5), fake_node(["m"], decode_tps=50,
                                                                  tokens=5)])
    tickets = [f.pipeline.submit(InferenceRequest.of_prompt("m", str(i))) for i in range(6)]
    f.pipeline.set_strategy("least-in-flight")
    tickets += [f.pipeline.submit(InferenceRequest.of_prompt("m", str(i))) for i in range(6)]
    assert all(t.result().status == 200 for t in tickets)
    assert f.pipeline.strategy.name == "least-in-flight"


def test_model_aware_waits_for_a_busy_warm_node_then_scales_out(fake_node, lib):
    warm = fake_node(["m"], decode_tps=20, tokens=6)  # ~0.3 s per request
    cold = fake_node(["m"], decode_tps=20, tokens=6)
    f = lib([warm, cold], node_overrides={0: {"maxConcurrentRequests": 1},
                                          1: {"maxConcurrentRequests": 1}},
            healthCheck={"modelRefreshMs": 60_000})
    f.pipeline.call(InferenceRequest.of_prompt("m", "warm up"))  # now loaded on one node
    first_node = next(n for n in f.node_registry.all_nodes() if n.loaded)
    a = f.pipeline.submit(InferenceRequest.of_prompt("m", "a"))  # takes the warm node
    b = f.pipeline.submit(InferenceRequest.of_prompt("m", "b"))  # waits for it (no cold load)
    c = f.pipeline.submit(InferenceRequest.of_prompt("m", "c"))  # waits too (2 rounds)
    assert wait_until(lambda: len(f.pipeline.queue) == 2, 2)
    d = f.pipeline.submit(InferenceRequest.of_prompt("m", "d"))  # backlog: goes cold
    assert d.result().node_id != first_node.id
    assert a.result().node_id == first_node.id
    assert all(t.result().status == 200 for t in (b, c))
    assert warm.stats.loads + cold.stats.loads == 2  # the warm-up and the one scale-out

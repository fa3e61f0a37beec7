"""Real LLM timing: replies that take long, clients that leave, trials that end without verdict.

Each test reproduces a failure seen against the first version through real sockets (the
simulated node, the appliance, real clients) and asserts the behaviour an operator relies on.
"""

from __future__ import annotations

import json
import socket
import time

import gevent
import gevent.event
import requests

from pipeline.breaker import CircuitState
from pipeline.config import parse_config
from pipeline.modelname import canonical
from pipeline.node import Health
from tests.conftest import lb_config
from tests.waiting import wait_until


def post(lb, body, path="/api/generate", timeout=30):
    r = requests.post(f"{lb.url}{path}", json=body, timeout=timeout)
    return r.status_code, r.json() if r.headers.get("Content-Type", "").startswith(
        "application/json") else r.text


def raw_request(lb, body, path="/api/generate") -> socket.socket:
    """Send one request on a raw socket and return it unread (the client 'waits')."""
    host, port = lb.url.rsplit("//", 1)[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def open_circuit(lb, node, fake):
    """Fail one request so the breaker (threshold 1) opens, then wait for HALF_OPEN."""
    fake.node.set_fault("500", count=1)
    assert post(lb, {"model": "m", "prompt": "x", "stream": False})[0] == 500
    n = lb.factory.node_registry.get(node)
    assert n.circuit is CircuitState.OPEN
    assert wait_until(lambda: n.circuit is CircuitState.HALF_OPEN, 5)
    return n


BREAKER = {"circuitBreakerFailureThreshold": 1, "circuitBreakerRecoveryMs": 200,
           "downThreshold": 1000, "degradedThreshold": 1000}


# --- 1. the half-open trial is always given back -------------------------------------------------

def test_half_open_trial_that_runs_into_the_deadline_is_given_back(fake_node, appliance):
    fake = fake_node(["m"])
    lb = appliance([fake], healthCheck=BREAKER, timeouts={"requestTimeoutMs": 700})
    node = open_circuit(lb, "n0", fake)
    fake.node.set_fault("hang", count=1)  # the trial request never gets an answer
    status, _ = post(lb, {"model": "m", "prompt": "x", "stream": False})
    assert status == 504
    assert wait_until(lambda: not node.breaker.trial_out, 3)
    status, body = post(lb, {"model": "m", "prompt": "x", "stream": False})
    assert status == 200 and body["done"] is True  # the next request is the new trial
    assert node.circuit is CircuitState.CLOSED


def test_half_open_trial_cancelled_by_its_client_is_given_back(fake_node, appliance):
    fake = fake_node(["m"])
    lb = appliance([fake], healthCheck=BREAKER)
    node = open_circuit(lb, "n0", fake)
    fake.node.set_fault("hang", count=1)
    sock = raw_request(lb, {"model": "m", "prompt": "x", "stream": False})
    assert wait_until(lambda: node.breaker.trial_out
                      and fake.stats.by_path.get("/api/generate") == 2, 5)
    sock.close()  # the client gives up on the trial
    assert wait_until(lambda: not node.breaker.trial_out and node.in_flight == 0, 2)
    status, _ = post(lb, {"model": "m", "prompt": "x", "stream": False})
    assert status == 200 and node.circuit is CircuitState.CLOSED


def test_half_open_trial_that_meets_a_stale_model_is_given_back(fake_node, appliance):
    gone, other = fake_node(["m", "k"]), fake_node(["m", "k"])
    lb = appliance([gone, other], strategy={"type": "round-robin"},
                   healthCheck={**BREAKER, "modelRefreshMs": 600_000, "intervalMs": 600_000})
    requests.delete(f"{gone.url}/api/delete", json={"model": "m"}, timeout=5).raise_for_status()
    n0 = lb.factory.node_registry.get("n0")
    n0.breaker.record_failure()  # threshold 1: n0 opens, then goes on trial
    assert wait_until(lambda: n0.circuit is CircuitState.HALF_OPEN, 5)
    for _ in range(4):  # until the trial request reaches n0 and meets the stale list
        assert post(lb, {"model": "m", "prompt": "x", "stream": False})[0] == 200
        if gone.stats.by_path.get("/api/generate", 0):
            break
    assert gone.stats.by_path.get("/api/generate", 0) == 1  # the trial met the 404
    assert not n0.breaker.trial_out
    before = gone.stats.by_path["/api/generate"]
    for _ in range(2):  # n0 takes a trial again and closes its circuit
        assert post(lb, {"model": "k", "prompt": "x", "stream": False})[0] == 200
    assert gone.stats.by_path["/api/generate"] == before + 1
    assert n0.circuit is CircuitState.CLOSED


# --- 2. a long non-streamed reply is not a dead node ---------------------------------------------

SLOW = {"decode_tps": 10.0, "tokens": 8}  # a stream:false reply takes ~0.8 s to start


def test_long_non_streamed_reply_is_answered_once_and_not_retried(fake_node, appliance):
    a, b = fake_node(["m"], **SLOW), fake_node(["m"], **SLOW)
    lb = appliance([a, b], strategy={"type": "round-robin"},
                   timeouts={"firstByteTimeoutMs": 200})
    status, body = post(lb, {"model": "m", "prompt": "x", "stream": False})
    assert status == 200 and body["done"] is True
    generated = a.stats.by_path.get("/api/generate", 0) + b.stats.by_path.get("/api/generate", 0)
    assert generated == 1  # the GPU work was done once
    for node in lb.factory.node_registry.all_nodes():
        assert node.health is Health.UP and node.failures == 0


def test_non_streamed_reply_past_the_deadline_times_out_once(fake_node, appliance):
    a, b = fake_node(["m"], **SLOW), fake_node(["m"], **SLOW)
    lb = appliance([a, b], strategy={"type": "round-robin"},
                   timeouts={"firstByteTimeoutMs": 100, "requestTimeoutMs": 400})
    status, body = post(lb, {"model": "m", "prompt": "x", "stream": False})
    assert status == 504 and "timed out" in body["error"]
    generated = a.stats.by_path.get("/api/generate", 0) + b.stats.by_path.get("/api/generate", 0)
    assert generated == 1  # not re-run elsewhere: work may have been done
    lb.factory.health_checker.check_all(discover=False)
    for node in lb.factory.node_registry.all_nodes():
        assert node.health is Health.UP  # it still passes its probe


def test_streamed_request_with_no_first_byte_is_still_failed_over(fake_node, appliance):
    hung, good = fake_node(["m"], fault="hang"), fake_node(["m"])
    lb = appliance([hung, good], strategy={"type": "round-robin"},
                   timeouts={"firstByteTimeoutMs": 300})
    for _ in range(2):
        r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                          timeout=10)
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["done"]


# --- 3. a client that goes away cancels its work -------------------------------------------------

def _settled(lb, node_id="n0", slots=0, admitted=0):
    p, node = lb.factory.pipeline, lb.factory.node_registry.get(node_id)
    return lambda: (node.in_flight == slots and p.in_flight == admitted and len(p.queue) == 0
                    and lb.factory.upstream.checked_out == slots)


def test_client_leaving_while_queued_frees_its_queue_entry(fake_node, appliance):
    fake = fake_node(["m"], decode_tps=20.0, tokens=200)
    lb = appliance([fake], node_overrides={0: {"maxConcurrentRequests": 1}})
    busy = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                         stream=True, timeout=30)
    queued = raw_request(lb, {"model": "m", "prompt": "y", "stream": False})
    assert wait_until(lambda: len(lb.factory.pipeline.queue) == 1, 5)
    queued.close()
    t0 = time.monotonic()
    assert wait_until(_settled(lb, slots=1, admitted=1), 1.0)
    assert time.monotonic() - t0 < 1.0
    busy.close()


def test_client_leaving_during_a_cold_load_frees_the_slot_and_the_connection(fake_node,
                                                                            appliance):
    fake = fake_node(["m"], load_s=5.0)
    lb = appliance([fake])
    sock = raw_request(lb, {"model": "m", "prompt": "x", "stream": True})
    assert wait_until(lambda: lb.factory.upstream.checked_out == 0
                      and lb.factory.node_registry.get("n0").in_flight == 1, 5)
    sock.close()
    assert wait_until(_settled(lb), 1.0)


def test_client_leaving_during_a_non_streamed_reply_cancels_generation(fake_node, appliance):
    fake = fake_node(["m"], decode_tps=10.0, tokens=100)  # 10 s of generation
    lb = appliance([fake])
    sock = raw_request(lb, {"model": "m", "prompt": "x", "stream": False})
    assert wait_until(lambda: fake.stats.active == 1, 5)
    sock.close()
    assert wait_until(_settled(lb), 1.0)
    assert wait_until(lambda: fake.stats.active == 0, 2)  # the node stopped generating


# --- 5. raising maxGlobalInFlight on reload never blocks the dispatch stage -------------------

def test_raised_in_flight_limit_does_not_block_requests_for_idle_nodes(fake_node, appliance):
    slow = fake_node(["slow"], decode_tps=5.0, tokens=15)  # 3 s per reply
    fast = fake_node(["fast"])
    sections = {"disruptor": {"maxGlobalInFlight": 2}}
    lb = appliance([slow, fast], **sections)
    lb.factory.apply_config(parse_config(lb_config(
        [slow, fast], disruptor={"maxGlobalInFlight": 8})))
    long_ones = [gevent.spawn(post, lb, {"model": "slow", "prompt": "x", "stream": False})
                 for _ in range(2)]
    assert wait_until(lambda: slow.stats.active == 2, 5)
    status, body = post(lb, {"model": "fast", "prompt": "x", "stream": False})
    assert status == 200 and body["done"] is True
    assert slow.stats.active == 2  # answered while both long requests still run
    gevent.joinall(long_ones, raise_error=True)
    assert all(g.value[0] == 200 for g in long_ones)


# --- 8. pool-wide lists never wait on a frozen node ---------------------------------------------

def test_model_lists_and_version_never_wait_on_a_frozen_node(fake_node, appliance):
    good = fake_node(["m"])
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)  # accepts connections (the kernel does) and never answers: a frozen box
    try:
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"

        class Frozen:
            pass
        box = Frozen()
        box.url = url
        lb = appliance([good, box], discover=False,
                       timeouts={"healthCheckTimeoutMs": 3000},
                       healthCheck={"intervalMs": 600_000, "modelRefreshMs": 600_000})
        lb.factory.health_checker.discover(lb.factory.node_registry.get("n0"))
        for path in ("/api/tags", "/api/ps", "/api/version", "/v1/models"):
            for _ in range(3):  # Open WebUI polls
                t0 = time.monotonic()
                r = requests.get(f"{lb.url}{path}", timeout=10)
                assert r.status_code == 200
                assert time.monotonic() - t0 < 1.0, f"{path} waited on the frozen node"
        names = [m["name"] for m in requests.get(f"{lb.url}/api/tags", timeout=5).json()["models"]]
        assert any(n.startswith("m") for n in names)
        assert requests.get(f"{lb.url}/api/version", timeout=5).json()["version"] != "0.0.0"
    finally:
        frozen.close()


# --- 9. a crashed stage answers what it strands, at once -----------------------------------------

def test_crashed_stage_fails_the_requests_already_in_the_ring_at_once(fake_node, appliance,
                                                                      greenlet_errors):
    lb = appliance([fake_node(["m"])], check_leaks=False)
    p = lb.factory.pipeline
    select = next(s for s in p.stages if s.name == "select")
    release = gevent.event.Event()

    class Bug(BaseException):
        pass

    def crashing(model):
        release.wait(5)  # hold the stage until requests queue up behind it in the ring
        raise Bug("select exploded")

    p.router.classify = crashing
    t0 = time.monotonic()
    jobs = [gevent.spawn(post, lb, {"model": "m", "prompt": str(i), "stream": False})
            for i in range(3)]
    assert wait_until(lambda: p.ring.cursor.value - select.sequence.value >= 3, 5)
    release.set()
    gevent.joinall(jobs, raise_error=True)
    greenlet_errors.clear()  # this crash is the one under test
    assert all(g.value[0] == 500 and "select" in g.value[1]["error"] for g in jobs)
    assert time.monotonic() - t0 < 3  # not left to the 20 s request deadline
    assert p.in_flight == 0
    assert requests.get(f"{lb.url}/health/live", timeout=5).status_code == 503


# --- 10. hostile bodies: deep nesting, and large ones parsed off the hub -------------------------

def test_deeply_nested_body_gets_400_in_ollamas_shape(fake_node, appliance):
    fake = fake_node(["m"])
    lb = appliance([fake])
    body = b'{"model":"m","prompt":"x","options":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = requests.post(f"{lb.url}/api/generate", data=body, timeout=10)
    assert r.status_code == 400 and r.json() == {"error": "exceeded max depth"}
    deep_messages = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(150):  # deep but parseable: the prompt count must not recurse either
        deep_messages = {"model": "m", "messages": [{"role": "user", "content": [deep_messages]}]}
    r = requests.post(f"{lb.url}/api/chat", json={**deep_messages, "stream": False}, timeout=10)
    assert r.status_code == 200
    assert fake.stats.by_path.get("/api/generate", 0) == 0


def test_parsing_a_large_body_does_not_stall_other_streams(fake_node, appliance):
    fake = fake_node(["m"], decode_tps=50.0, tokens=150)  # a token every 20 ms for 3 s
    lb = appliance([fake])
    gaps: list[float] = []

    def watch_stream():
        r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                          stream=True, timeout=30)
        last = None
        for _line in r.iter_lines():
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now

    # a model no node has: the body is parsed by the appliance only (the simulated node runs in
    # this process too, and its own parsing would stall this hub), encoded before the stream
    many = json.dumps({"model": "nobody-has-it", "stream": False,
                       "messages": [{"role": "user", "content": "x"} for _ in range(600_000)]})
    stream = gevent.spawn(watch_stream)
    assert wait_until(lambda: len(gaps) >= 5, 5)
    r = requests.post(f"{lb.url}/api/chat", data=many, timeout=60)
    assert r.status_code == 404  # parsed (~20 MB of small objects), validated, routed
    stream.join(30)
    assert stream.successful()
    assert max(gaps) < 0.3, f"the stream stalled for {max(gaps):.2f} s"


# --- 6. model-aware never leaves a request queued while a node that can serve it is idle -----

def test_model_aware_stops_waiting_for_a_warm_node_and_uses_the_idle_one(fake_node, appliance):
    a = fake_node(["m"], decode_tps=5.0, tokens=20)  # m warm here, busy for 4 s
    b = fake_node(["m", "k"], decode_tps=5.0, tokens=1)  # idle; holds the only warm copy of k
    lb = appliance([a, b], node_overrides={0: {"maxConcurrentRequests": 1},
                                           1: {"maxConcurrentRequests": 1}},
                   strategy={"type": "model-aware", "maxWarmWaitMs": 300},
                   disruptor={"queueTimeoutMs": 3000},
                   healthCheck={"modelRefreshMs": 600_000})
    n0, n1 = (lb.factory.node_registry.get(i) for i in ("n0", "n1"))
    n0.set_loaded({"m"})
    n1.set_loaded({"k"})  # b is not spare: sending m there evicts the last warm copy of k
    long_one = gevent.spawn(post, lb, {"model": "m", "prompt": "x", "stream": False})
    assert wait_until(lambda: n0.in_flight == 1, 5)
    t0 = time.monotonic()
    status, body = post(lb, {"model": "m", "prompt": "y", "stream": False})
    assert status == 200 and body["done"] is True  # not 503 "timed out waiting"
    assert time.monotonic() - t0 < 2.5
    assert n0.in_flight == 1  # served by the idle node while the warm one was still busy
    assert b.stats.by_path.get("/api/generate") == 1
    long_one.join(10)
    assert long_one.value[0] == 200


# --- 7. connection pools follow the caps; a new URL is a new node -------------------------------

def test_connection_pool_grows_with_the_nodes_cap_on_reload(fake_node, appliance):
    fake = fake_node(["m"], decode_tps=20.0, tokens=4)  # 0.2 s per reply
    quiet = {"enabled": False, "discovery": False}  # only requests use the node's pool
    lb = appliance([fake], discover=False, node_overrides={0: {"maxConcurrentRequests": 2}},
                   healthCheck=quiet)

    def round_of(n):
        jobs = [gevent.spawn(post, lb, {"model": "m", "prompt": str(i), "stream": False})
                for i in range(n)]
        gevent.joinall(jobs, raise_error=True)
        assert all(g.value[0] == 200 for g in jobs)

    round_of(2)
    lb.factory.apply_config(parse_config(lb_config(
        [fake], node_overrides={0: {"maxConcurrentRequests": 6}}, healthCheck=quiet)))
    round_of(6)
    opened = fake.connections
    round_of(6)
    assert fake.connections == opened  # all six connections were kept and reused


def test_node_whose_url_changes_starts_with_fresh_state(fake_node, appliance):
    old, new = fake_node(["m"]), fake_node(["k"])
    lb = appliance([old], healthCheck={"circuitBreakerFailureThreshold": 1,
                                       "circuitBreakerRecoveryMs": 600_000})
    before = lb.factory.node_registry.get("n0")
    before.breaker.record_failure()
    assert before.circuit is CircuitState.OPEN and before.has_model(canonical("m"))
    cfg = lb_config([new], healthCheck={"circuitBreakerFailureThreshold": 1,
                                        "circuitBreakerRecoveryMs": 600_000})
    changes = lb.factory.apply_config(parse_config(cfg))
    assert changes["updated"] == ["n0"]
    after = lb.factory.node_registry.get("n0")
    assert after is not before and after.url == new.url
    assert after.circuit is CircuitState.CLOSED and after.failures == 0
    assert after.installed is None  # nothing known about the new box until it is asked
    lb.factory.health_checker.check_all(discover=True)
    assert after.has_model(canonical("k")) and not after.has_model(canonical("m"))
    assert post(lb, {"model": "k", "prompt": "x", "stream": False})[0] == 200


def test_finished_streams_give_their_connection_back_for_reuse(fake_node, appliance):
    fake = fake_node(["m"])
    lb = appliance([fake], discover=False, healthCheck={"enabled": False, "discovery": False})
    for _ in range(5):
        r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                          timeout=10)
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["done"] is True
    assert fake.connections == 1  # one kept-alive connection carried all five streams

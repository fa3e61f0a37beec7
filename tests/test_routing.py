"""Strategies, the circuit breaker and backoff, deterministically (no sockets)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.breaker import CircuitBreaker, CircuitState
from pipeline.config import parse_config
from pipeline.modelname import canonical
from pipeline.node import Health, Node
from pipeline.retry import backoff_delay
from pipeline.strategy import ModelAware, RandomChoice, StrategyFactory

M = canonical("llama3.2")


def nodes(*weights: int, cap: int = 4) -> list[Node]:
    cfg = parse_config({"nodes": [{"id": f"n{i}", "url": f"http://127.0.0.1:{9000 + i}",
                                   "weight": w, "maxConcurrentRequests": cap}
                                  for i, w in enumerate(weights)]})
    return [Node(n, cfg) for n in cfg.nodes]


def picks(strategy, pool, n, model=M):
    return Counter(strategy.select(pool, model).id for _ in range(n))


def test_round_robin_cycles_evenly():
    pool = nodes(1, 1, 1)
    s = StrategyFactory.create("round-robin")
    order = [s.select(pool, M).id for _ in range(6)]
    assert order == ["n0", "n1", "n2", "n0", "n1", "n2"]


def test_smooth_weighted_round_robin_respects_weights_and_interleaves():
    pool = nodes(5, 1, 1)
    s = StrategyFactory.create("weighted-round-robin")
    order = [s.select(pool, M).id for _ in range(7)]
    assert Counter(order) == {"n0": 5, "n1": 1, "n2": 1}
    assert order == ["n0", "n0", "n1", "n0", "n2", "n0", "n0"]  # nginx's smooth order
    assert picks(s, pool, 700) == {"n0": 500, "n1": 100, "n2": 100}


def test_adaptive_weighting_halves_a_degraded_node():
    pool = nodes(4, 4)
    pool[1].health = Health.DEGRADED
    s = StrategyFactory.create("weighted-round-robin", adaptive=True)
    assert picks(s, pool, 600) == {"n0": 400, "n1": 200}


def test_least_in_flight_prefers_the_idlest_and_rotates_ties():
    pool = nodes(1, 1, 1)
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 3, 1, 1
    s = StrategyFactory.create("least-in-flight")
    assert picks(s, pool, 10) == {"n1": 5, "n2": 5}


def test_least_in_flight_compares_load_relative_to_capacity():
    big, small = nodes(1, cap=8)[0], nodes(1, cap=2)[0]
    small.id = "small"
    big.in_flight, small.in_flight = 3, 1  # 3/8 < 1/2
    assert StrategyFactory.create("least-in-flight").select([big, small], M) is big


def test_random_is_uniform_with_a_seeded_rng():
    pool = nodes(1, 1, 1, 1)
    counts = picks(RandomChoice(rng=random.Random(7)), pool, 4000)
    assert set(counts) == {"n0", "n1", "n2", "n3"}
    assert all(900 < c < 1100 for c in counts.values())


def test_model_aware_prefers_loaded_then_least_busy_then_fewest_loaded():
    pool = nodes(1, 1, 1)
    for n in pool:
        n.installed = {M, canonical("mistral")}
    pool[2].loaded = {M}
    s = ModelAware()
    assert picks(s, pool, 10) == {"n2": 10}  # warm wins
    pool[1].loaded = {M}
    pool[2].in_flight = 2
    assert picks(s, pool, 10) == {"n1": 10}  # among warm nodes, the least busy
    pool[1].loaded = pool[2].loaded = {canonical("mistral")}
    assert picks(s, pool, 10) == {"n0": 10}  # cold: the node that evicts nothing


def test_model_aware_cold_load_goes_where_it_evicts_least():
    pool = nodes(1, 1, 1, 1)
    a, b = canonical("a"), canonical("b")
    for n in pool:
        n.installed = {M, a, b}
    s = ModelAware()
    s.pool = lambda: pool
    pool[0].loaded, pool[1].loaded, pool[2].loaded, pool[3].loaded = {a}, {a}, {b}, set()
    assert s.select(pool, M) is pool[3]  # empty room first
    pool[3].loaded = {b}
    pool[1].in_flight = 1
    # a and b both have two warm copies; n0 and n2 are idle, n1 busy: an idle node is evicted
    assert s.select(pool, M) in (pool[0], pool[2], pool[3])
    pool[3].loaded = {canonical("c")}  # c's only warm copy: never evicted while others can go
    assert s.select(pool, M) in (pool[0], pool[2])


def test_a_success_marks_the_model_loaded_and_forgets_what_it_evicted():
    node = nodes(1)[0]
    node.set_loaded({canonical("a")})  # /api/ps: this node keeps one model at a time
    node.mark_loaded(M)
    assert node.loaded == {M}
    node.set_loaded({canonical("a"), canonical("b")})  # it can hold two after all
    node.mark_loaded(M)
    assert len(node.loaded) == 2 and M in node.loaded


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match="round-robin, weighted-round-robin, least-in-flight"):
        StrategyFactory.create("fastest")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_threshold_and_half_opens_after_recovery():
    clock = Clock()
    changes = []
    b = CircuitBreaker(3, 10.0, clock=clock, on_change=lambda a, z: changes.append(z))
    for _ in range(2):
        b.record_failure()
    assert b.state is CircuitState.CLOSED and b.acquire()
    b.record_failure()
    assert b.state is CircuitState.OPEN and not b.acquire() and not b.allows()
    clock.t = 9.9
    assert b.state is CircuitState.OPEN
    clock.t = 10.0
    assert b.state is CircuitState.HALF_OPEN
    assert b.acquire()  # the one trial
    assert not b.acquire() and not b.allows()  # nobody else meanwhile
    b.record_success()
    assert b.state is CircuitState.CLOSED
    assert changes == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED]


def test_breaker_trial_failure_reopens_for_a_full_recovery_period():
    clock = Clock()
    b = CircuitBreaker(1, 5.0, clock=clock)
    b.record_failure()
    clock.t = 5.0
    assert b.acquire()
    b.record_failure()
    assert b.state is CircuitState.OPEN
    clock.t = 9.0
    assert b.state is CircuitState.OPEN
    clock.t = 10.0
    assert b.state is CircuitState.HALF_OPEN


def test_a_success_resets_the_consecutive_failure_count():
    b = CircuitBreaker(3, 5.0, clock=Clock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is CircuitState.CLOSED


def test_probe_success_does_not_close_a_circuit_opened_by_live_failures():
    node = nodes(1)[0]
    for _ in range(node.breaker.failure_threshold):
        node.record_failure("boom", live=True)
    assert node.circuit is CircuitState.OPEN
    node.record_success(live=False)
    assert node.circuit is CircuitState.OPEN and node.health is Health.UP


def test_health_degrades_then_goes_down_on_consecutive_failures():
    node = nodes(1)[0]
    node.record_failure("x", live=False)
    assert node.health is Health.DEGRADED
    node.record_failure("x", live=False)
    node.record_failure("x", live=False)
    assert node.health is Health.DOWN and not node.admits()
    node.record_success(live=False)
    assert node.health is Health.UP


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    assert backoff_delay(1, 0.1, 2.0, 1.0, rng=lambda: 0.0) == pytest.approx(0.05)
    assert backoff_delay(1, 0.1, 2.0, 1.0, rng=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_delay(3, 0.1, 2.0, 1.0, rng=lambda: 1.0) == pytest.approx(0.4)
    assert backoff_delay(10, 0.1, 2.0, 1.0, rng=lambda: 1.0) == pytest.approx(1.0)
    delays = {backoff_delay(2, 0.1, 2.0, 1.0) for _ in range(50)}
    assert len(delays) > 40 and all(0.1 <= d <= 0.2 for d in delays)


def test_model_names_compare_in_canonical_form():
    assert canonical("Llama3.2") == canonical("llama3.2:latest") == canonical(
        "registry.ollama.ai/library/llama3.2:latest")
    assert canonical("me/model:7b") == "registry.ollama.ai/me/model:7b"
    assert canonical("host:5000/ns/m") == "host:5000/ns/m:latest"


def test_a_request_that_waited_long_still_prefers_a_free_warm_node():
    """After its wait for a warm node ran out, a request may go cold, but not when a warm
    node has room: the router must still offer that one (cold_ok only widens the choice)."""
    from pipeline.routing import Router

    cfg = parse_config({"nodes": [{"id": f"n{i}", "url": f"http://127.0.0.1:{9 + i}",
                                   "models": [M, "k"]} for i in range(2)]})
    from pipeline.registry import NodeRegistry
    registry = NodeRegistry(cfg)
    warm, other = registry.all_nodes()
    warm.set_loaded({M, canonical("k")})  # not spare: holds the only warm copy of k
    router = Router(registry, StrategyFactory.create("model-aware"))
    assert router.candidates(M, [warm, other], cold_ok=True) == [warm, other]
    lease = router.acquire(M, cold_ok=True)
    assert lease is not None and lease.node is warm
    registry.release(lease)

"""Ring microbenchmarks (pytest-benchmark; `make bench`, skipped by `make test`).

Each benchmark pushes N requests through the same six stage functions in one of three ways;
compare ``ops`` (rounds per second) x N for requests per second. Latency percentiles at
10,000 requests/s offered (paced, and in bursts) are in ``extra_info``.
"""

from __future__ import annotations

import statistics

import pytest
import ringbench as rb

N = 20_000
ROUNDS = 5  # of the latency benchmark: 1 s of ring and 1 s of loop each, paced and burst


@pytest.fixture
def factory():
    f = rb.make_factory()
    yield f
    f.stop()


@pytest.mark.parametrize("wait", ["yielding", "blocking", "sleeping", "busy-spin"])
def test_ring_throughput(benchmark, wait):
    f = rb.make_factory(wait)
    try:
        benchmark.extra_info["requests"] = N
        benchmark.pedantic(rb.run_ring, args=(f, N), rounds=5, iterations=1)
        benchmark.extra_info["requests_per_s"] = N / benchmark.stats.stats.median
    finally:
        f.stop()


def test_ring_one_at_a_time_throughput(benchmark, factory):
    """Each request answered before the next: the ring's cost per wake-up, unbatched."""
    benchmark.pedantic(rb.run_serial, args=(factory, N), rounds=5, iterations=1)
    benchmark.extra_info["requests_per_s"] = N / benchmark.stats.stats.median


def test_plain_loop_throughput(benchmark, factory):
    benchmark.pedantic(rb.run_loop, args=(factory, N), rounds=5, iterations=1)
    benchmark.extra_info["requests_per_s"] = N / benchmark.stats.stats.median


def test_queue_chain_throughput(benchmark, factory):
    benchmark.pedantic(rb.run_queues, args=(factory, N), rounds=5, iterations=1)
    benchmark.extra_info["requests_per_s"] = N / benchmark.stats.stats.median


def test_ring_latency_at_10k_per_second(benchmark, factory):
    """Paced arrivals (one every 100 us) decide the goal; bursts (ten at once each 1 ms)
    are reported beside them, for what the stages' batching costs the first of a burst.

    Each round runs 1 s through the ring, then the same arrivals through the plain loop; a
    p99 of one second is moved by a single hiccup of the VM (in either run), so what is
    reported is each figure's median over the rounds, with every round's kept beside it."""
    rounds: list[dict[str, float]] = []

    def run():
        result = {}
        for prefix, burst in (("", False), ("burst_", True)):
            lat = rb.latency_ring(factory, burst=burst)
            base = rb.latency_loop(factory, burst=burst)
            result.update({f"{prefix}p50_us": rb.percentile(lat, 50) * 1e6,
                           f"{prefix}p99_us": rb.percentile(lat, 99) * 1e6,
                           f"{prefix}loop_p50_us": rb.percentile(base, 50) * 1e6,
                           f"{prefix}loop_p99_us": rb.percentile(base, 99) * 1e6,
                           f"{prefix}samples": len(lat)})
        rounds.append(result)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({key: statistics.median(r[key] for r in rounds)
                                 for key in rounds[0]})
    benchmark.extra_info["rounds"] = rounds
    assert len(rounds) == ROUNDS
    assert all(r["samples"] == r["burst_samples"] == 10_000 for r in rounds)  # all answered

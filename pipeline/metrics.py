"""Prometheus metrics, in a registry of their own (one per pipeline, so tests can run many).

The seed's series keep their names (``<prefix>_requests_total``, ``_request_latency``,
``_errors_total``, ``_node_inflight``, ``_node_max_concurrent``, ``_node_health``,
``_ringbuffer_remaining``) so its PromQL and alert rules work verbatim. Pool gauges are read
from live state at scrape time rather than updated on every request. Model labels are bounded:
a model no node is known to have is reported as ``other``, so junk names create no series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.breaker import STATE_VALUE
from pipeline.node import HEALTH_VALUE, Node
from pipeline.tally import CounterTally, HistogramTally

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400)
OTHER = "other"
RELOAD_RESULTS = ("applied", "invalid")  # every result app/reload.py counts


class _Bound:
    """Caches labelled children: ``.labels()`` costs ~1.6 us, a cached child ~0.5 us."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child


class PoolCollector(Collector):
    """Gauges read at scrape time from the pipeline's stats and the nodes' live state."""

    def __init__(self, prefix: str, stats: Callable[[], dict[str, Any]],
                 nodes: Callable[[], list[Node]]) -> None:
        self.prefix = prefix
        self._stats = stats
        self._nodes = nodes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pre = self.prefix
        gauges = {
            "node_inflight": ("Requests in flight on the node", lambda n: n.in_flight),
            "node_max_concurrent": ("The node's concurrency cap", lambda n: n.max_concurrent),
            "node_health": ("1 UP, 0.5 DEGRADED, 0 DOWN", lambda n: HEALTH_VALUE[n.health]),
            "node_circuit_state": ("0 CLOSED, 1 HALF_OPEN, 2 OPEN",
                                   lambda n: STATE_VALUE[n.circuit]),
            "node_enabled": ("1 if the node takes new requests", lambda n: float(
                n.enabled and not n.draining)),
        }
        nodes = self._nodes()
        for name, (doc, read) in gauges.items():
            fam = GaugeMetricFamily(f"{pre}_{name}", doc, labels=["node"])
            for node in nodes:
                fam.add_metric([node.id], float(read(node)))
            yield fam
        stats = self._stats()
        for name, doc, value in (
            ("ringbuffer_remaining", "Free ring slots", stats["ringBufferRemaining"]),
            ("global_inflight", "Requests admitted and not finished", stats["globalInFlight"]),
            ("queue_depth", "Requests waiting for node capacity", stats["queued"]),
            ("pipeline_up", "1 while every stage greenlet runs", float(stats["running"])),
        ):
            yield GaugeMetricFamily(f"{pre}_{name}", doc, value=float(value))


class MetricsRegistry:
    """All series of one pipeline, with cheap recording helpers."""

    def __init__(self, prefix: str = "ollama_lb") -> None:
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=False)
        r, p = self.registry, prefix
        # the series every request updates: plain numbers until scraped (pipeline/tally.py)
        self.requests = CounterTally(f"{p}_requests", "Requests finished",
                                     ["endpoint", "model", "node", "status"], r).labels
        self.latency = HistogramTally(f"{p}_request_latency", "Request latency, seconds",
                                      ["endpoint", "model"], r, LATENCY_BUCKETS).labels
        self.errors = CounterTally(f"{p}_errors", "Requests that failed, by error code",
                                   ["code"], r).labels
        self.ttft = HistogramTally(f"{p}_time_to_first_token_seconds",
                                   "Time from arrival to the node's first byte",
                                   ["model", "node"], r, TTFT_BUCKETS).labels
        self.queue_wait = Histogram(f"{p}_queue_wait_seconds",
                                    "Time spent waiting for node capacity", registry=r,
                                    buckets=LATENCY_BUCKETS)
        self.tokens = CounterTally(f"{p}_tokens_generated", "Tokens generated (eval_count; "
                                   "completion_tokens, output_tokens on /v1)",
                                   ["model", "node"], r).labels
        self.token_rate = HistogramTally(f"{p}_tokens_per_second",
                                         "Generation speed of finished requests",
                                         ["model", "node"], r, RATE_BUCKETS).labels
        self.retries = _Bound(Counter(f"{p}_retries", "Retries, by the node retried on",
                                      ["node"], registry=r))
        self.circuit_transitions = _Bound(Counter(
            f"{p}_circuit_transitions", "Circuit breaker state changes", ["node", "to"],
            registry=r))
        self.reloads = _Bound(Counter(f"{p}_config_reloads", "Config reloads by result",
                                      ["result"], registry=r))
        for result in RELOAD_RESULTS:  # at 0 from the start: the first rejection is an increase
            self.reloads(result)
        self.admissions = CounterTally(f"{p}_admissions", "Ring outcomes per request",
                                       ["outcome"], r).labels
        # model management (pull, create, blobs, copy, delete) and the placement reconciler
        self.model_operations = _Bound(Counter(
            f"{p}_model_operations", "Model management requests by operation and outcome",
            ["operation", "outcome"], registry=r))
        self.model_operation_latency = _Bound(Histogram(
            f"{p}_model_operation_seconds", "Model management requests, seconds", ["operation"],
            registry=r, buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400)))
        self.placement_actions = _Bound(Counter(
            f"{p}_placement_actions", "Reconciler actions (pull, warm, delete) by outcome",
            ["action", "outcome"], registry=r))
        self._pool: PoolCollector | None = None

    def bind(self, stats: Callable[[], dict[str, Any]],
             nodes: Callable[[], list[Node]]) -> None:
        """Expose the pipeline's live gauges: its stats and every node, read at scrape time."""
        if self._pool is None:
            self._pool = PoolCollector(self.prefix, stats, nodes)
            self.registry.register(self._pool)

    def retry(self, node_id: str) -> None:
        self.retries(node_id).inc()

    def scrape(self) -> str:
        """The Prometheus text exposition (as the seed's ``String prometheus = scrape()``)."""
        return generate_latest(self.registry).decode()

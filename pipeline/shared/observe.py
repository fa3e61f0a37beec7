"""Metrics of shared caps, registered in the pipeline's own Prometheus registry.

Mode, instances seen alive and leases held per node are read at scrape time from the live
state; Redis round trips go into a histogram as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MODES = ("shared", "local", "rejoining")
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class _SharedCollector(Collector):
    def __init__(self, prefix: str, status: Callable[[], dict[str, Any]]) -> None:
        self.prefix = prefix
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s, p = self.status(), self.prefix
        mode = GaugeMetricFamily(f"{p}_shared_mode", "1 for the instance's current mode "
                                 "(shared: caps counted in Redis; local: own share; rejoining)",
                                 labels=["mode"])
        for m in MODES:
            mode.add_metric([m], float(s["mode"] == m))
        yield mode
        yield GaugeMetricFamily(f"{p}_shared_instances_alive",
                                "Appliance instances seen alive (shares are split over them)",
                                value=float(len(s["instancesAlive"])))
        held = GaugeMetricFamily(f"{p}_shared_leases_held",
                                 "Leases this instance holds per node", labels=["node"])
        for node, n in s["leasesHeld"].items():
            held.add_metric([node], float(n))
        yield held


class SharedMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str,
                 status: Callable[[], dict[str, Any]]) -> None:
        self.redis_seconds = Histogram(f"{prefix}_redis_seconds", "Redis round trips, seconds",
                                       ["op"], registry=registry, buckets=REDIS_BUCKETS)
        self._ops = {op: self.redis_seconds.labels(op)
                     for op in ("acquire", "release", "renew", "sentinel", "hint")}
        self.mode_changes = Counter(f"{prefix}_shared_mode_changes",
                                    "Mode changes of shared caps, by the mode entered", ["to"],
                                    registry=registry)
        self.hints = Counter(f"{prefix}_shared_circuit_hints",
                             "Circuit-open hints, by node: sent (this instance's breaker "
                             "opened) or received (another's did)", ["node", "direction"],
                             registry=registry)
        self.hint_probes = Counter(f"{prefix}_shared_hint_probes",
                                   "Probe bursts run on a received circuit-open hint, by how "
                                   "they ended (ok: the node answered; failed; skipped: "
                                   "already DOWN or open here, or checks off)",
                                   ["node", "result"], registry=registry)
        self.redis_errors = Counter(f"{prefix}_redis_errors", "Redis calls that failed",
                                    ["op"], registry=registry)
        registry.register(_SharedCollector(prefix, status))

    def observe(self, op: str, seconds: float) -> None:
        self._ops[op].observe(seconds)

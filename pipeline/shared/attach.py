"""Wiring shared caps into one pipeline: the factory's only call into this package."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.breaker import CircuitState
from pipeline.config import Config
from pipeline.metrics import MetricsRegistry
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.shared.caps import SharedCaps
from pipeline.shared.hints import CircuitHints, Probe
from pipeline.shared.leases import RedisLeases
from pipeline.shared.observe import SharedMetrics

if TYPE_CHECKING:  # the dispatcher is above this package: it calls the gate, not the reverse
    from pipeline.dispatch import Dispatcher


def attach(settings: Callable[[], Config], registry: NodeRegistry, dispatcher: Dispatcher,
           metrics: MetricsRegistry, probe: Probe | None = None) -> SharedCaps:
    """Shared caps for ``sharedState.redisUrl``: the dispatch gate and the release hook;
    circuit-open hints through the registry's breaker hook (``probe``: the health checker's
    out-of-turn check, run when another instance's breaker opened).

    The URL and key prefix are restart-only, so the store is made once from the first config;
    TTL, heartbeat, timeout and grace are read live.
    """
    s = settings().sharedState
    assert s.redisUrl, "attach() is only for a configured sharedState.redisUrl"
    caps: SharedCaps | None = None
    observer = SharedMetrics(metrics.registry, metrics.prefix,
                             lambda: caps.status() if caps else {
                                 "mode": "local", "instancesAlive": [], "leasesHeld": {}})
    store = RedisLeases(s.redisUrl, s.keyPrefix, s.timeoutMs / 1000.0, observer.observe)
    caps = SharedCaps(lambda: settings().sharedState, registry, store, observer)
    registry.on_release = caps.on_release
    dispatcher.admit = caps.admit
    hints = caps.hints = CircuitHints(caps, registry, probe)
    earlier = registry.on_circuit_change  # the pipeline's (metrics, logs): still called first

    def circuit_changed(node: Node, old: CircuitState, new: CircuitState) -> None:
        earlier(node, old, new)
        hints.circuit_changed(node, old, new)

    registry.on_circuit_change = circuit_changed
    return caps

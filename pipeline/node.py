"""One Ollama node as the appliance knows it: config, health, models, load and circuit.

Everything here is read on the request path, so it is plain attributes updated in place by
the health checker and by live traffic; no locking is needed on a single gevent hub.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pipeline.breaker import CircuitBreaker, CircuitState
from pipeline.config import Config, NodeConfig
from pipeline.lease import Lease
from pipeline.modelname import canonical


class Health(StrEnum):
    UP = "UP"
    DEGRADED = "DEGRADED"
    DOWN = "DOWN"


HEALTH_VALUE = {Health.UP: 1.0, Health.DEGRADED: 0.5, Health.DOWN: 0.0}


class Node:
    """Per-node state. ``in_flight`` counts requests from this appliance holding a slot."""

    def __init__(self, cfg: NodeConfig, config: Config,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.id = cfg.id
        self.url = cfg.url
        self.in_flight = 0
        self.shared_full = False  # sharedState: full across instances (pipeline/shared)
        self.health = Health.UP
        self.failures = 0  # consecutive failures, active and passive
        self.last_error: str | None = None
        self.last_check: float | None = None
        self.version: str | None = None
        self.installed: set[str] | None = None  # canonical names from /api/tags; None: unknown
        self.loaded: set[str] = set()  # canonical names from /api/ps (and own traffic)
        self.max_loaded_seen = 0  # most models /api/ps ever showed at once: the node's room
        self._recent: list[str] = []  # loaded models, least recently used first
        self.tags: list[dict[str, Any]] = []  # raw /api/tags entries, for merging
        self.ps: list[dict[str, Any]] = []  # raw /api/ps entries
        self.models_at: float | None = None  # monotonic time of the last model refresh
        self.discovery_ok = False  # the last model refresh succeeded (the node answers)
        self.draining = False  # removed from config or drained by an operator
        self.requests_total = 0
        self.latency_ewma: float | None = None  # seconds to first byte, for adaptive routing
        self.breaker = CircuitBreaker(
            config.healthCheck.circuitBreakerFailureThreshold,
            config.healthCheck.circuitBreakerRecoveryMs / 1000.0, clock=clock)
        self.apply(cfg, config)

    def apply(self, cfg: NodeConfig, config: Config) -> None:
        """Take new settings in place (hot reload): in-flight requests are unaffected.

        ``enabled`` follows the file only when the file's value changes, so an operator's
        enable/disable through the admin API survives unrelated reloads.
        """
        previous = getattr(self, "cfg", None)
        self.cfg = cfg
        self.url = cfg.url
        self.weight = cfg.weight
        self.max_concurrent = cfg.maxConcurrentRequests
        if previous is None or previous.enabled != cfg.enabled:
            self.enabled = cfg.enabled
        self.static_models = {canonical(m) for m in cfg.models}
        hc = config.healthCheck
        self.active_checks = hc.enabled if cfg.healthCheck is None else cfg.healthCheck
        self.discovery = hc.discovery if cfg.discovery is None else cfg.discovery
        self.degraded_threshold = hc.degradedThreshold
        self.down_threshold = hc.downThreshold
        self.breaker.reconfigure(hc.circuitBreakerFailureThreshold,
                                 hc.circuitBreakerRecoveryMs / 1000.0)

    # --- models -------------------------------------------------------------------------------

    def knows_models(self) -> bool:
        return bool(self.static_models) or self.installed is not None

    def has_model(self, model: str) -> bool:
        """True if the node has (or may have, when nothing is known) the canonical model."""
        if model in self.static_models:
            return True
        installed = self.installed
        if installed is not None:
            return model in installed
        return not self.static_models  # nothing known: it may

    def has_loaded(self, model: str) -> bool:
        return model in self.loaded

    def set_loaded(self, models: set[str]) -> None:
        """Take /api/ps as the truth, and learn how many models the node keeps at once."""
        self.loaded = set(models)
        self._recent = [m for m in self._recent if m in models] + sorted(
            models - set(self._recent))
        self.max_loaded_seen = max(self.max_loaded_seen, len(models))

    def mark_loaded(self, model: str) -> None:
        """A request for ``model`` just succeeded here, so it is loaded now.

        If that is more models than the node has ever shown loaded at once, it evicted the
        least recently used one: forget it now rather than at the next /api/ps refresh, so
        routing does not send that model's requests to a node that would have to reload it.
        """
        if model not in self.loaded:
            self.models_at = None  # the node's /api/ps list no longer tells the truth
        if model in self._recent:
            self._recent.remove(model)
        self._recent.append(model)
        self.loaded.add(model)
        while self.max_loaded_seen and len(self._recent) > self.max_loaded_seen:
            self.loaded.discard(self._recent.pop(0))

    # --- eligibility and capacity -------------------------------------------------------------

    def admits(self) -> bool:
        """May take new requests at all (ignoring capacity)."""
        return (self.enabled and not self.draining and self.health is not Health.DOWN
                and self.breaker.allows())

    def has_capacity(self) -> bool:
        return self.in_flight < self.max_concurrent and not self.shared_full

    def try_acquire(self) -> Lease | None:
        """A lease on one request slot if the node admits it and has room."""
        if not self.has_capacity() or not self.admits():
            return None
        permit = self.breaker.acquire()
        if permit is None:
            return None
        self.in_flight += 1
        self.requests_total += 1
        return Lease(self, permit)

    def give_back(self, lease: Lease) -> None:
        """A lease ended (``Lease.release``): the slot, and an unjudged trial, come back."""
        self.in_flight -= 1
        if self.in_flight < 0:  # a bug; never let it hide capacity
            self.in_flight = 0
        if not lease.verdict:
            self.breaker.release(lease.permit)

    # --- health -------------------------------------------------------------------------------

    def record_success(self, first_byte_s: float | None = None, *, live: bool = True) -> None:
        """A success resets health; only live traffic closes the circuit.

        An answering ``/api/version`` does not prove inference works, so a probe never closes
        a circuit opened by failing requests: the half-open trial request does.
        """
        self.failures = 0
        self.health = Health.UP
        if live:
            self.breaker.record_success()
        if first_byte_s is not None:
            prev = self.latency_ewma
            self.latency_ewma = first_byte_s if prev is None else 0.8 * prev + 0.2 * first_byte_s

    def record_failure(self, error: str, *, live: bool) -> None:
        """Count a failure. Live-traffic failures also feed the circuit breaker.

        A node whose active checks are off is never marked DOWN by live failures alone (no
        probe would ever bring it back): its breaker does the excluding and the recovering.
        """
        self.failures += 1
        self.last_error = error
        if live:
            self.breaker.record_failure()
        if self.failures >= self.down_threshold and (self.active_checks or not live):
            self.health = Health.DOWN
        elif self.failures >= self.degraded_threshold:
            self.health = Health.DEGRADED

    @property
    def circuit(self) -> CircuitState:
        return self.breaker.state

    def snapshot(self) -> dict[str, Any]:
        """The node as /health and /admin/nodes show it."""
        return {
            "id": self.id,
            "url": self.url,
            "health": self.health.value,
            "enabled": self.enabled,
            "draining": self.draining,
            "inFlight": self.in_flight,
            "maxConcurrent": self.max_concurrent,
            "weight": self.weight,
            "circuitState": self.circuit.value,
            "consecutiveFailures": self.failures,
            "lastError": self.last_error,
            "version": self.version,
            "models": sorted(self.static_models | (self.installed or set())),
            "loadedModels": sorted(self.loaded),
            "requestsTotal": self.requests_total,
        }

"""Circuit-open hints: one instance's breaker opened for a node, the others probe it at once.

Without them, every other instance keeps sending that node requests until its own breaker
has seen enough failures to trip (``circuitBreakerFailureThreshold`` of them, each a failed
or retried request). With them, the instance whose breaker opened publishes
``"<instance> <node id>"`` on ``{prefix}:hints`` (pub/sub, the subscription that carries
freed-slot wake-ups), and each receiver runs its own active health check of that node out of
turn, again while it fails, up to ``healthCheck.downThreshold`` checks: a node that is really
gone is DOWN on every instance within milliseconds, by each one's own evidence.

A hint is only a hint. It never opens the receiver's breaker, never marks the node by itself,
and a node that answers the probe keeps its traffic (a fault that strikes only inference,
with ``/api/version`` fine, is left to the receiver's own breaker). A probe's failures count
like any health check's; the regular checks bring the node back when it answers again.
Hints are not sent in local mode (Redis away) and are not stored: an instance that was not
subscribed when one was sent relies on its own breaker, as without hints.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
import redis
from gevent.pool import Group

from pipeline.breaker import CircuitState
from pipeline.node import Health, Node
from pipeline.registry import NodeRegistry
from pipeline.shared.caps import Mode, SharedCaps

log = logging.getLogger("ollama_lb.shared")
Probe = Callable[[Node], bool]  # one active health check now; True if the node answered
PROBE_GAP_S = 0.05  # between the checks of one burst: a blip of the node is not a verdict


class CircuitHints:
    def __init__(self, caps: SharedCaps, registry: NodeRegistry, probe: Probe | None) -> None:
        self.caps = caps
        self.registry = registry
        self.probe = probe
        self.jobs = Group()  # publishes and probe bursts under way
        self._probing: dict[str, gevent.Greenlet] = {}
        self.sent: Counter[str] = Counter()
        self.received_from: Counter[str] = Counter()
        self.last_probe: dict[str, str] = {}  # node id -> "ok" | "failed" | "skipped"

    def stop(self) -> None:
        self.jobs.kill(block=True, timeout=2)
        self._probing.clear()

    # --- sending ------------------------------------------------------------------------------

    def circuit_changed(self, node: Node, old: CircuitState, new: CircuitState) -> None:
        """The registry's breaker hook: our own traffic opened ``node``'s circuit."""
        if new is CircuitState.OPEN and self.caps.mode is not Mode.LOCAL:
            self.jobs.spawn(self._send, node.id)  # not on the request's greenlet

    def _send(self, nid: str) -> None:
        try:
            self.caps.store.hint(nid, self.caps.me)
        except redis.RedisError as exc:
            self.caps._error("hint", exc)
            return
        self.sent[nid] += 1
        if self.caps.metrics is not None:
            self.caps.metrics.hints.labels(nid, "sent").inc()

    # --- receiving ----------------------------------------------------------------------------

    def received(self, payload: str) -> None:
        """Another instance's breaker opened for a node: probe it now (once at a time)."""
        sender, _, nid = payload.partition(" ")
        if sender == self.caps.me or not nid:
            return
        node = self.registry.get(nid)
        if node is None:
            return
        self.received_from[nid] += 1
        metrics = self.caps.metrics
        if metrics is not None:
            metrics.hints.labels(nid, "received").inc()
        log.info("circuit-open hint", extra={"event": "circuit_hint", "node": nid,
                                             "from": sender, "instance": self.caps.me})
        job = self._probing.get(nid)
        if job is None or job.dead:
            self._probing[nid] = self.jobs.spawn(self._probe_burst, node)

    def _probe_burst(self, node: Node) -> None:
        """Own checks until the node answers or is DOWN; ``last_probe`` says how it ended."""
        result = "skipped"  # no prober, checks off, or already known bad here
        if self.probe is not None and node.active_checks and node.health is not Health.DOWN \
                and node.circuit is CircuitState.CLOSED:
            for attempt in range(max(1, node.down_threshold)):
                if attempt:
                    gevent.sleep(PROBE_GAP_S)
                result = "ok" if self.probe(node) else "failed"
                if result == "ok" or node.health is Health.DOWN:
                    break
        self.last_probe[node.id] = result
        if self.caps.metrics is not None:
            self.caps.metrics.hint_probes.labels(node.id, result).inc()
        if self._probing.get(node.id) is gevent.getcurrent():
            del self._probing[node.id]

    def status(self) -> dict[str, Any]:
        """For /health: hints sent and received per node, and how each node's probe ended."""
        return {"sent": dict(self.sent), "received": dict(self.received_from),
                "lastProbe": dict(self.last_probe),
                "probing": sorted(n for n, g in self._probing.items() if not g.dead)}

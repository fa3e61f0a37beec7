"""Active health checks and model discovery, one greenlet for the whole pool.

Every ``healthCheck.intervalMs`` each node with checks on is probed with ``GET /api/version``;
every ``healthCheck.modelRefreshMs`` nodes with discovery on are asked for ``/api/tags``
(installed models) and ``/api/ps`` (loaded models). Probes of different nodes run in parallel,
each bounded by ``timeouts.healthCheckTimeoutMs``, so one hung node cannot delay the others,
and at most one model refresh per node is in flight at a time (``refresh``), however often
clients ask for the pool's model lists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pool import Group

from pipeline.config import Config
from pipeline.modelname import canonical
from pipeline.node import Health, Node
from pipeline.registry import NodeRegistry
from pipeline.upstream import UpstreamClient

log = logging.getLogger("ollama_lb.health")


class HealthChecker:
    def __init__(self, registry: NodeRegistry, upstream: UpstreamClient, config: Config,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.upstream = upstream
        self.config = config
        self.on_change = on_change  # capacity may have come back: wake waiters
        self._greenlet: gevent.Greenlet | None = None
        self._last_discovery = 0.0
        self._jobs = Group()  # probes and refreshes under way, killed on stop
        self._refreshing: dict[str, gevent.Greenlet] = {}  # node id -> its model refresh

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)
            self._greenlet.name = "health-checker"

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        self._jobs.kill()
        self._refreshing.clear()

    def _loop(self) -> None:
        while True:
            try:
                self.check_all()
            except Exception:  # never let the checker die
                log.exception("health round failed")
            gevent.sleep(self.config.healthCheck.intervalMs / 1000.0)

    def check_all(self, discover: bool | None = None) -> None:
        """One round: probe every node in parallel and wait for all (bounded by timeouts)."""
        now = time.monotonic()
        if discover is None:
            discover = now - self._last_discovery >= self.config.healthCheck.modelRefreshMs / 1e3
        if discover:
            self._last_discovery = now
        jobs = [self._jobs.spawn(self.check_node, node, discover)
                for node in self.registry.all_nodes()]
        gevent.joinall(jobs)
        self.on_change()

    def refreshing(self, node: Node) -> bool:
        job = self._refreshing.get(node.id)
        return job is not None and not job.dead

    def refresh(self, node: Node) -> gevent.Greenlet:
        """Refresh a node's model lists in the background; joins the one already under way."""
        job = self._refreshing.get(node.id)
        if job is None or job.dead:
            job = self._refreshing[node.id] = self._jobs.spawn(self.discover, node)
            job.link(lambda g, key=node.id: self._forget(key, g))
        return job

    def _forget(self, node_id: str, job: gevent.Greenlet) -> None:
        if self._refreshing.get(node_id) is job:
            del self._refreshing[node_id]

    def check_node(self, node: Node, discover: bool) -> None:
        if node.active_checks:
            self._probe(node)
        if discover and node.discovery and node.health is not Health.DOWN:
            self.refresh(node).join()

    def _timeouts(self) -> tuple[float, float]:
        t = self.config.timeouts
        return t.connectTimeoutMs / 1000.0, t.healthCheckTimeoutMs / 1000.0

    def probe_now(self, node: Node) -> bool:
        """One active check of ``node`` now, out of turn (a peer's circuit-open hint):
        counted like any probe, so failures can mark it DOWN; True if it answered."""
        return self._probe(node)

    def _probe(self, node: Node) -> bool:
        connect, read = self._timeouts()
        was = node.health
        ok = False
        try:
            with gevent.Timeout(connect + read):
                data = self.upstream.get_json(node.url, "/api/version", connect, read)
            node.version = str(data.get("version")) if isinstance(data, dict) else None
            node.record_success(live=False)
            ok = True
        except (Exception, gevent.Timeout) as exc:
            node.record_failure(f"health check: {type(exc).__name__}: {str(exc)[:120]}",
                                live=False)
        node.last_check = time.time()
        if node.health is not was:
            log.warning("node health changed", extra={"event": "node_health", "node": node.id,
                        "from": was.value, "to": node.health.value, "error": node.last_error})
        return ok

    def discover(self, node: Node) -> None:
        """Refresh installed and loaded models; failures leave the last known lists."""
        connect, read = self._timeouts()
        try:
            with gevent.Timeout(connect + 3 * read):
                tags = self.upstream.get_json(node.url, "/api/tags", connect, read)
                ps = self.upstream.get_json(node.url, "/api/ps", connect, read)
                if node.version is None:  # nodes without active checks are never probed
                    data = self.upstream.get_json(node.url, "/api/version", connect, read)
                    node.version = str(data.get("version")) if isinstance(data, dict) else None
        except (Exception, gevent.Timeout) as exc:
            log.info("model discovery failed", extra={"event": "discovery_failed",
                     "node": node.id, "error": str(exc)[:200]})
            node.discovery_ok = False
            return
        update_models(node, tags, ps)
        node.discovery_ok = True


def _entries(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        return [m for m in data["models"] if isinstance(m, dict)]
    return []


def model_key(entry: dict[str, Any]) -> str:
    """The canonical name of a /api/tags or /api/ps entry ("" if it names none)."""
    return canonical(str(entry.get("model") or entry.get("name") or ""))


def take_tags(node: Node, tags: Any) -> None:
    """A node's /api/tags reply as its installed models."""
    node.tags = _entries(tags)
    node.installed = {model_key(m) for m in node.tags} - {""}


def take_ps(node: Node, ps: Any) -> None:
    """A node's /api/ps reply as its loaded models."""
    node.ps = _entries(ps)
    node.set_loaded({model_key(m) for m in node.ps} - {""})


def update_models(node: Node, tags: Any, ps: Any) -> None:
    """Take a node's /api/tags and /api/ps replies as its model lists."""
    take_tags(node, tags)
    if ps is not None:
        take_ps(node, ps)
    node.models_at = time.monotonic()

"""The node registry: the pool as configured, updated in place on reload.

A node removed from the config is not dropped at once: it drains (no new requests, streams in
flight finish) and leaves the registry when idle, so a reload never cuts a stream.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.breaker import CircuitState
from pipeline.config import Config
from pipeline.lease import Lease
from pipeline.node import Node


class NodeRegistry:
    def __init__(self, config: Config) -> None:
        self._nodes: dict[str, Node] = {}
        self._removed: list[Node] = []  # draining after removal (or a URL change)
        self.on_capacity: Callable[[Node], None] = lambda node: None
        #: a lease was given back (sharedState gives its Redis lease back with it)
        self.on_release: Callable[[Lease], None] = lambda lease: None
        #: called on every circuit state change: (node, old state, new state)
        self.on_circuit_change: Callable[[Node, CircuitState, CircuitState], None] = (
            lambda node, old, new: None)
        self.apply(config)

    def apply(self, config: Config) -> dict[str, list[str]]:
        """Add, update and remove nodes to match ``config``; returns what changed.

        A node whose URL changes is another box: the old one drains like a removed node and
        a new one, with fresh health, breaker and model state, takes its id.
        """
        changes: dict[str, list[str]] = {"added": [], "updated": [], "removed": []}
        wanted = {n.id: n for n in config.nodes}
        for node_id, node in list(self._nodes.items()):
            cfg = wanted.get(node_id)
            if cfg is None or cfg.url != node.url:
                self._retire(node)
                changes["removed" if cfg is None else "updated"].append(node_id)
        for node_id, cfg in wanted.items():
            node = self._nodes.get(node_id) or self._take_back(node_id, cfg.url)
            if node is None:
                node = self._nodes[node_id] = Node(cfg, config)
                node.breaker.on_change = (
                    lambda old, new, n=node: self.on_circuit_change(n, old, new))
                if node_id not in changes["updated"]:
                    changes["added"].append(node_id)
                continue
            if node.cfg != cfg:
                changes["updated"].append(node_id)
            node.apply(cfg, config)
            self._nodes[node_id] = node
        self._drop_idle_removed()
        return changes

    def _retire(self, node: Node) -> None:
        node.draining = True
        del self._nodes[node.id]
        self._removed.append(node)

    def _take_back(self, node_id: str, url: str) -> Node | None:
        """A node re-added (same id and URL) while it still drains gets its state back."""
        for node in self._removed:
            if node.id == node_id and node.url == url:
                self._removed.remove(node)
                node.draining = False
                return node
        return None

    def all_nodes(self) -> list[Node]:
        """The configured nodes, in config order."""
        return list(self._nodes.values())

    def removed_nodes(self) -> list[Node]:
        """Nodes removed from the config that still have requests in flight."""
        return list(self._removed)

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent) and let waiting requests take the slot."""
        if not lease.release():
            return
        self.on_release(lease)
        node = lease.node
        if node.draining and node.in_flight == 0 and node in self._removed:
            self._removed.remove(node)
        self.on_capacity(node)

    def _drop_idle_removed(self) -> None:
        self._removed = [n for n in self._removed if n.in_flight > 0]

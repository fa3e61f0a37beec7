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
        self._removed: dict[str, Node] = {}  # draining after removal from the config
        self.on_capacity: Callable[[Node], None] = lambda node: None
        #: called on every circuit state change: (node, old state, new state)
        self.on_circuit_change: Callable[[Node, CircuitState, CircuitState], None] = (
            lambda node, old, new: None)
        self.apply(config)

    def apply(self, config: Config) -> dict[str, list[str]]:
        """Add, update and remove nodes to match ``config``; returns what changed."""
        changes: dict[str, list[str]] = {"added": [], "updated": [], "removed": []}
        wanted = {n.id: n for n in config.nodes}
        for node_id, node in list(self._nodes.items()):
            if node_id not in wanted:
                node.draining = True
                del self._nodes[node_id]
                self._removed[node_id] = node
                changes["removed"].append(node_id)
        for node_id, cfg in wanted.items():
            node = self._nodes.get(node_id)
            if node is None and node_id in self._removed:  # re-added while draining
                node = self._removed.pop(node_id)
                node.draining = False
            if node is None:
                node = self._nodes[node_id] = Node(cfg, config)
                node.breaker.on_change = (
                    lambda old, new, n=node: self.on_circuit_change(n, old, new))
                changes["added"].append(node_id)
            else:
                if node.cfg != cfg:
                    changes["updated"].append(node_id)
                node.apply(cfg, config)
                self._nodes[node_id] = node
        self._drop_idle_removed()
        return changes

    def all_nodes(self) -> list[Node]:
        """The configured nodes, in config order."""
        return list(self._nodes.values())

    def removed_nodes(self) -> list[Node]:
        """Nodes removed from the config that still have requests in flight."""
        return list(self._removed.values())

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent) and let waiting requests take the slot."""
        if not lease.release():
            return
        node = lease.node
        if node.draining and node.id in self._removed and node.in_flight == 0:
            del self._removed[node.id]
        self.on_capacity(node)

    def _drop_idle_removed(self) -> None:
        for node_id, node in list(self._removed.items()):
            if node.in_flight == 0:
                del self._removed[node_id]

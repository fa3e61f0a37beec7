"""Pool operations: the pool's health and an operator's actions on nodes, without HTTP.

/health and /admin/nodes are thin callers of this module, so a library user gets the same
verdicts (``factory.operations.health()``) and the same node actions (``enable``, ``disable``,
``drain``) as an operator with curl. Each action wakes the capacity waiters itself through the
``wake`` callable (the factory passes ``pipeline.offer_capacity``): a node that comes back
must take the requests queued for it at once, and no caller can forget to say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pipeline.node import Health, Node
from pipeline.registry import NodeRegistry

UP, DEGRADED, DOWN = Health.UP.value, Health.DEGRADED.value, Health.DOWN.value


class PipelineState(Protocol):
    """What pool health reads from the pipeline (``Pipeline`` has it)."""

    running: bool
    accepting: bool
    crashed: str | None

    def stats(self) -> dict[str, Any]: ...


class UnknownNodeError(LookupError):
    """No configured node has this id."""

    def __init__(self, node_id: str) -> None:
        super().__init__(f"no node {node_id!r}")
        self.node_id = node_id


class UnknownActionError(ValueError):
    """Not one of ``PoolOperations.NODE_ACTIONS``."""

    def __init__(self, action: str, valid: tuple[str, ...]) -> None:
        super().__init__(f"unknown action {action!r}; valid: {', '.join(valid)}")
        self.action = action


class PoolOperations:
    """Health verdicts and node steering for one pool; every change wakes waiters."""

    #: the actions an operator may take on a node by name (``act``)
    NODE_ACTIONS: tuple[str, ...] = ("enable", "disable", "drain")

    def __init__(self, registry: NodeRegistry, pipeline: PipelineState,
                 wake: Callable[[], None]) -> None:
        self.registry = registry
        self.pipeline = pipeline
        self.wake = wake
        self.draining = False  # set by the server on SIGTERM: requests drain, not ready
        #: sharedState: mode, instances alive, leases held (set by the factory), else None
        self.shared_status: Callable[[], dict[str, Any]] | None = None

    # --- health -------------------------------------------------------------------------------

    def status(self) -> str:
        """UP: every enabled node serves; DEGRADED: some can; DOWN: none can, or a stage died."""
        p = self.pipeline
        if p.crashed or not p.running:
            return DOWN
        nodes = [n for n in self.registry.all_nodes() if n.enabled]
        serving = [n for n in nodes if n.admits()]
        if not serving:
            return DOWN
        if len(serving) < len(nodes) or any(n.health is not Health.UP for n in nodes):
            return DEGRADED
        return UP

    def health(self) -> dict[str, Any]:
        """The pool as /health shows it: overall status, every node, the pipeline's gauges."""
        out = {
            "status": self.status(),
            "nodes": [n.snapshot() for n in self.registry.all_nodes()],
            "drainingNodes": [n.snapshot() for n in self.registry.removed_nodes()],
            "pipeline": self.pipeline.stats(),
        }
        if self.shared_status is not None:
            out["sharedState"] = self.shared_status()
        return out

    def live(self) -> dict[str, Any]:
        """UP while every stage greenlet runs: the process is worth keeping."""
        p = self.pipeline
        return {"status": UP if p.running and not p.crashed else DOWN, "crashed": p.crashed}

    def ready(self) -> dict[str, Any]:
        """UP while the pipeline accepts, the appliance is not draining, and at least one node
        can take a request."""
        serving = [n.id for n in self.registry.all_nodes() if n.admits()]
        ok = self.pipeline.accepting and not self.draining and bool(serving)
        return {"status": UP if ok else DOWN, "servingNodes": serving,
                "draining": self.draining}

    # --- node actions -------------------------------------------------------------------------

    def node(self, node_id: str) -> Node:
        """The configured node ``node_id``, or UnknownNodeError."""
        node = self.registry.get(node_id)
        if node is None:
            raise UnknownNodeError(node_id)
        return node

    def enable(self, node_id: str) -> Node:
        """Take new requests again: undoes both ``disable`` and ``drain``."""
        node = self.node(node_id)
        node.enabled, node.draining = True, False
        self.wake()
        return node

    def disable(self, node_id: str) -> Node:
        """No new requests; those in flight finish."""
        node = self.node(node_id)
        node.enabled = False
        self.wake()
        return node

    def drain(self, node_id: str) -> Node:
        """No new requests while in-flight ones finish (shown as ``draining``)."""
        node = self.node(node_id)
        node.draining = True
        self.wake()
        return node

    def act(self, action: str, node_id: str) -> Node:
        """One of NODE_ACTIONS by name; an unknown node is reported before an unknown action."""
        self.node(node_id)
        if action not in self.NODE_ACTIONS:
            raise UnknownActionError(action, self.NODE_ACTIONS)
        steer: Callable[[str], Node] = getattr(self, action)
        return steer(node_id)

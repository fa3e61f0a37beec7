"""Routing: which nodes can take a model now, and which one the strategy picks.

The router reads the registry and asks the strategy; it owns no state of its own beyond the
strategy in use. ``acquire`` is the one place a node slot is taken for a routed request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeline.lease import Lease
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.strategy import Strategy

#: model-aware waits for busy warm nodes until this many rounds of their slots are queued
WARM_BACKLOG = 2


class Router:
    """Which nodes can take a model now, and which one the strategy picks.

    With a strategy that ``waits_for_warm`` (model-aware), a request whose model is loaded on
    nodes that are all busy waits for one of them rather than forcing a cold load (seconds,
    and an eviction) elsewhere, until the backlog for that model reaches ``WARM_BACKLOG``
    rounds of the warm nodes' slots: then it spreads to spare nodes (empty, or holding only
    models that are warm elsewhere too), so a popular model scales out without evicting the
    last warm copy of another model, which would only move the cold load to that model.

    That wait is bounded (``warm_wait_s``): a request never waits for a warm node longer than
    a cold load is expected to take (learned from the first bytes of cold dispatches, capped
    by ``strategy.maxWarmWaitMs``), and after that it may use an idle node (``cold_ok``: no
    request in flight there), spare ones first. So no request is left queued while a node that
    can serve it sits idle, and a busy pool does not thrash loading models on half-busy nodes.
    """

    def __init__(self, registry: NodeRegistry, strategy: Strategy,
                 waiting: Callable[[str], int] = lambda model: 0,
                 max_warm_wait_s: float = 10.0) -> None:
        self.registry = registry
        self.strategy = strategy
        self.waiting = waiting  # requests queued for a model
        self.max_warm_wait_s = max_warm_wait_s
        self.cold_load_s: float | None = None  # moving average of cold dispatches' first byte

    def observe_cold_load(self, seconds: float) -> None:
        prev = self.cold_load_s
        self.cold_load_s = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    def warm_wait_s(self, queue_timeout_s: float) -> float:
        """How long a request may wait for a busy warm node before going cold elsewhere."""
        bound = self.max_warm_wait_s
        if self.cold_load_s is not None:
            bound = min(bound, self.cold_load_s)
        return min(bound, queue_timeout_s / 2)

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        strategy.pool = self.registry.all_nodes
        self._strategy = strategy

    def classify(self, model: str) -> tuple[list[Node], bool]:
        """(nodes that admit requests and have the model, whether any node has it at all)."""
        admitting: list[Node] = []
        has_it = False
        for node in self.registry.all_nodes():
            if node.enabled and node.has_model(model):
                has_it = True
                if node.admits():
                    admitting.append(node)
        return admitting, has_it

    def candidates(self, model: str, admitting: list[Node], cold_ok: bool = False) -> list[Node]:
        """The nodes the strategy may pick from now (see the class docstring)."""
        free = [n for n in admitting if n.has_capacity()]
        if not free or not self._strategy.waits_for_warm or len(free) == len(admitting):
            return free  # (every admitting node has room: warm ones too)
        warm = [n for n in admitting if model in n.loaded]
        if not warm or any(n.has_capacity() for n in warm):
            return free  # nothing warm anywhere (a cold load is unavoidable), or warm and free
        if cold_ok:  # waited long enough for a busy warm node: an idle node may load it
            idle = [n for n in free if n.in_flight == 0]
            return [n for n in idle if self._spare(n)] or idle
        if self.waiting(model) < WARM_BACKLOG * sum(n.max_concurrent for n in warm):
            return []  # wait for a warm slot
        return [n for n in free if self._spare(n)]  # scale out without evicting a last copy

    def _spare(self, node: Node) -> bool:
        """Empty, or every model loaded on it is also loaded on another node."""
        others = [n for n in self.registry.all_nodes() if n is not node]
        return all(any(m in o.loaded for o in others) for m in node.loaded)

    def choose(self, model: str, admitting: list[Node]) -> Node | None:
        free = self.candidates(model, admitting)
        return self._strategy.select(free, model) if free else None

    def acquire(self, model: str, exclude: Iterable[Node] = (),
                cold_ok: bool = False) -> Lease | None:
        """Pick a node for ``model`` and take a lease on it, or None if none has room."""
        skip = {n.id for n in exclude}
        admitting, _ = self.classify(model)
        candidates = [n for n in self.candidates(model, admitting, cold_ok) if n.id not in skip]
        while candidates:
            node = self._strategy.select(candidates, model)
            if node is None:
                return None
            lease = node.try_acquire()
            if lease is not None:
                return lease
            candidates.remove(node)
        return None

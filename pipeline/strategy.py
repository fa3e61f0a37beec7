"""Routing strategies: pick one node among those that can take the request now.

The caller (node selection) passes only eligible candidates: enabled, not DOWN, circuit
admitting, has the model, has capacity. A strategy only orders them. State is kept per node id,
so nodes may come and go between calls.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from pipeline.node import Health, Node


class Strategy(ABC):
    """Base class; ``name`` is the config/admin name."""

    name = "base"
    waits_for_warm = False  # prefer waiting for a busy warm node over a cold load

    def __init__(self, adaptive: bool = False) -> None:
        self.adaptive = adaptive
        self.pool: Callable[[], Sequence[Node]] = list  # every node, set by the router

    @abstractmethod
    def select(self, candidates: Sequence[Node], model: str) -> Node | None:
        """One of ``candidates`` (all eligible and with room), or None if there are none."""

    def weight_of(self, node: Node) -> int:
        """Configured weight; with ``adaptive`` a DEGRADED node counts half."""
        if self.adaptive and node.health is Health.DEGRADED:
            return max(1, node.weight // 2)
        return node.weight


class RoundRobin(Strategy):
    """Each candidate in turn, by a counter over the candidate list."""

    name = "round-robin"

    def __init__(self, adaptive: bool = False) -> None:
        super().__init__(adaptive)
        self._next = 0

    def select(self, candidates: Sequence[Node], model: str) -> Node | None:
        if not candidates:
            return None
        node = candidates[self._next % len(candidates)]
        self._next += 1
        return node


class WeightedRoundRobin(Strategy):
    """nginx's smooth weighted round-robin: weights respected, picks interleaved."""

    name = "weighted-round-robin"

    def __init__(self, adaptive: bool = False) -> None:
        super().__init__(adaptive)
        self._current: dict[str, int] = {}

    def select(self, candidates: Sequence[Node], model: str) -> Node | None:
        if not candidates:
            return None
        total = 0
        best: Node | None = None
        best_weight = 0
        for node in candidates:
            weight = self.weight_of(node)
            current = self._current.get(node.id, 0) + weight
            self._current[node.id] = current
            total += weight
            if best is None or current > best_weight:
                best, best_weight = node, current
        assert best is not None
        self._current[best.id] = best_weight - total
        return best


class LeastInFlight(Strategy):
    """Fewest requests in flight relative to capacity; ties rotate so none is favoured."""

    name = "least-in-flight"

    def __init__(self, adaptive: bool = False) -> None:
        super().__init__(adaptive)
        self._tie = 0

    def select(self, candidates: Sequence[Node], model: str) -> Node | None:
        return self._least(candidates)

    def _least(self, nodes: Sequence[Node]) -> Node | None:
        if len(nodes) <= 1:  # nothing to compare
            if not nodes:
                return None
            self._tie += 1
            return nodes[0]
        tied = self._lowest_load(nodes)
        if self.adaptive and len(tied) > 1:
            fastest = min(n.latency_ewma or 0.0 for n in tied)
            tied = [n for n in tied if (n.latency_ewma or 0.0) == fastest]
        node = tied[self._tie % len(tied)]
        self._tie += 1
        return node

    @staticmethod
    def _lowest_load(nodes: Sequence[Node]) -> list[Node]:
        """The nodes with the fewest requests in flight relative to capacity, in order."""
        best, tied = float("inf"), []
        for node in nodes:
            load = node.in_flight / node.max_concurrent
            if load < best:
                best, tied = load, [node]
            elif load == best:
                tied.append(node)
        return tied


class RandomChoice(Strategy):
    """Uniform choice; the RNG is injectable for deterministic tests."""

    name = "random"

    def __init__(self, adaptive: bool = False, rng: random.Random | None = None) -> None:
        super().__init__(adaptive)
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[Node], model: str) -> Node | None:
        if not candidates:
            return None
        return candidates[self._rng.randrange(len(candidates))]


class ModelAware(LeastInFlight):
    """Warm first: nodes with the model loaded; equals share the load by in-flight count.

    A cold load (seconds, and maybe an eviction) goes where it costs the pool least: a node
    with nothing loaded; else a node whose loaded models are all loaded on another node too
    (evicting them loses no warm copy); else an idle node (its model can go at once rather
    than after its requests finish); then the node with the fewest models loaded.
    """

    name = "model-aware"
    waits_for_warm = True

    def select(self, candidates: Sequence[Node], model: str) -> Node | None:
        if len(candidates) <= 1:  # warm or cold, the only choice
            return self._least(candidates)
        loaded = [n for n in candidates if model in n.loaded]
        if loaded:
            return self._least(loaded)
        installed = [n for n in candidates if n.knows_models()] or list(candidates)
        elsewhere = self._loaded_elsewhere()

        def cost(n: Node) -> tuple[int, int, int, int]:
            only_copy = sum(1 for m in n.loaded if elsewhere.get(m, 0) <= 1)
            return (1 if n.loaded else 0, only_copy, 1 if n.in_flight else 0, len(n.loaded))

        best = min(cost(n) for n in installed)
        return self._least([n for n in installed if cost(n) == best])

    def _loaded_elsewhere(self) -> dict[str, int]:
        """How many nodes have each model loaded."""
        counts: dict[str, int] = {}
        for node in self.pool():
            for m in node.loaded:
                counts[m] = counts.get(m, 0) + 1
        return counts


class StrategyFactory:
    """Strategies by name, as the seed's StrategyFactory."""

    TYPES: dict[str, type[Strategy]] = {
        s.name: s for s in (RoundRobin, WeightedRoundRobin, LeastInFlight, RandomChoice, ModelAware)
    }

    @classmethod
    def names(cls) -> list[str]:
        return list(cls.TYPES)

    @classmethod
    def create(cls, name: str, adaptive: bool = False) -> Strategy:
        try:
            return cls.TYPES[name](adaptive=adaptive)
        except KeyError:
            raise ValueError(
                f"unknown strategy {name!r}; valid: {', '.join(cls.TYPES)}") from None

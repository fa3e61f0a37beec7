"""Labelled counters and histograms kept as plain numbers, exposed through prometheus_client.

``prometheus_client``'s children take a lock and walk the buckets in Python on every update,
which is most of what a finished request's bookkeeping costs. The series updated per request
are therefore plain attributes (one hub, no threads update them) and become metric families
only when /metrics is scraped, with the very samples ``Counter`` and ``Histogram`` expose
(``_total``, ``_created``, ``_bucket``, ``_count``, ``_sum``), so dashboards see no change.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class CounterChild:
    """One labelled counter: ``inc`` adds to a float."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramChild:
    """One labelled histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # the upper bounds, the last one +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # first bound >= amount
        self.sum += amount


class _Tally(Collector):
    """A metric family's children by label values, collected at scrape time."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], CounterChild | HistogramChild] = {}
        if registry is not None:
            registry.register(self)

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, "
                             f"got {len(values)}")

    def describe(self) -> list[object]:
        return []


class CounterTally(_Tally):
    """The drop-in for a labelled ``prometheus_client.Counter`` (``labels(...).inc()``)."""

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = CounterChild()
        return child  # type: ignore[return-value]

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            assert isinstance(child, CounterChild)
            fam.add_metric(list(values), child.value, created=child.created)
        yield fam


class HistogramTally(_Tally):
    """The drop-in for a labelled ``prometheus_client.Histogram`` (``labels(...).observe()``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None, buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labelnames, registry)
        bounds = [float(b) for b in buckets]
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        self._les = [floatToGoString(b) for b in self.bounds]

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            self._check(values)
            child = self._children[values] = HistogramChild(self.bounds)
        return child  # type: ignore[return-value]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            assert isinstance(child, HistogramChild)
            labels = list(values)
            fam.add_metric(labels, list(zip(self._les, itertools.accumulate(child.counts),
                                            strict=True)), child.sum)
            fam.add_sample(f"{self.name}_created", dict(zip(self.labelnames, labels,
                                                            strict=True)), child.created)
        yield fam

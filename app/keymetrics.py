"""Prometheus series per API key, in the appliance's own registry.

Labelled by the key's name only (never its hash), so the series are bounded by the keys ever
configured in this process. Every configured key's series exist from the start at 0, so a
first request shows as an increase. Requests without keys are not labelled per address:
those would be unbounded.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from pipeline.metrics import TTFT_BUCKETS, MetricsRegistry, _Bound

REJECTIONS = ("scope", "model", "rate", "concurrency", "tokens")


class KeyStats:
    """One key's figures since the start: plain integers on the request path."""

    __slots__ = ("errors", "requests", "tokens_in", "tokens_out", "ttft_counts", "ttft_sum")

    def __init__(self) -> None:
        self.requests = self.errors = self.tokens_in = self.tokens_out = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket, the last one +Inf
        self.ttft_sum = 0.0


class _KeySeries(Collector):
    """Requests, errors, tokens, time to first token and in-flight per key, read at scrape."""

    def __init__(self, prefix: str, stats: dict[str, KeyStats],
                 in_flight: Callable[[], dict[str, int]]) -> None:
        self.prefix = prefix
        self.stats = stats
        self.in_flight = in_flight

    def collect(self) -> Iterator[Any]:
        p, items = self.prefix, sorted(self.stats.items())
        requests = CounterMetricFamily(f"{p}_key_requests", "Requests admitted, per API key",
                                       labels=["key"])
        errors = CounterMetricFamily(f"{p}_key_errors", "Admitted requests answered with an "
                                     "error status, per API key", labels=["key"])
        tokens = CounterMetricFamily(f"{p}_key_tokens", "Tokens per API key (prompt: in, "
                                     "completion: out)", labels=["key", "direction"])
        ttft = HistogramMetricFamily(f"{p}_key_time_to_first_token_seconds", "Time from "
                                     "arrival to the first byte of the reply, per API key",
                                     labels=["key"])
        for name, st in items:
            requests.add_metric([name], st.requests)
            errors.add_metric([name], st.errors)
            tokens.add_metric([name, "in"], st.tokens_in)
            tokens.add_metric([name, "out"], st.tokens_out)
            ttft.add_metric([name], list(zip([*map(floatToGoString, TTFT_BUCKETS), "+Inf"],
                                             itertools.accumulate(st.ttft_counts),
                                             strict=True)), st.ttft_sum)
        inflight = GaugeMetricFamily(f"{p}_key_inflight", "Requests in flight per API key",
                                     labels=["key"])
        for key, value in sorted(self.in_flight().items()):
            inflight.add_metric([key], float(value))
        yield from (requests, errors, tokens, ttft, inflight)


class KeyMetrics:
    """requests, errors, rejections, tokens and time to first token, by key name.

    A request's end adds a few integers to its key's ``KeyStats``; the Prometheus families
    are built from them when /metrics is scraped. Five labelled ``prometheus_client`` updates
    per request (a lock and a label lookup each) were most of what a key cost a request.
    """

    def __init__(self, metrics: MetricsRegistry, in_flight: Callable[[], dict[str, int]]
                 ) -> None:
        r, p = metrics.registry, metrics.prefix
        self.stats: dict[str, KeyStats] = {}
        self.rejections = _Bound(Counter(f"{p}_key_rejections",
                                         "Requests refused for a scope, model or limit, per "
                                         "API key", ["key", "reason"], registry=r))
        r.register(_KeySeries(p, self.stats, in_flight))

    def declare(self, names: list[str]) -> None:
        """Series at 0 for every configured key."""
        for name in names:
            self.stats.setdefault(name, KeyStats())
            for reason in REJECTIONS:
                self.rejections(name, reason)

    def finished(self, key: str, error: bool, tokens_in: int, tokens_out: int,
                 ttft: float | None) -> None:
        stats = self.stats
        st = stats[key] if key in stats else stats.setdefault(key, KeyStats())
        st.requests += 1
        st.errors += error
        st.tokens_in += tokens_in
        st.tokens_out += tokens_out
        if ttft is not None:
            st.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, ttft)] += 1
            st.ttft_sum += ttft

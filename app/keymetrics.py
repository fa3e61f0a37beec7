"""Prometheus series per API key, in the appliance's own registry.

Labelled by the key's name only (never its hash), so the series are bounded by the keys ever
configured in this process. Every configured key's series exist from the start at 0, so a
first request shows as an increase. Requests without keys are not labelled per address:
those would be unbounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.metrics import TTFT_BUCKETS, MetricsRegistry, _Bound

REJECTIONS = ("scope", "model", "rate", "concurrency", "tokens")


class _InFlight(Collector):
    def __init__(self, name: str, read: Callable[[], dict[str, int]]) -> None:
        self.name = name
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily(self.name, "Requests in flight per API key", labels=["key"])
        for key, value in sorted(self.read().items()):
            fam.add_metric([key], float(value))
        yield fam


class KeyMetrics:
    """requests, errors, rejections, tokens and time to first token, by key name."""

    def __init__(self, metrics: MetricsRegistry, in_flight: Callable[[], dict[str, int]]
                 ) -> None:
        r, p = metrics.registry, metrics.prefix
        self.requests = _Bound(Counter(f"{p}_key_requests", "Requests admitted, per API key",
                                       ["key"], registry=r))
        self.errors = _Bound(Counter(f"{p}_key_errors",
                                     "Admitted requests answered with an error status, per "
                                     "API key", ["key"], registry=r))
        self.rejections = _Bound(Counter(f"{p}_key_rejections",
                                         "Requests refused for a scope, model or limit, per "
                                         "API key", ["key", "reason"], registry=r))
        self.tokens = _Bound(Counter(f"{p}_key_tokens", "Tokens per API key (prompt: in, "
                                     "completion: out)", ["key", "direction"], registry=r))
        self.ttft = _Bound(Histogram(f"{p}_key_time_to_first_token_seconds",
                                     "Time from arrival to the first byte of the reply, per "
                                     "API key", ["key"], registry=r, buckets=TTFT_BUCKETS))
        r.register(_InFlight(f"{p}_key_inflight", in_flight))

    def declare(self, names: list[str]) -> None:
        """Series at 0 for every configured key."""
        for name in names:
            self.requests(name)
            self.errors(name)
            self.tokens(name, "in")
            self.tokens(name, "out")
            self.ttft(name)
            for reason in REJECTIONS:
                self.rejections(name, reason)

    def finished(self, key: str, error: bool, tokens_in: int, tokens_out: int,
                 ttft: float | None) -> None:
        self.requests(key).inc()
        if error:
            self.errors(key).inc()
        if tokens_in:
            self.tokens(key, "in").inc(tokens_in)
        if tokens_out:
            self.tokens(key, "out").inc(tokens_out)
        if ttft is not None:
            self.ttft(key).observe(ttft)

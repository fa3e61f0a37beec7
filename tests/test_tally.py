"""The plain-number series expose exactly what prometheus_client's own classes expose."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from pipeline.tally import CounterTally, HistogramTally

BUCKETS = (0.005, 0.1, 1, 10)
CREATED = re.compile(rb"(_created(\{[^}]*\})?) [0-9.e+]+")


def _same_text(a: CollectorRegistry, b: CollectorRegistry) -> None:
    for generate in (generate_latest, openmetrics):
        ours, theirs = (CREATED.sub(rb"\1 T", generate(r)) for r in (b, a))
        assert ours == theirs


def test_counters_and_histograms_scrape_as_prometheus_client_s() -> None:
    theirs, ours = CollectorRegistry(auto_describe=False), CollectorRegistry(auto_describe=False)
    c1 = Counter("x_requests", "Requests finished", ["endpoint", "status"], registry=theirs)
    h1 = Histogram("x_latency", "Latency", ["endpoint"], registry=theirs, buckets=BUCKETS)
    c2 = CounterTally("x_requests", "Requests finished", ["endpoint", "status"], ours)
    h2 = HistogramTally("x_latency", "Latency", ["endpoint"], ours, BUCKETS)
    for value in (0.001, 0.005, 0.05, 0.1, 3, 30, 0.1, 10):  # on bounds and between them
        h1.labels("/api/chat").observe(value)
        h2.labels("/api/chat").observe(value)
    for status, amount in (("200", 1), ("500", 3), ("200", 2.5)):
        c1.labels("/api/chat", status).inc(amount)
        c2.labels("/api/chat", status).inc(amount)
    _same_text(theirs, ours)
    assert b'x_latency_bucket{endpoint="/api/chat",le="0.1"} 5.0' in generate_latest(ours)
    assert ours.get_sample_value("x_requests_total", {"endpoint": "/api/chat",
                                                      "status": "200"}) == 3.5


def test_wrong_label_count_and_negative_increments_are_refused() -> None:
    counter = CounterTally("y", "doc", ["a", "b"], None)
    with pytest.raises(ValueError):
        counter.labels("only-one")
    with pytest.raises(ValueError):
        counter.labels("1", "2").inc(-1)

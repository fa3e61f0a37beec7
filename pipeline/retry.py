"""The retry policy: which failures are retried, how long to back off, and on which node.

Retries happen only before anything has reached the caller: on a connect failure, a reset
before the response headers, a first-byte timeout, a malformed reply, or a 502/503/504 from the
node (Ollama's 503 "server busy" included), with exponential backoff and equal jitter, on a
different node where one can serve, and within the request's deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import gevent

from pipeline.config import RetryConfig
from pipeline.lease import Lease
from pipeline.node import Node
from pipeline.request import Ticket
from pipeline.routing import Router

RETRYABLE_STATUS = frozenset({502, 503, 504})


def backoff_delay(attempt: int, initial_s: float, multiplier: float, max_s: float,
                  rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with equal jitter for retry ``attempt`` (1-based)."""
    base = min(max_s, initial_s * multiplier ** (attempt - 1))
    return base / 2 + rng() * base / 2


class RetryPolicy:
    def __init__(self, settings: Callable[[], RetryConfig], router: Router) -> None:
        self.settings = settings  # the live config's retry section (reloads apply at once)
        self.router = router

    def may_retry(self, ticket: Ticket) -> bool:
        return (ticket.attempts <= self.settings().maxRetries
                and time.monotonic() < ticket.deadline)

    def next_node(self, ticket: Ticket, tried: list[Node]) -> Lease | None:
        """Back off, then take a different node if one can serve, else a tried one."""
        retry = self.settings()
        delay = backoff_delay(ticket.attempts, retry.initialBackoffMs / 1000.0,
                              retry.backoffMultiplier, retry.maxBackoffMs / 1000.0)
        delay = min(delay, max(0.0, ticket.deadline - time.monotonic()))
        if delay > 0:
            gevent.sleep(delay)
        model = ticket.model or ""
        return self.router.acquire(model, exclude=tried) or self.router.acquire(model)

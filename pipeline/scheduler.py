"""The scheduler: requests waiting for node capacity, and who gets a slot when one frees up.

Waiting happens outside the ring (in the capacity queue), so a request for a model with free
capacity never waits behind one for a model whose nodes are all busy. Whenever a node slot is
given back, a node recovers or the config changes, ``wake`` hands free capacity to the oldest
waiter it can serve.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.errors import BackpressureError, ErrorCode, PipelineError
from pipeline.lease import Lease
from pipeline.ledger import Ledger
from pipeline.metrics import MetricsRegistry
from pipeline.node import Node
from pipeline.request import Ticket
from pipeline.routing import Router
from pipeline.waitqueue import CapacityQueue, Waiter

Dispatch = Callable[[Ticket, Lease], None]


class Scheduler:
    def __init__(self, router: Router, ledger: Ledger, metrics: MetricsRegistry,
                 queue_size: int, queue_timeout_s: float) -> None:
        self.router = router
        self.ledger = ledger
        self.metrics = metrics
        self.queue = CapacityQueue(queue_size, queue_timeout_s, self._expired)
        self.dispatch: Dispatch = lambda ticket, lease: None  # wired by the pipeline
        self._waking = False

    def __len__(self) -> int:
        return len(self.queue)

    def wait(self, ticket: Ticket, model: str) -> None:
        """Queue a request for capacity; raises BackpressureError when the queue is full.

        With a strategy that waits for warm nodes, the queue re-offers capacity to the
        request when its wait for a warm node ends, so it then takes an idle node.
        """
        nudge = (self._warm_wait() + 0.001) if self.router.strategy.waits_for_warm else None
        waiter = self.queue.put(ticket, model, ticket.deadline - time.monotonic(),
                                nudge_in=nudge, on_nudge=self.wake)
        ticket.on_cancel = lambda: self._cancel(waiter)

    def _warm_wait(self) -> float:
        return self.router.warm_wait_s(self.queue.timeout_s)

    def requeue(self, ticket: Ticket) -> bool:
        """A retry found no free node: wait like any other request (False if the queue is full)."""
        try:
            self.wait(ticket, ticket.model or "")
        except BackpressureError:
            return False
        self.metrics.retry("queued")
        self.wake()
        return True

    def wake(self, node: Node | None = None) -> None:
        """Capacity may be free (a slot given back, a node back, a reload): serve waiters."""
        if not self.queue or self._waking:
            return
        self._waking = True  # re-entry: a dispatch that fails at once gives its slot back
        try:
            while self.queue and self._serve_one():
                pass
        finally:
            self._waking = False

    def _serve_one(self) -> bool:
        """Dispatch the oldest waiter (across models) that free capacity can serve."""
        now = time.monotonic()
        for waiter in self.queue.heads():
            cold_ok = now - waiter.ticket.submitted_at >= self._warm_wait()
            lease = self.router.acquire(waiter.model, cold_ok=cold_ok)
            if lease is None:
                continue
            self.queue.pop(waiter)
            waiter.ticket.queue_wait = time.monotonic() - waiter.ticket.submitted_at
            self.metrics.queue_wait.observe(waiter.ticket.queue_wait)
            self.dispatch(waiter.ticket, lease)
            return True
        return False

    def _expired(self, waiter: Waiter) -> None:
        self.metrics.queue_wait.observe(time.monotonic() - waiter.ticket.submitted_at)
        timed_out = time.monotonic() >= waiter.ticket.deadline
        err = (PipelineError(ErrorCode.TIMEOUT, "request timed out waiting for a node")
               if timed_out else BackpressureError(
                   "server busy, please try again.  timed out waiting for a free node",
                   self.retry_hint()))
        self.ledger.finish(waiter.ticket, err.code.value, error=err)

    def _cancel(self, waiter: Waiter) -> None:
        if self.queue.remove(waiter):
            self.ledger.finish(waiter.ticket, "CANCELLED")

    def retry_hint(self) -> float:
        """Seconds a shed client should wait: about how long the oldest waiter has waited."""
        return float(max(1, min(30, round(self.queue.oldest_wait(time.monotonic())) or 1)))

    def drain(self) -> None:
        """Answer every waiter (shutdown): nothing is dropped unanswered."""
        for waiter in self.queue.drain_all():
            self.ledger.finish(waiter.ticket, ErrorCode.SHUTTING_DOWN.value, error=PipelineError(
                ErrorCode.SHUTTING_DOWN, "server shutting down", retry_after=5.0))

    def configure(self, queue_size: int, queue_timeout_s: float) -> None:
        self.queue.limit = queue_size
        self.queue.timeout_s = queue_timeout_s

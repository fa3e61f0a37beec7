"""The capacity queue: requests waiting for a node slot, outside the ring's order.

Waiters are kept per model, oldest first, so a freed slot goes to the oldest request that the
freed capacity can serve, and a request for a model with free capacity never waits behind
requests for a model whose nodes are all busy (no head-of-line blocking). The queue is bounded
in length; each waiter has a timer that fails it when its wait runs out.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import gevent

from pipeline.errors import BackpressureError
from pipeline.request import Ticket


class Waiter:
    __slots__ = ("model", "nudge", "seq", "ticket", "timer")

    def __init__(self, ticket: Ticket, model: str, seq: int) -> None:
        self.ticket = ticket
        self.model = model
        self.seq = seq
        self.timer: Any = None  # fails the waiter when its wait runs out
        self.nudge: Any = None  # re-offers capacity when its wait for a warm node ends


class CapacityQueue:
    def __init__(self, limit: int, timeout_s: float,
                 on_timeout: Callable[[Waiter], None]) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._by_model: dict[str, deque[Waiter]] = {}
        self._count = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._count

    def put(self, ticket: Ticket, model: str, deadline_in: float,
            nudge_in: float | None = None, on_nudge: Callable[[], None] | None = None) -> Waiter:
        """Enqueue or raise BackpressureError when full; the wait is bounded by both limits.

        ``on_nudge`` runs once after ``nudge_in`` seconds if the waiter is still queued.
        """
        if self._count >= self.limit:
            raise BackpressureError(
                "server busy, please try again.  maximum pending requests exceeded")
        waiter = Waiter(ticket, model, next(self._seq))
        self._by_model.setdefault(model, deque()).append(waiter)
        self._count += 1
        wait = max(0.0, min(self.timeout_s, deadline_in))
        waiter.timer = gevent.get_hub().loop.timer(wait)
        waiter.timer.start(self._expire, waiter)
        if nudge_in is not None and on_nudge is not None and nudge_in < wait:
            waiter.nudge = gevent.get_hub().loop.timer(nudge_in)
            waiter.nudge.start(on_nudge)
        return waiter

    def _expire(self, waiter: Waiter) -> None:
        if self.remove(waiter):
            self._on_timeout(waiter)

    def remove(self, waiter: Waiter) -> bool:
        """Take a waiter out (dispatched, cancelled or expired); False if already gone."""
        dq = self._by_model.get(waiter.model)
        if dq is None:
            return False
        try:
            dq.remove(waiter)
        except ValueError:
            return False
        self._finish(waiter, dq)
        return True

    def pop(self, waiter: Waiter) -> None:
        """Remove the head of its model's queue (the usual dispatch case, O(1))."""
        dq = self._by_model[waiter.model]
        dq.popleft()
        self._finish(waiter, dq)

    def _finish(self, waiter: Waiter, dq: deque[Waiter]) -> None:
        self._count -= 1
        if not dq:
            del self._by_model[waiter.model]
        for timer in (waiter.timer, waiter.nudge):
            if timer is not None:
                timer.close()
        waiter.timer = waiter.nudge = None

    def heads(self) -> Iterator[Waiter]:
        """The oldest waiter of each model, oldest first."""
        return iter(sorted((dq[0] for dq in self._by_model.values()), key=lambda w: w.seq))

    def waiting(self, model: str) -> int:
        dq = self._by_model.get(model)
        return len(dq) if dq else 0

    def by_model(self) -> dict[str, int]:
        return {model: len(dq) for model, dq in self._by_model.items()}

    def oldest_wait(self, now: float) -> float:
        heads = [dq[0].ticket.submitted_at for dq in self._by_model.values()]
        return max(0.0, now - min(heads)) if heads else 0.0

    def drain_all(self) -> list[Waiter]:
        """Remove every waiter (shutdown)."""
        out = [w for dq in self._by_model.values() for w in dq]
        for w in out:
            self.remove(w)
        return out

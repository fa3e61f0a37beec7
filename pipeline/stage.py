"""Stages: a greenlet per event handler, batching everything available per wake-up.

The Disruptor's BatchEventProcessor in gevent form. A handler's ``Exception`` is recorded on the
slot (via ``on_error``) and the stage moves on; a ``BaseException`` (a kill, a bug in the loop
itself) ends the greenlet, and ``on_crash`` reports it so a dead stage is never a silent stall.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import gevent

from pipeline.barrier import SequenceBarrier
from pipeline.ring import RingBuffer
from pipeline.sequence import Sequence
from pipeline.wait import AlertError

T = TypeVar("T")
log = logging.getLogger("ollama_lb.pipeline")

Handler = Callable[[T], None]


class Stage(Generic[T]):
    """One handler, its sequence, its barrier and its greenlet."""

    def __init__(
        self,
        name: str,
        handler: Callable[[T], None],
        ring: RingBuffer[T],
        barrier: SequenceBarrier,
        on_error: Callable[[T, str, Exception], None],
    ) -> None:
        self.name = name
        self.handler = handler
        self.ring = ring
        self.barrier = barrier
        self.sequence = Sequence()
        self.on_error = on_error
        self.greenlet: gevent.Greenlet | None = None
        self.batches = 0  # wake-ups that found work
        self.processed = 0  # slots handled
        self.crashed: BaseException | None = None

    def start(self, on_crash: Callable[[Stage[T], BaseException], None]) -> None:
        self.sequence.value = self.ring.cursor.value
        self.barrier.clear_alert()
        self.greenlet = gevent.spawn(self._run)
        self.greenlet.name = f"stage-{self.name}"

        def crashed(g: gevent.Greenlet) -> None:
            self.crashed = g.exception
            on_crash(self, g.exception)

        self.greenlet.link_exception(crashed)

    def halt(self) -> None:
        self.barrier.alert()

    def _run(self) -> None:
        ring, handler, barrier, on_error = self.ring, self.handler, self.barrier, self.on_error
        strategy = ring.strategy
        next_seq = self.sequence.value + 1
        successor = None  # a parked follower this stage claimed, to switch to if it parks
        while True:
            available = barrier.available()
            if available < next_seq:  # nothing for this stage: wait (and hand on if it parks)
                try:
                    available = strategy.wait_for(next_seq, barrier, successor)
                except AlertError:
                    return
            elif successor is not None:  # more work here: the follower runs when this yields
                successor.resume_later()
            for seq in range(next_seq, available + 1):
                slot = ring.get(seq)
                try:
                    handler(slot)
                except Exception as exc:  # recorded per slot; the stage goes on
                    on_error(slot, self.name, exc)
            self.processed += available - next_seq + 1
            self.batches += 1
            self.sequence.value = available
            successor = strategy.pass_on(self.sequence)
            next_seq = available + 1

"""Disruptor-style wiring: ``handle_events_with(a).then(b).then(c, d)``.

Each handler gets a stage (greenlet + sequence); handlers given together run in parallel on the
same slots; ``then`` makes the next group wait on every stage of the previous one. The producer
is gated by the final group only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.barrier import SequenceBarrier
from pipeline.ring import RingBuffer
from pipeline.sequence import Sequence
from pipeline.stage import Stage

T = TypeVar("T")
NamedHandler = tuple[str, Callable[[T], None]]


class Disruptor(Generic[T]):
    def __init__(self, ring: RingBuffer[T], on_error: Callable[[T, str, Exception], None]) -> None:
        self.ring = ring
        self.on_error = on_error
        self.stages: list[Stage[T]] = []
        self._last: list[Stage[T]] = []

    def handle_events_with(self, *handlers: NamedHandler[T]) -> Disruptor[T]:
        return self._group(handlers, [])

    def then(self, *handlers: NamedHandler[T]) -> Disruptor[T]:
        return self._group(handlers, [s.sequence for s in self._last])

    def _group(self, handlers: tuple[NamedHandler[T], ...],
               depends_on: list[Sequence]) -> Disruptor[T]:
        group = []
        for name, fn in handlers:
            barrier = SequenceBarrier(self.ring.cursor, depends_on)
            group.append(Stage(name, fn, self.ring, barrier, self.on_error))
        self.stages.extend(group)
        self._last = group
        return self

    def start(self, on_crash: Callable[[Stage[T], BaseException], None]) -> None:
        self.ring.add_gating(*(s.sequence for s in self._last))
        for stage in self.stages:
            stage.start(on_crash)

    def halt(self) -> None:
        for stage in self.stages:
            stage.halt()

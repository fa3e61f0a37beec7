"""The ring buffer: pre-allocated slots, a cursor, and a producer gated by the last stage.

One producer (the hub's request handlers, which never yield between claim and publish) claims
the next sequence, fills the slot it maps to and publishes it. A claim that would overwrite a
slot the slowest gating stage has not released fails at once with RingFullError: the caller sheds
load instead of blocking the accept loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.errors import RingFullError
from pipeline.sequence import INITIAL, Sequence, minimum
from pipeline.wait import WaitStrategy

T = TypeVar("T")


class RingBuffer(Generic[T]):
    """A power-of-two array of reusable slots indexed by ``sequence & mask``."""

    def __init__(self, size: int, factory: Callable[[], T], strategy: WaitStrategy) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, got {size}")
        self.size = size
        self._mask = size - 1
        self._slots: list[T] = [factory() for _ in range(size)]
        self.cursor = Sequence()
        self.strategy = strategy
        self._gating: list[Sequence] = []
        self._next = INITIAL  # last claimed sequence
        self._cached_gate = INITIAL  # slowest gating sequence, re-read only when needed

    def add_gating(self, *sequences: Sequence) -> None:
        """The producer may not lap these (the final stage, normally)."""
        self._gating.extend(sequences)

    def get(self, sequence: int) -> T:
        return self._slots[sequence & self._mask]

    def try_claim(self) -> int:
        """Claim the next sequence or raise RingFullError; never blocks, never yields."""
        nxt = self._next + 1
        wrap = nxt - self.size
        if wrap > self._cached_gate:
            self._cached_gate = minimum(self._gating, nxt - 1)
            if wrap > self._cached_gate:
                raise RingFullError()
        self._next = nxt
        return nxt

    def publish(self, sequence: int) -> None:
        """Make ``sequence`` visible to the first stages and wake them."""
        self.cursor.value = sequence
        self.strategy.signal(self.cursor)

    def remaining(self) -> int:
        """Free slots: what the producer could still claim right now."""
        consumed = minimum(self._gating, self._next)
        return self.size - (self._next - consumed)

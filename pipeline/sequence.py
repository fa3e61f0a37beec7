"""A sequence: how far a producer or a stage has got around the ring.

In the Java Disruptor a sequence is a padded atomic long. Under gevent every greenlet runs on one
OS thread and only switches at yield points, so a plain int attribute is already consistent: no
padding and no atomics are needed, only the discipline that claim/fill/publish never yields.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

INITIAL = -1


class Sequence:
    """A mutable counter; ``value`` is the last sequence number processed (or published).

    ``followers`` are the barriers gated on this sequence: only they are woken when it moves,
    so a publish wakes the first stage and a stage wakes the next, never every parked stage.
    """

    __slots__ = ("followers", "value")

    def __init__(self, value: int = INITIAL) -> None:
        self.value = value
        self.followers: list[Any] = []  # SequenceBarriers (with a ``wake()``) that wait on us

    def __repr__(self) -> str:
        return f"Sequence({self.value})"


def minimum(sequences: Iterable[Sequence], default: int) -> int:
    """The slowest of ``sequences``: what a follower may safely read up to."""
    lowest = default
    for seq in sequences:
        if seq.value < lowest:
            lowest = seq.value
    return lowest

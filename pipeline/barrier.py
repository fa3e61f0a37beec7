"""A sequence barrier: the gate between a stage and what it depends on.

A stage may process sequence ``n`` only when the producer has published ``n`` and every stage it
depends on has released ``n``. The barrier reports the highest such sequence, so one wake-up can
process a whole batch.
"""

from __future__ import annotations

from gevent.event import Event

from pipeline.sequence import Sequence, minimum
from pipeline.wait import AlertError, WaitStrategy


class SequenceBarrier:
    """Tracks the cursor and the dependent stages' sequences for one stage."""

    __slots__ = ("_alerted", "_cursor", "_dependents", "_strategy", "event", "parked", "spins")

    def __init__(
        self, cursor: Sequence, dependents: list[Sequence], strategy: WaitStrategy
    ) -> None:
        self._cursor = cursor
        self._dependents = dependents
        self._strategy = strategy
        self._alerted = False
        self.event = Event()  # parked-on by blocking strategies, owned by this barrier's stage
        self.parked = False  # the stage sleeps on ``event`` until a sequence it follows moves
        self.spins = 0  # how many yields the yielding strategy tries before parking next time
        for seq in dependents or [cursor]:  # what gates this stage: only its moves matter
            seq.followers.append(self)

    def wake(self) -> None:
        """A sequence this barrier follows moved: wake the stage if it is parked."""
        if self.parked:
            self.parked = False
            self.event.set()

    def available(self) -> int:
        """Highest sequence every upstream party has finished with."""
        cursor = self._cursor.value
        if not self._dependents:
            return cursor
        return minimum(self._dependents, cursor)

    def wait_for(self, sequence: int) -> int:
        """Block this greenlet (per the wait strategy) until ``sequence`` is available."""
        available = self.available()
        if available >= sequence:
            return available
        return self._strategy.wait_for(sequence, self)

    def alert(self) -> None:
        """Make waiters raise AlertError: used to stop stages."""
        self._alerted = True
        self.parked = False
        self.event.set()

    def clear_alert(self) -> None:
        self._alerted = False

    def check_alert(self) -> None:
        if self._alerted:
            raise AlertError()

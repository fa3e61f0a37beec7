"""A sequence barrier: the gate between a stage and what it depends on.

A stage may process sequence ``n`` only when the producer has published ``n`` and every stage it
depends on has released ``n``. The barrier reports the highest such sequence, so one wake-up can
process a whole batch.

The barrier also parks and resumes its stage's greenlet. A parked stage sleeps in the hub and
is resumed by a plain hub callback that switches to it: no ``Event``, whose links, notifier
and waiter cost more per wake-up (figures in tests/bench/performance.md). A stage that has
just released sequences its follower waits for, and is about to park itself, switches
straight to the follower instead: one greenlet switch in place of a callback and two
switches through the hub.
"""

from __future__ import annotations

from gevent import get_hub
from gevent.hub import Hub
from greenlet import getcurrent, greenlet

from pipeline.sequence import Sequence, minimum
from pipeline.wait import AlertError


class SequenceBarrier:
    """Tracks the cursor and the dependent stages' sequences for one stage."""

    __slots__ = ("_alerted", "_cursor", "_dependents", "_gate", "_hub", "parked", "sleeper",
                 "spins")

    def __init__(self, cursor: Sequence, dependents: list[Sequence]) -> None:
        self._cursor = cursor
        self._dependents = dependents
        #: the one sequence gating this stage, if one: the cursor for a first stage, else the
        #: stage it follows (a stage never passes the cursor, so that sequence alone is what
        #: is available); None when it follows several
        self._gate = (dependents[0] if len(dependents) == 1 else
                      None if dependents else cursor)
        self._alerted = False
        self._hub: Hub | None = None  # the hub the stage parked in (set by ``sleep``)
        self.sleeper: greenlet | None = None  # the stage's greenlet, set when it parks
        #: the stage sleeps in ``sleep`` and nobody has taken on resuming it yet
        self.parked = False
        self.spins = 0  # how many yields the yielding strategy tries before parking next time
        for seq in dependents or [cursor]:  # what gates this stage: only its moves matter
            seq.followers.append(self)

    def wake(self) -> None:
        """A sequence this barrier follows moved: wake the stage if it is parked."""
        if self.parked:
            self.parked = False
            self.resume_later()

    def claim(self) -> bool:
        """Take on resuming the parked stage (True if it was parked): the caller must then
        switch to it in its own ``sleep`` or call ``resume_later``, exactly once."""
        if self.parked:
            self.parked = False
            return True
        return False

    def resume_later(self) -> None:
        """Resume the parked (and claimed) stage from the hub's next callback round."""
        assert self._hub is not None and self.sleeper is not None
        self._hub.loop.run_callback(self.sleeper.switch)

    def sleep(self, successor: SequenceBarrier | None) -> None:
        """Park the stage until woken; the CPU goes straight to ``successor`` (a claimed,
        parked stage) if there is one, else to the hub. Raises AlertError when stopping,
        after passing ``successor`` on so it is never left asleep."""
        if self._alerted:
            if successor is not None:
                successor.resume_later()
            raise AlertError()
        if self.sleeper is not getcurrent():  # the stage's greenlet, once per (re)start
            self._hub, self.sleeper = get_hub(), getcurrent()
        self.parked = True
        try:
            if successor is None:
                self._hub.switch()  # type: ignore[union-attr]
            else:
                successor.sleeper.switch()  # type: ignore[union-attr]
        finally:
            self.parked = False

    def available(self) -> int:
        """Highest sequence every upstream party has finished with."""
        gate = self._gate
        if gate is not None:
            return gate.value
        return minimum(self._dependents, self._cursor.value)

    def alert(self) -> None:
        """Make waiters raise AlertError: used to stop stages."""
        self._alerted = True
        self.wake()

    def clear_alert(self) -> None:
        self._alerted = False

    def check_alert(self) -> None:
        if self._alerted:
            raise AlertError()

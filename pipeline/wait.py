"""Wait strategies: how a stage waits for the sequence it depends on to advance.

The Java Disruptor's strategies trade CPU for wake-up latency on dedicated threads. Here every
stage is a greenlet on one gevent hub, so each strategy is mapped onto what the hub offers, and
none of them may spin without yielding: a spin that never yields would starve the hub (no socket
would be read, no timer would fire). What each one does under gevent:

``blocking``
    Parks the stage in the hub; whoever advances a sequence wakes only the stages gated on
    that sequence (the producer wakes the first stage, each stage the next). No CPU while
    idle; a wake-up by the producer costs one hub callback, and a stage that parks right
    after releasing work switches straight to the parked stage after it.
``yielding`` (default)
    While work comes in bursts (the last wait found more than one slot ready), re-checks after
    ``gevent.sleep(0)`` (other ready greenlets and pending callbacks run, such as the producer
    publishing the rest of a burst) up to ``spin_tries`` (8) times before parking as
    ``blocking`` does; otherwise parks at once. Spinning a lightly loaded ring only burns CPU
    (figures in tests/bench/performance.md).
``sleeping``
    Yields ``spin_tries`` times, then polls on a hub timer every ``sleep_seconds``. Never
    signalled, so publishers pay nothing, at the price of a poll timer while idle (about
    1,000 wake-ups per second per stage) and up to ``sleep_seconds`` of added latency.
``busy-spin``
    Re-checks after every ``gevent.sleep(0)`` and never parks. The lowest wake-up latency, and
    a full core burnt while idle: for benchmarks on a dedicated box only. It still yields on
    every check, which is the most honest "busy spin" a single hub allows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import gevent

from pipeline.sequence import Sequence


class AlertError(Exception):
    """Raised in a waiting stage when the pipeline is stopping."""


class Waitable(Protocol):
    """What a strategy needs from a barrier."""

    spins: int

    def available(self) -> int: ...
    def check_alert(self) -> None: ...
    def claim(self) -> bool: ...
    def resume_later(self) -> None: ...
    def sleep(self, successor: Waitable | None) -> None: ...


class WaitStrategy(ABC):
    """Base: subclasses implement ``wait_for``; ``signal`` wakes what follows a sequence."""

    name = "base"

    @abstractmethod
    def wait_for(self, sequence: int, barrier: Waitable, successor: Waitable | None) -> int:
        """Return the highest available sequence once ``sequence`` is available.

        Called (by ``Stage``) once ``barrier.available()`` was seen below
        ``sequence`` with no yield since, so a strategy checks again only after a yield.
        ``successor`` is a parked follower the stage claimed: resumed exactly once, by the
        first park (which switches to it) or before the first yield."""

    def signal(self, sequence: Sequence) -> None:
        """``sequence`` moved: wake the parked stages gated on it (and only those)."""
        for barrier in sequence.followers:
            barrier.wake()

    def pass_on(self, sequence: Sequence) -> Waitable | None:
        """A stage moved ``sequence`` and checks its own barrier next: the first parked
        follower is claimed and returned, for the stage to switch to if it parks; the
        others are woken."""
        successor = None
        for barrier in sequence.followers:
            if successor is None and barrier.claim():
                successor = barrier
            else:
                barrier.wake()
        return successor

    def _park(self, sequence: int, barrier: Waitable, successor: Waitable | None) -> int:
        """Sleep until the sequence is available; no lost wake-ups.

        Called right after ``available()`` was seen below ``sequence``: between that check
        and the park nothing else can run (no yield point), so a publish cannot slip in
        unseen.
        """
        while True:
            barrier.sleep(successor)
            successor = None
            available = barrier.available()
            if available >= sequence:
                return available


class BlockingWaitStrategy(WaitStrategy):
    name = "blocking"

    wait_for = WaitStrategy._park  # parking is all it does: one call fewer per park


class YieldingWaitStrategy(WaitStrategy):
    """Yields before parking while work comes in bursts, up to ``spin_tries`` times.

    A wait that ended with more than one slot available (a burst: the stage will batch) makes
    the next wait spin the full budget; one that ended with a single slot makes the next wait
    park at once. So a lightly loaded ring costs what ``blocking`` costs (one wake-up per stage
    per request) and a busy one keeps its stages hot.
    """

    name = "yielding"

    def __init__(self, spin_tries: int = 8) -> None:
        self.spin_tries = spin_tries

    def wait_for(self, sequence: int, barrier: Waitable, successor: Waitable | None) -> int:
        available = -1
        if barrier.spins and successor is not None:
            successor.resume_later()  # it runs while this stage spins
            successor = None
        for _ in range(barrier.spins):
            barrier.check_alert()
            gevent.sleep(0)
            available = barrier.available()
            if available >= sequence:
                break
        if available < sequence:
            available = self._park(sequence, barrier, successor)
        barrier.spins = self.spin_tries if available > sequence else 0
        return available


class SleepingWaitStrategy(WaitStrategy):
    name = "sleeping"

    def __init__(self, spin_tries: int = 20, sleep_seconds: float = 0.001) -> None:
        super().__init__()
        self.spin_tries = spin_tries
        self.sleep_seconds = sleep_seconds

    def wait_for(self, sequence: int, barrier: Waitable, successor: Waitable | None) -> int:
        tries = 0
        while True:
            barrier.check_alert()
            if tries < self.spin_tries:
                tries += 1
                gevent.sleep(0)
            else:
                gevent.sleep(self.sleep_seconds)
            available = barrier.available()
            if available >= sequence:
                return available

    def signal(self, sequence: Sequence) -> None:
        """Sleepers poll; nothing to wake."""

    def pass_on(self, sequence: Sequence) -> Waitable | None:
        return None


class BusySpinWaitStrategy(WaitStrategy):
    name = "busy-spin"

    def wait_for(self, sequence: int, barrier: Waitable, successor: Waitable | None) -> int:
        while True:
            barrier.check_alert()
            gevent.sleep(0)
            available = barrier.available()
            if available >= sequence:
                return available

    def signal(self, sequence: Sequence) -> None:
        """Spinners re-check on their own; nothing to wake."""

    def pass_on(self, sequence: Sequence) -> Waitable | None:
        return None


_TABLE: dict[str, type[WaitStrategy]] = {
    "blocking": BlockingWaitStrategy,
    "yielding": YieldingWaitStrategy,
    "sleeping": SleepingWaitStrategy,
    "busy-spin": BusySpinWaitStrategy,
}
WAIT_STRATEGY_NAMES = tuple(_TABLE)


def create_wait_strategy(name: str) -> WaitStrategy:
    """The strategy for a ``disruptor.waitStrategy`` value."""
    table = _TABLE
    try:
        return table[name]()
    except KeyError:
        raise ValueError(f"unknown wait strategy {name!r}; valid: {', '.join(table)}") from None

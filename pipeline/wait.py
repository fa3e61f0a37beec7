"""Wait strategies: how a stage waits for the sequence it depends on to advance.

The Java Disruptor's strategies trade CPU for wake-up latency on dedicated threads. Here every
stage is a greenlet on one gevent hub, so each strategy is mapped onto what the hub offers, and
none of them may spin without yielding: a spin that never yields would starve the hub (no socket
would be read, no timer would fire). What each one does under gevent:

``blocking``
    Parks the stage on a ``gevent.event.Event``; whoever advances a sequence wakes the parked
    stages. No CPU while idle; each wake-up costs one hub callback (~3-7 us).
``yielding`` (default)
    Re-checks after ``gevent.sleep(0)`` (other ready greenlets and pending callbacks run, such
    as the producer publishing the rest of a burst) up to ``spin_tries`` (8) times, then parks
    as ``blocking`` does. Best latency under load, no CPU while idle. (Measured with wrk
    through the appliance: 50 tries cost ~0.5 ms more CPU per request at one client than 8,
    spinning six stages around a hub that had nothing else to run.)
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
from gevent.event import Event


class AlertError(Exception):
    """Raised in a waiting stage when the pipeline is stopping."""


class Waitable(Protocol):
    """What a strategy needs from a barrier."""

    event: Event

    def available(self) -> int: ...
    def check_alert(self) -> None: ...


class WaitStrategy(ABC):
    """Base: subclasses implement ``wait_for``; ``signal_all`` wakes parked waiters."""

    name = "base"

    def __init__(self) -> None:
        self._parked: list[Event] = []

    @abstractmethod
    def wait_for(self, sequence: int, barrier: Waitable) -> int:
        """Return the highest available sequence once ``sequence`` is available."""

    def signal_all(self) -> None:
        """Wake every parked waiter. Cheap when nothing is parked (the busy case)."""
        if self._parked:
            for ev in self._parked:
                ev.set()
            self._parked.clear()

    def _park(self, sequence: int, barrier: Waitable) -> int:
        """Wait on the barrier's event until the sequence is available; no lost wake-ups.

        Between the check and ``wait()`` nothing else can run (no yield point), so a publish
        cannot slip in unseen.
        """
        while True:
            available = barrier.available()
            if available >= sequence:
                return available
            barrier.check_alert()
            ev = barrier.event
            ev.clear()
            self._parked.append(ev)
            ev.wait()


class BlockingWaitStrategy(WaitStrategy):
    name = "blocking"

    def wait_for(self, sequence: int, barrier: Waitable) -> int:
        return self._park(sequence, barrier)


class YieldingWaitStrategy(WaitStrategy):
    name = "yielding"

    def __init__(self, spin_tries: int = 8) -> None:
        super().__init__()
        self.spin_tries = spin_tries

    def wait_for(self, sequence: int, barrier: Waitable) -> int:
        for _ in range(self.spin_tries):
            available = barrier.available()
            if available >= sequence:
                return available
            barrier.check_alert()
            gevent.sleep(0)
        return self._park(sequence, barrier)


class SleepingWaitStrategy(WaitStrategy):
    name = "sleeping"

    def __init__(self, spin_tries: int = 20, sleep_seconds: float = 0.001) -> None:
        super().__init__()
        self.spin_tries = spin_tries
        self.sleep_seconds = sleep_seconds

    def wait_for(self, sequence: int, barrier: Waitable) -> int:
        tries = 0
        while True:
            available = barrier.available()
            if available >= sequence:
                return available
            barrier.check_alert()
            if tries < self.spin_tries:
                tries += 1
                gevent.sleep(0)
            else:
                gevent.sleep(self.sleep_seconds)

    def signal_all(self) -> None:
        """Sleepers poll; nothing to wake."""


class BusySpinWaitStrategy(WaitStrategy):
    name = "busy-spin"

    def wait_for(self, sequence: int, barrier: Waitable) -> int:
        while True:
            available = barrier.available()
            if available >= sequence:
                return available
            barrier.check_alert()
            gevent.sleep(0)

    def signal_all(self) -> None:
        """Spinners re-check on their own; nothing to wake."""


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

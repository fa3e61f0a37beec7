"""A per-node circuit breaker: CLOSED -> OPEN -> HALF_OPEN -> CLOSED.

CLOSED counts consecutive failures; at the threshold it opens and refuses requests for the
recovery time; then HALF_OPEN lets exactly one trial request through, whose success closes the
circuit and whose failure reopens it. The clock is injected so tests can drive time.

Ownership of the trial: ``acquire()`` hands out a numbered permit. Whoever holds the trial
permit must end it one of three ways: ``record_success()``, ``record_failure()`` (a verdict),
or ``release(permit)`` (no verdict: the request timed out, was cancelled, found the model
gone, or crashed). ``release`` is called unconditionally from a ``finally`` (see
``pipeline.lease.Lease``) and is a no-op once a verdict was recorded or for a permit that is
not the current trial, so a trial can never stay out: a node in HALF_OPEN always admits the
next trial once the previous one has ended, however it ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

Listener = Callable[[CircuitState, CircuitState], None]


class CircuitBreaker:
    def __init__(self, failure_threshold: int, recovery_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Listener | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_s = recovery_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial: int | None = None  # HALF_OPEN: the permit of the trial under way
        self._permits = 0  # permits handed out; a trial permit is identified by its number
        self.on_change = on_change
        self.transitions = 0

    @property
    def state(self) -> CircuitState:
        """The state, moving OPEN to HALF_OPEN once the recovery time has passed."""
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.recovery_s:
            self._set(CircuitState.HALF_OPEN)
        return self._state

    def allows(self) -> bool:
        """Would a request be let through now (without taking the half-open trial)?"""
        if self._state is CircuitState.CLOSED:  # the common case, without the clock
            return True
        state = self.state
        return state is CircuitState.CLOSED or (
            state is CircuitState.HALF_OPEN and self._trial is None)

    @property
    def trial_out(self) -> bool:
        """Is a half-open trial under way (for tests' leak checks and /admin)?"""
        return self._trial is not None

    def acquire(self) -> int | None:
        """A permit for one request, or None; in HALF_OPEN only one trial at a time."""
        state = self._state if self._state is CircuitState.CLOSED else self.state
        if state is CircuitState.HALF_OPEN and self._trial is not None:
            return None
        if state is CircuitState.OPEN:
            return None
        self._permits += 1
        if state is CircuitState.HALF_OPEN:
            self._trial = self._permits
        return self._permits

    def release(self, permit: int) -> None:
        """The request holding ``permit`` ended: if it was the trial and left no verdict,
        the trial is given back so the next request can be the trial."""
        if self._trial == permit:
            self._trial = None

    def record_success(self) -> None:
        self._failures = 0
        self._trial = None
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self._trial = None
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if state is CircuitState.CLOSED and self._failures >= self.failure_threshold:
            self._open()

    def reconfigure(self, failure_threshold: int, recovery_s: float) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_s = recovery_s

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._failures = 0
        self._set(CircuitState.OPEN)

    def _set(self, new: CircuitState) -> None:
        old, self._state = self._state, new
        if old is not new:
            self.transitions += 1
            if self.on_change is not None:
                self.on_change(old, new)

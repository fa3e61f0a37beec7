"""An idle timer re-armed lazily: one hub timer per stream, not one per read.

A per-read socket timeout makes gevent create a Timeout and start and stop a timer for every
``recv``, which is most of the cost of relaying a token. Instead, as HAProxy and nginx do, the
reader only records when data last arrived (it sets ``last``, one clock read, inline: a method
call per line would cost more than the clock); the timer fires once per idle period, and
re-arms itself for the rest of the period if data came meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent


class IdleTimer:
    __slots__ = ("_expired", "_on_idle", "_timer", "idle_s", "last")

    def __init__(self, idle_s: float, on_idle: Callable[[], None]) -> None:
        self.idle_s = idle_s
        self._on_idle = on_idle
        self.last = time.monotonic()
        self._expired = False
        self._timer: Any = None
        self._arm(idle_s)

    @property
    def expired(self) -> bool:
        return self._expired

    def _arm(self, after: float) -> None:
        self._timer = gevent.get_hub().loop.timer(max(after, 0.0))
        self._timer.start(self._fire)

    def _fire(self) -> None:
        self._timer.close()
        silent = time.monotonic() - self.last
        if silent < self.idle_s:
            self._arm(self.idle_s - silent)
            return
        self._timer = None
        self._expired = True
        self._on_idle()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None

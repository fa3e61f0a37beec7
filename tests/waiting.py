"""Bounded waits on observable state, for tests that must not sleep a fixed time.

A fixed ``sleep(0.1)`` that stands for "the request is now queued" is either too short on a
busy machine (a flaky test) or too long everywhere (a slow one); polling the state itself is
neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent


def wait_until(predicate: Callable[[], object], timeout: float = 5.0,
               step: float = 0.02) -> bool:
    """Poll ``predicate`` on the hub until it is true or ``timeout`` s pass; its last verdict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(step)
    return bool(predicate())

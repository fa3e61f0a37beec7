"""Which appliance instances share the pool: the set local shares are computed over.

Redis keeps a heartbeat per instance. While Redis answers, the set is what it says. When
Redis goes away the last set seen is frozen (never shrunk while degraded: an instance that
merely cannot be seen still runs). On rejoin the set is the union of the frozen one and the
fresh one until the rejoin window ends: right after an empty restart the fresh set holds
only the instances that have already rejoined, and a lone early instance must not take
every share.
"""

from __future__ import annotations

import os
import secrets
import socket


def new_instance_id() -> str:
    """Fresh at every process start: a restarted instance never inherits a dead one's leases."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Membership:
    def __init__(self, me: str) -> None:
        self.me = me
        self.live: tuple[str, ...] = (me,)  # as Redis last said
        self.frozen: tuple[str, ...] = (me,)  # the set shares use while Redis is away

    def seen(self, live: list[str], *, settled: bool) -> None:
        """Redis answered with ``live``; ``settled``: in shared mode, the set may shrink."""
        self.live = tuple(sorted(set(live) | {self.me}))
        if settled:
            self.frozen = self.live

    def for_shares(self) -> tuple[str, ...]:
        """The instances a cap is split over: the frozen set and the fresh one together."""
        return tuple(sorted(set(self.frozen) | set(self.live)))

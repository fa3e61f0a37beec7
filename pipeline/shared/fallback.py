"""Local shares: what one instance may send a node while Redis cannot count for everyone.

A node's cap C is split over the instances last seen alive: ``C // n`` each, one more for
``C % n`` of them, so the shares add up exactly to C. Which instances get the extra one
rotates with the node, so no instance is favoured on every node.

Right after losing Redis, the other instances may still run requests that Redis admitted,
and no instance can know how many. The one bound every instance knows is its own: at the
outage the instances together held at most C, each its own part. So for ``localGraceMs``
after the outage each instance admits at most ``min(share, what it held then)``: the sum
over instances stays within C whatever the others hold. After the grace window, the share
alone (requests admitted before the outage are assumed finished by then).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence


def share(cap: int, instances: Sequence[str], me: str, node_id: str) -> int:
    """This instance's part of ``cap``; the parts of all ``instances`` add up to ``cap``."""
    ids = sorted(set(instances) | {me})
    n = len(ids)
    base, extra = divmod(cap, n)
    rotated = (ids.index(me) - zlib.crc32(node_id.encode())) % n
    return base + (1 if rotated < extra else 0)


def allowance(cap: int, instances: Sequence[str], me: str, node_id: str,
              held_then: int | None, in_grace: bool) -> int:
    """How many leases this instance may hold on the node now, without Redis.

    ``held_then``: own leases on the node when Redis went away (None: never had Redis, so
    nothing to be careful about); ``in_grace``: still within ``localGraceMs`` of that.
    """
    own = share(cap, instances, me, node_id)
    if held_then is not None and in_grace:
        return min(own, held_then)
    return own

"""The Redis side of shared node caps: acquire, release, renew, and the freed-slot channel.

Every call has a short timeout (``sharedState.timeoutMs``, for connect and reply) and no
retry of its own: a Redis that does not answer at once is treated as gone by the caller,
which falls back to local shares rather than make a request wait on Redis. Only
``redis.RedisError`` escapes from here (the store's own failures), so a bug is never taken
for an outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis

from pipeline.shared.connect import connect, sentinel_listener
from pipeline.shared.scripts import ACQUIRE, RENEW

GRANTED, FULL, LOST = 1, -1, -2  # acquire results: a lease, the node full, Redis lost state
NodeHoldings = tuple[str, list[str], list[str]]  # node id, own held ids, own pending ids
Message = tuple[str, str]  # ("freed", node id) or ("hint", "<instance> <node id>")


class RedisLeases:
    """Lease operations on one Redis, each timed into ``observe(op, seconds)``."""

    def __init__(self, url: str, prefix: str, timeout_s: float,
                 observe: Callable[[str, float], None] = lambda op, s: None,
                 max_connections: int = 64) -> None:
        self.prefix = "{" + prefix + "}"
        self.channel = f"{self.prefix}:freed"
        self.hints_channel = f"{self.prefix}:hints"
        self.observe = observe
        self.client, self._single, self.sentinel = connect(url, timeout_s, max_connections)
        self.pool = self.client.connection_pool
        self.generation = 0  # +1 at each Sentinel failover seen: subscriptions start again
        self._subscribed: set[Any] = set()  # open subscriptions: left at a failover too
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)

    def node_key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}:leases"

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}:epoch"

    def acquire(self, epoch: str, node_id: str, lease_id: str, ttl_ms: int,
                cap: int) -> tuple[int, int]:
        """(GRANTED | FULL | LOST, the node's lease count across instances): one round trip."""
        t0 = time.perf_counter()
        code, count = self._acquire(keys=[self.epoch_key, self.node_key(node_id)],
                                    args=[epoch, lease_id, ttl_ms, cap])
        self.observe("acquire", time.perf_counter() - t0)
        return int(code), int(count)

    def release(self, leases: Iterable[tuple[str, str]]) -> None:
        """Delete leases and tell every instance which nodes have room: one round trip."""
        t0 = time.perf_counter()
        pipe = self.client.pipeline(transaction=False)
        nodes: set[str] = set()
        for node_id, lease_id in leases:
            pipe.zrem(self.node_key(node_id), lease_id)
            nodes.add(node_id)
        for node_id in sorted(nodes):
            pipe.publish(self.channel, node_id)
        pipe.execute()
        self.observe("release", time.perf_counter() - t0)

    def renew(self, epoch: str, instance: str, ttl_ms: int, liveness_ms: int, join: bool,
              nodes: list[NodeHoldings], issued: int
              ) -> tuple[str | None, list[str], dict[str, int]]:
        """Heartbeat and re-assert own leases (see ``scripts.RENEW``); ``issued``: the last
        lease number given out when ``nodes`` (the holdings) were read.

        Returns (Redis's epoch, or None if it is not ``epoch`` and this is no join; the live
        instance ids; each node's lease count).
        """
        args: list[Any] = [epoch, instance, ttl_ms, liveness_ms, "1" if join else "0", issued]
        for _, held, pending in nodes:
            args += [len(held), *held, len(pending), *pending]
        t0 = time.perf_counter()
        reply = self._renew(keys=[self.epoch_key, f"{self.prefix}:instances",
                                  *(self.node_key(n) for n, _, _ in nodes)], args=args)
        self.observe("renew", time.perf_counter() - t0)
        if not reply or reply[0] is None:
            return None, [], {}
        live = sorted(m.decode() for m in reply[1])
        return reply[0].decode(), live, {n: int(c) for (n, _, _), c in zip(nodes, reply[2],
                                                                          strict=True)}

    def master_moved(self) -> str | None:
        """Through Sentinel: has it named another master than the one the pool talks to?

        redis-py asks the sentinels only when it opens a connection, so kept connections
        would go on talking to a demoted master (which answers writes until the sentinels
        reconfigure it: two masters, two counts). Asked once per heartbeat: if the master
        moved, every connection is dropped, in use or not, and the caller rejoins on the new
        one (re-asserting its leases). None: no Sentinel, or the same master.
        """
        if self.sentinel is None or self.pool.master_address is None:
            return None
        t0 = time.perf_counter()
        name = self.pool.service_name
        named = tuple(self.sentinel.discover_master(name))
        self.observe("sentinel", time.perf_counter() - t0)
        old = tuple(self.pool.master_address)
        if named == old:
            return None
        self.pool.disconnect()  # in use too: nothing more reaches the old master
        self.pool.get_master_address()  # the pool names the new master from now on
        self.generation += 1
        for ps in list(self._subscribed):  # its reader ends and subscribes on the new one
            ps.connection.disconnect()
        return f"{old[0]}:{old[1]} -> {named[0]}:{named[1]}"

    def switches(self, wait_s: float, running: Callable[[], bool]) -> Iterator[bool]:
        """Through Sentinel: True when a sentinel announces ``+switch-master`` for our master
        (so it is asked at once, not at the next heartbeat), False every ``wait_s`` of
        silence. Nothing without Sentinel. Ends when ``running()`` turns false; a RedisError
        other than a timeout escapes, and the caller listens again later."""
        if self.sentinel is None:
            return
        name = self.pool.service_name
        client = sentinel_listener(self.sentinel, wait_s)
        ps = client.pubsub(ignore_subscribe_messages=True)
        try:
            ps.subscribe("+switch-master")
            while running():
                try:
                    msg = ps.parse_response(block=True)
                except redis.TimeoutError:
                    yield False
                    continue
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message":
                    yield msg[2].split(b" ", 1)[0].decode() == name
        finally:
            ps.close()
            client.close()

    def hint(self, node_id: str, instance: str) -> None:
        """Tell every instance that this one's breaker for ``node_id`` opened: one round trip."""
        t0 = time.perf_counter()
        self.client.publish(self.hints_channel, f"{instance} {node_id}")
        self.observe("hint", time.perf_counter() - t0)

    def messages(self, wait_s: float, running: Callable[[], bool]) -> Iterator[Message | None]:
        """("freed", node id) and ("hint", "instance node id") as instances publish them;
        None every ``wait_s`` of silence.

        Its own connection (a subscription holds one), read with ``wait_s`` as the socket
        timeout. Ends when ``running()`` turns false or the Sentinel master moved (the caller
        subscribes again, on the new one); a RedisError other than a timeout escapes, and the
        caller subscribes again later.
        """
        kinds = {self.channel.encode(): "freed", self.hints_channel.encode(): "hint"}
        sub = self._single(wait_s)
        ps = sub.pubsub(ignore_subscribe_messages=True)
        generation = self.generation
        try:
            ps.subscribe(*(c.decode() for c in kinds))
            self._subscribed.add(ps)
            while running() and generation == self.generation:
                try:
                    msg = ps.parse_response(block=True)
                except redis.TimeoutError:
                    yield None
                    continue
                except redis.ConnectionError:
                    if generation != self.generation:
                        return  # master_moved() closed it: the caller subscribes again
                    raise
                if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message" and (
                        msg[1] in kinds):
                    yield kinds[msg[1]], msg[2].decode()
        finally:
            self._subscribed.discard(ps)
            ps.close()
            sub.close()

    def close(self) -> None:
        self.pool.disconnect()
        if self.sentinel is not None:
            self.sentinel.close()

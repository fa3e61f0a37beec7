"""Shared caps: the gate every dispatch passes in Redis mode, and its three modes.

- ``shared``: a request's lease is also taken in Redis (one Lua script), so a node's cap
  holds across every instance. Full across instances: the request gives its local lease
  back and waits in the scheduler; the node is marked ``shared_full`` (the router skips it)
  until a "freed" message arrives from any instance, or a short jittered retry.
- ``local``: Redis is unreachable (any RedisError, at once): each node's cap is split over
  the instances last seen alive (``fallback``), and no request waits on Redis.
- ``rejoining``: Redis answers again. Own leases are re-asserted (the renew script), and for
  a few heartbeats a request needs both its local share and a Redis lease, so that instances
  that rejoin later are never over-counted.

The capacity stage takes only the local lease (no yield there); this gate runs with the
node call, off the ring (in the caller's greenlet), before the node is called. Shared leases
are given back with the local one (``NodeRegistry.release`` calls ``on_release``), in batches
by a greenlet of their own.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import gevent
import redis
from gevent.event import Event
from gevent.pool import Group

from pipeline.config_shared import SharedStateConfig
from pipeline.lease import Lease
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.shared.fallback import allowance
from pipeline.shared.leases import FULL, LOST, RedisLeases
from pipeline.shared.membership import Membership, new_instance_id
from pipeline.shared.observe import SharedMetrics

if TYPE_CHECKING:  # hints need the caps (mode, errors); the caps only hand messages on
    from pipeline.shared.hints import CircuitHints

log = logging.getLogger("ollama_lb.shared")
RETRY_S = (0.02, 0.06)  # a full node is retried after this (jittered), freed message or not


class Mode(StrEnum):
    SHARED = "shared"
    LOCAL = "local"
    REJOINING = "rejoining"


class SharedCaps:
    """One instance's view of the shared caps; ``admit`` gates each dispatch."""

    def __init__(self, settings: Callable[[], SharedStateConfig], registry: NodeRegistry,
                 store: RedisLeases, metrics: SharedMetrics | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.me = new_instance_id()
        self.members = Membership(self.me)
        self.mode = Mode.LOCAL  # until the first join: own share of what is known (all)
        self.epoch = ""
        self.held: dict[str, str] = {}  # lease id -> node id: granted, Redis's or local
        self.pending: dict[str, str] = {}  # lease id -> node id: an acquire on its way
        self.held_count: Counter[str] = Counter()
        self.pending_count: Counter[str] = Counter()
        self.held_then: dict[str, int] | None = None  # own leases when Redis went away
        self.lost_at = 0.0
        self.rejoin_until = 0.0
        self.counts: dict[str, int] = {}  # each node's lease count, as Redis last said
        self.issued = 0  # the last lease number given out (renewals spare later ones)
        self._releases: list[tuple[str, str]] = []
        self._release_due = Event()
        self._retry: dict[str, Any] = {}  # node id -> its pending retry timer
        self._running = False
        self.greenlets = Group()
        self.hints: CircuitHints | None = None  # set by attach(): breaker-open hints
        self._started_with = (settings().redisUrl, settings().keyPrefix)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> SharedCaps:
        self._running = True
        self._join()  # bounded by the Redis timeout; local shares if it fails
        for loop in (self._heartbeat, self._releaser, self._wakeups, self._switches):
            self.greenlets.spawn(loop)
        return self

    def stop(self) -> None:
        self._running = False
        self._release_due.set()
        if self.hints is not None:
            self.hints.stop()
        self.greenlets.kill(block=True, timeout=2)
        for timer in list(self._retry.values()):
            timer.kill(block=False)
        self._retry.clear()
        self.store.close()

    # --- the gate -----------------------------------------------------------------------------

    def admit(self, lease: Lease) -> bool:
        """May this lease's request go to its node now? False: the node is full (blocked)."""
        node = lease.node
        nid = node.id
        if self.mode is not Mode.SHARED and self._own(nid) >= self._allowance(node):
            self._block(node, retry=False)
            return False
        self.issued += 1
        lease_id = f"{self.me}/{self.issued}"
        if self.mode is Mode.LOCAL:
            self._grant(lease, lease_id, nid)
            return True
        self.pending[lease_id] = nid  # reserved before yielding: counted as own, kept by renew
        self.pending_count[nid] += 1
        try:
            s = self.settings()
            code, count = self.store.acquire(self.epoch, nid, lease_id, s.leaseTtlMs,
                                             node.max_concurrent)
        except redis.RedisError as exc:
            self._error("acquire", exc)
            code = None
        finally:
            del self.pending[lease_id]
            self.pending_count[nid] -= 1
        if code is None or code == LOST:
            if code == LOST:
                self._lose("Redis lost its state (restart or failover)")
            return self.admit(lease)  # now in local mode: no Redis call, no recursion beyond
        self.counts[nid] = count
        if code == FULL:
            self._block(node, retry=True)
            return False
        self._grant(lease, lease_id, nid)
        if count >= node.max_concurrent:
            self._block(node, retry=True)  # the last slot: spare the next request a refusal
        return True

    def on_release(self, lease: Lease) -> None:
        """The local lease was given back: the shared one goes too (Redis: batched)."""
        lease_id = getattr(lease, "shared", None)
        if lease_id is None:
            return
        lease.shared = None
        nid = self.held.pop(lease_id, None)
        if nid is None:
            return
        self.held_count[nid] -= 1
        if self.mode is not Mode.LOCAL:
            self._releases.append((nid, lease_id))
            self._release_due.set()
        if self.mode is not Mode.SHARED and lease.node.shared_full:
            lease.node.shared_full = False  # the registry wakes waiters right after this

    def _grant(self, lease: Lease, lease_id: str, nid: str) -> None:
        self.held[lease_id] = nid
        self.held_count[nid] += 1
        lease.shared = lease_id
        if lease.released:  # given back while the acquire was on its way
            self.on_release(lease)

    def _own(self, nid: str) -> int:
        return self.held_count[nid] + self.pending_count[nid]

    def _allowance(self, node: Node) -> int:
        in_grace = time.monotonic() - self.lost_at < self.settings().localGraceMs / 1000.0
        then = None if self.held_then is None else self.held_then.get(node.id, 0)
        return allowance(node.max_concurrent, self.members.for_shares(), self.me, node.id,
                         then, in_grace)

    # --- full nodes ---------------------------------------------------------------------------

    def _block(self, node: Node, retry: bool) -> None:
        """The router skips the node until it may have room again."""
        node.shared_full = True
        if retry and node.id not in self._retry:
            self._retry[node.id] = gevent.spawn_later(random.uniform(*RETRY_S), self._unblock,
                                                      node.id)

    def _unblock(self, nid: str) -> None:
        timer = self._retry.pop(nid, None)
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        node = self.registry.get(nid)
        if node is not None and node.shared_full:
            node.shared_full = False
            self.registry.on_capacity(node)

    def _refresh_blocks(self) -> None:
        """Local or rejoining: a node blocked by its share is freed when the share allows."""
        for node in self.registry.all_nodes():
            if node.shared_full and node.id not in self._retry and (
                    self.mode is Mode.SHARED or self._own(node.id) < self._allowance(node)):
                self._unblock(node.id)

    # --- modes --------------------------------------------------------------------------------

    def _enter(self, mode: Mode, why: str) -> None:
        if mode is self.mode:
            return
        old, self.mode = self.mode, mode
        if self.metrics is not None:
            self.metrics.mode_changes.labels(mode.value).inc()
        log.warning("shared caps mode changed", extra={
            "event": "shared_mode", "from": old.value, "to": mode.value, "reason": why,
            "instance": self.me, "instances": list(self.members.for_shares())})

    def _lose(self, why: str) -> None:
        """Redis is gone (or lost its state): local shares from now on, at once."""
        if self.mode is Mode.LOCAL:
            return
        self.held_then = dict(self.held_count)
        self.lost_at = time.monotonic()
        self._releases.clear()  # the rejoin reconcile deletes what Redis still has of them
        self._enter(Mode.LOCAL, why)
        self._refresh_blocks()

    def _error(self, op: str, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.redis_errors.labels(op).inc()
        self._lose(f"Redis {op} failed: {str(exc)[:200]}")  # Sentinel's errors hold reprs

    def _holdings(self) -> list[tuple[str, list[str], list[str]]]:
        held: dict[str, list[str]] = {n.id: [] for n in self.registry.all_nodes()}
        pending: dict[str, list[str]] = {nid: [] for nid in held}
        for lease_id, nid in self.held.items():
            held.setdefault(nid, []).append(lease_id)
        for lease_id, nid in self.pending.items():
            pending.setdefault(nid, []).append(lease_id)
        return [(nid, held[nid], pending.get(nid, [])) for nid in held]

    def _renew(self, join: bool) -> bool:
        """Heartbeat and re-assert own leases; False (and local mode) if Redis is away."""
        s = self.settings()
        epoch = new_instance_id() if join else self.epoch  # a fresh epoch if Redis has none
        holdings, issued = self._holdings(), self.issued  # read together: no yield between
        try:
            got, live, counts = self.store.renew(epoch, self.me, s.leaseTtlMs,
                                                 3 * s.heartbeatMs, join, holdings, issued)
        except redis.RedisError as exc:
            self._error("renew", exc)
            return False
        if got is None:
            self._lose("Redis lost its state (epoch changed)")
            return False
        self.epoch = got
        self.counts = counts
        self.members.seen(live, settled=self.mode is Mode.SHARED)
        return True

    def _check_master(self) -> None:
        """Sentinel named a new master (or cannot be asked): local mode, to rejoin there."""
        try:
            moved = self.store.master_moved()
        except redis.RedisError as exc:
            self._error("sentinel", exc)
            return
        if moved:
            self._lose(f"Sentinel failover: master {moved}")

    def _join(self) -> None:
        """From local mode: rejoin, then a window where local share and Redis both admit."""
        if self._renew(join=True):
            self.rejoin_until = time.monotonic() + 3 * self.settings().heartbeatMs / 1000.0
            self._enter(Mode.REJOINING, "Redis answers again: own leases re-asserted")

    def tick(self) -> None:
        """One heartbeat: renew (or rejoin), end the rejoin window when due, free blocks."""
        s = self.settings()
        if (s.redisUrl, s.keyPrefix) != self._started_with:
            self._started_with = (s.redisUrl, s.keyPrefix)  # logged once per change
            log.warning("sharedState.redisUrl or keyPrefix changed: applies at restart",
                        extra={"event": "shared_restart_needed"})
        if self.mode is not Mode.LOCAL:
            self._check_master()  # a failover: local now, and the rejoin below re-asserts
        if self.mode is Mode.LOCAL:
            self._join()
        elif self._renew(join=False) and self.mode is Mode.REJOINING and (
                time.monotonic() >= self.rejoin_until):
            self.members.seen(list(self.members.live), settled=True)
            self._enter(Mode.SHARED, "rejoin window over: every live instance re-asserted")
        self._refresh_blocks()

    # --- background greenlets -----------------------------------------------------------------

    def _heartbeat(self) -> None:
        while self._running:
            gevent.sleep(self.settings().heartbeatMs / 1000.0)
            if self._running:
                self.tick()

    def _releaser(self) -> None:
        """Send given-back leases to Redis in batches: one round trip however many."""
        while self._running:
            self._release_due.wait()
            self._release_due.clear()
            batch, self._releases = self._releases, []
            if not batch or not self._running:
                continue
            try:
                self.store.release(batch)
            except redis.RedisError as exc:
                self._error("release", exc)
                continue
            for nid in {nid for nid, _ in batch}:
                self._unblock(nid)

    def _wakeups(self) -> None:
        """Other instances' freed slots: retry the node now rather than at the next timer;
        their circuit-open hints: handed to ``hints`` (which probes the node)."""
        while self._running:
            wait = max(0.5, 2 * self.settings().heartbeatMs / 1000.0)
            try:
                for msg in self.store.messages(wait, lambda: self._running):
                    if msg is None:
                        continue
                    kind, payload = msg
                    if kind == "freed":
                        self._unblock(payload)
                    elif self.hints is not None:
                        self.hints.received(payload)
            except redis.RedisError:
                gevent.sleep(self.settings().heartbeatMs / 1000.0)

    def _switches(self) -> None:
        """Sentinel's ``+switch-master``: leave the old master now, not at the next heartbeat
        (which would also see it, up to ``heartbeatMs`` later). Ends at once without one."""
        while self._running and self.store.sentinel is not None:
            wait = max(0.5, 2 * self.settings().heartbeatMs / 1000.0)
            try:
                for ours in self.store.switches(wait, lambda: self._running):
                    if ours and self.mode is not Mode.LOCAL:
                        self._check_master()
            except redis.RedisError:
                gevent.sleep(self.settings().heartbeatMs / 1000.0)

    # --- what operators see -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /health and the metrics: mode, instances alive, own leases and Redis's counts."""
        return {
            "mode": self.mode.value,
            "instance": self.me,
            "instancesAlive": list(self.members.for_shares()),
            "leasesHeld": {n.id: self.held_count[n.id] for n in self.registry.all_nodes()},
            "leasesCounted": dict(self.counts),
            "blockedNodes": [n.id for n in self.registry.all_nodes() if n.shared_full],
            **({"circuitHints": self.hints.status()} if self.hints is not None else {}),
        }

"""Limits per key (and per client address) counted across instances in Redis.

With ``sharedState.redisUrl`` every worker of every appliance counts each principal's
requests per minute, requests in flight and tokens per day in one Redis
(``pipeline/shared/quotas.py``), so a key with ``requestsPerMinute: 60`` gets 60 a minute
across two appliances, not 120. The modes are those of the shared node caps:

- ``shared``: one Lua script per admission (bucket, places in flight and the day's tokens in
  one round trip). A place in flight is a lease with a TTL, renewed by the heartbeat, so a
  crashed instance's places come back. Releases and token charges are written behind by one
  greenlet, batched, never on the reply's end.
- ``local``: Redis failed (any RedisError, at once): each limit is split over the instances
  last seen alive (``pipeline.shared.fallback.share``, at least 1 each), counted in this
  process; no request waits on Redis, and the heartbeat probes for its return.
- ``rejoining``: Redis answers again: own leases re-asserted (and own usage of today if Redis
  lost its state); for three heartbeats both the local share and Redis must admit.

The instance id, the set of instances alive and the Redis connections are the shared caps'
(so a Sentinel failover they see moves the limits too); the limits' heartbeat is their own
greenlet, which also sends releases and charges, so a renewal never races a release. Only
``Security`` makes one of these, and only with a Redis URL: without it the request path is
exactly what it was.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import gevent
import redis
from gevent.event import Event
from prometheus_client import Gauge

from app.limits import (
    Denied,
    Grant,
    LimitSettings,
    SharedGrant,
    limited,
    over_quota,
    over_rate,
    too_many_in_flight,
)
from app.usage import Account, UsageBook, utc_day
from pipeline.config_shared import SharedStateConfig
from pipeline.factory import PipelineFactory
from pipeline.shared.caps import Mode
from pipeline.shared.fallback import share
from pipeline.shared.membership import new_instance_id
from pipeline.shared.observe import MODES
from pipeline.shared.quotas import CONCURRENCY, GRANTED, LOST, RATE, RedisQuotas

log = logging.getLogger("ollama_lb.shared")
OPS = ("limits_admit", "limits_flush", "limits_renew")


class Share:
    """This instance's part of a principal's limits while Redis cannot count for everyone
    (tokens per day are checked by ``SharedLimits`` itself)."""

    __slots__ = ("maxConcurrent", "requestsPerMinute", "tokensPerDay")

    def __init__(self, limits: LimitSettings, part: Callable[[int], int]) -> None:
        rpm, cap = limits.requestsPerMinute, limits.maxConcurrent
        self.requestsPerMinute = None if rpm is None else part(rpm)
        self.maxConcurrent = None if cap is None else part(cap)
        self.tokensPerDay = None


class SharedLimits:
    """One instance's side of shared limits: ``admit_key``, ``admit_client`` and ``settle``
    stand in for ``Security``'s own."""

    def __init__(self, factory: PipelineFactory, book: UsageBook,
                 local_settle: Callable[[Grant, bool, int, int, float | None], bool]) -> None:
        caps = factory.shared
        assert caps is not None, "shared limits ride on the shared caps (sharedState.redisUrl)"
        ref = weakref.ref(factory)  # Security is the factory's weak-keyed value: no cycle
        self._factory = ref
        self.book = book
        self.local_settle = local_settle
        self.me = caps.me
        self.members = caps.members
        s = factory.config.sharedState
        assert s.redisUrl
        self._leases = caps.store  # its connections: a failover the caps see moves both
        self._generation = caps.store.generation
        self.store = RedisQuotas(caps.store.client, s.keyPrefix, self._observe)
        self._timed = {op: caps.metrics.redis_seconds.labels(op) for op in OPS} \
            if caps.metrics is not None else {}
        self._errors = caps.metrics.redis_errors if caps.metrics is not None else None
        self._mode_gauge = Gauge(f"{factory.metrics_registry.prefix}_shared_limits_mode",
                                 "1 for the mode of per-key limits (shared: counted in Redis; "
                                 "local: own share; rejoining)", ["mode"],
                                 registry=factory.metrics_registry.registry)
        self.mode = Mode.LOCAL
        self.epoch = ""
        self.rejoin_until = 0.0
        self.held: dict[str, set[str]] = {}  # principal -> own leases granted
        self.pending: dict[str, set[str]] = {}  # principal -> leases on their way to Redis
        self.dirty: set[str] = set()  # principals whose Redis side may hold released leases
        self.releases: dict[str, list[str]] = {}  # to give back (write-behind)
        self.charges: dict[tuple[str, int], int] = {}  # (principal, day) -> tokens to add
        self.issued = 0  # the last lease number given out (renewals spare later ones)
        self._due = Event()
        self._running = True
        self._show_mode()
        self._join()
        if self.mode is Mode.LOCAL:  # _lose() logs changes only: say it once here
            log.warning("shared limits: Redis unreachable at start, each instance limits "
                        "on its own", extra={"event": "shared_limits_mode", "from": None,
                                             "to": "local", "instance": self.me})
        self._greenlet = gevent.spawn(self._loop)
        inner = factory.operations.shared_status
        factory.operations.shared_status = lambda: {**(inner() if inner else {}),
                                                    "limits": self.status()}

    def settings(self) -> SharedStateConfig:
        factory = self._factory()
        assert factory is not None, "the pipeline factory is gone"
        return factory.config.sharedState

    # --- admission ----------------------------------------------------------------------------

    def admit_key(self, key: Any, counts_tokens: bool) -> Grant:
        """``Security.admit_key`` with the key's limits counted across instances."""
        name = key.name
        return self.admit(self.book.key(name), "k:" + name, name, lambda: f"key '{name}'",
                          key.config, counts_tokens)

    def admit_client(self, address: str, limits: LimitSettings, counts_tokens: bool) -> Grant:
        return self.admit(self.book.client(address, time.monotonic()), "c:" + address, None,
                          lambda: f"client {address}", limits, counts_tokens)

    def admit(self, account: Account, principal: str, key: str | None, who: Callable[[], str],
              limits: LimitSettings, counts: bool) -> Grant:
        """A grant, or Denied; Redis asked once at most, and for as long as its timeout."""
        day = utc_day()
        own = account.used_today(day)
        cap = limits.maxConcurrent
        lease = self._new_lease() if cap is not None else None
        checked = self.mode is not Mode.SHARED
        if checked:
            self._local(account, principal, who, limits, (day, own), counts)
        if self.mode is Mode.LOCAL or not limited(limits):
            return self._grant(account, key, counts, principal, lease)
        code, value = self._remote(principal, lease, limits, counts, day)
        if code is None:  # Redis failed just now: this instance is in local mode
            if not checked:
                self._local(account, principal, who, limits, (day, own), counts)
            return self._grant(account, key, counts, principal, lease)
        if code == GRANTED:
            account.allowance.seen = (day, value, own)
            return self._grant(account, key, counts, principal, lease)
        raise _denied(code, value, who, limits)

    def _new_lease(self) -> str:
        self.issued += 1
        return f"{self.me}/{self.issued}"

    def _remote(self, principal: str, lease: str | None, limits: LimitSettings, counts: bool,
                day: int) -> tuple[int | None, int]:
        if self._master_moved():
            return None, 0
        if lease is not None:
            self.pending.setdefault(principal, set()).add(lease)
        s = self.settings()
        try:  # one bound for all of it: a free connection, (re)loading the script, the reply
            with gevent.Timeout(s.timeoutMs / 1000.0, redis.TimeoutError(
                    f"no answer within sharedState.timeoutMs ({s.timeoutMs} ms)")):
                code, value = self.store.admit(
                    self.epoch, principal, lease or "", s.leaseTtlMs,
                    limits.requestsPerMinute or 0, limits.maxConcurrent or 0,
                    limits.tokensPerDay or 0, counts, day)
        except redis.RedisError as exc:
            self._error("limits_admit", exc)
            return None, 0
        finally:
            if lease is not None:
                self._drop(self.pending, principal, lease)
        if code == LOST:
            self._lose("Redis lost its state (restart or failover)")
            return None, 0
        return code, value

    def _local(self, account: Account, principal: str, who: Callable[[], str],
               limits: LimitSettings, today: tuple[int, int], counts: bool) -> None:
        """This instance's share of each limit (Denied over it): no Redis call. ``today``:
        the UTC day and this instance's own tokens of it."""
        day, own = today
        instances = self.members.for_shares()

        def part(limit: int) -> int:
            return max(1, share(limit, instances, self.me, principal))

        quota = limits.tokensPerDay
        if counts and quota is not None:
            seen = account.allowance.seen  # what Redis counted, plus own use since: a floor
            total = own if seen is None or seen[0] != day else seen[1] + max(0, own - seen[2])
            if total >= quota or own >= part(quota):
                raise over_quota(who(), max(total, own), quota)
        account.allowance.admit(who, Share(limits, part), 0, time.monotonic(), tokens=False)

    def _grant(self, account: Account, key: str | None, counts: bool, principal: str,
               lease: str | None) -> Grant:
        grant = SharedGrant(account.allowance, account, key, counts, self, principal, lease)
        if lease is not None:
            self.held.setdefault(principal, set()).add(lease)
        return grant

    @staticmethod
    def _drop(where: dict[str, set[str]], principal: str, lease: str) -> None:
        leases = where.get(principal)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del where[principal]

    # --- the end of a request -----------------------------------------------------------------

    def released(self, principal: str, lease: str) -> None:
        """A grant's place is given back: in Redis with the next batch."""
        self._drop(self.held, principal, lease)
        if self.mode is Mode.LOCAL:
            self.dirty.add(principal)  # the rejoin's reconcile deletes it there
            return
        self.releases.setdefault(principal, []).append(lease)
        self._due.set()

    def settle(self, grant: Grant, error: bool, tokens_in: int, tokens_out: int,
               first_at: float | None) -> bool:
        """``Security.settle``, then the request's tokens are queued for Redis."""
        if not self.local_settle(grant, error, tokens_in, tokens_out, first_at):
            return False
        if tokens_in + tokens_out and isinstance(grant, SharedGrant):
            slot = (grant.principal, utc_day())
            self.charges[slot] = self.charges.get(slot, 0) + tokens_in + tokens_out
            if self.mode is not Mode.LOCAL:
                self._due.set()
        return True

    # --- the writer: releases, charges, heartbeat ---------------------------------------------

    def _loop(self) -> None:
        """One greenlet does all background Redis work, so a renewal never races a release."""
        beat = time.monotonic()
        while self._running and self._factory() is not None:
            period = self.settings().heartbeatMs / 1000.0
            self._due.wait(timeout=max(0.0, beat + period - time.monotonic()))
            if not self._running:
                break
            self._due.clear()
            if time.monotonic() >= beat + period:
                beat = time.monotonic()
                self.tick()
            self._flush()

    def _flush(self) -> None:
        if self.mode is Mode.LOCAL or not (self.releases or self.charges):
            return
        releases, self.releases = self.releases, {}
        charges, self.charges = self.charges, {}
        try:
            ok = self.store.flush(self.epoch, releases, charges)
        except redis.RedisError as exc:
            ok = None
            self._error("limits_flush", exc)
        if not ok:
            self.dirty.update(releases)
            for slot, tokens in charges.items():
                self.charges[slot] = self.charges.get(slot, 0) + tokens
            if ok is not None:
                self._lose("Redis lost its state (epoch changed)")

    def tick(self) -> None:
        """One heartbeat: renew (or rejoin), and end the rejoin window when due."""
        self._master_moved()  # then rejoins on the new master at once, just below
        if self.mode is Mode.LOCAL:
            self._join()
            return
        idle = not (self.held or self.pending or self.dirty)  # nothing to renew: no call
        if (idle or self._renew(join=False)) and self.mode is Mode.REJOINING and (
                time.monotonic() >= self.rejoin_until):
            self._enter(Mode.SHARED, "rejoin window over")

    def _renew(self, join: bool) -> bool:
        s = self.settings()
        epoch = new_instance_id() if join else self.epoch
        dirty, self.dirty = self.dirty, set()
        names = set(self.held) | set(self.pending) | dirty
        holdings = [(p, sorted(self.held.get(p, ())), sorted(self.pending.get(p, ())))
                    for p in sorted(names)]
        try:
            got = self.store.renew(epoch, join, s.leaseTtlMs, self.me + "/", holdings,
                                   self.issued)  # read with the holdings: no yield between
        except redis.RedisError as exc:
            self.dirty |= dirty
            self._error("limits_renew", exc)
            return False
        if got is None:
            self.dirty |= dirty
            self._lose("Redis lost its state (epoch changed)")
            return False
        if join and self.epoch and got != self.epoch:
            self.charges.clear()  # they are part of own usage, re-asserted whole
            self._reassert_usage()
        self.epoch = got
        return True

    def _reassert_usage(self) -> None:
        """Redis lost its state: each instance adds its own tokens of today again."""
        day = utc_day()
        rows = [("k:" + n, day, a.used_today(day)) for n, a in self.book.keys.items()]
        rows += [("c:" + n, day, a.used_today(day)) for n, a in self.book.clients.items()]
        try:
            self.store.add_usage([r for r in rows if r[2] > 0])
        except redis.RedisError as exc:
            self._error("limits_flush", exc)

    def _join(self) -> None:
        if self._renew(join=True):
            self.rejoin_until = time.monotonic() + 3 * self.settings().heartbeatMs / 1000.0
            self._enter(Mode.REJOINING, "Redis answers: own leases re-asserted")

    # --- modes --------------------------------------------------------------------------------

    def _enter(self, mode: Mode, why: str) -> None:
        if mode is self.mode:
            return
        old, self.mode = self.mode, mode
        self._show_mode()
        log.warning("shared limits mode changed", extra={
            "event": "shared_limits_mode", "from": old.value, "to": mode.value,
            "reason": why, "instance": self.me})

    def _show_mode(self) -> None:
        for m in MODES:
            self._mode_gauge.labels(m).set(float(self.mode.value == m))

    def _master_moved(self) -> bool:
        """The caps saw Sentinel name a new master (their pool, ours, moved there): local,
        to rejoin there with own places re-asserted (replication may have lost them)."""
        generation = self._leases.generation
        if generation == self._generation:
            return False
        self._generation = generation
        self._lose("Sentinel failover: rejoining on the new master")
        return True

    def _lose(self, why: str) -> None:
        if self.mode is Mode.LOCAL:
            return
        self.dirty.update(self.held)
        self.dirty.update(self.releases)
        self.releases.clear()
        self._enter(Mode.LOCAL, why)

    def _error(self, op: str, exc: Exception) -> None:
        if self._errors is not None:
            self._errors.labels(op).inc()
        self._lose(f"Redis {op} failed: {exc}")

    def _observe(self, op: str, seconds: float) -> None:
        child = self._timed.get(op)
        if child is not None:
            child.observe(seconds)

    # --- what operators see, and the end ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode.value,
                "leasesHeld": sum(len(v) for v in self.held.values()),
                "queued": {"releases": sum(len(v) for v in self.releases.values()),
                           "charges": len(self.charges)}}

    def stop(self) -> None:
        """Stop the writer; what it still had queued is sent once (bounded by the timeout)."""
        self._running = False
        self._due.set()
        self._greenlet.join(timeout=2)
        self._greenlet.kill(block=False)
        if self.mode is not Mode.LOCAL and self._factory() is not None:
            self._flush()
        self._leases.close()  # again: the flush above may have opened a connection


def _denied(code: int, value: int, who: Callable[[], str], limits: LimitSettings) -> Denied:
    """The refusal Redis decided, worded as the local limits word it."""
    if code == CONCURRENCY:
        return too_many_in_flight(who(), limits.maxConcurrent)
    if code == RATE:
        return over_rate(who(), limits.requestsPerMinute, value / 1000.0)
    return over_quota(who(), value, limits.tokensPerDay)

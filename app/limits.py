"""Limits per principal (an API key, or a client address while no keys are configured).

Three limits, each optional: requests per minute (a token bucket holding up to a minute's
worth, so short bursts pass and a steady rate above the limit does not), requests in flight,
and tokens per UTC day. A request over any of them is refused before anything reaches a node,
with the seconds after which trying again can succeed. Checks that change nothing come first,
so a request refused for concurrency does not also spend a bucket token.

An admitted request holds a ``Grant``; its ``release()`` gives the in-flight place back and is
idempotent, so every way a request can end may call it and the count is right once.

With ``sharedState.redisUrl`` the same limits are counted across instances in Redis
(``app/sharedlimits.py``): its grants are ``SharedGrant``s, which also give their Redis lease
back. Without it nothing here changes: no extra work on the request path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol


class LimitSettings(Protocol):
    """What an ``ApiKeyConfig`` or a ``ClientLimitsConfig`` has."""

    requestsPerMinute: int | None
    maxConcurrent: int | None
    tokensPerDay: int | None


def limited(limits: LimitSettings) -> bool:
    """Does this key (or client) have any limit at all?"""
    return (limits.requestsPerMinute is not None or limits.maxConcurrent is not None
            or limits.tokensPerDay is not None)


class Denied(Exception):
    """Over a limit: ``reason`` is rate, concurrency or tokens."""

    def __init__(self, reason: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = max(1, math.ceil(retry_after))


def too_many_in_flight(who: str, cap: int | None) -> Denied:
    return Denied("concurrency", f"too many concurrent requests: {who} may have {cap} in flight",
                  1.0)


def over_rate(who: str, per_minute: int | None, wait_s: float) -> Denied:
    return Denied("rate", f"rate limit exceeded: {who} may send {per_minute} requests per "
                  "minute", wait_s)


def over_quota(who: str, used: int, quota: int | None) -> Denied:
    return Denied("tokens", f"token quota exceeded: {who} has used {used} of {quota} tokens "
                  "today (UTC)", seconds_to_utc_midnight())


def seconds_to_utc_midnight(wall: float | None = None) -> float:
    now = time.time() if wall is None else wall
    return 86400.0 - (now % 86400.0)


class TokenBucket:
    """``per_minute`` tokens, refilled continuously; holds at most a minute's worth. A token is
    taken in ``Allowance.admit`` (inline: it runs for every request of a limited key)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def resize(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = min(self.level, self.capacity)

    def full(self, now: float) -> bool:
        return self.level + (now - self.stamp) * self.rate >= self.capacity


class Allowance:
    """The limit state of one principal: its bucket, and its requests in flight."""

    __slots__ = ("bucket", "epoch", "in_flight", "seen")

    def __init__(self) -> None:
        self.bucket: TokenBucket | None = None
        self.in_flight = 0
        #: moved on when the key is removed: a grant of an earlier epoch is revoked (no set of
        #: live grants to keep on every request)
        self.epoch = 0
        # shared limits only: (UTC day, its tokens as Redis last said, own tokens of it then)
        self.seen: tuple[int, int, int] | None = None

    def admit(self, who: Callable[[], str], limits: LimitSettings, used_today: int,
              now: float, *, tokens: bool) -> None:
        """Raise Denied if over a limit; otherwise count the request in (rate and place).
        ``who()`` names the principal in a refusal (only built when one is given)."""
        cap = limits.maxConcurrent
        if cap is not None and self.in_flight >= cap:
            raise too_many_in_flight(who(), cap)
        quota = limits.tokensPerDay
        if tokens and quota is not None and used_today >= quota:
            raise over_quota(who(), used_today, quota)
        rpm = limits.requestsPerMinute
        if rpm is None:
            self.bucket = None
            return
        bucket = self.bucket
        if bucket is None:
            bucket = self.bucket = TokenBucket(rpm, now)
        elif bucket.capacity != rpm:
            bucket.resize(rpm)
        # the bucket refilled for the time since its last take, then one token taken
        level = min(bucket.capacity, bucket.level + (now - bucket.stamp) * bucket.rate)
        bucket.stamp = now
        if level >= 1.0:
            bucket.level = level - 1.0
            return
        bucket.level = level
        raise over_rate(who(), rpm, (1.0 - level) / bucket.rate)

    def idle(self, now: float) -> bool:
        """Nothing to remember: no request in flight and a full bucket (or none)."""
        return not self.in_flight and (self.bucket is None or self.bucket.full(now))

    def revoke(self) -> int:
        """The key was removed: every request of it in flight is to stop (the meter cuts its
        streams); how many were in flight."""
        self.epoch += 1
        return self.in_flight


class Grant:
    """One admitted request: what its end must give back and charge."""

    __slots__ = ("account", "allowance", "counts_tokens", "epoch", "key", "released",
                 "started")

    def __init__(self, allowance: Allowance, account: Any, key: str | None,
                 counts_tokens: bool, started: float | None = None) -> None:
        self.allowance = allowance
        self.account = account  # app.usage.Account: what the reply is charged to
        self.key = key  # the key's name, or None (a client address without keys)
        self.counts_tokens = counts_tokens
        # the admission's clock reading, when it had one: no second one per request
        self.started = time.monotonic() if started is None else started
        self.released = False
        # revoked once the allowance's epoch moves on (the key removed): app/meter.py
        self.epoch = allowance.epoch
        allowance.in_flight += 1

    def release(self) -> bool:
        """Give the in-flight place back; True the first time only."""
        if self.released:
            return False
        self.released = True
        self.allowance.in_flight -= 1
        return True


class Released(Protocol):
    def released(self, principal: str, lease: str) -> None: ...


class SharedGrant(Grant):
    """A grant of shared limits: its release also gives back its lease in Redis (batched)."""

    __slots__ = ("lease", "principal", "shared")

    def __init__(self, allowance: Allowance, account: Any, key: str | None,
                 counts_tokens: bool, shared: Released, principal: str,
                 lease: str | None) -> None:
        super().__init__(allowance, account, key, counts_tokens)
        self.shared = shared
        self.principal = principal  # k:<key name> or c:<address>
        self.lease = lease  # None: no in-flight limit, nothing held in Redis

    def release(self) -> bool:
        if not Grant.release(self):
            return False
        if self.lease is not None:
            self.shared.released(self.principal, self.lease)
        return True

"""The Redis side of per-principal limits (API keys, or client addresses without keys).

Per principal ``P`` (``k:<key name>`` or ``c:<address>``), under the pool's hash tag:

- ``{prefix}:lim:P:b``: the token bucket (a hash: level, stamp in Redis milliseconds); it
  expires when it would be full again, so an idle principal costs Redis nothing.
- ``{prefix}:lim:P:f``: requests in flight, a sorted set of lease ids scored by expiry, renewed
  by their instance's heartbeat: a crashed instance's places come back after the lease TTL.
- ``{prefix}:lim:P:d:<UTC day>``: tokens used that day (``INCRBY``, kept two days).

One script admits (concurrency, then the day's tokens, then a bucket token, then the lease:
checks that change nothing come first, as in ``app/limits.py``), one round trip gives back a
batch of leases and charges a batch of tokens, one renews an instance's leases. Clocks are
Redis's own (``TIME``) except the UTC day, which is the caller's. Every call has the short
timeout the client was made with and no retry: only ``redis.RedisError`` escapes, and the
caller falls back to local limits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from pipeline.shared.connect import connect
from pipeline.shared.scripts import RECONCILE

GRANTED, CONCURRENCY, TOKENS, RATE, LOST = 1, -1, -2, -3, -9
DAY_KEY_TTL_S = 2 * 86400

#: KEYS: epoch, bucket, in-flight zset, day counter.
#: ARGV: epoch, lease id, ttl ms, per minute, cap, quota (0: none), '1' if it counts tokens.
#: Returns {1, tokens used today} granted, {-1, in flight}, {-2, used}, {-3, wait ms},
#: {-9, 0} Redis lost its state (epoch).
ADMIT = """
local e = redis.call('GET', KEYS[1])
if (not e) or e ~= ARGV[1] then return {-9, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[5])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local n = redis.call('ZCARD', KEYS[3])
  if n >= cap then return {-1, n} end
end
local used = 0
local quota = tonumber(ARGV[6])
if quota > 0 then
  used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if ARGV[7] == '1' and used >= quota then return {-2, used} end
end
local rpm = tonumber(ARGV[4])
if rpm > 0 then
  local rate = rpm / 60000
  local b = redis.call('HMGET', KEYS[2], 'l', 't')
  local level = tonumber(b[1]) or rpm
  local stamp = tonumber(b[2]) or now
  level = math.min(rpm, level + math.max(0, now - stamp) * rate)
  if level < 1 then return {-3, math.ceil((1 - level) / rate)} end
  level = level - 1
  redis.call('HSET', KEYS[2], 'l', tostring(level), 't', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil((rpm - level) / rate) + 1000)
end
if cap > 0 then
  local ttl = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ttl * 2)
end
return {1, used}
"""

#: KEYS: epoch, then the in-flight zsets released from, then the day counters charged.
#: ARGV: epoch, number of zsets, then per zset: n, lease ids...; then one amount per counter.
#: Nothing is written on an epoch mismatch (returns 0): Redis lost its state, and the caller
#: re-asserts its own usage instead.
FLUSH = """
local e = redis.call('GET', KEYS[1])
if (not e) or e ~= ARGV[1] then return 0 end
local nz = tonumber(ARGV[2])
local a = 3
for k = 2, nz + 1 do
  local n = tonumber(ARGV[a]); a = a + 1
  for i = 1, n do redis.call('ZREM', KEYS[k], ARGV[a]); a = a + 1 end
end
for k = nz + 2, #KEYS do
  redis.call('INCRBY', KEYS[k], ARGV[a]); a = a + 1
  redis.call('EXPIRE', KEYS[k], DAY_KEY_TTL_S)
end
return 1
""".replace("DAY_KEY_TTL_S", str(DAY_KEY_TTL_S))

#: KEYS: epoch, then one in-flight zset per principal.
#: ARGV: epoch, '1' to join (creates the epoch if missing), ttl ms, own lease prefix, the
#: last lease number issued when the holdings were read, then per zset: n held, held ids...,
#: n pending, pending ids... (``scripts.RECONCILE``). Returns {epoch} or {false} on a
#: mismatch without join.
RENEW = RECONCILE + """
if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[1], 'NX') end
local e = redis.call('GET', KEYS[1])
if (not e) or (ARGV[2] ~= '1' and e ~= ARGV[1]) then return {false} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, prefix, issued = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local a = 6
for k = 2, #KEYS do a = reconcile(KEYS[k], a, now, ttl, prefix, issued) end
return {e}
"""

Holdings = tuple[str, list[str], list[str]]  # principal, own held lease ids, pending ids


class RedisQuotas:
    """Limit operations on one Redis client (the shared caps', so that a Sentinel failover
    the caps see moves both), each timed."""

    def __init__(self, client: redis.Redis, prefix: str,
                 observe: Callable[[str, float], None] = lambda op, s: None) -> None:
        self.client = client
        self.prefix = "{" + prefix + "}"
        self.observe = observe
        self._admit = client.register_script(ADMIT)
        self._flush = client.register_script(FLUSH)
        self._renew = client.register_script(RENEW)

    @classmethod
    def from_url(cls, url: str, prefix: str, timeout_s: float,
                 observe: Callable[[str, float], None] = lambda op, s: None,
                 max_connections: int = 64) -> RedisQuotas:
        """With a pool of its own (plain or through Sentinel, ``connect``), for tools and
        tests: every call, and the wait for a free connection, ends within ``timeout_s``."""
        client, _, _ = connect(url, timeout_s, max_connections)
        return cls(client, prefix, observe)

    def close(self) -> None:
        self.client.connection_pool.disconnect()

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}:lim:epoch"

    def key(self, principal: str, part: str) -> str:
        return f"{self.prefix}:lim:{principal}:{part}"

    def day_key(self, principal: str, day: int) -> str:
        return f"{self.prefix}:lim:{principal}:d:{day}"

    def admit(self, epoch: str, principal: str, lease: str, ttl_ms: int, per_minute: int,
              cap: int, quota: int, counts_tokens: bool, day: int) -> tuple[int, int]:
        """(GRANTED | CONCURRENCY | TOKENS | RATE | LOST, value); 0 for a limit: none."""
        t0 = time.perf_counter()
        code, value = self._admit(
            keys=[self.epoch_key, self.key(principal, "b"), self.key(principal, "f"),
                  self.day_key(principal, day)],
            args=[epoch, lease, ttl_ms, per_minute, cap, quota, "1" if counts_tokens else "0"])
        self.observe("limits_admit", time.perf_counter() - t0)
        return int(code), int(value)

    def flush(self, epoch: str, releases: dict[str, list[str]],
              charges: dict[tuple[str, int], int]) -> bool:
        """Give back leases and add tokens, one round trip; False if Redis lost its state."""
        keys, args = [self.epoch_key], [epoch, len(releases)]
        for principal, leases in releases.items():
            keys.append(self.key(principal, "f"))
            args += [len(leases), *leases]
        for (principal, day), tokens in charges.items():
            keys.append(self.day_key(principal, day))
            args.append(tokens)
        t0 = time.perf_counter()
        ok = self._flush(keys=keys, args=args)
        self.observe("limits_flush", time.perf_counter() - t0)
        return bool(ok)

    def renew(self, epoch: str, join: bool, ttl_ms: int, own_prefix: str,
              holdings: Iterable[Holdings], issued: int) -> str | None:
        """Re-assert own leases (see ``RENEW``); Redis's epoch, or None if it lost state.
        ``issued``: the last lease number given out when ``holdings`` were read."""
        keys = [self.epoch_key]
        args: list[Any] = [epoch, "1" if join else "0", ttl_ms, own_prefix, issued]
        for principal, held, pending in holdings:
            keys.append(self.key(principal, "f"))
            args += [len(held), *held, len(pending), *pending]
        t0 = time.perf_counter()
        if join:  # loaded ahead, so that no admission pays NOSCRIPT and a load
            pipe = self.client.pipeline(transaction=False)
            for script in (self._admit, self._flush, self._renew):
                pipe.script_load(script.script)
            pipe.execute()
        reply = self._renew(keys=keys, args=args)
        self.observe("limits_renew", time.perf_counter() - t0)
        if not reply or reply[0] is None:
            return None
        return reply[0].decode()

    def add_usage(self, usage: Iterable[tuple[str, int, int]]) -> None:
        """Re-assert own usage after Redis lost its state: (principal, day, tokens)."""
        pipe = self.client.pipeline(transaction=False)
        for principal, day, tokens in usage:
            pipe.incrby(self.day_key(principal, day), tokens)
            pipe.expire(self.day_key(principal, day), DAY_KEY_TTL_S)
        pipe.execute()

    def used(self, principal: str, day: int) -> int:
        """Tokens the principal used that day, as Redis counts them (for reports and tests)."""
        value: Any = self.client.get(self.day_key(principal, day))
        return int(value or 0)

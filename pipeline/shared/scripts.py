"""The Lua scripts: each one runs atomically in Redis, so a cap holds across instances.

Keys share the hash tag ``{prefix}`` so the scripts stay valid on Redis Cluster. Lease expiry
scores come from ``redis.call('TIME')``: the instances' clocks never matter.
"""

from __future__ import annotations

#: A Lua function both renewal scripts (node leases here, in-flight places in quotas.py) run
#: on each lease zset: ARGV from index ``a`` holds n held, held ids..., n pending, pending ids.
#: Own held leases get a fresh expiry (re-asserted if Redis lost them); own leases (``prefix``
#: then a sequence number) neither held nor on their way are deleted (releases that never
#: reached Redis), but only those numbered up to ``issued``: the last number the instance had
#: given out when it read its holdings. A lease acquired after that read (on another
#: connection, which Redis may serve first) is in neither list and must stay. Returns the
#: index after this zset's arguments.
RECONCILE = """
local function reconcile(key, a, now, ttl, prefix, issued)
  local keep = {}
  local nheld = tonumber(ARGV[a]); a = a + 1
  for i = 1, nheld do
    redis.call('ZADD', key, now + ttl, ARGV[a]); keep[ARGV[a]] = true; a = a + 1
  end
  local npend = tonumber(ARGV[a]); a = a + 1
  for i = 1, npend do keep[ARGV[a]] = true; a = a + 1 end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(m, 1, #prefix) == prefix and not keep[m]
        and (tonumber(string.sub(m, #prefix + 1)) or 0) <= issued then
      redis.call('ZREM', key, m)
    end
  end
  if nheld > 0 then redis.call('PEXPIRE', key, ttl * 2) end
  return a
end
"""

#: KEYS: epoch, the node's lease zset. ARGV: epoch, lease id, ttl ms, cap.
#: Returns {1, count} granted, {-1, count} full, {-2, 0} Redis lost its state (epoch).
ACQUIRE = """
local e = redis.call('GET', KEYS[1])
if (not e) or e ~= ARGV[1] then return {-2, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[2])
if n >= tonumber(ARGV[4]) then return {-1, n} end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return {1, n + 1}
"""

#: KEYS: epoch, instances zset, then one lease zset per node.
#: ARGV: epoch, instance id, ttl ms, liveness ms, join ('1' creates the epoch if missing),
#:       the last lease number issued when the holdings were read,
#:       then per node: n held, held ids..., n pending, pending ids...
#: Heartbeats, then reconciles each node: own leases held are (re)written with a fresh
#: expiry (so leases lost with Redis's state are re-asserted), own leases neither held nor
#: being acquired (and issued before the holdings were read) are deleted (releases that never
#: reached Redis). Returns
#: {epoch or false, live instance ids, count per node} ({false} on an epoch mismatch).
RENEW = RECONCILE + """
if ARGV[5] == '1' then redis.call('SET', KEYS[1], ARGV[1], 'NX') end
local e = redis.call('GET', KEYS[1])
if (not e) or (ARGV[5] ~= '1' and e ~= ARGV[1]) then return {false} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl = ARGV[2], tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now, me)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) * 4)
local live = redis.call('ZRANGE', KEYS[2], 0, -1)
local prefix, issued = me .. '/', tonumber(ARGV[6])
local counts = {}
local a = 7
for k = 3, #KEYS do
  a = reconcile(KEYS[k], a, now, ttl, prefix, issued)
  counts[#counts + 1] = redis.call('ZCARD', KEYS[k])
end
return {e, live, counts}
"""

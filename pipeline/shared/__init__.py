"""Node caps shared across appliance instances through Redis (``sharedState.redisUrl``).

``leases``: the Redis side (one Lua script per acquire, one round trip per release batch, a
renew-and-heartbeat script); ``fallback``: each instance's local share of a cap while Redis is
away; ``membership``: which instances are alive; ``caps``: the mode machine that puts them
together and gates each dispatch; ``observe``: its metrics. Nothing here runs unless a Redis
URL is configured.
"""

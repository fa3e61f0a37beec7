"""Redis clients for ``sharedState.redisUrl``: one Redis by URL, or the master a Sentinel names.

Both get the same short timeouts (connect and reply) and no retry of redis-py's own, and both
wait for a free connection for at most the timeout rather than fail when the pool is
exhausted. Through Sentinel, every new connection asks the sentinels for the master (each
sentinel with the same timeouts), and a connection to a master that was demoted fails with a
ConnectionError (redis-py turns the replica's READONLY into one): the caller falls back to
local shares and rejoins on the new master, re-asserting its leases, as after any outage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from pipeline.config_shared import is_sentinel, parse_sentinel_url

ClientFactory = Callable[[float], redis.Redis]  # a fresh client with this reply timeout


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's master discovery with the blocking pool's wait for a free connection."""


CLIENT_NAME = "ollama-lb"  # CLIENT LIST on Redis shows which connections are the appliance's


def short_timeouts(timeout_s: float) -> dict[str, Any]:
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0),  # no retry: a caller falls back at once
            "client_name": CLIENT_NAME}


def sentinel_listener(sentinel: Sentinel, wait_s: float) -> redis.Redis:
    """A client of the sentinel that answered last (discovery puts it first), with ``wait_s``
    as its reply timeout: for a subscription to the sentinels' own events."""
    kwargs = dict(sentinel.sentinels[0].connection_pool.connection_kwargs)
    return redis.Redis(connection_pool=redis.ConnectionPool(**{**kwargs,
                                                               "socket_timeout": wait_s}))


def connect(url: str, timeout_s: float,
            max_connections: int = 64) -> tuple[redis.Redis, ClientFactory, Sentinel | None]:
    """(the pooled client, a factory of single clients, the Sentinel manager if any)."""
    common = short_timeouts(timeout_s)
    if not is_sentinel(url):
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, **common)
        return (redis.Redis(connection_pool=pool),
                lambda wait_s: redis.Redis.from_url(url, **{**common,
                                                            "socket_timeout": wait_s}), None)
    parts = parse_sentinel_url(url)
    auth = {"db": parts.db, "username": parts.username, "password": parts.password}
    sentinel = Sentinel(list(parts.sentinels), sentinel_kwargs={
        **common, "username": parts.sentinel_username, "password": parts.sentinel_password},
        **common, **auth)
    client = sentinel.master_for(parts.master, connection_pool_class=BlockingSentinelPool,
                                 max_connections=max_connections, timeout=timeout_s)

    def single(wait_s: float) -> redis.Redis:
        return sentinel.master_for(parts.master, socket_timeout=wait_s)

    return client, single, sentinel

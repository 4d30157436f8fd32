"""Every Redis client of the server, made in one place: a single Redis, or a
Redis Cluster (``TOKENCHAT_REDIS_CLUSTER=1``, docs/deploy.md "Redis Cluster").

A cluster client is handed out typed as ``Redis``: the code calls only what
both clients do alike for its keys (single-key commands, scripts whose keys
share a slot, multi-key commands within one slot, ``scan_iter``, which the
cluster client runs on every primary). Where they differ, the code asks
``is_cluster``: the script batcher sends each node its own calls
(``economy/batcher.py``), and the broker subscribes to each room's channel on
its slot's primary (``gateway/broker.py``). tests/server/test_cluster.py runs
the product on a cluster of three primaries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

from .config import Settings


def connect(
    settings: Settings, *, max_connections: int, socket_timeout_s: float, blocking: bool = True
) -> Redis:
    """A client of ``settings.redis_url`` with at most ``max_connections``
    connections (per node, on a cluster); commands time out after
    ``socket_timeout_s``. ``blocking``: on a single Redis, a command waits
    (up to redis_timeout_s) for a free connection instead of failing at once."""
    if settings.redis_cluster:
        cluster = RedisCluster.from_url(
            settings.redis_url,
            # Per node. The cluster client has no blocking pool: past this, a
            # command fails at once (MaxConnectionsError, a RedisError: the
            # caller answers UNAVAILABLE) instead of waiting for a connection.
            max_connections=max_connections,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        _mend_transaction_callbacks(cluster)
        return cast(Redis, cluster)
    if not blocking:
        return Redis.from_url(
            settings.redis_url,
            max_connections=max_connections,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=max_connections,
            timeout=settings.redis_timeout_s,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
    )


def _mend_transaction_callbacks(cluster: RedisCluster) -> None:
    """redis-py 8's cluster MULTI calls each command's reply callback with
    the command's options (``keys=...``), which the callbacks that are plain
    types (``bool`` of HSETNX, HEXISTS, EXPIRE...) refuse with a TypeError:
    those become functions that drop the options."""
    for command, callback in list(cluster.response_callbacks.items()):
        if isinstance(callback, type):
            cluster.set_response_callback(command, functools.partial(_plain, callback))


def _plain(convert: Callable[[Any], Any], reply: Any, **options: Any) -> Any:
    return convert(reply)


def is_cluster(redis: Redis) -> bool:
    """True when ``redis`` is a cluster client (made by ``connect``)."""
    return isinstance(redis, RedisCluster)


def as_cluster(redis: Redis) -> RedisCluster:
    """``redis`` as the cluster client it is (``is_cluster`` is true)."""
    if not isinstance(redis, RedisCluster):
        raise TypeError("not a Redis Cluster client")
    return redis

"""The pub/sub broker on a single Redis (and a cluster), driven directly: what only its own
bookkeeping shows (the end-to-end contract is in test_backends.py)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection

from tokenchat.server.config import Settings
from tokenchat.server.gateway.broker import RedisBroker, _node_client
from tokenchat.server.keys import Keys


@pytest.mark.cluster
async def test_a_room_left_and_joined_again_at_once_is_no_slot_move(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.redis_prefix)
    channel = keys.room_channel("alice")
    reconnects: list[None] = []
    broker = RedisBroker(
        redis,
        lambda channel, data: None,
        lambda: reconnects.append(None),
        control_channel=f"{settings.redis_prefix}control",
        timeout_s=5.0,
        sharded=lambda name: keys.channel_room(name) is not None,
    )
    await broker.start()
    try:
        await broker.subscribe(channel)
        # The SUNSUBSCRIBE's reply comes after the channel is ours again: it
        # is no shard giving the channel up (which a cluster answers with a
        # refill of every room, and a single Redis never does).
        for _ in range(20):
            await asyncio.gather(broker.unsubscribe(channel), broker.subscribe(channel))
        await asyncio.sleep(0.2)
        assert broker._lost == set()
        assert reconnects == []
        await broker.subscribe(channel)
    finally:
        await broker.close()


def test_a_shard_link_to_a_tls_cluster_speaks_tls_with_its_options() -> None:
    # What a rediss:// URL gives each node of a cluster client.
    node = ClusterNode(
        "127.0.0.1",
        7000,
        connection_class=SSLConnection,
        ssl_cert_reqs="none",
        ssl_ca_certs="/etc/ssl/ca.pem",
        password="pw",
    )
    pool = _node_client(node).connection_pool
    assert issubclass(pool.connection_class, SSLConnection)
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert pool.connection_kwargs["password"] == "pw"
    plain = _node_client(ClusterNode("127.0.0.1", 7000)).connection_pool
    assert not issubclass(plain.connection_class, SSLConnection)

"""Cross-node fan-out: Redis pub/sub, one subscription per channel per node.

A node subscribes to a room's channel only while it has members in that room.
``subscribe()`` returns once Redis has confirmed the subscription, so a caller
that reads history afterwards cannot miss an event between the two: anything
published after the history read arrives on the channel.

Room channels are sharded (SSUBSCRIBE; the scripts SPUBLISH on them, Redis
7 or newer): on a Redis Cluster an event goes only to the shard owning its
room's slot, and each node holds one pub/sub connection per shard it has
subscribed rooms on (a *link*), opened on first use, plus one link on any
node for the classic channels (users, moderation, live, ledger commits),
which a cluster copies to every node. On a single Redis one link carries both
kinds.

Messages are handed to one synchronous callback in the order a link's
connection received them, which for one channel is the order Redis published
them (a channel lives on one link). When a link's connection drops, its
reader reconnects with backoff, redis-py resubscribes every channel of it,
and ``on_reconnect`` tells the node so it can fill from history whatever was
published while it was away. From then until Redis confirms a channel's
resubscription, ``subscribe()`` of that channel waits for the confirmation,
so the node can read history after it. When a cluster moves a slot away
(Redis then ends its sharded subscriptions with an unasked SUNSUBSCRIBE, or
answers one with MOVED), the broker reloads the slot map, subscribes those
channels on their new shard and calls ``on_reconnect`` alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import ConnectionError, RedisClusterException, RedisError, ResponseError

from ..aio import raise_if_cancelling, reraise_if_cancelled
from ..redis_client import as_cluster, is_cluster

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
ReconnectHandler = Callable[[], None]
ShardedPredicate = Callable[[str], bool]

# Backoff between reconnect attempts while Redis is down: starts small so a
# blip heals fast, capped so a long outage costs one attempt every 2 s.
RECONNECT_DELAY_MIN_S = 0.05
RECONNECT_DELAY_MAX_S = 2.0
# The classic channels' link on a cluster.
CLASSIC = "classic"


class Broker(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def subscribe(self, channel: str) -> None: ...
    async def subscribe_many(self, channels: list[str]) -> None: ...
    async def unsubscribe(self, channel: str) -> None: ...


class _Link:
    """One pub/sub connection (``client``'s) and the task reading it."""

    def __init__(self, name: str, client: Redis, *, own_client: bool, by_slot: bool) -> None:
        self.name = name
        self.client = client
        self.own_client = own_client
        self.pubsub: PubSub = client.pubsub(ignore_subscribe_messages=False)
        if by_slot:
            # A cluster node refuses an SSUBSCRIBE whose channels span slots
            # (CROSSSLOT), and one node owns many slots: redis-py's
            # resubscription after a reconnect sends them all in one command
            # unless told otherwise (its ClusterPubSub does the same).
            self.pubsub._resubscribe_shard_channels = self._resubscribe_by_slot  # type: ignore[method-assign]
        self.reader: asyncio.Task[None] | None = None
        # SUNSUBSCRIBEs sent on this connection and not answered yet, per
        # channel: their replies are ours, not a shard giving a slot up.
        self.unsubscribing: dict[str, int] = {}

    async def _resubscribe_by_slot(self) -> None:
        for channels in _by_slot(list(self.pubsub.shard_channels)).values():
            await self.pubsub.ssubscribe(*channels)

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        if self.own_client:
            with contextlib.suppress(RedisError, OSError):
                await self.client.aclose()


class RedisBroker:
    def __init__(
        self,
        redis: Redis,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler,
        *,
        control_channel: str,
        timeout_s: float,
        sharded: ShardedPredicate = lambda channel: False,
    ) -> None:
        self._redis = redis
        self._cluster = is_cluster(redis)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        # Always subscribed to this one, so the reader never idles unsubscribed.
        self._control_channel = control_channel
        self._timeout_s = timeout_s
        # Which channels go through SSUBSCRIBE (the room channels).
        self._sharded = sharded
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._links: dict[str, _Link] = {}
        # The link each subscribed channel is on.
        self._channel_links: dict[str, _Link] = {}
        self._rerouting: asyncio.Task[None] | None = None
        # Sharded channels a shard ended unasked, to subscribe again.
        self._lost: set[str] = set()
        self._reroute_again = False

    async def start(self) -> None:
        await self.subscribe(self._control_channel)

    async def close(self) -> None:
        if self._rerouting is not None:
            self._rerouting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rerouting
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    # --- links ------------------------------------------------------------------------
    def _link_for(self, channel: str) -> _Link:
        """The link ``channel`` is subscribed on: its shard's on a cluster for
        a sharded channel, else the one link of classic channels."""
        if not self._cluster:
            return self._link(CLASSIC, lambda: (self._redis, False))
        cluster = as_cluster(self._redis)
        if not self._sharded(channel):
            # Any node will do: a cluster copies classic messages to all.
            return self._link(CLASSIC, lambda: (_node_client(cluster.get_default_node()), True))
        try:
            node = cluster.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
        except RedisClusterException as exc:  # no node serves the slot: the cluster is down
            raise ConnectionError(str(exc)) from exc
        return self._link(node.name, lambda: (_node_client(node), True))

    def _link(self, name: str, make: Callable[[], tuple[Redis, bool]]) -> _Link:
        link = self._links.get(name)
        if link is None:
            client, own = make()
            link = _Link(name, client, own_client=own, by_slot=self._cluster)
            self._links[name] = link
        return link

    async def _send_subscribe(self, link: _Link, channels: list[str]) -> None:
        sharded = [channel for channel in channels if self._sharded(channel)]
        classic = [channel for channel in channels if not self._sharded(channel)]
        if classic:
            await link.pubsub.subscribe(*classic)
        for group in _by_slot(sharded).values() if self._cluster else [sharded] if sharded else []:
            await link.pubsub.ssubscribe(*group)
        if link.reader is None:  # its connection exists from the first subscription on
            link.reader = asyncio.create_task(self._read_forever(link), name=f"broker-{link.name}")

    # --- the contract -------------------------------------------------------------------
    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait for Redis to confirm it (``RedisError`` on failure)."""
        waiter = self._confirmations.get(channel)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._confirmations[channel] = waiter
            try:
                if self._cluster:
                    await as_cluster(self._redis).initialize()  # the slot map
                link = self._link_for(channel)
                self._channel_links[channel] = link
                await asyncio.wait_for(self._send_subscribe(link, [channel]), self._timeout_s)
            except (RedisError, OSError, TimeoutError):
                self._confirmations.pop(channel, None)
                self._channel_links.pop(channel, None)
                raise
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._timeout_s)
        except TimeoutError:
            self._confirmations.pop(channel, None)
            raise

    async def subscribe_many(self, channels: list[str]) -> None:
        """``subscribe`` for many channels in one SUBSCRIBE command per link
        (one round trip and one write for a batch of hellos); returns once
        Redis has confirmed every one of them (``RedisError`` or
        ``TimeoutError`` on failure)."""
        loop = asyncio.get_running_loop()
        new = [channel for channel in dict.fromkeys(channels) if channel not in self._confirmations]
        for channel in new:
            self._confirmations[channel] = loop.create_future()
        if new:
            try:
                if self._cluster:
                    await as_cluster(self._redis).initialize()
                per_link: dict[str, list[str]] = defaultdict(list)
                for channel in new:
                    link = self._link_for(channel)
                    self._channel_links[channel] = link
                    per_link[link.name].append(channel)
                await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            self._send_subscribe(self._links[name], group)
                            for name, group in per_link.items()
                        )
                    ),
                    self._timeout_s,
                )
            except (RedisError, OSError, TimeoutError):
                for channel in new:
                    self._confirmations.pop(channel, None)
                    self._channel_links.pop(channel, None)
                raise
        waiters = [self._confirmations.get(channel) for channel in channels]
        pending = [asyncio.shield(waiter) for waiter in waiters if waiter is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), self._timeout_s)
        except TimeoutError:
            for channel in channels:
                self._confirmations.pop(channel, None)
            raise

    async def unsubscribe(self, channel: str) -> None:
        self._confirmations.pop(channel, None)
        link = self._channel_links.pop(channel, None)
        if link is None:
            return
        if self._sharded(channel):
            link.unsubscribing[channel] = link.unsubscribing.get(channel, 0) + 1
            try:
                await asyncio.wait_for(link.pubsub.sunsubscribe(channel), self._timeout_s)
            except BaseException:  # not sent, or its connection is gone: no reply
                _forget_one(link.unsubscribing, channel)
                raise
        else:
            await asyncio.wait_for(link.pubsub.unsubscribe(channel), self._timeout_s)

    # --- reading ------------------------------------------------------------------------
    async def _read_forever(self, link: _Link) -> None:
        delay_s = RECONNECT_DELAY_MIN_S
        while True:
            raise_if_cancelling()
            try:
                message = await link.pubsub.get_message(timeout=None)
            except ResponseError as exc:
                # An error reply, not a lost connection: on a cluster, a
                # subscription sent to a shard that no longer owns its slot.
                log.warning("pub/sub %s: %s; rerouting its channels", link.name, exc)
                self._reroute()
                continue
            except (RedisError, OSError) as exc:
                reraise_if_cancelled(exc)
                log.warning("pub/sub %s connection lost (%s); reconnecting", link.name, exc)
                delay_s = await self._reconnect(link, delay_s)
                continue
            delay_s = RECONNECT_DELAY_MIN_S
            if message is not None:
                self._dispatch(link, message)

    async def _reconnect(self, link: _Link, delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        try:
            # Reconnecting makes redis-py resubscribe every channel it had.
            await link.pubsub.connect()  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            if self._cluster:
                self._reroute()  # the shard may be gone for good (a failover)
            return min(delay_s * 2, RECONNECT_DELAY_MAX_S)
        log.info("pub/sub %s reconnected", link.name)
        # A confirmation from the old connection says nothing of the new one:
        # until Redis confirms the resubscription, `subscribe()` waits again.
        self._unconfirm([c for c, each in self._channel_links.items() if each is link])
        link.unsubscribing.clear()  # the old connection's replies never come
        self._on_reconnect()
        return RECONNECT_DELAY_MIN_S

    def _unconfirm(self, channels: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for channel in channels:
            waiter = self._confirmations.get(channel)
            if waiter is not None and waiter.done():
                self._confirmations[channel] = loop.create_future()

    def _reroute(self) -> None:
        """Reload the slot map and move each sharded channel whose slot has
        another owner now to that owner's link (once at a time)."""
        if not self._cluster:
            return
        if self._rerouting is None or self._rerouting.done():
            self._rerouting = asyncio.create_task(self._reroute_now(), name="broker-reroute")
        else:  # one running: another pass after it, for what it may not see
            self._reroute_again = True

    async def _reroute_now(self) -> None:
        cluster = as_cluster(self._redis)
        delay_s = RECONNECT_DELAY_MIN_S
        while True:
            moved: dict[str, _Link] = {}
            try:
                await cluster.nodes_manager.initialize()
                # Those on another shard now, and those a shard ended without
                # being asked (Redis does so for a slot it is given again).
                lost, self._lost = self._lost, set()
                moved = {
                    channel: link
                    for channel, link in self._channel_links.items()
                    if self._sharded(channel)
                    and (channel in lost or self._link_for(channel) is not link)
                }
                for channel, old in moved.items():
                    # Not resubscribed on the old shard by a reconnect.
                    old.pubsub.shard_channels.pop(channel.encode(), None)
                    old.pubsub.shard_channels.pop(channel, None)
                    self._channel_links[channel] = self._link_for(channel)
                    self._unconfirm([channel])
                if moved:
                    log.info("pub/sub: %d channels move to another shard", len(moved))
                    # Before the new subscriptions can deliver anything: the
                    # node holds its rooms' live events until what was
                    # published while they moved is read from history (else
                    # a live event delivered first makes the hub drop those).
                    self._on_reconnect()
                for channel in moved:
                    link = self._channel_links.get(channel)
                    if link is not None:  # None: unsubscribed meanwhile
                        await asyncio.wait_for(
                            self._send_subscribe(link, [channel]), self._timeout_s
                        )
                await self._close_idle_links()
            except (RedisError, OSError, TimeoutError) as exc:
                reraise_if_cancelled(exc)
                self._lost.update(moved)
                log.warning("pub/sub rerouting failed (%s); trying again", exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_DELAY_MAX_S)
                continue
            if not self._reroute_again:
                return
            self._reroute_again = False

    async def _close_idle_links(self) -> None:
        """Close the shard links left without channels by a move: a failed
        primary's would otherwise reconnect to its address forever."""
        in_use = set(map(id, self._channel_links.values()))
        idle = [
            name for name in self._links if name != CLASSIC and id(self._links[name]) not in in_use
        ]
        # Out of the map before any await: no new channel joins them.
        for link in [self._links.pop(name) for name in idle]:
            await link.close()

    def _dispatch(self, link: _Link, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "message" or kind == "smessage":
            if channel != self._control_channel:
                self._on_message(channel, message["data"])
        elif kind == "subscribe" or kind == "ssubscribe":
            waiter = self._confirmations.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "sunsubscribe" and link.unsubscribing.get(channel):
            # Ours (a room left, perhaps joined again before this reply came).
            _forget_one(link.unsubscribing, channel)
        elif kind == "sunsubscribe" and self._cluster and self._channel_links.get(channel) is link:
            # Unasked: the cluster moved its slot (a single Redis never does).
            log.info("pub/sub: shard %s gave up %s; rerouting", link.name, channel)
            self._lost.add(channel)
            self._reroute()


def _forget_one(counts: dict[str, int], channel: str) -> None:
    if counts.get(channel, 0) > 1:
        counts[channel] -= 1
    else:
        counts.pop(channel, None)


def _by_slot(channels: list[Any]) -> dict[int, list[Any]]:
    groups: dict[int, list[Any]] = defaultdict(list)
    for channel in channels:
        groups[key_slot(channel if isinstance(channel, bytes) else channel.encode())].append(
            channel
        )
    return groups


# What a pub/sub link's client takes from the cluster client's options.
_LINK_OPTIONS = (
    "username",
    "password",
    "credential_provider",
    "socket_connect_timeout",
    "socket_timeout",
    "socket_keepalive",
)


def _node_client(node: ClusterNode) -> Redis:
    """A plain client of one cluster node, for a pub/sub link: a cluster
    client's own connections are for commands routed by key."""
    options = {
        k: v
        for k, v in node.connection_kwargs.items()
        # ssl_*: a rediss:// cluster's links speak TLS like its other clients.
        if k in _LINK_OPTIONS or (k.startswith("ssl_") and k in _REDIS_SSL_OPTIONS)
    }
    tls = issubclass(node.connection_class, SSLConnection)
    return Redis(host=node.host, port=int(node.port), ssl=tls, **options)


# The TLS options a plain client takes (the cluster's nodes may carry more).
_REDIS_SSL_OPTIONS = frozenset(
    name for name in inspect.signature(Redis.__init__).parameters if name.startswith("ssl_")
)

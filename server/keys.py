"""Names of every Redis key and channel tokenchat uses, in one place.

All start with the configured prefix so deployments and test runs can share a
Redis. A room's keys carry the room id as a hash tag (``{alice}``) so that, on
Redis Cluster, one room's state lives in one slot.
"""

from __future__ import annotations


class Keys:
    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def room_history(self, room: str) -> str:
        """Stream of the room's last `history_len` message/tip events."""
        return f"{self.prefix}room:{{{room}}}:history"

    def room_channel(self, room: str) -> str:
        """Pub/sub channel carrying the room's events to every node."""
        return f"{self.prefix}room:{{{room}}}:events"

    def room_presence(self, room: str) -> str:
        """Hash: node id -> sessions that node has in the room."""
        return f"{self.prefix}room:{{{room}}}:presence"

    def room_info(self, room: str) -> str:
        """Hash caching the room's row from Postgres (owner, tip_min)."""
        return f"{self.prefix}room:{{{room}}}:info"

    def node_prefix(self) -> str:
        return f"{self.prefix}node:"

    def node(self, node_id: str) -> str:
        """Heartbeat of a gateway process; expires when the process dies."""
        return f"{self.node_prefix()}{node_id}"

    def channel_room(self, channel: str) -> str | None:
        """The room a room channel belongs to, or None for other channels."""
        head = f"{self.prefix}room:{{"
        if channel.startswith(head) and channel.endswith("}:events"):
            return channel[len(head) : -len("}:events")]
        return None

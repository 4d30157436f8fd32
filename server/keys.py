"""Names of every Redis key and channel tokenchat uses, in one place.

All start with the configured prefix so deployments and test runs can share a
Redis. A room's keys carry the room id as a hash tag (``{alice}``) so that, on
Redis Cluster, one room's state lives in one slot.
"""

from __future__ import annotations


def glob_escape(text: str) -> str:
    """``text`` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Keys:
    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def room_history(self, room: str) -> str:
        """Stream of the room's last `history_len` message/tip events."""
        return f"{self.prefix}room:{{{room}}}:history"

    def room_histories(self) -> str:
        """SCAN MATCH pattern of every room's history stream."""
        return glob_escape(self.prefix) + "room:{*}:history"

    def room_of_history(self, key: str) -> str:
        """The room whose `room_history` key ``key`` is."""
        return key.removeprefix(f"{self.prefix}room:{{").removesuffix("}:history")

    def room_channel(self, room: str) -> str:
        """Pub/sub channel carrying the room's events to every node."""
        return f"{self.prefix}room:{{{room}}}:events"

    def room_presence(self, room: str) -> str:
        """Hash: node id -> sessions that node has in the room."""
        return f"{self.prefix}room:{{{room}}}:presence"

    def room_info(self, room: str) -> str:
        """Hash caching the room's row from Postgres (owner, tip_min)."""
        return f"{self.prefix}room:{{{room}}}:info"

    def room_show(self, room: str) -> str:
        """Hash naming the room's running ticket show (`id`) and who sees its
        chat (`u:<user>`): read by every chat line and tip (show_state.lua)."""
        return f"{self.prefix}room:{{{room}}}:show"

    def node_prefix(self) -> str:
        return f"{self.prefix}node:"

    def nodes(self) -> str:
        """Sorted set of gateway nodes: id -> when its heartbeat runs out
        (ms, Redis's clock; node_beat.lua). One key, not one per node, so a
        room's viewer count learns the live nodes in one read (viewers.lua)."""
        return f"{self.prefix}nodes"

    def node(self, node_id: str) -> str:
        """Prefix of a gateway process's own channels (its control channel);
        its heartbeat is in ``nodes``, not a key of its own."""
        return f"{self.node_prefix()}{node_id}"

    def user_channel(self, user_id: str) -> str:
        """Pub/sub channel of one user: DMs and balance pushes to their sessions."""
        return f"{self.prefix}user:{user_id}"

    def ledger_commits(self) -> str:
        """Pub/sub channel: transactions the ledger writers have committed or
        parked, for the spends waiting on them (server/ledger/confirmations.py)."""
        return f"{self.prefix}ledger:commits"

    def moderation_channel(self) -> str:
        """Pub/sub channel every node subscribes to: moderation changes (the
        ``M`` payload), so each node's copy of the rules stays current."""
        return f"{self.prefix}moderation"

    def relayed(self, room: str, tx: str) -> str:
        """Set (NX, expiring after relay_dedupe_s) by the delivery relay when
        it delivers transaction ``tx``'s events to the room: present means
        "delivered already" (server/economy/relay.py)."""
        return f"{self.prefix}room:{{{room}}}:relayed:{tx}"

    def slow_mode(self, room: str, user: str) -> str:
        """Set (NX, expiring after the room's slow_s) by a member's chat line
        while slow mode is on: present means "too soon"."""
        return f"{self.prefix}room:{{{room}}}:slow:{user}"

    def deadline_lease(self) -> str:
        """Held (SET NX PX, renewed) by the one process sweeping deadlines."""
        return f"{self.prefix}deadlines:lease"

    def private_lease(self, show: str) -> str:
        """Held (SET NX PX, renewed) by the node whose meter bills the show."""
        return f"{self.prefix}private:lease:{show}"

    # --- discovery (issue #13 sections 2 and 3) ---------------------------------------
    def live_state(self, model: str) -> str:
        """Hash of a model's presence in her own room: ``in`` (her sessions
        there) and ``left`` (ms she was last seen leaving), for "goes live"."""
        return f"{self.prefix}live:{{{model}}}"

    def live_channel(self) -> str:
        """Pub/sub channel every node subscribes to: a model went live (the
        ``L`` payload); each node tells its own connected followers."""
        return f"{self.prefix}live"

    def rooms_pin(self, pin: str) -> str:
        """String: one pinned room ranking of GET /v1/rooms (the room ids of
        one snapshot in one sort, newline-separated), read by the later pages
        of a listing on any node; expires after discovery_cursor_idle_s
        without a page read (server/discovery.py, "stable paging")."""
        return f"{self.prefix}rooms:pin:{pin}"

    def channel_user(self, channel: str) -> str | None:
        head = f"{self.prefix}user:"
        return channel[len(head) :] if channel.startswith(head) else None

    # --- the economy: every key in one hash slot ({eco}), so that each money
    # script runs in one slot on Redis Cluster.
    def _eco(self, name: str) -> str:
        return f"{self.prefix}{{eco}}:{name}"

    def balance(self, account: str) -> str:
        """An account's hot balance (integer tokens); absent = not loaded."""
        return self._eco(f"bal:{account}")

    def balance_prefix(self) -> str:
        return self._eco("bal:")

    def idempotency(self, initiator: str, key: str) -> str:
        """The outcome of one idempotency key. The initiator's length comes
        first so that ("a:b", "c") and ("a", "b:c") never share a key."""
        return self._eco(f"idem:{len(initiator)}:{initiator}:{key}")

    def outbox(self) -> str:
        """Stream of ledger entries waiting for Postgres."""
        return self._eco("outbox")

    def epoch(self) -> str:
        """Random token naming this Redis dataset; gone when Redis loses data."""
        return self._eco("epoch")

    def rebuild_lock(self) -> str:
        """Held by the process rebuilding hot balances from the ledger."""
        return self._eco("rebuild-lock")

    def deliveries(self) -> str:
        """Stream of room deliveries waiting for the relay (delivery mode
        `relay`): what a money script would have written into a room's slot,
        written here atomically with the charge (server/economy/relay.py)."""
        return self._eco("deliveries")

    def deliveries_parked(self) -> str:
        """Stream of delivery entries whose room refused them
        ``RELAY_ATTEMPTS_MAX`` times in a row (server/economy/relay.py):
        out of the way of the others, retried every ``PARKED_RETRY_S``."""
        return self._eco("deliveries:parked")

    def room_show_mirror(self, room: str) -> str:
        """The {eco} copy of the room's running-show marker (`room_show`),
        same fields: what tips check and tickets extend in delivery mode
        `relay`, where a money script cannot read the room's slot. Written
        by show_state.lua with the show's hash (server/economy/shows.py)."""
        return self._eco(f"room-show:{room}")

    def prices(self, user_id: str) -> str:
        """Hash of a user's prices (field `dm`); absent = not loaded."""
        return self._eco(f"price:{user_id}")

    def menu(self, user_id: str) -> str:
        """Hash caching a model's tip menu from Postgres: `v` (the menu's
        version), `order` (item ids, space-separated), and per item
        `p:<id>` (price) and `l:<id>` (label); absent = not loaded."""
        return self._eco(f"menu:{user_id}")

    def inbox(self, user_id: str) -> str:
        """Stream of a user's DMs, for delivery at their next hello."""
        return self._eco(f"inbox:{user_id}")

    def inbox_cursor(self, user_id: str) -> str:
        """Id of the last DM delivered to one of the user's sessions."""
        return self._eco(f"inbox-cursor:{user_id}")

    def show(self, show_id: str) -> str:
        """Hash of a ticket show: state, price, `u:<fan>` per ticket
        (ticket.lua); absent = not loaded."""
        return self._eco(f"show:{show_id}")

    def show_prefix(self) -> str:
        return self._eco("show:")

    def refunded(self, tx: str) -> str:
        return self._eco(f"refunded:{tx}")

    def media(self, media_id: str) -> str:
        """Hash caching a media row (owner, kind, price, preview); absent =
        not loaded. In the money slot: the unlock script reads its price."""
        return self._eco(f"media:{media_id}")

    def media_prefix(self) -> str:
        return self._eco("media:")

    def entitlements(self, user_id: str) -> str:
        """Hash: media id -> the unlock's transaction, for the media a user
        unlocked, plus the field ``*`` (so that none is not "not loaded");
        absent = not loaded (Postgres has them: the unlock ledger rows)."""
        return self._eco(f"ent:{user_id}")

    def entitlements_prefix(self) -> str:
        return self._eco("ent:")

    def goal(self, room: str) -> str:
        """Hash of a room's current tip goal (goals.py, goal_state.lua): id
        ('' when the room has none), state, target, progress, title, room,
        aon, deadline, escrow and escrow_key (the escrow's account and its
        balance key; '' unless all-or-nothing); absent = not loaded. In the
        money slot: tip.lua and tip_item.lua count toward it."""
        return self._eco(f"goal:{room}")

    def goal_prefix(self) -> str:
        return self._eco("goal:")

    # --- spending limits (server/economy/limits.py) ------------------------------
    def limits(self, user_id: str) -> str:
        """Hash caching a user's spend_limits row (`v` version, `x`
        excluded until, `d`/`w`/`m` limits and pending raises, `rc`);
        absent = not loaded. In the money slot: user_gate reads it."""
        return self._eco(f"lim:{user_id}")

    def limits_prefix(self) -> str:
        return self._eco("lim:")

    def spent(self, user_id: str) -> str:
        """Hash of what a user spent per calendar window (`dn`/`ds`,
        `wn`/`ws`, `mn`/`ms`: index and tokens) and in total (`t`), advanced
        by the money scripts; absent = not loaded (the ledger rebuilds it)."""
        return self._eco(f"spent:{user_id}")

    def spent_prefix(self) -> str:
        return self._eco("spent:")

    def channel_room(self, channel: str) -> str | None:
        """The room a room channel belongs to, or None for other channels."""
        head = f"{self.prefix}room:{{"
        if channel.startswith(head) and channel.endswith("}:events"):
            return channel[len(head) : -len("}:events")]
        return None

    # --- DMs: the archive stream, and who blocks whom (server/catalog/dms.py).
    # In the money slot: dm.lua appends to the one and reads the other.
    def dm_log(self) -> str:
        """Stream of every DM delivered, paid or free, waiting for the DM
        archiver to copy it into Postgres (table ``dms``)."""
        return self._eco("dmlog")

    def blocks(self, user_id: str) -> str:
        """Set of the users whose DMs ``user_id`` blocks, plus the member
        ``*`` (so that none is not "not loaded"); absent = not loaded."""
        return self._eco(f"blocks:{user_id}")

    def blocks_prefix(self) -> str:
        return self._eco("blocks:")

    def blocks_generation(self, user_id: str) -> str:
        """Counter bumped by every change of a user's blocks: a load that read
        Postgres before a change writes nothing (blocks_load.lua)."""
        return self._eco(f"blocks-gen:{user_id}")

    # --- standing (server/standing.py) ------------------------------------------
    def tiers(self) -> str:
        """Hash: user id -> tier (an integer), for users above tier 0, plus
        the field ``*`` once the standing projector has filled it (absent:
        Redis lost it, and the projector fills it again from Postgres)."""
        return f"{self.prefix}tiers"

"""Ticket shows: a model's scheduled show, paid for with tickets held in escrow.

States (the row in ``shows``, migration 0010)::

    scheduled --show_start (model)--> running --show_end (model)--> ended
        |   \\                           |    \\--show_length_max_s--> ended
        |    \\--not started by starts_at + show_start_grace_s--> cancelled
        +--show_cancel (model)-----------+-----------------------> cancelled

An ended show that ran at least ``min_s`` is released to the model (outcome
``release``: the escrow's whole balance, RELEASE); an ended-early or
cancelled show refunds every ticket (outcome ``refund``: one TICKET_REFUND
per ticket, ledger kind escrow_refund). The outcome is decided in the same
UPDATE that closes the show, from Postgres' clock, so a replay can only finish
what the state decided.

Where things live, and why:

- The workflow state is in Postgres (the escrow foundation's rule: the state
  decides, the money follows; docs/economy.md, "Escrow").
- A copy of the state, the price and the tickets is in the show's Redis hash
  (``{eco}:show:<id>``), because buying a ticket is ONE Lua call that must
  check them (ticket.lua). It is written only by scripts, after Postgres
  (show_state.lua), and rebuilt from Postgres and the ledger when missing
  (``load``): the tickets are the ledger's ``ticket`` transactions less its
  ``escrow_refund`` ones for the show.
- The room's running-show marker (``room:{<room>}:show``) names the show
  while it runs and who sees it (the model, each ticket holder). Chat lines
  and tips check it and mark their event with ``in_show`` (room_event.lua,
  tip.lua), and the gateway gives a marked event only to those who see that
  show: live (the hub), in ``join`` history and through ``since`` alike.

The order around the money is the requests' one: closing commits the state
with a ``show.settle`` deadline; then ``settle`` sets the Redis state (no
ticket sells after that), moves the money, sets ``settled_at`` and drops the
deadline. A crash anywhere leaves the deadline, and settling again finds
each ticket refunded already ('r' in the hash, rebuilt from the ledger after
a Redis loss) or the escrow empty: nothing leaves escrow twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol import events
from tokenchat.protocol.limits import SHOW_AHEAD_S_MAX, SHOW_ID_RE, SHOW_MIN_S_MAX

from ..config import Settings
from ..errors import (
    BadRequest,
    Conflict,
    EscrowEmpty,
    Forbidden,
    NotFound,
    ServiceError,
    Unavailable,
)
from ..keys import Keys
from . import deadlines
from .economy import Economy, escrow_account, user_account
from .scripts import script_source

log = logging.getLogger(__name__)

SHOWS_INITIATOR = "sys:shows"
ESCROW_KIND = "show"
NO_SHOW = "show.no_show"  # not started by starts_at + show_start_grace_s
AUTO_END = "show.auto_end"  # running for show_length_max_s
SETTLE = "show.settle"
OPEN = ("scheduled", "running")
CLOSED = ("ended", "cancelled")
# GET /v1/rooms/{room}/shows: the newest this many (by starts_at); a room
# schedules a few shows a week, so this is months of them.
LISTED_MAX = 50

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)
_COLUMNS = """id, room, model, title, price, starts_at, min_s, state, started_at, ended_at,
              outcome, settled_at, created_at"""
# Attempts at loading a show's hash when Redis keeps being reset meanwhile.
_LOAD_ATTEMPTS_MAX = 3


def new_show_id() -> str:
    return "t_" + secrets.token_hex(12)


def settle_key(show_id: str) -> str:
    """The idempotency key of a show's release."""
    return f"settle:{show_id}"


def refund_key(show_id: str, fan: str) -> str:
    """The idempotency key of one ticket's refund."""
    return f"refund:{show_id}:{fan}"


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def wire(row: Any) -> dict[str, Any]:
    """A show as clients see it (listed, in `show` events, in `join`)."""
    return {
        "room": row["room"],
        "show": row["id"],
        "title": row["title"],
        "state": row["state"],
        "price": row["price"],
        "starts_at": _ms(row["starts_at"]),
        "min_s": row["min_s"],
        "started_at": _ms(row["started_at"]),
        "ended_at": _ms(row["ended_at"]),
    }


class Shows:
    """The show workflow: scheduling, the model's commands, the sweeper's
    handlers, the listing, and who sees a running show."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        economy: Economy,
        post: Any,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._economy = economy
        # RoomStore.append: the `show` events go into the room's history.
        self._post = post
        self._state_script = redis.register_script(script_source("show_state"))
        self._load_script = redis.register_script(script_source("show_load"))
        self._marker_script = redis.register_script(script_source("show_marker"))
        economy.show_loader = self.load
        economy.ticket_granted = self.ticket_granted

    def register(self, sweeper: deadlines.Sweeper) -> None:
        sweeper.handle(NO_SHOW, self.no_show)
        sweeper.handle(AUTO_END, self.auto_end)
        sweeper.handle(SETTLE, self.settle)
        sweeper.every_sweep(self.restore_markers)

    # --- the model --------------------------------------------------------------------
    async def create(
        self, model: str, title: str, price: int, starts_at_ms: int, min_s: int
    ) -> dict[str, Any]:
        if not 1 <= min_s <= SHOW_MIN_S_MAX:
            raise BadRequest(f"field 'min_s' must be 1 to {SHOW_MIN_S_MAX} seconds")
        if min_s > self._settings.show_length_max_s:
            raise BadRequest("field 'min_s' is longer than a show may run on this server")
        starts_at = datetime.fromtimestamp(starts_at_ms / 1000, tz=UTC)
        now = datetime.now(tz=UTC)
        if starts_at > now + timedelta(seconds=SHOW_AHEAD_S_MAX):
            raise BadRequest("field 'starts_at' is more than a year ahead")
        show_id = new_show_id()
        grace = timedelta(seconds=self._settings.show_start_grace_s)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                room = await conn.fetchval("SELECT id FROM rooms WHERE id = $1", model)
                if room is None:
                    raise NotFound(f"no room '{model}'")
                row = await conn.fetchrow(
                    f"""INSERT INTO shows (id, room, model, title, price, starts_at, min_s, state)
                        VALUES ($1, $2, $2, $3, $4, $5, $6, 'scheduled')
                        RETURNING {_COLUMNS}""",
                    show_id,
                    model,
                    title,
                    price,
                    starts_at,
                    min_s,
                )
                await deadlines.schedule(conn, show_id, NO_SHOW, max(starts_at, now) + grace)
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable; nothing was scheduled") from exc
        await self._publish(row)
        return wire(row)

    async def start(self, model: str, show_id: str) -> dict[str, Any]:
        return await self._move(show_id, model, ("scheduled",), "running")

    async def end(self, model: str, show_id: str) -> dict[str, Any]:
        return await self._move(show_id, model, ("running",), "ended")

    async def cancel(self, model: str, show_id: str) -> dict[str, Any]:
        return await self._move(show_id, model, OPEN, "cancelled")

    # --- reading ----------------------------------------------------------------------
    async def list_room(self, room: str) -> list[dict[str, Any]]:
        try:
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM shows WHERE room = $1
                    ORDER BY starts_at DESC, id LIMIT $2""",
                room,
                LISTED_MAX,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc
        return [wire(row) for row in rows]

    async def current(self, room: str) -> dict[str, Any] | None:
        """The room's running show, else its next scheduled one, else None."""
        try:
            row = await self._pool.fetchrow(
                f"""SELECT {_COLUMNS} FROM shows WHERE room = $1 AND state = ANY($2::text[])
                    ORDER BY state = 'running' DESC, starts_at, id LIMIT 1""",
                room,
                list(OPEN),
            )
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc
        return None if row is None else wire(row)

    async def holds_ticket(self, show_id: str, user_id: str) -> bool:
        """Whether the user holds a (not refunded) ticket to the show."""
        key = self._keys.show(show_id)
        for _ in range(_LOAD_ATTEMPTS_MAX):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.exists(key)
                    pipe.hget(key, user_account(user_id))
                    exists, paid = await pipe.execute()
            except _REDIS_ERRORS as exc:
                raise Unavailable("shows are unavailable") from exc
            if exists:
                return paid is not None and paid != b"r"
            await self.load(show_id)
        raise Unavailable("the show could not be loaded")

    async def refund_ticket(self, show_id: str, fan: str) -> int:
        """One fan's ticket to a scheduled show back (her account is being
        deleted: server/economy/closing.py), under the key the show's own
        refund would use, so its settle later finds that ticket done ('r').
        The tokens refunded (0: none held)."""
        try:
            reply = await self._economy.ticket_refund(
                show_id, fan, initiator=SHOWS_INITIATOR, key=refund_key(show_id, fan)
            )
        except EscrowEmpty:
            return 0  # refunded already, or never bought
        return int(reply["amount"])

    # --- the sweeper's handlers ----------------------------------------------------------
    async def no_show(self, show_id: str) -> None:
        """A show not started in time cancels itself and refunds."""
        try:
            await self._move(show_id, None, ("scheduled",), "cancelled")
        except (NotFound, Conflict) as exc:
            log.info("show %s not cancelled: %s", show_id, exc.message)

    async def auto_end(self, show_id: str) -> None:
        """A show running for show_length_max_s ends by itself."""
        try:
            await self._move(show_id, None, ("running",), "ended")
        except (NotFound, Conflict) as exc:
            log.info("show %s not ended: %s", show_id, exc.message)

    async def settle(self, show_id: str) -> None:
        """Move a closed show's escrow the way its outcome says: the whole
        balance to the model, or each ticket back to its fan. Safe to run any
        number of times, from any process."""
        row = await self._fetch(show_id)
        if row is None or row["state"] in OPEN:
            return
        if row["settled_at"] is None:
            # The Redis state first: no ticket sells once this returns, so
            # the tickets read below are all there will be.
            await self._set_redis_state(row)
            escrow = escrow_account(ESCROW_KIND, show_id)
            if row["outcome"] == "release":
                # EscrowEmpty: released before (its key's record lost with
                # Redis), or no ticket was sold.
                with contextlib.suppress(EscrowEmpty):
                    await self._economy.release(
                        escrow,
                        row["model"],
                        initiator=SHOWS_INITIATOR,
                        key=settle_key(show_id),
                        meta={"show": show_id},
                    )
            else:
                for fan in await self._ticket_holders(show_id):
                    with contextlib.suppress(EscrowEmpty):  # refunded already
                        await self._economy.ticket_refund(
                            show_id, fan, initiator=SHOWS_INITIATOR, key=refund_key(show_id, fan)
                        )
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE shows SET settled_at = now() WHERE id = $1 AND settled_at IS NULL",
                    show_id,
                )
                await deadlines.cancel(conn, show_id, SETTLE)
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc

    async def restore_markers(self) -> None:
        """Every sweep: the Redis state of each running show (its room's
        marker lost with Redis would let its chat reach non-holders; the
        script leaves a marker already in place as it is)."""
        try:
            rows = await self._pool.fetch(f"SELECT {_COLUMNS} FROM shows WHERE state = 'running'")
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc
        for row in rows:
            await self._set_redis_state(row)

    # --- Redis ------------------------------------------------------------------------
    async def load(self, show_id: str) -> None:
        """Put the show's hash into Redis from Postgres: its state and price
        from its row, its tickets from the ledger (tickets less refunds)."""
        if not SHOW_ID_RE.fullmatch(show_id):
            raise NotFound(f"no show '{show_id}'")
        escrow = escrow_account(ESCROW_KIND, show_id)
        for _ in range(_LOAD_ATTEMPTS_MAX):
            epoch = await self._economy.epoch()
            try:
                async with self._pool.acquire() as conn:
                    row = await conn.fetchrow(
                        "SELECT room, state, price FROM shows WHERE id = $1", show_id
                    )
                    tickets = await conn.fetch(
                        """SELECT t.kind, t.meta->>'fan' AS fan, p.amount
                           FROM ledger_transactions t
                           JOIN ledger_postings p ON p.tx_id = t.id AND p.account_id = $2
                           WHERE t.meta->>'show' = $1 AND t.meta ? 'show'
                             AND t.kind IN ('ticket', 'escrow_refund')""",
                        show_id,
                        escrow,
                    )
            except _DB_ERRORS as exc:
                raise Unavailable("shows are unavailable; nothing was charged") from exc
            if row is None:
                raise NotFound(f"no show '{show_id}'")
            held: dict[str, str] = {}
            for ticket in tickets:
                field = user_account(ticket["fan"])
                if ticket["kind"] == "escrow_refund":
                    held[field] = "r"
                elif held.get(field) != "r":
                    held[field] = str(ticket["amount"])
            args: list[Any] = [epoch, "state", row["state"], "price", row["price"]]
            args += ["room", row["room"]]
            for field, value in held.items():
                args += [field, value]
            try:
                result = await self._load_script(
                    keys=[self._keys.epoch(), self._keys.show(show_id)], args=args
                )
            except _REDIS_ERRORS as exc:
                raise Unavailable("shows are unavailable; nothing was charged") from exc
            if _text(result) in ("OK", "EXISTS"):
                return
            log.warning("Redis was reset while loading show %s; loading again", show_id)
        raise Unavailable("Redis keeps being reset; try again")

    async def _set_redis_state(self, row: Any) -> None:
        """The show's state into its hash and the room's marker. In delivery
        mode `relay` the script writes the marker's {eco} mirror (what tips
        and tickets read, in the money slot), then the room's marker is
        copied from it (``_copy_marker``): the mirror is never behind the
        marker, and a tip is refused or marked by the same state as a
        ticket is sold by (docs/economy.md, "Delivery relay")."""
        show_id, room = row["id"], row["room"]
        relay = self._economy.delivery == "relay"
        marker = self._keys.room_show_mirror(room) if relay else self._keys.room_show(room)
        keys = [self._keys.show(show_id), marker]
        args = [row["state"], show_id, user_account(row["model"])]
        for _ in range(_LOAD_ATTEMPTS_MAX):
            try:
                result = await self._state_script(keys=keys, args=args)
            except _REDIS_ERRORS as exc:
                raise Unavailable("shows are unavailable") from exc
            if _text(result) == "OK":
                if relay:
                    await self._copy_marker(room, show_id, row["state"])
                return
            await self.load(show_id)
        raise Unavailable("the show could not be loaded")

    async def ticket_granted(self, room: str, show_id: str) -> None:
        """Relay mode: a ticket sold while its show runs is in the mirror;
        let its holder into the room's marker too (chat lines check it)."""
        await self._copy_marker(room, show_id, "grant")

    async def _copy_marker(self, room: str, show_id: str, state: str) -> None:
        """The room's marker from its {eco} mirror (show_marker.lua): set
        while the mirror names ``show_id``, removed once the show stopped.
        A crash between the mirror and this is mended by the next sweep
        (restore_markers)."""
        args: list[Any] = [state, show_id]
        try:
            if state in ("running", "grant"):
                fields: dict[bytes, bytes] = await self._redis.hgetall(  # type: ignore[misc,assignment]
                    self._keys.room_show_mirror(room)
                )
                if fields.get(b"id") != show_id.encode():
                    return  # the mirror names another show, or none: nothing to copy
                for name, value in fields.items():
                    args += [name, value]
            await self._marker_script(keys=[self._keys.room_show(room)], args=args)
            # The copy is two calls: a show that ended between them removed
            # the marker before `running` set it again. Once the mirror no
            # longer names it, remove what we set (an end after this read
            # copies itself after our write).
            if state == "running":
                named = await self._redis.hget(self._keys.room_show_mirror(room), "id")  # type: ignore[misc]
                if named != show_id.encode():
                    await self._marker_script(
                        keys=[self._keys.room_show(room)], args=["ended", show_id]
                    )
        except _REDIS_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc

    async def _ticket_holders(self, show_id: str) -> list[str]:
        key = self._keys.show(show_id)
        try:
            fields: dict[bytes, bytes] = await self._redis.hgetall(key)  # type: ignore[misc,assignment]
        except _REDIS_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc
        if not fields:
            await self.load(show_id)
            return await self._ticket_holders(show_id)
        return sorted(
            name.decode()[2:]
            for name, value in fields.items()
            if name.startswith(b"u:") and value != b"r"
        )

    # --- the state machine ------------------------------------------------------------
    async def _move(
        self, show_id: str, model: str | None, from_states: tuple[str, ...], to: str
    ) -> dict[str, Any]:
        """Compare-and-set the state (``model`` None: the sweeper, which acts
        only once the deadline has passed), with the deadlines that go with
        it; then the Redis state, the `show` event and, closed, the money."""
        if not SHOW_ID_RE.fullmatch(show_id):
            raise NotFound(f"no show '{show_id}'")  # another kind of id
        # The model acts on her own show at any time; the sweeper (no model)
        # only once the deadline has passed by Postgres' clock.
        party_check = """AND (model = $3::text OR ($3::text IS NULL AND (
                (state = 'scheduled' AND starts_at + $4::float8 * interval '1 second' <= now())
                OR (state = 'running'
                    AND started_at + $5::float8 * interval '1 second' <= now()))))"""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""UPDATE shows SET state = $2,
                           started_at = CASE WHEN $2 = 'running' THEN now() ELSE started_at END,
                           ended_at = CASE WHEN $2 IN ('ended', 'cancelled') THEN now()
                                      ELSE ended_at END,
                           outcome = CASE
                               WHEN $2 = 'cancelled' THEN 'refund'
                               WHEN $2 = 'ended' AND
                                    now() - started_at >= min_s * interval '1 second'
                                    THEN 'release'
                               WHEN $2 = 'ended' THEN 'refund'
                               ELSE NULL END
                        WHERE id = $1 AND state = ANY($6::text[]) {party_check}
                        RETURNING {_COLUMNS}""",
                    show_id,
                    to,
                    model,
                    self._settings.show_start_grace_s,
                    self._settings.show_length_max_s,
                    list(from_states),
                )
                if row is not None:
                    await deadlines.cancel(conn, show_id, NO_SHOW)
                    if to == "running":
                        due = row["started_at"] + timedelta(
                            seconds=self._settings.show_length_max_s
                        )
                        await deadlines.schedule(conn, show_id, AUTO_END, due)
                    else:
                        await deadlines.cancel(conn, show_id, AUTO_END)
                        grace = timedelta(seconds=self._settings.show_settle_grace_s)
                        await deadlines.schedule(conn, show_id, SETTLE, row["ended_at"] + grace)
        except asyncpg.UniqueViolationError as exc:  # shows_one_running
            raise Conflict("another show is running in this room") from exc
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable; nothing changed") from exc
        if row is None:
            return await self._refused(show_id, model, to)
        reply: dict[str, Any] = {"show": show_id, "state": to}
        if to == "running":
            # Before the reply: the model's next line must already be
            # marked. A failure here is mended by restore_markers.
            try:
                await self._set_redis_state(row)
            except ServiceError as exc:
                log.warning("show %s running, its marker not set yet: %s", show_id, exc.message)
            await self._publish(row)
            return reply
        reply["outcome"] = row["outcome"]
        try:
            await self.settle(show_id)
            reply["settled"] = True
        except ServiceError as exc:
            # The state stands; the sweeper settles at the deadline.
            log.warning("show %s %s, not settled yet: %s", show_id, to, exc.message)
            reply["settled"] = False
        await self._publish(row)
        return reply

    async def _refused(self, show_id: str, model: str | None, to: str) -> dict[str, Any]:
        row = await self._fetch(show_id)
        if row is None:
            raise NotFound(f"no show '{show_id}'")
        if model is not None and row["model"] != model:
            raise Forbidden("only the show's model can start, end or cancel it")
        if row["state"] == to:
            reply: dict[str, Any] = {"show": show_id, "state": to, "duplicate": True}
            if to in CLOSED:
                reply["outcome"] = row["outcome"]
                reply["settled"] = row["settled_at"] is not None
            return reply
        raise Conflict(f"show '{show_id}' is {row['state']}; it cannot become {to}")

    async def _fetch(self, show_id: str) -> Any:
        try:
            return await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM shows WHERE id = $1", show_id)
        except _DB_ERRORS as exc:
            raise Unavailable("shows are unavailable") from exc

    async def _publish(self, row: Any) -> None:
        """The `show` event to the room (its history too, so a member who
        joins later sees it in `join`). Posted by no user: never marked as
        show-time, so members without a ticket see it. Best effort after the
        commit: a lost event is seen in the listing and in `join`."""
        try:
            await self._post(row["room"], events.show_event(wire(row)))
        except ServiceError as exc:
            log.warning("show event of %s lost: %s", row["id"], exc.message)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

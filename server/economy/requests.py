"""Custom requests: a fan's offer, held in escrow until the model delivers.

States (the row in ``requests``, migration 0009)::

    offered --accept (model)--> accepted --deliver (model)--> delivered  [release]
      |  |                        |  |
      |  +--decline (model)-------+--+--> declined                       [refund]
      +--cancel (fan)-----------------> cancelled                        [refund]
      +--offer expiry-----------------> expired  <--delivery deadline--+ [refund]

The workflow state is in Postgres; the money is in the request's escrow
account ``esc:request:<id>`` (a hold at the offer, then ONE release to the
model or ONE escrow_refund to the fan, each moving the escrow's whole
balance). Every transition is a compare-and-set (``UPDATE ... WHERE state =
ANY(from)``), so two of them racing (a fan cancelling while the model
accepts, the sweeper expiring an offer she is accepting) have one winner.

The order around the money, and why:

- Offer: hold first (the fan's idempotency key), then the row. A crash
  between them leaves tokens in an escrow with no row: the fan's retry with
  the same key is answered by the hold's duplicate, whose reply names the
  original id, and writes the row; without a retry, the sweeper adopts the
  hold from the ledger (``adopt_orphans``: its meta holds the whole offer).
  The other order (row, then hold) would let a crash leave an offer the
  model can accept and deliver with nothing in escrow.
- Closing (deliver, decline, cancel, expire): the state first, then the
  money. One Postgres transaction sets the closed state and a
  ``request.settle`` deadline; then the release or escrow_refund runs
  (initiator ``sys:requests``, key ``settle:<id>``: one key for either
  direction, so they can never both apply); then ``settled_at`` is set and
  the deadline dropped. A crash after the state leaves the deadline, and the
  sweeper settles; a crash after the money leaves it too, and settling again
  is a duplicate of the same key, or finds the escrow empty (after Redis
  lost the key's record), both meaning done. Money first would let a crash
  leave a refunded request still open, which the model could then accept
  and deliver unpaid. The direction comes from the closed state alone, so
  a replay can only finish what the state decided.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol import events
from tokenchat.protocol.limits import REQUEST_ID_RE

from ..config import Settings
from ..errors import Conflict, EscrowEmpty, Forbidden, NotFound, ServiceError, Unavailable
from ..keys import Keys
from . import deadlines
from .economy import Economy, escrow_account, fingerprint
from .scripts import script_source

log = logging.getLogger(__name__)

# The initiator of what the request workflow does by itself (settling).
REQUESTS_INITIATOR = "sys:requests"
ESCROW_KIND = "request"
EXPIRE = "request.expire"
SETTLE = "request.settle"
OPEN = ("offered", "accepted")
CLOSED = ("delivered", "declined", "cancelled", "expired")
# GET /v1/me/requests and `request_list`: the newest this many, as fan and as
# model each; older requests stay in Postgres (a page of them is a later need).
LISTED_MAX = 100

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # before any hold: a first look reads them all
_COLUMNS = """id, fan, model, text, amount, state, hold_tx, delivery_text, media,
              settled_at, settle_tx, created_at, expires_at"""


def new_request_id() -> str:
    return "r_" + secrets.token_hex(12)


def settle_key(request_id: str) -> str:
    """The one idempotency key of a request's release or escrow_refund."""
    return f"settle:{request_id}"


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def wire(row: Any) -> dict[str, Any]:
    """A request as clients see it (listed, and in `request` events)."""
    item: dict[str, Any] = {
        "request": row["id"],
        "from": row["fan"],
        "to": row["model"],
        "text": row["text"],
        "amount": row["amount"],
        "state": row["state"],
        "expires_ms": _ms(row["expires_at"]),
        "created_ms": _ms(row["created_at"]),
    }
    if row["state"] == "delivered":
        item["delivery"] = {"text": row["delivery_text"] or "", "media": row["media"]}
    return item


class Requests:
    """The request workflow: commands, the sweeper's handlers, the listing."""

    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, keys: Keys, settings: Settings, economy: Economy
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._economy = economy
        self._user_event = redis.register_script(script_source("user_event"))
        # Holds recorded up to here have been looked at by adopt_orphans
        # (this process; a new holder of the sweep lease starts from 0).
        self._adopted_through: datetime | None = None

    def register(self, sweeper: deadlines.Sweeper) -> None:
        sweeper.handle(EXPIRE, self.expire)
        sweeper.handle(SETTLE, self.settle)
        sweeper.every_sweep(self.adopt_orphans)

    # --- the fan ----------------------------------------------------------------------
    async def offer(self, fan: str, model: str, text: str, amount: int, key: str) -> dict[str, Any]:
        if fan == model:
            raise Forbidden("you cannot send a request to yourself")
        await self._require_model(model)
        subject = new_request_id()
        reply = await self._economy.hold(
            fan,
            escrow_account(ESCROW_KIND, subject),
            amount,
            subject=subject,
            key=key,
            request=fingerprint("request_offer", model=model, text=text, amount=amount),
            meta={"request": subject, "from": fan, "to": model, "text": text, "amount": amount},
        )
        # A duplicate names the original request, whose row may be missing
        # (its process died after the hold): written here if so.
        request_id = str(reply["subject"])
        row = await self._insert(request_id, fan, model, text, amount, str(reply["tx"]), None)
        if row is not None:
            await self._publish(row)
        answer = {"request": request_id, "balance": reply["balance"], "tx": reply["tx"]}
        if reply.get("duplicate"):
            answer["duplicate"] = True
        return answer

    async def cancel(self, fan: str, request_id: str) -> dict[str, Any]:
        return await self._move(request_id, fan, "fan", ("offered",), "cancelled")

    # --- the model --------------------------------------------------------------------
    async def accept(self, model: str, request_id: str) -> dict[str, Any]:
        return await self._move(
            request_id,
            model,
            "model",
            ("offered",),
            "accepted",
            expires_in_s=self._settings.request_delivery_ttl_s,
        )

    async def deliver(
        self, model: str, request_id: str, text: str, media: str | None
    ) -> dict[str, Any]:
        return await self._move(
            request_id, model, "model", ("accepted",), "delivered", delivery=(text, media)
        )

    async def decline(self, model: str, request_id: str) -> dict[str, Any]:
        return await self._move(request_id, model, "model", OPEN, "declined")

    # --- reading ----------------------------------------------------------------------
    async def list_for(self, user_id: str) -> list[dict[str, Any]]:
        """The user's newest requests as fan and as model, newest first."""
        try:
            rows = await self._pool.fetch(
                f"""(SELECT {_COLUMNS} FROM requests WHERE fan = $1
                     ORDER BY created_at DESC LIMIT $2)
                    UNION ALL
                    (SELECT {_COLUMNS} FROM requests WHERE model = $1
                     ORDER BY created_at DESC LIMIT $2)
                    ORDER BY created_at DESC, id""",
                user_id,
                LISTED_MAX,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("requests are unavailable") from exc
        return [wire(row) for row in rows]

    # --- the sweeper's handlers ----------------------------------------------------------
    async def expire(self, request_id: str) -> None:
        """An offer or an accepted request whose time is up refunds itself."""
        try:
            await self._move(request_id, None, None, OPEN, "expired")
        except (NotFound, Conflict) as exc:
            # Gone, or closed meanwhile (delivered, declined): nothing to expire.
            log.info("request %s not expired: %s", request_id, exc.message)

    async def settle(self, request_id: str) -> None:
        """Move a closed request's escrow the way its state says: the whole
        balance to the model (delivered) or back to the fan (the others).
        Safe to run any number of times, from any process."""
        row = await self._fetch(request_id)
        if row is None or row["state"] in OPEN:
            return  # nothing to settle: the deadline goes
        if row["settled_at"] is None:
            escrow = escrow_account(ESCROW_KIND, request_id)
            money = (
                self._economy.release(
                    escrow,
                    row["model"],
                    initiator=REQUESTS_INITIATOR,
                    key=settle_key(request_id),
                    meta={"request": request_id},
                )
                if row["state"] == "delivered"
                else self._economy.escrow_refund(
                    escrow,
                    row["fan"],
                    initiator=REQUESTS_INITIATOR,
                    key=settle_key(request_id),
                    meta={"request": request_id},
                )
            )
            tx: str | None
            try:
                tx = str((await money)["tx"])
            except EscrowEmpty:
                tx = None  # emptied by this key before (its record lost with Redis)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if row["settled_at"] is None:
                    await conn.execute(
                        """UPDATE requests SET settled_at = now(), settle_tx = $2
                           WHERE id = $1 AND settled_at IS NULL""",
                        request_id,
                        tx,
                    )
                await deadlines.cancel(conn, request_id, SETTLE)
        except _DB_ERRORS as exc:
            raise Unavailable("requests are unavailable") from exc

    async def adopt_orphans(self) -> None:
        """Write the row of every request whose hold is in the ledger but
        whose row is not (its process died between the two). Reads only the
        holds recorded since the last look, less the settle grace (a hold
        that recent may still be getting its row the normal way)."""
        grace = timedelta(seconds=self._settings.request_settle_grace_s)
        try:
            async with self._pool.acquire() as conn:
                now = await conn.fetchval("SELECT now()")
                since = (self._adopted_through or _EPOCH) - grace
                holds = await conn.fetch(
                    """SELECT t.id, t.meta::text AS meta, t.initiator, t.applied_ms
                       FROM ledger_transactions t
                       WHERE t.kind = 'hold' AND t.recorded_at > $1 AND t.recorded_at <= $2
                         AND t.meta->>'escrow' LIKE 'esc:request:%'
                         AND NOT EXISTS
                             (SELECT 1 FROM requests r WHERE r.id = t.meta->>'request')""",
                    since,
                    now - grace,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        for hold in holds:
            meta = orjson.loads(hold["meta"])
            created = datetime.fromtimestamp(hold["applied_ms"] / 1000, tz=now.tzinfo)
            log.warning("adopting request %s: its hold has no row", meta.get("request"))
            row = await self._insert(
                meta["request"],
                meta["from"],
                meta["to"],
                meta["text"],
                int(meta["amount"]),
                hold["id"],
                created,
            )
            if row is not None:
                await self._publish(row)
        self._adopted_through = now - grace

    # --- the state machine ------------------------------------------------------------
    async def _move(
        self,
        request_id: str,
        user_id: str | None,
        party: str | None,
        from_states: tuple[str, ...],
        to: str,
        *,
        expires_in_s: float | None = None,
        delivery: tuple[str, str | None] | None = None,
    ) -> dict[str, Any]:
        """Compare-and-set the state (``party``: the column the acting user
        must be in; None for the sweeper, which acts once the deadline has
        passed), with the deadlines that go with it; then publish the event
        and, for a closed state, settle the escrow."""
        if not REQUEST_ID_RE.fullmatch(request_id):
            raise NotFound(f"no request '{request_id}'")  # another kind of id
        text, media = delivery if delivery is not None else (None, None)
        party_check = "AND $6::text IS NULL" if party is None else f"AND {party} = $6::text"
        due_check = "AND expires_at <= now()" if party is None else ""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""UPDATE requests SET state = $2, updated_at = now(),
                           expires_at = now() + $3::float8 * interval '1 second',
                           delivery_text = coalesce($4, delivery_text),
                           media = coalesce($5, media)
                        WHERE id = $1 AND state = ANY($7::text[]) {party_check} {due_check}
                        RETURNING {_COLUMNS}""",
                    request_id,
                    to,
                    expires_in_s,
                    text,
                    media,
                    user_id,
                    list(from_states),
                )
                if row is not None:
                    if to in OPEN:
                        await deadlines.schedule(conn, request_id, EXPIRE, row["expires_at"])
                    else:
                        await deadlines.cancel(conn, request_id, EXPIRE)
                        grace = timedelta(seconds=self._settings.request_settle_grace_s)
                        due = await conn.fetchval("SELECT now()") + grace
                        await deadlines.schedule(conn, request_id, SETTLE, due)
        except _DB_ERRORS as exc:
            raise Unavailable("requests are unavailable; nothing changed") from exc
        if row is None:
            return await self._refused(request_id, user_id, party, to)
        await self._publish(row)
        reply: dict[str, Any] = {"request": request_id, "state": to}
        if to in CLOSED:
            try:
                await self.settle(request_id)
                reply["settled"] = True
            except ServiceError as exc:
                # The state stands; the sweeper settles at the deadline.
                log.warning("request %s %s, not settled yet: %s", request_id, to, exc.message)
                reply["settled"] = False
        return reply

    async def _refused(
        self, request_id: str, user_id: str | None, party: str | None, to: str
    ) -> dict[str, Any]:
        """Why a transition did not apply: the error, or (the request is in
        the target state already: a retry) the duplicate's reply."""
        row = await self._fetch(request_id)
        if row is None or (user_id is not None and user_id not in (row["fan"], row["model"])):
            raise NotFound(f"no request '{request_id}'")
        if party is not None and row[party] != user_id:
            other = "fan" if party == "model" else "model"
            raise Forbidden(f"the {other} of a request cannot make it {to}")
        if row["state"] == to:
            reply: dict[str, Any] = {"request": request_id, "state": to, "duplicate": True}
            if to in CLOSED:
                reply["settled"] = row["settled_at"] is not None
            return reply
        raise Conflict(f"request '{request_id}' is {row['state']}; it cannot become {to}")

    async def _fetch(self, request_id: str) -> Any:
        try:
            return await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM requests WHERE id = $1", request_id
            )
        except _DB_ERRORS as exc:
            raise Unavailable("requests are unavailable") from exc

    async def _insert(
        self,
        request_id: str,
        fan: str,
        model: str,
        text: str,
        amount: int,
        hold_tx: str,
        created: datetime | None,
    ) -> Any:
        """The offered request's row and its expiry, unless it exists;
        ``created``: when its hold was applied (None: now)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""INSERT INTO requests
                          (id, fan, model, text, amount, state, hold_tx, created_at, expires_at)
                        SELECT $1, $2, $3, $4, $5, 'offered', $6, c,
                               c + $8::float8 * interval '1 second'
                        FROM (SELECT coalesce($7::timestamptz, now()) AS c) AS t
                        ON CONFLICT (id) DO NOTHING
                        RETURNING {_COLUMNS}""",
                    request_id,
                    fan,
                    model,
                    text,
                    amount,
                    hold_tx,
                    created,
                    self._settings.request_offer_ttl_s,
                )
                if row is not None:
                    await deadlines.schedule(conn, request_id, EXPIRE, row["expires_at"])
        except _DB_ERRORS as exc:
            raise Unavailable(
                "the offer is held in escrow but not recorded yet: retry with the same key"
            ) from exc
        return row

    async def _require_model(self, model: str) -> None:
        try:
            role = await self._pool.fetchval("SELECT role FROM users WHERE id = $1", model)
        except _DB_ERRORS as exc:
            raise Unavailable("users are unavailable; nothing was charged") from exc
        if role != "model":
            raise NotFound(f"no model '{model}'")

    async def _publish(self, row: Any) -> None:
        """The `request` event to the fan and the model: queued in each one's
        inbox (delivered at their next hello when offline) and published.
        Best effort after the commit: a lost event is seen in the listing."""
        event = orjson.dumps({**events.request_event(wire(row)), "ts": int(time.time() * 1000)})
        for user in (row["fan"], row["model"]):
            try:
                await self._user_event(
                    keys=[self._keys.inbox(user)],
                    args=[self._keys.user_channel(user), self._settings.inbox_len, event],
                )
            except (RedisError, OSError) as exc:
                log.warning("request event to %s lost: %s", user, exc)

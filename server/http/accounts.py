"""HTTP routes of payments and accounts (issue #13 section 4; shapes in
docs/protocol.md, "Payments and accounts"; money paths in docs/economy.md,
"Refunds, chargebacks and deleted accounts").

- ``POST /v1/payments/webhook``: the payment provider's signed events
  (``payment.confirmed``, ``payment.refunded``, ``payment.charged_back``).
- ``GET /v1/admin/flags``: accounts flagged by a chargeback, newest first;
  ``POST /v1/admin/flags/{id}/resolve``: an admin closes one (audited).
- ``GET /v1/me/export``: the caller's data as one streamed JSON object.
- ``DELETE /v1/me``: delete the caller's account.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.commands import PAYMENT_REF
from tokenchat.protocol.limits import USER_ID_RE

from ..auth import Identity
from ..catalog import dms
from ..catalog.media import content_name, preview_name
from ..catalog.moderation import append_audit
from ..catalog.reports import REPORT_REASON_LEN_MAX, check_text
from ..economy.economy import PAYMENTS_INITIATOR
from ..errors import BadRequest, Conflict, Forbidden, NotFound, ServiceError, Unavailable
from ..gateway.node import Node
from ..ledger.pseudonyms import Pseudonyms
from .api import BODY_SIZE_MAX_BYTES, JSONResponse, bundle_list, json_body, query_int
from .payments import (
    EVENT_CHARGED_BACK,
    EVENT_CONFIRMED,
    EVENT_REFUNDED,
    EVENT_TYPES,
    SIGNATURE_HEADER,
    verify_webhook,
)

log = logging.getLogger(__name__)

IdentityOf = Callable[..., Identity]
LimitCreates = Callable[[Identity], None]
CreditPurchase = Callable[[str, dict[str, Any], str], Awaitable[dict[str, Any]]]
Drain = Callable[[], Awaitable[int]]

_DB_ERRORS = (asyncpg.PostgresError, OSError, TimeoutError)
# A provider's event id (Stripe's are `evt_` and 24 characters).
EVENT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# A webhook's price, in cents: the contract's token range at 100 cents a token.
AMOUNT_CENTS_MAX = 100_000_000
# GET /v1/admin/flags: rows in one answer, by default and at most.
FLAGS_PAGE_DEFAULT = 50
FLAGS_PAGE_MAX = 500
FLAG_ID_MAX = 2**63 - 1
FLAG_STATES = ("all", "open", "resolved")
# A flag's resolution note (characters): a paragraph, as a report's.
FLAG_RESOLUTION_LEN_MAX = REPORT_REASON_LEN_MAX
# One flag as GET /v1/admin/flags and its resolve answer show it.
FLAG_SELECT = """SELECT f.id, f.user_id, f.reason, f.payment_ref, f.shortfall, f.state,
                        f.resolution, f.resolved_by,
                        (extract(epoch FROM f.created_at) * 1000)::bigint AS ts,
                        (extract(epoch FROM f.resolved_at) * 1000)::bigint AS resolved_ts,
                        d.pseudonym
                   FROM account_flags f LEFT JOIN deleted_users d ON d.user_id = f.user_id"""
# Rows of one export section fetched from Postgres at once (memory bound of
# the stream: a few hundred small JSON objects).
EXPORT_PREFETCH_ROWS = 200
FOLLOWS_PRESENT = "SELECT to_regclass('follows') IS NOT NULL"
# What stands where a deleted user's text was, in rows the books still name.
ERASED_TEXT = "(deleted)"


def pseudonym(secret: str, user_id: str) -> str:
    """A deleted user's stable pseudonym: ``del:`` and 16 bytes of an HMAC of
    the id under the server's secret, so nobody without the secret can turn a
    guessed id into its pseudonym and back."""
    digest = hmac.new(secret.encode(), b"deleted-user\x00" + user_id.encode(), hashlib.sha256)
    return "del:" + digest.hexdigest()[:32]


def accounts_routes(
    node: Node,
    identity_of: IdentityOf,
    limit_creates: LimitCreates,
    credit_purchase: CreditPurchase,
    drain: Drain,
) -> list[BaseRoute]:
    settings = node.settings
    pseudonyms = Pseudonyms(node.pool)
    closing = node.closing

    # --- webhooks -------------------------------------------------------------------
    async def webhook(request: Request) -> Response:
        body = await raw_body(request)
        verify_webhook(
            settings.payment_webhook_secret,
            request.headers.get(SIGNATURE_HEADER),
            body,
            settings.payment_webhook_tolerance_s,
        )
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(event, dict):
            raise BadRequest("the body must be a JSON object")
        event_id = event.get("id")
        if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
            raise BadRequest("field 'id' must be the event's id (1-128 of A-Z a-z 0-9 _ . : -)")
        kind = event.get("type")
        if kind not in EVENT_TYPES:
            raise BadRequest(f"field 'type' must be one of {', '.join(EVENT_TYPES)}")
        data = event.get("data")
        if not isinstance(data, dict):
            raise BadRequest("field 'data' must be an object")
        payment_ref = data.get("payment_ref")
        if not isinstance(payment_ref, str) or not PAYMENT_REF.accept(payment_ref):
            raise BadRequest(f"field 'data.payment_ref' must be {PAYMENT_REF.describe}")
        prior = await event_seen(event_id)
        if prior is not None:
            if prior[0] != kind or prior[1] != payment_ref:
                raise Conflict(f"event '{event_id}' was received with other fields")
            return JSONResponse({**prior[2], "event": event_id, "duplicate": True})
        if kind == EVENT_CONFIRMED:
            result = await confirmed(payment_ref, data)
        else:
            reason = "refund" if kind == EVENT_REFUNDED else "chargeback"
            result = await reverse(payment_ref, reason)
        await event_record(event_id, kind, payment_ref, result)
        return JSONResponse({**result, "event": event_id})

    async def raw_body(request: Request) -> bytes:
        """The body as sent (the signature covers these very bytes), bounded."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > BODY_SIZE_MAX_BYTES:
            raise BadRequest(f"the body is over {BODY_SIZE_MAX_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > BODY_SIZE_MAX_BYTES:
                raise BadRequest(f"the body is over {BODY_SIZE_MAX_BYTES} bytes")
        return body

    async def event_seen(event_id: str) -> tuple[str, str, dict[str, Any]] | None:
        try:
            row = await node.pool.fetchrow(
                """SELECT type, payment_ref, result::text AS result
                     FROM payment_events WHERE event_id = $1""",
                event_id,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payments are unavailable; nothing was applied") from exc
        if row is None:
            return None
        return str(row["type"]), str(row["payment_ref"]), dict(orjson.loads(row["result"]))

    async def event_record(
        event_id: str, kind: str, payment_ref: str, result: dict[str, Any]
    ) -> None:
        """The event as applied. Its effect is idempotent on the payment id on
        its own, so a row not written (Postgres gone just now) only means the
        provider's retry applies nothing twice the slow way."""
        try:
            await node.pool.execute(
                """INSERT INTO payment_events (event_id, type, payment_ref, result)
                   VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT (event_id) DO NOTHING""",
                event_id,
                kind,
                payment_ref,
                orjson.dumps(result).decode(),
            )
        except _DB_ERRORS:
            log.warning("webhook event %s applied but not recorded", event_id)

    async def confirmed(payment_ref: str, data: dict[str, Any]) -> dict[str, Any]:
        """A confirmed payment credits its bundle, exactly as POST
        /v1/purchases does (one credit per payment_ref, whichever came first)."""
        user = data.get("user")
        # The user id's own rule, not just its length: an id Postgres cannot
        # store (NUL) would be answered 503, and the provider retry for ever.
        if not isinstance(user, str) or not USER_ID_RE.fullmatch(user):
            raise BadRequest("field 'data.user' must be a user id")
        bundle_id = data.get("bundle")
        bundle = next((b for b in bundle_list(node) if b["id"] == bundle_id), None)
        if bundle is None:
            raise NotFound(f"no bundle '{str(bundle_id)[:64]}'")
        cents = data.get("amount_cents")
        if not isinstance(cents, int) or isinstance(cents, bool) or cents < 0:
            cents = -1
        if not 0 <= cents <= AMOUNT_CENTS_MAX:
            raise BadRequest(f"field 'data.amount_cents' must be an integer 0-{AMOUNT_CENTS_MAX}")
        if cents != bundle["price_cents"]:
            raise Conflict(
                f"bundle '{bundle['id']}' costs {bundle['price_cents']} cents, not {cents}"
            )
        state = await user_state(user)
        if state is None:
            raise NotFound(f"no user '{user}'")
        if state == "deleted":
            raise Conflict(f"the account '{user}' was deleted; refund the payment")
        reply = await credit_purchase(user, bundle, payment_ref)
        return {"type": EVENT_CONFIRMED, "payment_ref": payment_ref, "user": user, **reply}

    async def user_state(user: str) -> str | None:
        """'deleted', 'active', or None for no such user."""
        try:
            row = await node.pool.fetchrow(
                """SELECT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_id = u.id) AS deleted
                     FROM users u WHERE u.id = $1""",
                user,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("users are unavailable; nothing was applied") from exc
        if row is None:
            return None
        return "deleted" if row["deleted"] else "active"

    async def reverse(payment_ref: str, reason: str) -> dict[str, Any]:
        """A refund or a chargeback of a purchase: claw back what is left of
        its tokens (one reversal per purchase, whichever came first), record
        the shortfall, and flag the account on a chargeback."""
        try:
            purchase = await node.pool.fetchrow(
                """SELECT p.user_id, p.tokens, p.tx_id,
                          EXISTS (SELECT 1 FROM ledger_transactions t WHERE t.id = p.tx_id)
                              AS ledgered
                     FROM purchases p WHERE p.payment_ref = $1""",
                payment_ref,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payments are unavailable; nothing was applied") from exc
        if purchase is None:
            raise NotFound(f"no purchase with payment_ref '{payment_ref}'")
        user, tokens = str(purchase["user_id"]), int(purchase["tokens"])
        existing = await reversal_of(payment_ref)
        if existing is None:
            if not purchase["ledgered"] and await drain():
                # Its credit may still be on its way to Postgres: claw back
                # only what the books show was given.
                raise Unavailable("the ledger is behind; send the event again")
            if not purchase["ledgered"] and not await ledgered(str(purchase["tx_id"])):
                raise Unavailable("the purchase's credit is not in the ledger; send it again")
            reply = await node.economy.clawback(
                user,
                tokens,
                kind="chargeback",
                initiator=PAYMENTS_INITIATOR,
                key=f"reverse:{payment_ref}",
                meta={"payment_ref": payment_ref, "reason": reason, "purchase": purchase["tx_id"]},
            )
            await record_reversal(payment_ref, reason, user, tokens, reply)
            existing = await reversal_of(payment_ref)
            assert existing is not None  # just written, or written by a concurrent call
        if reason == "chargeback":
            await flag(user, payment_ref, int(existing["shortfall"]))
        return {
            "type": EVENT_CHARGED_BACK if reason == "chargeback" else EVENT_REFUNDED,
            "payment_ref": payment_ref,
            "user": user,
            "tokens": tokens,
            "clawed": int(existing["clawed"]),
            "shortfall": int(existing["shortfall"]),
            "tx": existing["tx_id"],
            "reversed_as": existing["kind"],
        }

    async def ledgered(tx: str) -> bool:
        try:
            return bool(
                await node.pool.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM ledger_transactions WHERE id = $1)", tx
                )
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable; nothing was applied") from exc

    async def reversal_of(payment_ref: str) -> asyncpg.Record | None:
        try:
            return await node.pool.fetchrow(
                """SELECT kind, clawed, shortfall, tx_id FROM payment_reversals
                    WHERE payment_ref = $1""",
                payment_ref,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payments are unavailable") from exc

    async def record_reversal(
        payment_ref: str, reason: str, user: str, tokens: int, reply: dict[str, Any]
    ) -> None:
        """The shortfall's durable record. The clawback is idempotent on its
        key, so a failure here is answered UNAVAILABLE and the provider's retry
        gets the same reply (DUP) and writes this row then."""
        try:
            await node.pool.execute(
                """INSERT INTO payment_reversals
                       (payment_ref, kind, user_id, tokens, clawed, shortfall, tx_id)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (payment_ref) DO NOTHING""",
                payment_ref,
                reason,
                user,
                tokens,
                int(reply["clawed"]),
                int(reply["shortfall"]),
                str(reply["tx"]),
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the reversal was applied but not recorded; send it again") from exc

    async def flag(user: str, payment_ref: str, shortfall: int) -> None:
        try:
            await node.pool.execute(
                """INSERT INTO account_flags (user_id, reason, payment_ref, shortfall)
                   VALUES ($1, 'chargeback', $2, $3) ON CONFLICT (payment_ref) DO NOTHING""",
                user,
                payment_ref,
                shortfall,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the chargeback was applied but not flagged; send it again") from exc

    async def admin_flags(request: Request) -> Response:
        identity_of(request, "admin")
        limit = query_int(request, "limit", FLAGS_PAGE_DEFAULT, 1, FLAGS_PAGE_MAX)
        before = request.query_params.get("before")
        cursor = None if before is None else query_int(request, "before", 1, 1, FLAG_ID_MAX)
        user = request.query_params.get("user")
        state = request.query_params.get("state", "all")
        if state not in FLAG_STATES:
            raise BadRequest(f"query parameter 'state' must be one of {', '.join(FLAG_STATES)}")
        try:
            rows = await node.pool.fetch(
                f"""{FLAG_SELECT}
                    WHERE ($1::bigint IS NULL OR f.id < $1)
                      AND ($2::text IS NULL OR f.user_id = $2)
                      AND ($4 = 'all' OR f.state = $4)
                    ORDER BY f.id DESC LIMIT $3""",
                cursor,
                user,
                limit + 1,
                state,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("flags are unavailable") from exc
        page = rows[:limit]
        more = len(rows) > limit
        return JSONResponse(
            {"flags": [_flag_wire(row) for row in page], "next": page[-1]["id"] if more else None}
        )

    async def resolve_flag(request: Request) -> Response:
        """POST /v1/admin/flags/{flag}/resolve {resolution?}: close a flag,
        once. Resolving a resolved flag changes nothing and answers it as it
        stands, with ``already`` (a retried click, or two admins at once)."""
        identity = identity_of(request, "admin")
        raw = str(request.path_params["flag"])
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise NotFound(f"no flag '{raw[:32]}'")
        flag_id = int(raw)
        body = await json_body(request)
        resolution = check_text(
            body.get("resolution"), "resolution", required=False, len_max=FLAG_RESOLUTION_LEN_MAX
        )
        try:
            async with node.pool.acquire() as conn, conn.transaction():
                # FOR UPDATE: of two concurrent resolves, the second waits and
                # then sees the first's close (one audit row, not two).
                row = await conn.fetchrow(f"{FLAG_SELECT} WHERE f.id = $1 FOR UPDATE OF f", flag_id)
                if row is None:
                    raise NotFound(f"no flag {flag_id}")
                if row["state"] == "resolved":
                    return JSONResponse({**_flag_wire(row), "already": True})
                await conn.execute(
                    """UPDATE account_flags SET state = 'resolved', resolution = $2,
                              resolved_by = $3, resolved_at = now()
                        WHERE id = $1""",
                    flag_id,
                    resolution,
                    identity.user_id,
                )
                # An admin's action: in the audit log, with the flag's close.
                # A deleted user is named by their pseudonym there too.
                await append_audit(
                    conn,
                    identity.user_id,
                    "flag_resolve",
                    None,
                    row["pseudonym"] or row["user_id"],
                    {
                        "flag": flag_id,
                        "reason": row["reason"],
                        "payment_ref": row["payment_ref"],
                        "shortfall": row["shortfall"],
                        "resolution": resolution,
                    },
                )
                row = await conn.fetchrow(f"{FLAG_SELECT} WHERE f.id = $1", flag_id)
        except _DB_ERRORS as exc:
            raise Unavailable("flags are unavailable; nothing changed") from exc
        assert row is not None
        return JSONResponse(_flag_wire(row))

    # --- export ---------------------------------------------------------------------
    # Each section: a query of JSON rows about the user ($1: the user id, $2:
    # the user's ledger account), oldest first, at most rows_max + 1 ($3).
    sections: list[tuple[str, str]] = [
        (
            "purchases",
            """SELECT to_jsonb(p)::text FROM (
                   SELECT payment_ref, provider, bundle, tokens, price_cents, tx_id AS tx,
                          created_at FROM purchases WHERE user_id = $1
                    ORDER BY created_at, payment_ref LIMIT $3) p""",
        ),
        (
            "reversals",
            """SELECT to_jsonb(r)::text FROM (
                   SELECT payment_ref, kind, tokens, clawed, shortfall, tx_id AS tx, created_at
                     FROM payment_reversals WHERE user_id = $1
                    ORDER BY created_at, payment_ref LIMIT $3) r""",
        ),
        (
            "transactions",
            """SELECT to_jsonb(t)::text FROM (
                   SELECT x.id AS tx, x.kind, x.applied_ms AS ts, p.amount, x.meta
                     FROM ledger_postings p JOIN ledger_transactions x ON x.id = p.tx_id
                    WHERE p.account_id = $2
                    ORDER BY x.applied_ms, x.id LIMIT $3) t""",
        ),
        (
            "dms",
            """SELECT to_jsonb(m)::text FROM (
                   SELECT tx, sender, recipient, text, price, media, ts FROM dms
                    WHERE sender = $1 OR recipient = $1
                    ORDER BY ts, tx LIMIT $3) m""",
        ),
        (
            "blocks",
            """SELECT to_jsonb(b)::text FROM (
                   SELECT blocked AS user, created_at FROM dm_blocks WHERE blocker = $1
                    ORDER BY created_at, blocked LIMIT $3) b""",
        ),
        (
            "reports",
            """SELECT to_jsonb(r)::text FROM (
                   SELECT id, reported AS user, message, reason, state, created_at
                     FROM reports WHERE reporter = $1 ORDER BY id LIMIT $3) r""",
        ),
    ]

    async def export(request: Request) -> Response:
        identity = identity_of(request)
        limit_creates(identity)  # an export reads much: rate-limited as a create
        user = identity.user_id
        rows_max = settings.export_section_rows_max
        try:
            row = await node.pool.fetchrow(
                "SELECT to_jsonb(u)::text AS user FROM users u WHERE id = $1", user
            )
            # Follows (another feature's table) when this deployment has it:
            # its rows naming the user in any column.
            has_follows = bool(await node.pool.fetchval(FOLLOWS_PRESENT))
        except _DB_ERRORS as exc:
            raise Unavailable("the export is unavailable") from exc
        if row is None:
            raise NotFound("you have no data here yet")
        balance = await node.balance_of(user)
        queries = list(sections)
        if has_follows:
            queries.append(
                (
                    "follows",
                    """SELECT to_jsonb(f)::text FROM follows f
                        WHERE EXISTS (SELECT 1 FROM jsonb_each_text(to_jsonb(f)) e
                                       WHERE e.value = $1 OR e.value = $2)
                        LIMIT $3""",
                )
            )

        async def stream() -> AsyncIterator[bytes]:
            head = {"user": orjson.loads(row["user"]), "balance": balance}
            yield orjson.dumps(head)[:-1]  # the object stays open for the sections
            truncated = []
            seen: dict[str, str | None] = {}
            async with node.pool.acquire() as conn, conn.transaction(readonly=True):
                for name, sql in queries:
                    yield b',"' + name.encode() + b'":['
                    count = 0
                    # Every query declares all three parameters' types (not
                    # every query uses each of them).
                    typed = f"WITH args AS (SELECT $1::text, $2::text, $3::int) {sql}"
                    async for record in conn.cursor(
                        typed, user, f"u:{user}", rows_max + 1, prefetch=EXPORT_PREFETCH_ROWS
                    ):
                        count += 1
                        if count > rows_max:
                            truncated.append(name)
                            break
                        # Other users' ids in her rows (a tip's room, a
                        # DM's recipient): a deleted one's pseudonym only.
                        item = await pseudonyms.scrub(orjson.loads(record[0]), seen)
                        yield (b"," if count > 1 else b"") + orjson.dumps(item)
                    yield b"]"
            tail = {"truncated": truncated, "rows_max": rows_max}
            yield b"," + orjson.dumps(tail)[1:]

        return StreamingResponse(
            stream(),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="tokenchat-{user}.json"'},
        )

    # --- deletion -------------------------------------------------------------------
    async def delete_me(request: Request) -> Response:
        identity = identity_of(request)
        if identity.role == "admin":
            raise Forbidden("an admin account is not deleted this way")
        body = await json_body(request)
        user = identity.user_id
        if body.get("confirm") != user:
            raise BadRequest("field 'confirm' must be your own user id")
        if await user_state(user) is None:
            raise NotFound("you have no account here yet")
        alias = pseudonym(settings.jwt_secret, user)
        # 0. Every open escrow she is party to is settled by its own
        #    workflow, so nothing comes back to her after the forfeiture; or
        #    CONFLICT (nothing moved) while one closes only by itself.
        closed = await closing.close(user, drain)
        # 1. The balance goes to sys:forfeited through the ledger (the user's
        #    account then holds 0). A failure stops here: nothing was deleted.
        first = await forfeit(user, alias, 1)
        # 1b. Her DMs out of the inboxes that would replay them at a hello,
        #     while her archived rows still name their recipients (again
        #     after 2, for one she sent meanwhile).
        await dms.forget_sender(node.pool, node.redis, node.keys, user, archived_too=False)
        # 2. Personal data removed and the pseudonym recorded, in one
        #    transaction; then the user is shut out everywhere (a permanent
        #    platform ban closes every session on every node and refuses
        #    every token).
        hot: list[str] = []  # Redis keys caching what is deleted
        await remove_personal_data(user, alias, int(first["clawed"]), hot)
        try:
            await node.moderation.platform_ban(identity, user, None, "account deleted")
        except ServiceError:
            log.warning("account %s deleted but its sessions were not closed", user)
            raise
        # 2b. The WebSocket side (server/catalog/forgetting.py): her
        #     kingships under her pseudonym, her events out of every room's
        #     history (live members get `clear`), her DMs out of inboxes.
        #     She cannot ask again once shut out, so a step that fails is
        #     left to the sweeper (every step is retry-safe).
        try:
            await node.forgetting.forget(user, alias)
        except ServiceError as exc:  # she is shut out: the sweeper finishes it
            log.warning("deleted %s not forgotten yet: %s", alias, exc.message)
        # 3. Anything credited between 1 and 2 (a purchase, an escrow refund).
        second = await forfeit(user, alias, 2)
        forfeited = int(first["clawed"]) + int(second["clawed"])
        if second["clawed"]:
            try:
                await node.pool.execute(
                    "UPDATE deleted_users SET forfeited = $2 WHERE user_id = $1", user, forfeited
                )
            except _DB_ERRORS:
                log.warning("forfeited total of deleted %s not updated", alias)
        await forget_hot_state(user, hot)
        return JSONResponse(
            {"deleted": True, "pseudonym": alias, "forfeited": forfeited, "closed": closed}
        )

    async def forfeit(user: str, alias: str, step: int) -> dict[str, Any]:
        return await closing.forfeit(user, alias, f"account-deleted:{step}")

    async def remove_personal_data(user: str, alias: str, forfeited: int, hot: list[str]) -> None:
        try:
            async with node.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    """INSERT INTO deleted_users (user_id, pseudonym, forfeited)
                       VALUES ($1, $2, $3) ON CONFLICT (user_id) DO NOTHING""",
                    user,
                    alias,
                    forfeited,
                )
                # DMs they wrote go; DMs written to them stay the sender's,
                # addressed to the pseudonym.
                await conn.execute("DELETE FROM dms WHERE sender = $1", user)
                await conn.execute(
                    """UPDATE dms SET recipient = $2, pair_low = least(sender, $2),
                              pair_high = greatest(sender, $2)
                        WHERE recipient = $1""",
                    user,
                    alias,
                )
                await conn.execute("DELETE FROM dm_blocks WHERE blocker = $1 OR blocked = $1", user)
                await conn.execute("DELETE FROM reports WHERE reporter = $1", user)
                if await conn.fetchval(FOLLOWS_PRESENT):
                    await conn.execute(
                        """DELETE FROM follows f WHERE EXISTS (
                               SELECT 1 FROM jsonb_each_text(to_jsonb(f)) e WHERE e.value = $1)""",
                        user,
                    )
                media = await remove_model_data(conn, user, hot)
        except _DB_ERRORS as exc:
            raise Unavailable("the account could not be deleted now; try again") from exc
        # The files after the rows: a file left by a failure here is never
        # served (no row names it), and the next deletion attempt finds no row.
        for media_id in media:
            try:
                await node.media.store.delete(content_name(media_id))
                await node.media.store.delete(preview_name(media_id))
            except OSError:
                log.warning("media %s of deleted %s not removed from storage", media_id, alias)

    async def remove_model_data(conn: Any, user: str, hot: list[str]) -> list[str]:
        """Her room (its settings, moderators, restrictions, shows and goals,
        all closed and settled by now: closing.close), menu, prices, media,
        profile, live notifications, payout method and verification. The
        ids of her media, whose files go next; ``hot`` gets the Redis keys
        caching what went."""
        owned = await conn.fetch("SELECT id FROM media WHERE owner_id = $1", user)
        media = [row["id"] for row in owned]
        held = await conn.fetch("SELECT id FROM shows WHERE room = $1", user)
        shows = [row["id"] for row in held]
        hot.extend([*map(node.keys.media, media), *map(node.keys.show, shows)])
        for sql in (
            "DELETE FROM media WHERE owner_id = $1",
            """DELETE FROM menu_items WHERE model_id = $1""",
            "DELETE FROM menus WHERE model_id = $1",
            "DELETE FROM prices WHERE model_id = $1",
            "DELETE FROM private_prices WHERE model_id = $1",
            "DELETE FROM room_moderators WHERE room = $1 OR user_id = $1",
            "DELETE FROM room_restrictions WHERE room = $1 OR user_id = $1",
            "DELETE FROM room_settings WHERE room = $1",
            "DELETE FROM goals WHERE room = $1",
            "DELETE FROM shows WHERE room = $1",
            "DELETE FROM rooms WHERE id = $1",
            "DELETE FROM profiles WHERE user_id = $1",
            "DELETE FROM notifications WHERE model = $1 OR user_id = $1",
            "DELETE FROM live_jobs WHERE model = $1",
            "DELETE FROM payout_methods WHERE user_id = $1",
            "DELETE FROM model_verifications WHERE user_id = $1",
            "DELETE FROM spend_limits WHERE user_id = $1",
            "UPDATE requests SET delivery_text = NULL, media = NULL WHERE model = $1",
            # A payout's row stays (the books name it), its bank details go.
            """UPDATE payouts SET method = '{"type": "erased"}'::jsonb WHERE model = $1""",
        ):
            await conn.execute(sql, user)
        # A request's row stays (the books name it), the texts she wrote go:
        # her ask as a fan (above: her delivery as a model).
        await conn.execute("UPDATE requests SET text = $2 WHERE fan = $1", user, ERASED_TEXT)
        return media

    async def forget_hot_state(user: str, hot: list[str]) -> None:
        """Redis copies of what was deleted (best effort: each is rebuilt from
        Postgres on a miss, where the rows are gone)."""
        keys = node.keys
        # This process's copy of her room; other processes' expire with
        # their ROOM_INFO_TTL_S (a tip there meanwhile is a late credit).
        node.directory.forget_room(user)
        try:
            await node.redis.delete(
                keys.room_info(user),
                keys.menu(user),
                keys.prices(user),
                keys.goal(user),
                keys.room_show(user),
                keys.room_show_mirror(user),
                # Her room's history (the room is gone), her DM inbox.
                keys.room_history(user),
                keys.inbox(user),
                keys.inbox_cursor(user),
                *hot,
            )
        except (RedisError, OSError):
            log.warning("hot state of a deleted account left to expire")

    return [
        Route("/v1/payments/webhook", webhook, methods=["POST"]),
        Route("/v1/admin/flags", admin_flags),
        Route("/v1/admin/flags/{flag}/resolve", resolve_flag, methods=["POST"]),
        Route("/v1/me/export", export),
        Route("/v1/me", delete_me, methods=["DELETE"]),
    ]


def _flag_wire(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        # A deleted account is named by its pseudonym only.
        "user": row["pseudonym"] or row["user_id"],
        "reason": row["reason"],
        "payment_ref": row["payment_ref"],
        "shortfall": row["shortfall"],
        "ts": row["ts"],
        "state": row["state"],
        "resolution": row["resolution"],
        "resolved_by": row["resolved_by"],
        "resolved_ts": row["resolved_ts"],
    }

"""Payouts: versioned payout rules, a model's payout requests held in escrow,
admins' approval or rejection, earnings statements and the platform's
liabilities (issue #13 section 1; verification and payout method, section 4).

Rules (``payout_rules``, migration 0017) are versions, never edited: the rule
in force at a time is the one with the latest ``effective_at`` at or before
it; before the first row, the settings are the rule (id 0:
TOKENCHAT_PAYOUT_CENTS_PER_TOKEN and TOKENCHAT_PAYOUT_MIN_TOKENS). A rule
can never take effect in the past, so no earning or payout already made
changes value when a rule is added.

A payout's states (its row in ``payouts``)::

    requesting --hold--> requested --approve (admin)--> paid      [payout]
        |                    +-------reject (admin)---> rejected  [escrow_refund]
        +--hold refused--> refused (nothing moved; the same key tries again)

The order around the money, and why:

- Request: the row first (``requesting``, unique per model and key), then
  the hold (the model's key) into ``esc:payout:<id>``, then ``requested``.
  A crash after the row leaves a ``requesting`` row and, at most, an escrow
  that belongs to it; the model's retry with the same key finishes it (the
  hold answers its duplicate). The other order would let a crash leave
  tokens in an escrow of no object, which reconcile reports.
- Approve and reject: the decision first (one Postgres transaction sets the
  state and a ``payout.settle`` deadline), then the money (initiator
  ``sys:payouts``, key ``settle:<id>``: one key for either direction, so
  both can never apply), then ``settled_at``. A crash in between leaves the
  deadline, and the sweeper settles; the admin's retry settles too. The
  direction comes from the decided state alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import orjson

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
from . import deadlines
from .economy import MINT, PAYOUTS, Economy, escrow_account, fingerprint

log = logging.getLogger(__name__)

PAYOUTS_INITIATOR = "sys:payouts"
ESCROW_KIND = "payout"
SETTLE = "payout.settle"
STATES = ("requesting", "refused", "requested", "paid", "rejected")
# The states GET /v1/admin/payouts?state= may name (refused ones moved nothing).
LISTED_STATES = ("requesting", "requested", "paid", "rejected")
DECIDED = ("paid", "rejected")
PAYOUT_ID_RE = re.compile(r"po_[0-9a-f]{24}")
# The rule's bounds: a token worth up to $1,000 and a minimum up to a billion
# tokens (the columns' checks, migration 0017).
CENTS_PER_TOKEN_MAX = 100_000
MIN_PAYOUT_TOKENS_MAX = 1_000_000_000
# The most one payout may ask for, in tokens (a bound, not a policy: her
# balance bounds it first).
PAYOUT_TOKENS_MAX = 1_000_000_000
# How far in the past an effective_at may be and still count as "now": the
# admin's clock and the round trip.
EFFECTIVE_SLACK_S = 1.0
# The earnings statement's default period when `from` is not given.
EARNINGS_DEFAULT_DAYS = 30
REASON_LEN_MAX = 500  # characters, the column's bound
# Why the sweeper set a `requesting` payout refused (finish_requesting).
STUCK_REASON = "the request did not finish and nothing was held; ask again"

# Earnings: the ledger kinds that credit a model for what she sold, and the
# label each gets in a statement. A release is labelled by its escrow's kind
# (a custom request, a ticket show, a private show's minimum, a goal). A
# refund of one of her earnings counts minus, as `refunded`.
EARNING_LABELS_SQL = """
    CASE
        WHEN t.kind = 'meter' THEN 'private'
        WHEN t.kind = 'release' THEN
            CASE split_part(t.meta->>'escrow', ':', 2)
                WHEN 'request' THEN 'request'
                WHEN 'show' THEN 'ticket'
                WHEN 'private' THEN 'private'
                WHEN 'goal' THEN 'goal'
                ELSE 'release'
            END
        WHEN t.kind = 'refund' THEN 'refunded'
        ELSE t.kind
    END"""
EARNING_KINDS = ("tip", "dm", "unlock", "meter", "release")

# Payout methods: their shapes, checked here; nothing is sent anywhere.
PAYOUT_METHODS = ("bank", "paypal")
IBAN_RE = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}")
EMAIL_RE = re.compile(r"[^@\s\x00]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+")
HOLDER_LEN_MAX = 100  # characters

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_COLUMNS = """id, model, idem_key, tokens, state, rule_id, cents_per_token, cents, method,
              hold_tx, settle_tx, decided_by, reason, created_at, decided_at, settled_at"""


def new_payout_id() -> str:
    return "po_" + secrets.token_hex(12)


def settle_key(payout_id: str) -> str:
    """The one idempotency key of a payout's payout or escrow_refund."""
    return f"settle:{payout_id}"


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def cents_of(tokens: int, cents_per_token: Decimal) -> int:
    """Money for ``tokens`` at a rate, rounded half up to a cent."""
    return int((Decimal(tokens) * cents_per_token).to_integral_value(rounding=ROUND_HALF_UP))


def wire(row: Any) -> dict[str, Any]:
    """A payout as clients see it."""
    return {
        "payout": row["id"],
        "model": row["model"],
        "tokens": row["tokens"],
        "state": row["state"],
        "rule": row["rule_id"],
        "cents_per_token": float(row["cents_per_token"]),
        "cents": row["cents"],
        "method": _method_summary(row["method"]),
        "hold_tx": row["hold_tx"],
        "settle_tx": row["settle_tx"],
        "decided_by": row["decided_by"],
        "reason": row["reason"],
        "created_ms": _ms(row["created_at"]),
        "decided_ms": _ms(row["decided_at"]),
        "settled": row["settled_at"] is not None,
    }


def _method_summary(method: Any) -> dict[str, Any]:
    """A payout method as listed: the account number masked."""
    method = _loads(method)
    if not isinstance(method, dict):
        return {}
    if method.get("type") == "bank":
        iban = str(method.get("iban", ""))
        return {"type": "bank", "holder": method.get("holder"), "iban": "…" + iban[-4:]}
    return dict(method)


def check_method(body: Any) -> dict[str, Any]:
    """A payout method's shape: ``{"type": "bank", "holder", "iban"}`` (the
    IBAN's checksum verified) or ``{"type": "paypal", "email"}``."""
    if not isinstance(body, dict):
        raise BadRequest("the payout method must be an object")
    kind = body.get("type")
    if kind == "bank":
        holder = body.get("holder")
        iban = body.get("iban")
        if (
            not isinstance(holder, str)
            or not 1 <= len(holder.strip()) <= HOLDER_LEN_MAX
            or "\x00" in holder  # the method is jsonb, which refuses NUL
        ):
            raise BadRequest(
                f"field 'holder' must be a name of 1 to {HOLDER_LEN_MAX} characters, "
                "without NUL (U+0000)"
            )
        if not isinstance(iban, str):
            raise BadRequest("field 'iban' must be an IBAN")
        iban = iban.replace(" ", "").upper()
        if not IBAN_RE.fullmatch(iban) or not _iban_checksum_ok(iban):
            raise BadRequest("field 'iban' must be an IBAN (its check digits did not match)")
        return {"type": "bank", "holder": holder.strip(), "iban": iban}
    if kind == "paypal":
        email = body.get("email")
        if not isinstance(email, str) or len(email) > 254 or not EMAIL_RE.fullmatch(email):
            raise BadRequest("field 'email' must be an email address")
        return {"type": "paypal", "email": email}
    raise BadRequest(f"field 'type' must be one of {list(PAYOUT_METHODS)}")


def _iban_checksum_ok(iban: str) -> bool:
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def parse_time(raw: str | None, name: str) -> datetime | None:
    """A query time: epoch milliseconds, or an ISO 8601 date or date-time
    (UTC unless it names its offset)."""
    if raw is None or raw == "":
        return None
    if len(raw) > 40:
        raise BadRequest(f"query parameter '{name}' is too long")
    if raw.isascii() and raw.isdigit():
        if len(raw) > 15:
            raise BadRequest(f"query parameter '{name}' is out of range")
        try:
            return datetime.fromtimestamp(int(raw) / 1000, UTC)
        except (ValueError, OverflowError, OSError):  # past the year 9999
            raise BadRequest(f"query parameter '{name}' is out of range") from None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(
            f"query parameter '{name}' must be epoch milliseconds or an ISO 8601 date"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Payouts:
    """Rules, payouts, earnings and liabilities."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, economy: Economy) -> None:
        self._pool = pool
        self._settings = settings
        self._economy = economy

    def register(self, sweeper: deadlines.Sweeper) -> None:
        sweeper.handle(SETTLE, self.settle)
        sweeper.every_sweep(self.finish_stuck)

    # --- rules ------------------------------------------------------------------------
    def default_rule(self) -> dict[str, Any]:
        """Rule 0: the settings, in force before any rule row."""
        return {
            "rule": 0,
            "cents_per_token": float(self._settings.payout_cents_per_token),
            "min_payout_tokens": self._settings.payout_min_tokens,
            "effective_ms": 0,
            "created_by": "settings",
        }

    async def add_rule(
        self, admin: str, cents_per_token: float, min_payout_tokens: int, effective_ms: int | None
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        effective = (
            now if effective_ms is None else datetime.fromtimestamp(effective_ms / 1000, UTC)
        )
        if effective < now - timedelta(seconds=EFFECTIVE_SLACK_S):
            raise BadRequest("a payout rule can never take effect in the past")
        try:
            row = await self._pool.fetchrow(
                """INSERT INTO payout_rules (cents_per_token, min_payout_tokens, effective_at,
                                             created_by)
                   VALUES ($1, $2, greatest($3, now()), $4) RETURNING *""",
                Decimal(str(cents_per_token)),
                min_payout_tokens,
                effective,
                admin,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payout rules are unavailable") from exc
        return _rule(row)

    async def rules(self) -> dict[str, Any]:
        """Every version, newest effective first, and the one in force now."""
        try:
            rows = await self._pool.fetch(
                "SELECT * FROM payout_rules ORDER BY effective_at DESC, id DESC"
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payout rules are unavailable") from exc
        listed = [_rule(row) for row in rows] + [self.default_rule()]
        now_ms = _ms(datetime.now(UTC)) or 0
        current = next(rule for rule in listed if rule["effective_ms"] <= now_ms)
        return {"rules": listed, "current": current}

    async def rule_at(self, when: datetime, conn: Any = None) -> dict[str, Any]:
        """The rule in force at ``when``."""
        sql = """SELECT * FROM payout_rules WHERE effective_at <= $1
                 ORDER BY effective_at DESC, id DESC LIMIT 1"""
        try:
            row = await (conn or self._pool).fetchrow(sql, when)
        except _DB_ERRORS as exc:
            raise Unavailable("payout rules are unavailable") from exc
        return self.default_rule() if row is None else _rule(row)

    async def rate_at_ms(self, applied_ms: int) -> tuple[float, int]:
        """Cents per token and the rule id in force at a ledger time (receipts)."""
        rule = await self.rule_at(datetime.fromtimestamp(applied_ms / 1000, UTC))
        return float(rule["cents_per_token"]), int(rule["rule"])

    # --- verification and payout methods ----------------------------------------------
    async def verify(self, admin: str, user_id: str) -> dict[str, Any]:
        try:
            async with self._pool.acquire() as conn:
                role = await conn.fetchval("SELECT role FROM users WHERE id = $1", user_id)
                if role is None:
                    raise NotFound(f"no user '{user_id}'")
                if role != "model":
                    raise BadRequest(f"'{user_id}' is not a model")
                row = await conn.fetchrow(
                    """INSERT INTO model_verifications (user_id, verified_by) VALUES ($1, $2)
                       ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id
                       RETURNING verified_by, verified_at""",
                    user_id,
                    admin,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("verification is unavailable") from exc
        assert row is not None  # the upsert returns its row
        return {
            "user": user_id,
            "verified": True,
            "verified_by": row["verified_by"],
            "verified_ms": _ms(row["verified_at"]),
        }

    async def unverify(self, user_id: str) -> dict[str, Any]:
        try:
            await self._pool.execute("DELETE FROM model_verifications WHERE user_id = $1", user_id)
        except _DB_ERRORS as exc:
            raise Unavailable("verification is unavailable") from exc
        return {"user": user_id, "verified": False}

    async def set_method(self, user_id: str, method: dict[str, Any]) -> dict[str, Any]:
        try:
            await self._pool.execute(
                """INSERT INTO payout_methods (user_id, method) VALUES ($1, $2::jsonb)
                   ON CONFLICT (user_id) DO UPDATE SET method = EXCLUDED.method,
                                                       updated_at = now()""",
                user_id,
                _json(method),
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payout methods are unavailable") from exc
        return {"method": _method_summary(method)}

    async def status(self, user_id: str) -> dict[str, Any]:
        """What a model needs before asking for a payout, and the rule now."""
        try:
            async with self._pool.acquire() as conn:
                verified = await conn.fetchval(
                    "SELECT true FROM model_verifications WHERE user_id = $1", user_id
                )
                method = await conn.fetchval(
                    "SELECT method FROM payout_methods WHERE user_id = $1", user_id
                )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable") from exc
        return {
            "verified": bool(verified),
            "method": None if method is None else _method_summary(_loads(method)),
            "rule": await self.rule_at(datetime.now(UTC)),
        }

    # --- the model's request ----------------------------------------------------------
    async def request(self, model: str, tokens: int, key: str) -> dict[str, Any]:
        row = await self._fetch_key(model, key)
        if row is not None and row["tokens"] != tokens:
            raise Conflict("this key was used with other fields; nothing was charged")
        if row is not None and row["state"] not in ("requesting", "refused"):
            return {**wire(row), "duplicate": True}
        if row is None:
            row = await self._create(model, tokens, key)
        payout_id = row["id"]
        try:
            reply = await self._economy.hold(
                model,
                escrow_account(ESCROW_KIND, payout_id),
                tokens,
                subject=payout_id,
                key=key,
                request=fingerprint("payout_request", tokens=tokens),
                meta={"payout": payout_id, "tokens": tokens},
            )
        except Unavailable:
            raise  # the outcome may be unknown (a timeout): the same key's retry finds out
        except ServiceError:
            await self._mark_refused(payout_id)  # a refusal: nothing moved
            raise
        try:
            done = await self._pool.fetchrow(
                f"""UPDATE payouts SET state = 'requested', hold_tx = $2, reason = NULL
                    WHERE id = $1 AND state IN ('requesting', 'refused') RETURNING {_COLUMNS}""",
                payout_id,
                str(reply["tx"]),
            )
            if done is None:  # a concurrent retry of the same key finished it
                done = await self._fetch(payout_id)
        except _DB_ERRORS as exc:
            raise Unavailable("held; the payout's row was not updated: retry the key") from exc
        assert done is not None
        answer = {**wire(done), "balance": reply["balance"]}
        if reply.get("duplicate"):
            answer["duplicate"] = True
        return answer

    async def _create(self, model: str, tokens: int, key: str) -> Any:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                verified = await conn.fetchval(
                    "SELECT true FROM model_verifications WHERE user_id = $1", model
                )
                if not verified:
                    raise Forbidden("an admin must verify you (age and identity) before a payout")
                method = await conn.fetchval(
                    "SELECT method FROM payout_methods WHERE user_id = $1", model
                )
                if method is None:
                    raise Forbidden("set a payout method first (PUT /v1/me/payout-method)")
                rule = await self.rule_at(datetime.now(UTC), conn)
                if tokens < rule["min_payout_tokens"]:
                    raise BadRequest(
                        f"field 'tokens' must be at least the minimum payout, "
                        f"{rule['min_payout_tokens']} tokens"
                    )
                rate = Decimal(str(rule["cents_per_token"]))
                row = await conn.fetchrow(
                    f"""INSERT INTO payouts (id, model, idem_key, tokens, state, rule_id,
                                             cents_per_token, cents, method)
                        VALUES ($1, $2, $3, $4, 'requesting', $5, $6, $7, $8::jsonb)
                        ON CONFLICT (model, idem_key) DO NOTHING RETURNING {_COLUMNS}""",
                    new_payout_id(),
                    model,
                    key,
                    tokens,
                    rule["rule"],
                    rate,
                    cents_of(tokens, rate),
                    method if isinstance(method, str) else _json(method),
                )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable; nothing was charged") from exc
        if row is None:  # the same key, concurrently: one row
            row = await self._fetch_key(model, key)
            assert row is not None
            if row["tokens"] != tokens:
                raise Conflict("this key was used with other fields; nothing was charged")
        return row

    async def _mark_refused(self, payout_id: str) -> None:
        # A `requesting` row holds nothing either: the same key's retry redoes it.
        with contextlib.suppress(*_DB_ERRORS):
            await self._pool.execute(
                "UPDATE payouts SET state = 'refused' WHERE id = $1 AND state = 'requesting'",
                payout_id,
            )

    # --- the admin's decision -----------------------------------------------------------
    async def approve(self, admin: str, payout_id: str) -> dict[str, Any]:
        return await self._decide(admin, payout_id, "paid", None)

    async def reject(self, admin: str, payout_id: str, reason: str | None) -> dict[str, Any]:
        return await self._decide(admin, payout_id, "rejected", reason)

    async def _decide(
        self, admin: str, payout_id: str, state: str, reason: str | None
    ) -> dict[str, Any]:
        row = await self._fetch(payout_id)
        if row is None or row["state"] == "refused":
            raise NotFound(f"no payout '{payout_id}'")
        duplicate = row["state"] == state
        if row["state"] in DECIDED and not duplicate:
            raise Conflict(f"the payout is {row['state']} already")
        if row["state"] == "requesting":
            await self._finish_hold(row, rejecting=state == "rejected")
        if not duplicate:
            due = datetime.now(UTC) + timedelta(seconds=self._settings.payout_settle_grace_s)
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    moved = await conn.fetchrow(
                        f"""UPDATE payouts SET state = $2, decided_by = $3, decided_at = now(),
                                               reason = $4
                            WHERE id = $1 AND state IN ('requesting', 'requested')
                            RETURNING {_COLUMNS}""",
                        payout_id,
                        state,
                        admin,
                        reason,
                    )
                    if moved is not None:
                        await deadlines.schedule(conn, payout_id, SETTLE, due)
            except _DB_ERRORS as exc:
                raise Unavailable("payouts are unavailable; nothing was decided") from exc
            if moved is None:  # decided concurrently: the winner's answer
                return await self._decide(admin, payout_id, state, reason)
        await self.settle(payout_id)
        done = await self._fetch(payout_id)
        assert done is not None
        return {**wire(done), "duplicate": True} if duplicate else wire(done)

    async def _finish_hold(self, row: Any, *, rejecting: bool) -> None:
        """A ``requesting`` row whose request died after the hold: its escrow
        says whether the hold applied. Approving needs the tokens held."""
        held = await self._economy.escrow_balance(escrow_account(ESCROW_KIND, row["id"]))
        if held >= row["tokens"]:
            await self._pool.execute(
                "UPDATE payouts SET state = 'requested' WHERE id = $1 AND state = 'requesting'",
                row["id"],
            )
        elif not rejecting:
            raise Conflict("the payout's tokens are not held (yet): the model's retry finishes it")

    async def settle(self, payout_id: str) -> None:
        """Move a decided payout's escrow the way its state says: to
        ``sys:payouts`` (paid) or back to the model (rejected). Safe to run
        any number of times, from any process."""
        row = await self._fetch(payout_id)
        if row is None or row["state"] not in DECIDED:
            return
        tx: str | None = None
        if row["settled_at"] is None:
            escrow = escrow_account(ESCROW_KIND, payout_id)
            meta = {"payout": payout_id, "by": row["decided_by"]}
            try:
                if row["state"] == "paid":
                    reply = await self._economy.payout(
                        escrow, initiator=PAYOUTS_INITIATOR, key=settle_key(payout_id), meta=meta
                    )
                else:
                    reply = await self._economy.escrow_refund(
                        escrow,
                        row["model"],
                        initiator=PAYOUTS_INITIATOR,
                        key=settle_key(payout_id),
                        meta=meta,
                    )
                tx = str(reply["tx"])
            except EscrowEmpty:
                tx = None  # emptied by this key before (its record lost with Redis)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if row["settled_at"] is None:
                    await conn.execute(
                        """UPDATE payouts SET settled_at = now(),
                                              settle_tx = coalesce($2, settle_tx)
                           WHERE id = $1 AND settled_at IS NULL""",
                        payout_id,
                        tx,
                    )
                await deadlines.cancel(conn, payout_id, SETTLE)
        except _DB_ERRORS as exc:
            raise Unavailable("settled; the payout's row was not updated: retry") from exc

    # --- the sweeper: requests that died half-way ----------------------------------------
    async def finish_stuck(self) -> None:
        """Every sweep (under the sweeper's lease): each payout left
        ``requesting`` for longer than ``payout_requesting_max_age_s`` is
        finished or cancelled (``finish_requesting``), a batch at a time."""
        try:
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM payouts
                    WHERE state = 'requesting'
                      AND created_at < now() - $1::float8 * interval '1 second'
                    ORDER BY created_at LIMIT $2""",
                self._settings.payout_requesting_max_age_s,
                self._settings.deadline_batch_max,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable") from exc
        for row in rows:
            try:
                await self.finish_requesting(row)
            except ServiceError as exc:  # a backend away: the next sweep again
                log.warning("payout %s still requesting: %s", row["id"], exc.message)

    async def finish_requesting(self, row: Any) -> str:
        """A ``requesting`` payout whose request is over (its age is past any
        request's course): its escrow says whether the hold applied. Held:
        ``requested``, as the request would have left it (an admin decides
        it). Not held: ``refused`` with a reason, nothing having moved (the
        model's retry with the same key tries the hold again, as after any
        refusal). Each is a compare-and-set from ``requesting`` on the row,
        so the sweeper, a late request and an admin's decision racing it end
        in one state; a request whose hold lands after all still turns its
        row ``requested`` (its own update accepts ``refused``). The state."""
        payout_id = row["id"]
        held = await self._economy.escrow_balance(escrow_account(ESCROW_KIND, payout_id))
        try:
            if held >= row["tokens"]:
                hold_tx = await self._pool.fetchval(
                    """SELECT id FROM ledger_transactions
                        WHERE kind = 'hold' AND meta ? 'payout' AND meta->>'payout' = $1
                        ORDER BY applied_ms LIMIT 1""",
                    payout_id,
                )
                state = await self._pool.fetchval(
                    """UPDATE payouts SET state = 'requested', hold_tx = coalesce($2, hold_tx)
                        WHERE id = $1 AND state = 'requesting' RETURNING state""",
                    payout_id,
                    hold_tx,
                )
            else:
                state = await self._pool.fetchval(
                    """UPDATE payouts SET state = 'refused', reason = $2
                        WHERE id = $1 AND state = 'requesting' RETURNING state""",
                    payout_id,
                    STUCK_REASON,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable") from exc
        if state is None:  # decided meanwhile (the model's retry, an admin)
            current = await self._fetch(payout_id)
            return "gone" if current is None else str(current["state"])
        log.info("payout %s left requesting: %s (escrow held %d)", payout_id, state, held)
        return str(state)

    # --- reading ------------------------------------------------------------------------
    async def list_for(self, model: str) -> list[dict[str, Any]]:
        try:
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM payouts WHERE model = $1 AND state <> 'refused'
                    ORDER BY created_at DESC, id LIMIT $2""",
                model,
                self._settings.payouts_listed_max,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable") from exc
        return [wire(row) for row in rows]

    async def list_all(self, state: str | None) -> list[dict[str, Any]]:
        try:
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM payouts
                    WHERE state <> 'refused' AND ($1::text IS NULL OR state = $1)
                    ORDER BY created_at DESC, id LIMIT $2""",
                state,
                self._settings.payouts_listed_max,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable") from exc
        return [wire(row) for row in rows]

    async def _fetch(self, payout_id: str) -> Any:
        if not PAYOUT_ID_RE.fullmatch(payout_id):
            return None
        try:
            return await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM payouts WHERE id = $1", payout_id
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable") from exc

    async def _fetch_key(self, model: str, key: str) -> Any:
        try:
            return await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM payouts WHERE model = $1 AND idem_key = $2", model, key
            )
        except _DB_ERRORS as exc:
            raise Unavailable("payouts are unavailable; nothing was charged") from exc

    # --- earnings and liabilities -------------------------------------------------------
    async def earnings(
        self, model: str, start: datetime | None, end: datetime | None
    ) -> dict[str, Any]:
        """What the model earned in [start, end), by kind, in tokens and in
        cents, each earning valued at the rule in force when it was made."""
        end = end or datetime.now(UTC)
        start = start or end - timedelta(days=EARNINGS_DEFAULT_DAYS)
        if start >= end:
            raise BadRequest("'from' must be before 'to'")
        if end - start > timedelta(days=self._settings.earnings_period_days_max):
            raise BadRequest(
                f"a statement covers at most {self._settings.earnings_period_days_max} days"
            )
        start_ms, end_ms = _ms(start), _ms(end)
        default = Decimal(str(self._settings.payout_cents_per_token))
        try:
            rows = await self._pool.fetch(
                f"""SELECT {EARNING_LABELS_SQL} AS label,
                           sum(p.amount)::bigint AS tokens, count(*) AS count,
                           sum(p.amount * coalesce(r.cents_per_token, $4)) AS cents
                    FROM ledger_postings p
                    JOIN ledger_transactions t ON t.id = p.tx_id
                    LEFT JOIN LATERAL (
                        SELECT cents_per_token FROM payout_rules
                        WHERE effective_at <= to_timestamp(t.applied_ms / 1000.0)
                        ORDER BY effective_at DESC, id DESC LIMIT 1
                    ) r ON true
                    WHERE p.account_id = $1 AND t.applied_ms >= $2 AND t.applied_ms < $3
                      AND ((t.kind = ANY($5::text[]) AND p.amount > 0)
                           OR (t.kind = 'refund' AND p.amount < 0))
                    GROUP BY label ORDER BY label""",
                f"u:{model}",
                start_ms,
                end_ms,
                default,
                list(EARNING_KINDS),
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        kinds = {
            row["label"]: {
                "tokens": int(row["tokens"]),
                "cents": int(Decimal(row["cents"]).to_integral_value(rounding=ROUND_HALF_UP)),
                "count": int(row["count"]),
            }
            for row in rows
        }
        total_cents = sum((Decimal(row["cents"]) for row in rows), Decimal(0))
        return {
            "model": model,
            "from": start_ms,
            "to": end_ms,
            "kinds": kinds,
            "total": {
                "tokens": sum(k["tokens"] for k in kinds.values()),
                "cents": int(total_cents.to_integral_value(rounding=ROUND_HALF_UP)),
            },
            "rule": await self.rule_at(end),
        }

    async def liabilities(self) -> dict[str, Any]:
        """Tokens by holder, from Postgres (call after draining the outbox):
        ``issued == fans + models + escrow + paid_out + system``."""
        try:
            row = await self._pool.fetchrow(
                """SELECT
                     coalesce(sum(a.balance) FILTER (WHERE a.kind = 'user'
                         AND coalesce(u.role, 'fan') <> 'model'), 0)::bigint AS fans,
                     coalesce(sum(a.balance) FILTER (WHERE a.kind = 'user'
                         AND u.role = 'model'), 0)::bigint AS models,
                     coalesce(sum(a.balance) FILTER (WHERE a.kind = 'escrow'), 0)::bigint
                         AS escrow,
                     coalesce(sum(a.balance) FILTER (WHERE a.id = $1), 0)::bigint AS paid_out,
                     coalesce(sum(a.balance) FILTER (WHERE a.kind = 'system'
                         AND a.id NOT IN ($1, $2)), 0)::bigint AS system,
                     coalesce(-sum(a.balance) FILTER (WHERE a.id = $2), 0)::bigint AS issued
                   FROM accounts a
                   LEFT JOIN users u ON a.kind = 'user' AND u.id = substr(a.id, 3)""",
                PAYOUTS,
                MINT,
            )
            payouts_cents = await self._pool.fetchval(
                "SELECT coalesce(sum(cents), 0)::bigint FROM payouts WHERE state = 'paid'"
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        assert row is not None  # an aggregate has one row
        figures = {name: int(row[name]) for name in ("fans", "models", "escrow", "paid_out")}
        figures["system"] = int(row["system"])
        issued = int(row["issued"])
        return {
            **figures,
            "issued": issued,
            "balanced": issued == sum(figures.values()),
            "paid_out_cents": int(payouts_cents),
        }


def _rule(row: Any) -> dict[str, Any]:
    return {
        "rule": row["id"],
        "cents_per_token": float(row["cents_per_token"]),
        "min_payout_tokens": row["min_payout_tokens"],
        "effective_ms": _ms(row["effective_at"]),
        "created_by": row["created_by"],
    }


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value

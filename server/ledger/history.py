"""A user's transactions and receipts, read from the Postgres ledger.

The ledger is the record: each user's side of a transaction is their
account's posting in it (negative: they paid; positive: they were paid).
What it was for comes from the transaction's kind and meta (the room of a
tip, the item of a menu tip, the media of an unlock, the show of a ticket or
a private show's period, the recipient of a DM, the request of a hold), and
to whom from its other postings.

Money value on a receipt: the tokens at the paying fan's average purchase
price, that is the cents they paid for every bundle bought up to the
transaction divided by the tokens those bundles gave, rounded to the
nearest cent. Tokens granted by an admin cost nothing and are not counted;
a fan who never bought tokens has no value (``null``). What the model earns:
the tokens at ``TOKENCHAT_PAYOUT_CENTS_PER_TOKEN``. Both are display
figures in cents; balances stay integer tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from ..errors import NotFound, Unavailable

# Meta fields a receipt and a history row repeat as they are: what the spend
# was for (set by the Economy method of each kind; docs/economy.md).
META_FIELDS = ("room", "item", "media", "show", "to", "request", "reverses", "escrow", "payout")
# Kinds in which the receiving user earned the tokens (a refund or an
# escrow's return gives a payer back their own).
EARNING_KINDS = frozenset({"tip", "dm", "unlock", "meter", "release", "spend"})

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)


def _user_of(account: str) -> str | None:
    return account[2:] if account.startswith("u:") else None


def _counterparty(own: str, postings: list[tuple[str, int]]) -> str | None:
    """The other side, as a user id when it is a user's account, else the
    account (an escrow, the mint); None when there is no other side."""
    others = [account for account, _ in postings if account != own]
    if not others:
        return None
    users = [u for u in (_user_of(a) for a in others) if u is not None]
    return users[0] if users else others[0]


def _about(meta: dict[str, Any]) -> dict[str, Any]:
    return {name: meta[name] for name in META_FIELDS if name in meta}


class History:
    def __init__(self, pool: asyncpg.Pool, payout_cents_per_token: float) -> None:
        self._pool = pool
        self._payout_cents_per_token = payout_cents_per_token
        # The payout rule in force at a ledger time: cents per token and the
        # rule's id (set by the node to server/economy/payouts.py's); None:
        # the setting alone.
        self.rate_at: Callable[[int], Awaitable[tuple[float, int]]] | None = None

    async def transactions(
        self,
        user_id: str,
        kind: str | None,
        before: tuple[int, str] | None,
        limit: int,
    ) -> dict[str, Any]:
        """The user's side of their transactions, newest first, ``limit``
        before the cursor (applied ms, tx); ``next``: the next page's cursor."""
        account = f"u:{user_id}"
        try:
            rows = await self._pool.fetch(
                """SELECT t.id, t.kind, t.applied_ms, t.meta::text AS meta, p.amount,
                          (SELECT array_agg(o.account_id ORDER BY o.amount)
                             FROM ledger_postings o
                            WHERE o.tx_id = t.id AND o.account_id <> p.account_id) AS others
                     FROM ledger_postings p JOIN ledger_transactions t ON t.id = p.tx_id
                    WHERE p.account_id = $1
                      AND ($2::text IS NULL OR t.kind = $2)
                      AND ($3::bigint IS NULL OR (t.applied_ms, t.id) < ($3, $4))
                    ORDER BY t.applied_ms DESC, t.id DESC LIMIT $5""",
                account,
                kind,
                None if before is None else before[0],
                None if before is None else before[1],
                limit + 1,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        page = rows[:limit]
        items = []
        for row in page:
            others = list(row["others"] or [])
            postings = [(account, row["amount"]), *[(other, 0) for other in others]]
            items.append(
                {
                    "tx": row["id"],
                    "kind": row["kind"],
                    "ts": row["applied_ms"],
                    "amount": row["amount"],
                    "counterparty": _counterparty(account, postings),
                    **_about(orjson.loads(row["meta"])),
                }
            )
        more = len(rows) > limit
        cursor = f"{page[-1]['applied_ms']}-{page[-1]['id']}" if more and page else None
        aliases = await self._pseudonyms([i["counterparty"] for i in items if i["counterparty"]])
        for item in items:
            item["counterparty"] = aliases.get(item["counterparty"], item["counterparty"])
        return {"transactions": items, "next": cursor}

    async def _pseudonyms(self, users: list[str]) -> dict[str, str]:
        """Deleted users among ``users`` and their pseudonyms (migration
        0019): the ledger keeps `u:<id>` (append-only), what it shows names a
        deleted user by the pseudonym only."""
        if not users:
            return {}
        try:
            rows = await self._pool.fetch(
                "SELECT user_id, pseudonym FROM deleted_users WHERE user_id = ANY($1::text[])",
                sorted(set(users)),
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        return {row["user_id"]: row["pseudonym"] for row in rows}

    async def receipt(self, user_id: str, tx: str, *, admin: bool) -> dict[str, Any]:
        """One transaction as its parties (or an admin) may read it; anyone
        else gets NOT_FOUND, exactly as for a transaction that does not exist."""
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    """SELECT id, kind, initiator, applied_ms, meta::text AS meta, reverses
                         FROM ledger_transactions WHERE id = $1""",
                    tx,
                )
                if row is None:
                    raise NotFound(f"no transaction '{tx}' of yours")
                postings = [
                    (p["account_id"], int(p["amount"]))
                    for p in await conn.fetch(
                        """SELECT account_id, amount FROM ledger_postings WHERE tx_id = $1
                           ORDER BY amount, account_id""",
                        tx,
                    )
                ]
                users = {u for u in (_user_of(a) for a, _ in postings) if u is not None}
                if user_id not in users and not admin:
                    raise NotFound(f"no transaction '{tx}' of yours")
                payer = next(
                    (u for a, amount in postings if amount < 0 if (u := _user_of(a))), None
                )
                payee = next(
                    (u for a, amount in postings if amount > 0 if (u := _user_of(a))), None
                )
                average = None
                if payer is not None and (admin or payer == user_id):
                    average = await conn.fetchrow(
                        """SELECT coalesce(sum(tokens), 0) AS tokens,
                                  coalesce(sum(price_cents), 0) AS cents
                             FROM purchases
                            WHERE user_id = $1 AND created_at <= to_timestamp($2 / 1000.0)""",
                        payer,
                        row["applied_ms"],
                    )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        receipt = self._receipt(user_id, row, postings, payer, payee, average, admin=admin)
        parties = [u for u in (_user_of(a) for a, _ in postings) if u is not None and u != user_id]
        aliases = await self._pseudonyms(parties)
        if aliases:  # a deleted party: named by its pseudonym only
            for name in ("from", "to", "counterparty", "initiator"):
                receipt[name] = aliases.get(receipt[name], receipt[name])
            for posting in receipt["postings"]:
                user = _user_of(posting["account"])
                if user in aliases:
                    posting["account"] = aliases[user]
        if "earnings" in receipt and self.rate_at is not None:
            rate, rule = await self.rate_at(int(row["applied_ms"]))
            receipt["earnings"] = {
                "cents": round(receipt["tokens"] * rate),
                "cents_per_token": rate,
                "basis": (
                    "TOKENCHAT_PAYOUT_CENTS_PER_TOKEN"  # no rule added yet: the setting
                    if rule == 0
                    else "the payout rule in force at the time"
                ),
                "rule": rule,
            }
        return receipt

    def _receipt(
        self,
        user_id: str,
        row: asyncpg.Record,
        postings: list[tuple[str, int]],
        payer: str | None,
        payee: str | None,
        average: asyncpg.Record | None,
        *,
        admin: bool,
    ) -> dict[str, Any]:
        own = f"u:{user_id}"
        amount = sum(value for account, value in postings if account == own)
        # The tokens the transaction moved: what its payer paid (a refund's
        # payer is the model giving tokens back), else its largest credit.
        tokens = max((abs(value) for _, value in postings), default=0)
        initiator = str(row["initiator"])
        receipt: dict[str, Any] = {
            "tx": row["id"],
            "kind": row["kind"],
            "ts": row["applied_ms"],
            "tokens": tokens,
            "amount": amount,
            "from": payer,
            "to": payee,
            "counterparty": _counterparty(own, postings) if amount else None,
            "initiator": _user_of(initiator) or initiator,
            "postings": [{"account": a, "amount": v} for a, v in postings],
            **_about(orjson.loads(row["meta"])),
        }
        if average is not None:
            receipt["value"] = _value(tokens, int(average["tokens"]), int(average["cents"]))
        if payee is not None and row["kind"] in EARNING_KINDS and (admin or payee == user_id):
            rate = self._payout_cents_per_token
            receipt["earnings"] = {
                "cents": round(tokens * rate),
                "cents_per_token": rate,
                "basis": "TOKENCHAT_PAYOUT_CENTS_PER_TOKEN",
            }
        return receipt


def _value(tokens: int, bought_tokens: int, paid_cents: int) -> dict[str, Any]:
    """``tokens`` at the average price of the purchases (integer arithmetic:
    rounded half up to a cent)."""
    if bought_tokens == 0:
        return {"cents": None, "basis": "no purchases before this transaction"}
    return {
        "cents": (tokens * paid_cents * 2 + bought_tokens) // (bought_tokens * 2),
        "cents_per_token": round(paid_cents / bought_tokens, 4),
        "basis": "average purchase price: cents paid / tokens bought, every purchase up to it",
        "purchased_tokens": bought_tokens,
        "purchased_cents": paid_cents,
    }

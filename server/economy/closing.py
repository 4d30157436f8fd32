"""Closing a deleted account's escrows before its balance is forfeited.

``DELETE /v1/me`` forfeits the balance (server/http/accounts.py). Anything
an escrow would later give back to the user would land in an account that
nobody holds any more, so the open escrows she is party to are settled
FIRST, each the way its own workflow's cancel path does it, and the
forfeiture takes what came back (docs/economy.md, "Deleted accounts and open
escrows"). Per workflow:

As a fan:
- an ``offered`` custom request: cancelled (``Requests.cancel``), refunded;
- a private show: a ``requested`` one cancelled, an ``accepted`` or
  ``running`` one ended (``Privates.end``): what was due is billed, the rest
  comes back;
- a ticket to a ``scheduled`` show: that ticket refunded (``TICKET_REFUND``,
  the show's own refund key, so the show's settle later finds it done);
- REFUSED (``CONFLICT``, nothing moved) while she has an ``accepted``
  request (the model is making it: it is delivered or expires), a ticket to
  a ``running`` show (she is watching it: it ends), or tips held by an
  active all-or-nothing goal (the goal still counts on them: it is reached,
  fails at its deadline, or the model deletes it). Each closes by its own
  workflow; the error lists them.

As a model:
- her active goal: deleted (``Goals.delete``), held tips refunded;
- her ``scheduled`` and ``running`` shows: cancelled, tickets refunded;
- requests to her (``offered``, ``accepted``): declined, fans refunded;
- private shows: ``requested`` declined, ``accepted``/``running`` ended;
- payouts ``requesting`` or ``requested``: rejected, the tokens back in her
  balance (then forfeited with it).

A credit that still reaches a deleted account afterwards (an admin's
refund of one of her spends, an escrow she opened in the instant between
the settling and the ban, a goal's refund) is forfeited by the sweeper
(``forfeit_late_credits``, every sweep): no deleted account keeps a balance
for longer than one sweep interval.

Every step is its workflow's own idempotent transition, so a deletion that
failed half-way (a backend away) is simply asked again. Before answering,
every closed object she is party to must be settled (its money moved); if
one is not, the deletion stops with ``UNAVAILABLE`` before forfeiting, so a
refund can never arrive after the forfeiture.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ..errors import Conflict, NotFound, ServiceError, Unavailable
from . import goals, payouts, privates, requests, shows
from .economy import Economy, escrow_account, user_initiator

log = logging.getLogger(__name__)

# A deleted account's balance is taken whole: the clawback's bound (tokens)
# is above any balance the ledger can hold (a bigint, but far below Lua's
# exact-integer limit of 2^53).
FORFEIT_AMOUNT = 2**52
FORFEIT_REASON = "account deleted"
# Deleted accounts with a balance forfeited in one sweep (a bound on one
# sweep's work; more wait for the next sweep).
LATE_FORFEITS_PER_SWEEP_MAX = 100
# Who decided a payout rejected by a deletion (the payout's `decided_by`).
DELETION_DECIDER = "sys:accounts"
# The shows user $1 bought a ticket to (the ledger's ticket rows name them).
HER_TICKETS_SHOWS = (
    "SELECT t.meta->>'show' FROM ledger_transactions t"
    " WHERE t.kind = 'ticket' AND t.meta->>'fan' = $1"
)
_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
Drain = Callable[[], Awaitable[int]]


class AccountClosing:
    """Settles a leaving user's open escrows (see the module docstring)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        economy: Economy,
        requests_: requests.Requests,
        shows_: shows.Shows,
        privates_: privates.Privates,
        goals_: goals.Goals,
        payouts_: payouts.Payouts,
    ) -> None:
        self._pool = pool
        self._economy = economy
        self._requests = requests_
        self._shows = shows_
        self._privates = privates_
        self._goals = goals_
        self._payouts = payouts_

    async def close(self, user: str, drain: Drain) -> dict[str, int]:
        """Refuse while an escrow that cannot be settled now is open, else
        settle every open escrow ``user`` is party to. Returns how many of
        each kind were closed."""
        if await drain():  # tickets and goal tips are read from the ledger
            raise Unavailable("the ledger is behind; nothing was deleted, try again")
        blocking = await self.blocking(user)
        if blocking:
            error = Conflict(
                "your account has tokens in escrows that close by themselves; "
                "delete it once they have closed (nothing was deleted)"
            )
            error.fields["open"] = blocking
            raise error
        closed = {
            "requests": await self._close_requests(user),
            "privates": await self._close_privates(user),
            "tickets": await self._refund_tickets(user),
            "shows": await self._cancel_shows(user),
            "goals": await self._delete_goal(user),
            "payouts": await self._reject_payouts(user),
        }
        await self._settle_all(user)
        return closed

    async def blocking(self, user: str) -> list[dict[str, Any]]:
        """The fan-side escrows the deletion waits for, with when each closes
        by itself (ms; None when only its model or its target closes it)."""
        try:
            async with self._pool.acquire() as conn:
                accepted = await conn.fetch(
                    """SELECT id, (extract(epoch FROM expires_at) * 1000)::bigint AS until
                         FROM requests WHERE fan = $1 AND state = 'accepted' ORDER BY id""",
                    user,
                )
                running = await conn.fetch(
                    f"""SELECT s.id FROM shows s
                        WHERE s.state = 'running' AND s.model <> $1
                          AND s.id IN ({HER_TICKETS_SHOWS})
                        ORDER BY s.id""",
                    user,
                )
                held = await conn.fetch(
                    """SELECT g.id, (extract(epoch FROM g.deadline_at) * 1000)::bigint AS until
                         FROM goals g
                        WHERE g.state = 'active' AND g.all_or_nothing AND g.model <> $1
                          AND (SELECT coalesce(sum(p.amount), 0) FROM ledger_postings p
                                 JOIN ledger_transactions t ON t.id = p.tx_id
                                WHERE p.account_id = 'u:' || $1 AND t.meta ? 'goal'
                                  AND t.meta->>'goal' = g.id
                                  AND t.kind IN ('tip', 'escrow_refund')) < 0
                        ORDER BY g.id""",
                    user,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("escrows are unavailable; nothing was deleted") from exc
        blocking: list[dict[str, Any]] = [
            {"kind": "request", "id": r["id"], "until": r["until"]} for r in accepted
        ]
        for row in running:
            if await self._shows.holds_ticket(row["id"], user):
                blocking.append({"kind": "show", "id": row["id"], "until": None})
        blocking += [{"kind": "goal", "id": g["id"], "until": g["until"]} for g in held]
        return blocking

    # --- each workflow's own path ----------------------------------------------------
    async def _close_requests(self, user: str) -> int:
        """Her offers cancelled (fan); requests to her declined (model)."""
        rows = await self._fetch(
            """SELECT id, fan FROM requests
                WHERE (fan = $1 AND state = 'offered') OR (model = $1 AND state = ANY($2))""",
            user,
            list(requests.OPEN),
        )
        for row in rows:
            if row["fan"] == user:
                await _tolerant(self._requests.cancel(user, row["id"]))
            else:
                await _tolerant(self._requests.decline(user, row["id"]))
        return len(rows)

    async def _close_privates(self, user: str) -> int:
        rows = await self._fetch(
            """SELECT id, fan, state FROM private_shows
                WHERE (fan = $1 OR model = $1) AND state = ANY($2)""",
            user,
            list(privates.OPEN),
        )
        for row in rows:
            if row["state"] == "requested" and row["fan"] != user:
                await _tolerant(self._privates.decline(user, row["id"]))
            else:
                await _tolerant(self._privates.end(user, row["id"]))
        return len(rows)

    async def _refund_tickets(self, user: str) -> int:
        """Her tickets to scheduled shows of others, each refunded with the
        show's own refund key."""
        rows = await self._fetch(
            f"""SELECT s.id FROM shows s
                WHERE s.state = 'scheduled' AND s.model <> $1
                  AND s.id IN ({HER_TICKETS_SHOWS})
                ORDER BY s.id""",
            user,
        )
        refunded = 0
        for row in rows:
            refunded += bool(await self._shows.refund_ticket(row["id"], user))
        return refunded

    async def _cancel_shows(self, user: str) -> int:
        rows = await self._fetch(
            "SELECT id FROM shows WHERE model = $1 AND state = ANY($2) ORDER BY id",
            user,
            list(shows.OPEN),
        )
        for row in rows:
            await _tolerant(self._shows.cancel(user, row["id"]))
        return len(rows)

    async def _delete_goal(self, user: str) -> int:
        rows = await self._fetch("SELECT id FROM goals WHERE model = $1 AND state = 'active'", user)
        if rows:
            await _tolerant(self._goals.delete(user))
        return len(rows)

    async def _reject_payouts(self, user: str) -> int:
        rows = await self._fetch(
            """SELECT id FROM payouts WHERE model = $1 AND state IN ('requesting', 'requested')
                ORDER BY id""",
            user,
        )
        for row in rows:
            await _tolerant(self._payouts.reject(DELETION_DECIDER, row["id"], FORFEIT_REASON))
        return len(rows)

    async def _settle_all(self, user: str) -> None:
        """Every closed object she is party to (as a fan too: a show she
        holds a ticket to, a goal her tips went to), settled (each settle is
        idempotent); then none may be left unsettled."""
        settles = {
            "request": self._requests.settle,
            "private": self._privates.settle,
            "show": self._shows.settle,
            "goal": self._goals.settle,
            "payout": self._payouts.settle,
        }
        for kind, subject in await self._unsettled(user):
            await settles[kind](subject)
        await self._none_open(user)
        left = await self._unsettled(user)
        if left:
            kind, subject = left[0]
            raise Unavailable(
                f"{escrow_account(kind, subject)} is not settled yet; nothing was deleted, "
                "try again"
            )

    async def _none_open(self, user: str) -> None:
        """CONFLICT when one of her escrows is open still: its other party
        moved it meanwhile (the model accepted an offer being cancelled), so
        its own transition here did not apply. Her room's rows go next: no
        goal or show of hers may be open then."""
        still_open = await self._fetch(
            """SELECT 'goal' AS kind, id FROM goals WHERE model = $1 AND state = 'active'
               UNION ALL
               SELECT 'show', id FROM shows WHERE model = $1 AND state = ANY($2)
               UNION ALL
               SELECT 'request', id FROM requests
                WHERE state = ANY($3) AND (model = $1 OR (fan = $1 AND state = 'offered'))
               UNION ALL
               SELECT 'private', id FROM private_shows
                WHERE (fan = $1 OR model = $1) AND state = ANY($4)
               UNION ALL
               SELECT 'payout', id FROM payouts
                WHERE model = $1 AND state IN ('requesting', 'requested')
               LIMIT 1""",
            user,
            list(shows.OPEN),
            list(requests.OPEN),
            list(privates.OPEN),
        )
        if still_open:
            row = still_open[0]
            raise Conflict(
                f"{escrow_account(row['kind'], row['id'])} changed while your account was "
                "being deleted; nothing was deleted, try again"
            )

    async def _unsettled(self, user: str) -> list[tuple[str, str]]:
        rows = await self._fetch(
            f"""SELECT 'request' AS kind, id FROM requests
                WHERE (fan = $1 OR model = $1) AND state <> ALL($2) AND settled_at IS NULL
               UNION ALL
               SELECT 'private', id FROM private_shows
                WHERE (fan = $1 OR model = $1) AND state = 'ended' AND settled_at IS NULL
               UNION ALL
               SELECT 'show', id FROM shows
                WHERE state <> ALL($3) AND settled_at IS NULL
                  AND (model = $1 OR id IN ({HER_TICKETS_SHOWS}))
               UNION ALL
               SELECT 'goal', id FROM goals
                WHERE state <> 'active' AND settled_at IS NULL
                  AND (model = $1 OR id IN (
                       SELECT t.meta->>'goal' FROM ledger_transactions t
                         JOIN ledger_postings p ON p.tx_id = t.id
                        WHERE t.kind = 'tip' AND t.meta ? 'goal'
                          AND p.account_id = 'u:' || $1))
               UNION ALL
               SELECT 'payout', id FROM payouts
                WHERE model = $1 AND state IN ('paid', 'rejected') AND settled_at IS NULL""",
            user,
            list(requests.OPEN),
            list(shows.OPEN),
        )
        return [(row["kind"], row["id"]) for row in rows]

    # --- after the deletion ------------------------------------------------------------
    async def forfeit(self, user: str, alias: str, key: str) -> dict[str, Any]:
        """The whole balance of ``user`` to sys:forfeited (ledger kind
        ``forfeit``), once per ``key``."""
        return await self._economy.clawback(
            user,
            FORFEIT_AMOUNT,
            kind="forfeit",
            initiator=user_initiator(user),
            key=key,
            meta={"reason": FORFEIT_REASON, "pseudonym": alias},
        )

    async def forfeit_late_credits(self) -> None:
        """Every sweep: each deleted account the ledger shows a balance in
        has it forfeited, under a key naming the latest credit it received,
        so a repeat (this sweep again, another process) is a duplicate and
        a later credit gets a forfeiture of its own."""
        try:
            rows = await self._pool.fetch(
                """SELECT d.user_id, d.pseudonym,
                          (SELECT p.tx_id FROM ledger_postings p
                             JOIN ledger_transactions t ON t.id = p.tx_id
                            WHERE p.account_id = a.id AND p.amount > 0
                            ORDER BY t.applied_ms DESC, t.id DESC LIMIT 1) AS credit
                     FROM deleted_users d JOIN accounts a ON a.id = 'u:' || d.user_id
                    WHERE a.balance > 0 ORDER BY d.user_id LIMIT $1""",
                LATE_FORFEITS_PER_SWEEP_MAX,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("deleted accounts are unavailable") from exc
        for row in rows:
            try:
                reply = await self.forfeit(
                    row["user_id"], row["pseudonym"], f"account-deleted:after:{row['credit']}"
                )
            except ServiceError as exc:  # a backend away: the next sweep again
                log.warning("late credit of %s not forfeited: %s", row["pseudonym"], exc.message)
                continue
            if reply["clawed"]:
                await self._add_forfeited(row["user_id"], int(reply["clawed"]))

    async def _add_forfeited(self, user: str, tokens: int) -> None:
        try:
            await self._pool.execute(
                "UPDATE deleted_users SET forfeited = forfeited + $2 WHERE user_id = $1",
                user,
                tokens,
            )
        except _DB_ERRORS:
            log.warning("forfeited total of a deleted account not updated")

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return list(await self._pool.fetch(sql, *args))
        except _DB_ERRORS as exc:
            raise Unavailable("escrows are unavailable; nothing was deleted") from exc


async def _tolerant(step: Awaitable[Any]) -> None:
    """One workflow's transition. Closed meanwhile by its other party or the
    sweeper (NOT_FOUND, CONFLICT): what matters is that it is closed, which
    the settle check after all of them verifies. Anything else (a backend
    away) stops the deletion, nothing forfeited yet."""
    try:
        await step
    except (NotFound, Conflict) as exc:
        log.info("escrow closed meanwhile: %s", exc.message)
    except ServiceError:
        raise

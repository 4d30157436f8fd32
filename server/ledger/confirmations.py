"""Durable acknowledgements: a spend answered only once its ledger row commits.

With ``TOKENCHAT_DURABILITY=ledger`` (the default) the economy runs a money
script in Redis as before, then waits here for the ledger writer to commit
the transaction to Postgres before the client is answered. A Redis that loses
its data at any moment after that loses nothing acknowledged.

Group commit: writers commit batches back to back (no linger in this mode), and
after each COMMIT publish the transaction ids of the batch on one channel
(``ledger:commits``); every node subscribes to it and wakes the spends waiting
on those ids. One publish per batch: ``C`` for the ids committed (or found in
the ledger already), ``R`` for those Postgres refused and the writer parked in
ledger_rejected (the format is in server/bus.py).

A notification can be missed (pub/sub reconnecting, or a duplicate whose
original committed before it began to wait), so a waiter also asks Postgres:
a duplicate before it waits, every waiter when the pub/sub connection comes
back, and a waiter whose time is up, once, before answering UNAVAILABLE with
"outcome unknown".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import asyncpg

from .. import bus
from ..errors import ServiceError, Unavailable

log = logging.getLogger(__name__)

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)


class Parked(ServiceError):
    """The ledger refused the transaction: it is parked for an operator.

    Redis applied it, Postgres did not: the spend is not confirmed, and
    reconcile reports the difference until an operator settles it.
    """


class Confirmations:
    """Spends waiting for their ledger row, by transaction id."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        # Bounded by the commands in flight: a session runs one at a time.
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def waiting(self) -> int:
        return len(self._waiting)

    def on_message(self, message: bus.Message) -> None:
        """A writer's notification (see the module docstring)."""
        if isinstance(message, bus.LedgerCommitted):
            self.committed(message.txs)
        elif isinstance(message, bus.LedgerParked):
            self.parked(message.txs)
        else:
            log.warning("dropped a %s payload on the ledger channel", type(message).__name__)

    def committed(self, txs: Iterable[str]) -> None:
        for tx in txs:
            for future in self._waiting.pop(tx, ()):
                if not future.done():
                    future.set_result(None)

    def parked(self, txs: Iterable[str]) -> None:
        for tx in txs:
            for future in self._waiting.pop(tx, ()):
                if not future.done():
                    future.set_exception(_parked(tx))

    def expect(self, tx: str) -> asyncio.Future[None]:
        """Start listening for ``tx``: before its script runs, so that a commit
        that comes back faster than the script's reply is not missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tx, []).append(future)
        return future

    def forget(self, tx: str, future: asyncio.Future[None]) -> None:
        futures = self._waiting.get(tx)
        if futures is None:
            return
        if future in futures:
            futures.remove(future)
        if not futures:
            del self._waiting[tx]

    async def wait(self, tx: str, future: asyncio.Future[None], *, known_before: bool) -> None:
        """Return once ``tx`` is in the ledger; raise ``Parked`` or ``Unavailable``.

        ``future`` comes from ``expect(tx)``. ``known_before``: the transaction
        existed before its script was sent (a duplicate), so its notification
        may have gone out already: Postgres is asked first.
        """
        try:
            if known_before:
                await self._settle_from_ledger([tx])
            try:
                async with asyncio.timeout(self._timeout_s):
                    await asyncio.shield(future)
                return
            except TimeoutError:
                pass
            await self._settle_from_ledger([tx])
            if future.done():
                future.result()
                return
            raise Unavailable(
                f"the ledger did not confirm transaction '{tx}' in time; the outcome is "
                "unknown: retry with the same key"
            )
        finally:
            self.forget(tx, future)

    async def recheck(self) -> None:
        """Settle every waiter from Postgres (notifications may have been lost)."""
        if self._waiting:
            try:
                await self._settle_from_ledger(list(self._waiting))
            except Unavailable:
                log.warning("could not recheck %d spends waiting on the ledger", self.waiting())

    async def _settle_from_ledger(self, txs: list[str]) -> None:
        try:
            async with self._pool.acquire() as conn:
                committed = await conn.fetch(
                    "SELECT id FROM ledger_transactions WHERE id = ANY($1::text[])", txs
                )
                parked = await conn.fetch(
                    "SELECT tx_id FROM ledger_rejected WHERE tx_id = ANY($1::text[])", txs
                )
        except _DB_ERRORS as exc:
            raise Unavailable(
                "the ledger is unavailable; the outcome is unknown: retry with the same key"
            ) from exc
        self.committed(row["id"] for row in committed)
        self.parked(row["tx_id"] for row in parked)


def _parked(tx: str) -> Parked:
    return Parked(
        f"the ledger refused transaction '{tx}': it is parked for an operator "
        "(GET /v1/admin/ledger/rejected) and was not confirmed"
    )

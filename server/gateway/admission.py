"""Admission: the hellos that arrive together share their round trips.

After a restart or a deploy every client of a process says hello within a
second or two. Admitted one by one, each hello cost a Postgres upsert, a
SUBSCRIBE and a balance read (with its limits and inbox), and a process
admitted 550-850 hellos/s. Here the hellos that arrive within
``hello_batch_window_s`` of the first (or the first ``hello_batch_max``) go
through the same steps together, in the order one hello takes them:

1. the users are upserted (``Directory.touch_users``: one statement);
2. platform bans (the node's copy in memory) and the sessions-per-user limit;
3. the user channels are subscribed (one SUBSCRIBE), confirmed before...
4. ... the balances, limits and counters, and stored DMs are read
   (``hello_read.lua``: one script call), so that no change falls between
   the subscription and the reads; what Redis lacks is loaded from Postgres;
5. private shows left within their grace resume (one statement).

A failure belongs to the hellos it concerns: a refused user (ban, limit, a
row Postgres rejects) fails alone; a backend away fails every hello of the
batch that still needed it with ``Unavailable``, and those that were taken
online are taken offline again, so nothing is left half-done. A session gone
while its batch ran (cancelled) is taken offline when the batch ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from .. import metrics
from ..auth import Identity
from ..economy.economy import HelloState
from ..errors import ServiceError

if TYPE_CHECKING:
    from .node import Node
    from .session import Session

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Hello:
    session: Session
    identity: Identity
    done: asyncio.Future[HelloState]

    @property
    def user_id(self) -> str:
        return self.identity.user_id


class Admission:
    def __init__(self, node: Node) -> None:
        self._node = node
        self._window_s = node.settings.hello_batch_window_s
        self._batch_max = node.settings.hello_batch_max
        self._waiting: list[_Hello] = []
        self._timer: asyncio.TimerHandle | None = None

    async def admit(self, session: Session, identity: Identity) -> HelloState:
        """Admit one authenticated hello with the others of its batch.
        Raises the ``ServiceError`` that refused it."""
        loop = asyncio.get_running_loop()
        hello = _Hello(session, identity, loop.create_future())
        self._waiting.append(hello)
        if len(self._waiting) >= self._batch_max:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window_s, self._flush)
        return await hello.done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            metrics.HELLO_BATCH_SIZE.observe(len(batch))
            self._node.spawn(self._run(batch))

    async def _run(self, batch: list[_Hello]) -> None:
        online: list[_Hello] = []
        try:
            online = await self._admit(batch)
        except Exception as exc:
            # A bug: logged here; each waiting hello fails with it, as a
            # command that raised does (its session closes with 1011).
            log.exception("a batch of %d hellos failed", len(batch))
            for hello in batch:
                if not hello.done.done():
                    hello.done.set_exception(exc)
        finally:
            for hello in online:
                # Taken online, then refused, or gone meanwhile: offline again.
                if hello.done.cancelled() or hello.done.exception() is not None:
                    self._node.user_offline(hello.session, hello.user_id)

    async def _admit(self, batch: list[_Hello]) -> list[_Hello]:
        """Every hello of ``batch`` answered; returns those taken online."""
        node = self._node

        def refuse(hellos: list[_Hello], error: ServiceError) -> None:
            for hello in hellos:
                if not hello.done.done():
                    hello.done.set_exception(error)

        live = [hello for hello in batch if not hello.done.done()]
        failed_users = await node.directory.touch_users([hello.identity for hello in live])
        ready: list[_Hello] = []
        for hello in live:
            error: ServiceError | None = failed_users.get(hello.identity)
            if error is None:
                try:
                    # A platform-banned user never gets a session (closed 4003).
                    await node.moderation.check_platform(hello.user_id)
                except ServiceError as exc:
                    error = exc
            if error is not None:
                refuse([hello], error)
            elif not hello.done.done():
                ready.append(hello)
        refused = node.user_online_many([(hello.session, hello.user_id) for hello in ready])
        online = [hello for hello in ready if hello.session not in refused]
        for hello in ready:
            if hello.session in refused:
                refuse([hello], refused[hello.session])
        if not online:
            return online
        users = [hello.user_id for hello in online]
        try:
            # Subscribed before reading the balances and the inboxes, so that
            # no change falls between the two.
            await node.subscribe_users(users)
            # Balances, limits and counters (her spends then need no
            # Postgres), stored DMs: one script call for the batch.
            states = await node.economy.hello_state(users, node.settings.inbox_len)
        except ServiceError as exc:
            refuse(online, exc)
            return online
        # Back within a private show's grace: its billing resumes.
        await node.privates.back_many(users)
        for hello, state in zip(online, states, strict=True):
            if not hello.done.done():
                hello.done.set_result(state)
        return online

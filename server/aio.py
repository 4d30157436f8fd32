"""Small asyncio helpers shared by the server's long-running loops."""

from __future__ import annotations

import asyncio


def reraise_if_cancelled(exc: BaseException) -> None:
    """Raise CancelledError if the current task is being cancelled.

    redis-py can turn a cancellation that lands inside a command into a
    connection error; a loop that retries on connection errors would then
    never stop. Every such loop calls this in its error handler.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc

"""Small asyncio helpers shared by the server's long-running loops."""

from __future__ import annotations

import asyncio
import gc

# Objects allocated (net) before the cyclic GC collects its youngest
# generation; CPython's default is 700. At 1,000 tips/s that default promoted
# enough short-lived objects (futures and frames of commands in flight) to
# set off a full collection every ~3 s, each 20-33 ms with the event loop
# blocked (gc.callbacks): the ack p99 of the tips benchmark. At 50,000 the
# short-lived die young, and no full collection ran in a 10 s window.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Set the cyclic GC up for a long-running event loop; call after imports."""
    gc.collect()
    # What start-up made (modules, classes, settings) is never garbage: keep
    # it out of every later full collection instead of scanning it each time.
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task is being cancelled.

    asyncpg and redis-py can turn a cancellation that lands inside a call
    into a connection error, which the pass of a background loop handles
    like any other (it logs and goes on). Swallowed there, the cancellation
    would leave the loop running forever, and the node's close waiting on it
    (a test's teardown hung for 120 s that way). Every loop checks here
    between passes (``pause``), and in its error handlers
    (``reraise_if_cancelled``).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """Sleep between two passes of a background loop, unless it is being
    cancelled (see ``raise_if_cancelling``)."""
    raise_if_cancelling()
    await asyncio.sleep(seconds)


def reraise_if_cancelled(exc: BaseException) -> None:
    """Raise CancelledError if the current task is being cancelled.

    redis-py can turn a cancellation that lands inside a command into a
    connection error; a loop that retries on connection errors would then
    never stop. Every such loop calls this in its error handler.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc

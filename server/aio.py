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


def reraise_if_cancelled(exc: BaseException) -> None:
    """Raise CancelledError if the current task is being cancelled.

    redis-py can turn a cancellation that lands inside a command into a
    connection error; a loop that retries on connection errors would then
    never stop. Every such loop calls this in its error handler.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc

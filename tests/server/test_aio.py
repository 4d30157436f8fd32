"""Background loops stop when cancelled, even when a library swallowed the
cancellation inside a pass (asyncpg and redis-py can turn one into a
connection error that the pass handles): a node's close must never wait on a
loop for ever (a test teardown once hung 120 s on the deadline sweeper)."""

from __future__ import annotations

import asyncio
import contextlib

from tokenchat.server.aio import pause
from tokenchat.server.app import Process
from tokenchat.server.config import Settings


async def _swallowing_pass() -> None:
    """A pass that swallows a cancellation, as a library may."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)


async def test_a_loop_that_pauses_stops_after_its_pass_swallowed_the_cancellation() -> None:
    started = asyncio.Event()

    async def loop() -> None:
        while True:
            started.set()
            await _swallowing_pass()
            await pause(0.01)

    task = asyncio.create_task(loop())
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert done == {task} and task.cancelled()


async def test_close_cancels_again_a_loop_that_swallowed_the_first_cancellation(
    settings: Settings,
) -> None:
    process = Process(settings)
    await process.start()
    node = process.node
    assert node is not None
    in_second_call = asyncio.Event()

    async def stubborn() -> None:
        await _swallowing_pass()  # the first cancellation ends here
        in_second_call.set()
        await asyncio.sleep(3600)  # the second one ends this

    task = asyncio.create_task(stubborn())
    node._loops.append(task)
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await process.stop()
    assert in_second_call.is_set() and task.cancelled()
    assert loop.time() - started < 5.0

"""The load processes' pipe to their parent (loadtests/harness/processes.py)."""

from __future__ import annotations

import multiprocessing
import os
import struct
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from loadtests.harness.processes import recv_from_parent, run_on_uvloop

# Far over a pipe's buffer (64 KiB on Linux): a phase of the tips benchmark
# with thousands of frame heads (--action unlock or buy_ticket) is this big.
MESSAGE_BYTES = 1024 * 1024
RECV_TIMEOUT_S = 30.0
# Between the two halves of the message: the child has read the first half
# and finds the pipe empty meanwhile, as on a busy machine.
HALVES_GAP_S = 0.3


def send_in_two_halves(conn: Connection, message: object) -> None:
    """``conn.send(message)``, written as Connection frames it (a 4-byte
    length, then the pickle) in two writes with a pause between."""
    data = bytes(ForkingPickler.dumps(message))
    frame = struct.pack("!i", len(data)) + data
    half = len(frame) // 2
    for chunk in (frame[:half], frame[half:]):
        view = memoryview(chunk)
        while view:
            view = view[os.write(conn.fileno(), view) :]
        time.sleep(HALVES_GAP_S)


def test_recv_from_parent_reads_a_message_larger_than_the_pipe() -> None:
    """The event loop makes the pipe non-blocking; a message that arrives in
    several writes must still be read whole, not fail half read (EAGAIN)."""
    parent_end, child_end = multiprocessing.Pipe()
    message = ("phase", b"x" * MESSAGE_BYTES)
    received: list[object] = []

    async def child() -> None:
        received.append(await recv_from_parent(child_end, RECV_TIMEOUT_S))
        received.append(await recv_from_parent(child_end, RECV_TIMEOUT_S))

    # The parent's send blocks until the child has read most of it: a thread.
    sender = threading.Thread(
        target=lambda: [send_in_two_halves(parent_end, message), parent_end.send(("stop", None))]
    )
    sender.start()
    try:
        run_on_uvloop(child)
    finally:
        sender.join(RECV_TIMEOUT_S)
        parent_end.close()
        child_end.close()
    assert received == [message, ("stop", None)]

"""Small asyncio helpers shared by the pipeline and the MPPS forwarder.

:func:`set_from_thread` wakes a loop's worker from a receiver thread.

Python 3.11's :func:`asyncio.wait_for` can swallow a cancellation: when the awaited
thing completes in the same loop iteration as the ``cancel()``, it returns the result
and the task goes on as if never cancelled (fixed in 3.12, which builds ``wait_for``
on :func:`asyncio.timeout`).  A stage loop that swallows its stop runs forever and the
stop waits for it, so the gateway uses :func:`asyncio.timeout` instead.
"""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait until *event* is set or *timeout* seconds pass, then clear it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    event.clear()


def set_from_thread(loop: asyncio.AbstractEventLoop | None, event: asyncio.Event) -> None:
    """Thread-safe: set *event* on *loop* (a worker waits on it).  Before the worker
    started (no loop yet) or while its loop closes, nothing happens: the worker looks
    for work when it starts."""
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed between the check and the call
            loop.call_soon_threadsafe(event.set)

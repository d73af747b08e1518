"""Small asyncio helpers shared by the pipeline and the MPPS forwarder.

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

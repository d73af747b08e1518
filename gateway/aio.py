"""Small asyncio helpers shared by the pipeline, the MPPS forwarder and the Storage
Commitment reporter.

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
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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


async def in_daemon_thread(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking network I/O (a DIMSE association) in a daemon thread named *name*.

    Not :func:`asyncio.to_thread`: at exit, ``asyncio.run`` waits for the default
    executor, so an association waiting out its ACSE timeout on a silent peer would
    hold up the stop for that long.  A cancelled caller stops waiting at once; the
    thread ends on its own (its result is dropped).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future

"""gateway.aio: a stop is never swallowed (3.11's wait_for could); a thread wakes a worker."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.aio import set_from_thread, wait_event


@pytest.mark.asyncio
async def test_a_cancel_in_the_same_iteration_as_the_wake_is_not_swallowed() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 5.0))
    await asyncio.sleep(0)  # the task now waits on the event
    event.set()
    task.cancel()  # same iteration: 3.11's wait_for returned normally here
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


@pytest.mark.asyncio
async def test_wakes_on_the_event_and_clears_it() -> None:
    event = asyncio.Event()
    task = asyncio.create_task(wait_event(event, 5.0))
    await asyncio.sleep(0)
    event.set()
    await asyncio.wait_for(task, 1.0)
    assert not event.is_set()


@pytest.mark.asyncio
async def test_returns_after_the_timeout_without_the_event() -> None:
    event = asyncio.Event()
    await asyncio.wait_for(wait_event(event, 0.01), 1.0)
    assert not event.is_set()


@pytest.mark.asyncio
async def test_a_thread_wakes_the_loop() -> None:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    thread = threading.Thread(target=set_from_thread, args=(loop, event))
    thread.start()
    await asyncio.wait_for(event.wait(), 5.0)
    thread.join()


def test_no_loop_or_a_closed_loop_is_not_an_error() -> None:
    event = asyncio.Event()
    set_from_thread(None, event)
    loop = asyncio.new_event_loop()
    loop.close()
    set_from_thread(loop, event)
    assert not event.is_set()

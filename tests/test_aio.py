"""gateway.aio: a stop is never swallowed (Python 3.11's wait_for could)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.aio import wait_event


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

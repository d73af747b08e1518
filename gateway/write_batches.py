"""The parts of a batching SQLite writer that the queue database (gateway/store.py) and
the fleet receiver's database (gateway/fleet/database.py) share.

Both have one writer thread fed by a queue of writes, each a function of the
connection with a future for its caller.  The writer takes every write waiting
(:func:`next_batch`), runs them inside one ``BEGIN IMMEDIATE`` transaction, each in a
savepoint of its own so that one failing write does not undo its neighbours
(:func:`run_each`), commits once, and only then tells each caller (:func:`resolve`).
What differs, durability and the files a queue write discards, stays with each.
"""

from __future__ import annotations

import queue
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol, TypeVar


class Write(Protocol):
    """A queued write: the function and its caller's future."""

    @property
    def fn(self) -> Callable[[sqlite3.Connection], Any]: ...

    @property
    def future(self) -> Future[Any]: ...


W = TypeVar("W", bound=Write)


def next_batch(writes: queue.SimpleQueue[W | None], limit: int) -> tuple[list[W], bool]:
    """Wait for a write, then take the others waiting, up to *limit* in all.  The
    second value is True once the stop mark (None) was taken: nothing comes after it."""
    first = writes.get()
    if first is None:
        return [], True
    batch = [first]
    while len(batch) < limit:
        try:
            more = writes.get_nowait()
        except queue.Empty:
            break
        if more is None:
            return batch, True
        batch.append(more)
    return batch, False


def started(batch: list[W]) -> list[W]:
    """The writes of *batch* still wanted: a future its caller cancelled while it
    waited is dropped; the others can no longer be cancelled."""
    return [w for w in batch if w.future.set_running_or_notify_cancel()]


def run_each(conn: sqlite3.Connection, batch: list[W]) -> list[tuple[Future[Any], bool, Any]]:
    """Inside the caller's transaction: each write in a savepoint of its own.  A write
    that raises is rolled back alone, and its exception becomes its result."""
    results: list[tuple[Future[Any], bool, Any]] = []
    for i, write in enumerate(batch):
        conn.execute(f"SAVEPOINT w{i}")
        try:
            value = write.fn(conn)
        except Exception as exc:  # handed to the caller through its future
            conn.execute(f"ROLLBACK TO w{i}")
            results.append((write.future, False, exc))
        else:
            results.append((write.future, True, value))
        conn.execute(f"RELEASE w{i}")
    return results


def resolve(fut: Future[Any], ok: bool, value: Any) -> None:
    """Give a write's caller its result (or exception); one already resolved, by an
    error path, is left alone."""
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except InvalidStateError:
        pass

"""The fleet receiver's SQLite file: WAL, one writer thread fed by a queue, readers on
their own connections, never on the event loop.

As in gateway/store.py, and with its parts (gateway/write_batches.py): the writer
takes every write waiting, runs them in one ``BEGIN IMMEDIATE`` transaction (a
savepoint each, so one failing write does not undo its neighbours) and commits once,
so a burst of heartbeats shares one commit.  Unlike
the queue database it commits with ``synchronous=NORMAL``: a box's last state is
replaced by its next heartbeat anyway, so a power cut may cost the last second of
them, never anything a box cannot send again.  Reads (the page, ``/metrics``) run in
worker threads, each with its own connection.

This module runs the statements; the table and every statement on it belong to
gateway/fleet/boxes.py.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .. import write_batches
from . import boxes

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], T]

_BATCH_MAX = 256
CLOSE_TIMEOUT_S = 10.0


class DatabaseClosed(Exception):
    """The database is closing and takes no more writes."""


class _Write(NamedTuple):
    fn: WriteFn[Any]
    future: Future[Any]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


class FleetDatabase:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"{self.path}: could not enable WAL (journal_mode={mode})")
        boxes.migrate(conn, self.path)
        self._thread = threading.Thread(
            target=self._writer, args=(conn,), name="fleet-db-writer", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish the writes already submitted, then stop the writer (bounded wait)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("fleet database writer still busy after %.1f s; not waited for", timeout)
                return
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # -- writes ---------------------------------------------------------------------
    def submit(self, fn: WriteFn[T]) -> Future[T]:
        fut: Future[T] = Future()
        with self._lock:
            if self._closing:
                raise DatabaseClosed("the fleet database is closing")
            self._queue.put(_Write(fn, fut))
        return fut

    async def run(self, fn: WriteFn[T]) -> T:
        """:meth:`submit` for the event loop; the write completes even if the caller
        is cancelled once the writer has started it."""
        return await asyncio.wrap_future(self.submit(fn))

    def _writer(self, conn: sqlite3.Connection) -> None:
        try:
            stop = False
            while not stop:
                batch, stop = write_batches.next_batch(self._queue, _BATCH_MAX)
                if batch:
                    try:
                        self._run_batch(conn, batch)
                    except Exception as exc:  # the writer outlives anything a batch does
                        log.exception("fleet database writer: batch of %d writes failed",
                                      len(batch))  # fmt: skip
                        for w in batch:
                            write_batches.resolve(w.future, False, exc)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        batch = write_batches.started(batch)
        if not batch:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = write_batches.run_each(conn, batch)
            conn.execute("COMMIT")
        except Exception as exc:
            log.error("fleet database commit failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for w in batch:
                write_batches.resolve(w.future, False, exc)
            return
        for fut, ok, value in results:
            write_batches.resolve(fut, ok, value)

    # -- reads (blocking: call from a worker thread) -------------------------------------
    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return fn(conn)

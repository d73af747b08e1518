"""The queue database: schema, migrations, its single writer, and its readers.

One thread owns the write connection and is fed by a queue; every caller gets a
:class:`concurrent.futures.Future` back (or awaits :meth:`Store.run` on the loop).  The
writer (with the parts in gateway/write_batches.py) takes everything waiting, runs it
inside one ``BEGIN IMMEDIATE`` transaction (a savepoint each, so one failing write
does not undo its neighbours) and commits once:
with ``synchronous=FULL`` that commit is the fsync that makes a queue row durable, and
concurrent C-STOREs share it (group commit).  Reads use a connection per thread.

Each table has one owning module, the only one that writes SQL against it; the others
call its functions, which the writer (or a reader) runs:

* ``instances`` (the upload queue): gateway/instances.py;
* ``mpps``, ``mpps_outbox``: gateway/mpps/outbox.py;
* ``worklist_items``, ``worklist_sources``, ``worklist_mpps``: gateway/worklist/cache.py;
* ``commitment_requests``, ``commitment_items``: gateway/commitment/requests.py.

This module holds the schema (the migrations) and runs the statements, but writes none.

Spool files are content-addressed, so two rows (or a row and a C-STORE that has renamed
its file but not yet committed) can share one path.  No caller unlinks a spool file
itself: a write names the files it stopped referencing
(:func:`gateway.instances.discard_files`), the writer checks at the end of the batch,
inside the transaction, that no row refers to them any more, and after the commit hands
the rest to the spool, which skips any path a C-STORE or the compress stage holds pinned
between its rename and its commit (:meth:`gateway.spool.Spool.commit_file`), in this
process or another one.  Each process has its own writer (the receivers,
gateway/dicom/receivers.py, and the rest), so rows can also change elsewhere between the check
and the unlink: the spool asks again, under the path's cross-process lock, whether a
committed row refers to it (:meth:`gateway.spool.Spool.remove_unpinned`).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlite_utils

from . import instances, write_batches
from .clock import utcnow
from .instances import ReceivedInstance
from .spool import ofd_lock

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], T]
#: Unlinks a spool file unless pinned or the callable says a row refers to it.
RemoveFile = Callable[[str, Callable[[], bool]], bool]

_BATCH_MAX = 256
#: How long :meth:`Store.close` waits for the writer by default: the last queued writes,
#: each bounded by SQLite's busy_timeout (30 s) for a lock another process holds.
CLOSE_TIMEOUT_S = 30.0


class _WriterTurn:
    """Whose turn it is to write, across the gateway's processes.

    The receiver processes and the gateway's own process each have a writer on the
    one database.  When two want SQLite's write lock at once, the loser's busy handler
    sleeps 1, 2, 5, 10 ... up to 100 ms between tries and is not woken when the lock
    is freed, so a C-STORE or N-ACTION answer waited tens of milliseconds behind a
    commit that took a few (tests/bench/commitment.py: N-ACTION p99 124 ms).  So each
    writer first takes an open-file-description lock on ``<database>-writers``, which
    the kernel hands over the moment it is released; SQLite's own lock is then free.
    Only a store's writer thread takes it, around one batch's transaction.
    """

    def __init__(self, database: Path) -> None:
        self._fd = os.open(f"{database}-writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def taken(self) -> Iterator[None]:
        # A blocking wait: the kernel hands the lock over the moment it is released.
        # Bounded, because every holder is: it holds the turn only for one batch,
        # whose statements are each bounded by SQLite's busy_timeout, and a holder
        # that dies releases it with its descriptor.
        ofd_lock(self._fd, fcntl.F_WRLCK, 0, wait=True)
        try:
            yield
        finally:
            ofd_lock(self._fd, fcntl.F_UNLCK, 0, wait=False)

    def close(self) -> None:
        os.close(self._fd)


class StoreClosed(Exception):
    """The store is shutting down and takes no more writes."""


def _connect(path: Path, create: bool = True) -> sqlite3.Connection:
    # Each connection is used by one thread only; False just lets close() run elsewhere.
    # Readers never create the file: with the spool (and the database in it) gone,
    # an empty database would appear in whatever directory is now at that path.
    target = str(path) if create else f"file:{urllib.parse.quote(str(path))}?mode=rw"
    conn = sqlite3.connect(
        target, isolation_level=None, timeout=30, check_same_thread=False, uri=not create
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _migration_1(db: sqlite_utils.Database) -> None:
    db["instances"].create(  # type: ignore[union-attr]
        {
            "sop_instance_uid": str,
            "sop_class_uid": str,
            "study_instance_uid": str,
            "series_instance_uid": str,
            "calling_ae": str,
            "peer_address": str,
            "transfer_syntax": str,
            "size": int,
            "sha256": str,
            "path": str,
            "received_at": str,
            "state": str,
            "attempts": int,
            "next_attempt_at": str,
            "last_error": str,
            "updated_at": str,
        },
        pk="sop_instance_uid",
        not_null={
            "sop_class_uid",
            "study_instance_uid",
            "series_instance_uid",
            "size",
            "sha256",
            "received_at",
            "state",
            "attempts",
            "updated_at",
        },
        defaults={"attempts": 0},
    )
    db["instances"].create_index(["state", "next_attempt_at"])  # type: ignore[union-attr]
    db["instances"].create_index(["study_instance_uid"])  # type: ignore[union-attr]


def _migration_2(db: sqlite_utils.Database) -> None:
    # What the upload stage sends (the J2K file, or the original), and its outcome.
    table = db["instances"]
    table.add_column("upload_path", str)  # type: ignore[union-attr]
    table.add_column("upload_size", int)  # type: ignore[union-attr]
    table.add_column("upload_transfer_syntax", str)  # type: ignore[union-attr]
    table.add_column("transcode_outcome", str)  # type: ignore[union-attr]
    table.add_column("transcode_reason", str)  # type: ignore[union-attr]
    table.add_column("uploaded_at", str)  # type: ignore[union-attr]
    table.create_index(["state", "uploaded_at"])  # type: ignore[union-attr]


def _migration_3(db: sqlite_utils.Database) -> None:
    # The worklist cache: one row per item and source, the item kept as DICOM JSON.
    db["worklist_items"].create(  # type: ignore[union-attr]
        {"item_id": str, "source": str, "scheduled_date": str, "dataset": str,
         "last_seen_at": str},
        pk="item_id",
        not_null={"source", "scheduled_date", "dataset", "last_seen_at"},
    )  # fmt: skip
    db["worklist_items"].create_index(["scheduled_date"])  # type: ignore[union-attr]
    db["worklist_items"].create_index(["source"])  # type: ignore[union-attr]
    db["worklist_sources"].create(  # type: ignore[union-attr]
        {"source": str, "last_attempt_at": str, "last_success_at": str, "last_error": str,
         "item_count": int},
        pk="source",
    )  # fmt: skip


def _migration_4(db: sqlite_utils.Database) -> None:
    # MPPS (gateway/mpps/).
    # mpps: each Performed Procedure Step as it stands now (the N-CREATE with every
    # accepted N-SET merged in), to validate the next N-SET against.
    db.execute(
        "CREATE TABLE mpps (sop_instance_uid TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " dataset BLOB NOT NULL, calling_ae TEXT, created_at TEXT NOT NULL,"
        " updated_at TEXT NOT NULL)"
    )
    # mpps_outbox: every accepted N-CREATE / N-SET, forwarded upstream in seq order.
    # AUTOINCREMENT: seq is the delivery order and must never be reused.
    db.execute(
        "CREATE TABLE mpps_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " sop_instance_uid TEXT NOT NULL, kind TEXT NOT NULL, dataset BLOB NOT NULL,"
        " final INTEGER NOT NULL DEFAULT 0, received_at TEXT NOT NULL, state TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT, last_error TEXT,"
        " maybe_delivered INTEGER NOT NULL DEFAULT 0, sent_at TEXT, updated_at TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX mpps_outbox_state ON mpps_outbox (state, seq)")
    db.execute("CREATE INDEX mpps_outbox_instance ON mpps_outbox (sop_instance_uid, seq)")
    # The MPPS status of worklist items, keyed by the item's identity (worklist_items
    # .item_id) in a table of its own, so a refresh that replaces the items keeps it.
    db.execute(
        "CREATE TABLE worklist_mpps (item_id TEXT PRIMARY KEY, mpps_instance_uid TEXT NOT NULL,"
        " mpps_status TEXT NOT NULL, updated_at TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX worklist_mpps_instance ON worklist_mpps (mpps_instance_uid)")


def _migration_5(db: sqlite_utils.Database) -> None:
    # Status page and /metrics on a large queue (issue 5).
    # Oldest pending per state; per-minute received / uploaded counts and bytes over
    # the last hour without touching the table (covering); calling AE last seen.
    db.execute("CREATE INDEX idx_instances_state_received ON instances (state, received_at)")
    db.execute("CREATE INDEX idx_instances_received_size ON instances (received_at, size)")
    db.execute("CREATE INDEX idx_instances_uploaded_size ON instances (uploaded_at, upload_size)")
    db.execute("CREATE INDEX idx_instances_ae_received ON instances (calling_ae, received_at)")
    # Instances waiting for a retry after a failed upload, soonest first.
    db.execute(
        "CREATE INDEX idx_instances_retrying ON instances (next_attempt_at)"
        " WHERE state = 'compressed' AND last_error IS NOT NULL"
    )
    # Bytes still on disk: with retention off only the not-yet-uploaded rows are in it.
    db.execute(
        "CREATE INDEX idx_instances_on_disk ON instances (path, upload_path, size, upload_size)"
        " WHERE path IS NOT NULL"
    )


def _migration_6(db: sqlite_utils.Database) -> None:
    # Columns for the worklist's SQL prefilter: a value only when the item has exactly
    # that one value (one step, one value); NULL means "cannot narrow, always pass", so
    # rows from before this migration still answer correctly.
    table = db["worklist_items"]
    for column in ("step_date", "modality", "station_ae", "patient_id", "accession"):
        table.add_column(column, str)  # type: ignore[union-attr]
    table.create_index(["step_date", "modality"])  # type: ignore[union-attr]
    table.create_index(["patient_id"])  # type: ignore[union-attr]
    table.create_index(["accession"])  # type: ignore[union-attr]


def _migration_7(db: sqlite_utils.Database) -> None:
    # When the current run of failed upload attempts began (NULL: none failed since
    # the instance was received, uploaded or retried by an operator), for
    # upload.give_up_after_hours (issue 12).
    db["instances"].add_column("failing_since", str)  # type: ignore[union-attr]


def _migration_8(db: sqlite_utils.Database) -> None:
    # The writer checks that no row refers to a file before it goes (discard_files):
    # path is covered by idx_instances_on_disk, upload_path needs its own index.
    db.execute(
        "CREATE INDEX idx_instances_upload_path ON instances (upload_path)"
        " WHERE upload_path IS NOT NULL"
    )


def _migration_9(db: sqlite_utils.Database) -> None:
    # Archive profiles (issue 14).  warnings: what the archive said about an instance
    # it stored (a JSON list of texts, NULL: nothing), shown in `queue ls` and on the
    # page, the newest first.  sends: how many STOW-RS requests carried this UID, kept
    # across a re-receive: a re-send to an archive that may keep a conflicting copy
    # silently is verified (gateway/pipeline/archives.py, verify_resends).
    table = db["instances"]
    table.add_column("warnings", str)  # type: ignore[union-attr]
    table.add_column("sends", int, not_null_default=0)  # type: ignore[union-attr]
    db.execute(
        "CREATE INDEX idx_instances_warned ON instances (uploaded_at) WHERE warnings IS NOT NULL"
    )


def _migration_10(db: sqlite_utils.Database) -> None:
    # Storage Commitment (issue 17, gateway/commitment/).  commitment_requests: one row
    # per N-ACTION (its Transaction UID), from the SCP's durable write to the report the
    # modality acknowledged.  commitment_items: the SOP instances it names, in order,
    # each with its decision once made (outcome NULL: not yet).
    db.execute(
        "CREATE TABLE commitment_requests (transaction_uid TEXT PRIMARY KEY,"
        " requesting_ae TEXT NOT NULL, peer_address TEXT NOT NULL, received_at TEXT NOT NULL,"
        " deadline_at TEXT NOT NULL, state TEXT NOT NULL, item_count INTEGER NOT NULL,"
        " event_type INTEGER, decided_at TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at TEXT, last_error TEXT, maybe_reported INTEGER NOT NULL DEFAULT 0,"
        " reported_at TEXT, updated_at TEXT NOT NULL)"
    )
    db.execute(
        "CREATE INDEX commitment_requests_state ON commitment_requests (state, next_attempt_at)"
    )
    db.execute(
        "CREATE TABLE commitment_items (transaction_uid TEXT NOT NULL"
        " REFERENCES commitment_requests (transaction_uid) ON DELETE CASCADE,"
        " position INTEGER NOT NULL, sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,"
        " outcome TEXT, failure_reason INTEGER, detail TEXT, study_instance_uid TEXT,"
        " decided_at TEXT, PRIMARY KEY (transaction_uid, position))"
    )
    db.execute("CREATE INDEX commitment_items_instance ON commitment_items (sop_instance_uid)")
    db.execute(
        "CREATE INDEX commitment_items_study ON commitment_items (study_instance_uid)"
        " WHERE study_instance_uid IS NOT NULL"
    )
    db.execute(
        "CREATE INDEX commitment_items_undecided ON commitment_items (transaction_uid)"
        " WHERE outcome IS NULL"
    )


def _migration_11(db: sqlite_utils.Database) -> None:
    # The stages of an instance, for the per-study proof of delivery and for Storage
    # Commitment (issue 17).  compressed_at: when the compress stage finished with the
    # copy held now; confirmed_at: when the archive confirmed that copy (its STOW-RS
    # success, or with commitment.verify = "qido" a QIDO-RS search after it).  Both
    # are cleared when the instance is received again.  Rows from before: an uploaded
    # row counts as confirmed when it was uploaded.
    table = db["instances"]
    table.add_column("compressed_at", str)  # type: ignore[union-attr]
    table.add_column("confirmed_at", str)  # type: ignore[union-attr]
    instances.backfill_stage_times(db.conn)
    # What a QIDO-RS confirmation still has to look for, by study.
    db.execute(
        "CREATE INDEX idx_instances_unconfirmed ON instances (study_instance_uid)"
        " WHERE state = 'uploaded' AND confirmed_at IS NULL"
    )


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
    _migration_11,
]


class _Write(NamedTuple):
    fn: WriteFn[Any]
    future: Future[Any]
    durable: bool


class Store:
    def __init__(self, path: Path, remove_file: RemoveFile | None = None) -> None:
        """*remove_file* unlinks a spool file no row refers to any more (the spool's
        :meth:`~gateway.spool.Spool.remove_unpinned`); without it such files stay."""
        self.path = path
        self.remove_file = remove_file
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._synchronous = "FULL"

    # -- lifecycle ------------------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"{self.path}: could not enable WAL (journal_mode={mode})")
        self._migrate(conn)
        instances.create_discard_table(conn)
        # The writers' turn, across processes (see :class:`_WriterTurn`): the writer's.
        turn = _WriterTurn(self.path)
        self._thread = threading.Thread(
            target=self._writer, args=(conn, turn), name="store-writer", daemon=True
        )
        self._thread.start()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this gateway "
                f"understands ({len(MIGRATIONS)}); refusing to touch it"
            )
        db = sqlite_utils.Database(conn)
        for number, migrate in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrate(db)
                conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("database %s migrated to schema version %d", self.path, number)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Finish every write already submitted, then stop the writer.

        Called last at stop, once every caller is gone.  *timeout* (None:
        :data:`CLOSE_TIMEOUT_S`) bounds the wait, never unbounded: a write can wait
        SQLite's busy_timeout for a lock held by another process.  Past it, the writer
        is left to finish on its own (a daemon thread) and an error says so.
        """
        if timeout is None:
            timeout = CLOSE_TIMEOUT_S
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("queue database writer still busy after %.1f s; not waited for",
                          timeout)  # fmt: skip
                return
        for conn in self._readers:
            conn.close()
        self._readers.clear()

    # -- writes ---------------------------------------------------------------------
    def submit(
        self, fn: WriteFn[T], durable: bool = True, *, when_done: Callable[[], None] | None = None
    ) -> Future[T]:
        """Run *fn* in the writer's next transaction.

        ``durable=False`` is for queue transitions that are safe to lose and redo (a
        claim, a compression or upload outcome): they commit without waiting for the
        disk, and become durable with the next durable commit, which fsyncs the WAL
        and everything before it.  Whatever acknowledges or deletes data is durable.

        *when_done* runs exactly once: when the write is resolved (in the writer, before
        it removes any file the batch discarded), cancelled, or refused here.  The
        caller unpins its spool file with it (gateway/spool.py).
        """
        fut: Future[T] = Future()
        if when_done is not None:
            fut.add_done_callback(lambda _: when_done())
        with self._lock:
            if self._closing:
                fut.cancel()
                raise StoreClosed("the queue database is closing")
            self._queue.put(_Write(fn, fut, durable))
        return fut

    async def run(
        self,
        fn: WriteFn[T],
        durable: bool = True,
        *,
        when_done: Callable[[], None] | None = None,
        shield: bool = False,
    ) -> T:
        """:meth:`submit` for the event loop.

        Cancelling the caller skips the write if the writer has not started it; once
        started, it completes regardless.  With *shield*, cancelling the caller leaves
        the write's own future alone: the write runs (and *when_done* with it) whether
        or not anyone still waits for it.
        """
        future = asyncio.wrap_future(self.submit(fn, durable, when_done=when_done))
        return await (asyncio.shield(future) if shield else future)

    def record_instance(
        self, inst: ReceivedInstance, when_done: Callable[[], None] | None = None
    ) -> Future[list[str]]:
        """Insert or replace the queue row of a C-STORE; the future gives the replaced
        files' paths (removed by the writer once nothing refers to them: see
        :func:`gateway.instances.discard_files`)."""
        return self.submit(instances.record_received(inst, utcnow()), when_done=when_done)

    def _writer(self, conn: sqlite3.Connection, turn: _WriterTurn) -> None:
        try:
            stop = False
            while not stop:
                batch, stop = write_batches.next_batch(self._queue, _BATCH_MAX)
                if batch:
                    try:
                        self._run_batch(conn, turn, batch)
                    except Exception:  # the writer must outlive anything a batch does
                        log.exception("queue database writer: batch of %d writes failed",
                                      len(batch))  # fmt: skip
                        for w in batch:
                            write_batches.resolve(
                                w.future, False, RuntimeError("queue database writer error")
                            )
        finally:
            conn.close()
            turn.close()

    def _run_batch(self, conn: sqlite3.Connection, turn: _WriterTurn, batch: list[_Write]) -> None:
        batch = write_batches.started(batch)
        if not batch:
            return
        synchronous = "FULL" if any(w.durable for w in batch) else "NORMAL"
        try:
            if synchronous != self._synchronous:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                self._synchronous = synchronous
            with turn.taken():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    results = write_batches.run_each(conn, batch)
                    # Decided inside the transaction: no row refers to these any more.
                    doomed = instances.unreferenced_discards(conn)
                    conn.execute("COMMIT")
                except Exception:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")  # the temp table's discards with the rest
                    raise
        except Exception as exc:
            log.error("queue database commit failed: %s", exc)
            for w in batch:
                write_batches.resolve(w.future, False, exc)
            return
        # Results first: their done-callbacks unpin the files of the rows just committed.
        for fut, ok, value in results:
            write_batches.resolve(fut, ok, value)
        if doomed and synchronous != "FULL":
            # A file goes only once the state without it is on disk (SQLite refuses a
            # change of synchronous inside a transaction, hence the fsync here).
            try:
                self._fsync_wal()
            except OSError as exc:
                log.error("could not fsync the queue database's WAL: %s", exc)
                return  # the files stay; the reconciler removes them at the next start
        for relpath in doomed:
            self._remove(conn, relpath)

    def _fsync_wal(self) -> None:
        fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _remove(self, conn: sqlite3.Connection, relpath: str) -> None:
        if self.remove_file is None:
            return
        try:
            # Outside the transaction now: the query sees every process's commits.
            if not self.remove_file(relpath, lambda: instances.is_referenced(conn, relpath)):
                log.info("spool file %s kept: a C-STORE in progress has it", relpath)
        except OSError as exc:
            # Left behind as an orphan: the reconciler removes it at the next start.
            log.error("could not remove spool file %s: %s", relpath, exc)

    # -- reads ----------------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, create=False)
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        yield conn

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run *fn* (a read function of a table's owner) on this thread's reader
        connection (blocking: SQLite)."""
        with self.reader() as conn:
            return fn(conn)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self.reader() as conn:
            return conn.execute(sql, params).fetchall()

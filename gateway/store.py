"""SQLite queue: schema, migrations and its single writer.

One thread owns the write connection and is fed by a queue; every caller gets a
:class:`concurrent.futures.Future` back.  The writer takes everything waiting, runs it
inside one ``BEGIN IMMEDIATE`` transaction (a savepoint each, so one failing write does
not undo its neighbours) and commits once: with ``synchronous=FULL`` that commit is the
fsync that makes a queue row durable, and concurrent C-STOREs share it (group commit).
Reads use a connection per thread.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlite_utils

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], T]

# Queue states.  RECEIVED is where the receiver leaves a row; the transient states
# are leases that a crash can leave behind, and the reconciler hands them back.
RECEIVED = "received"
COMPRESSING = "compressing"
COMPRESSED = "compressed"
UPLOADING = "uploading"
UPLOADED = "uploaded"
FAILED = "failed"
STATES = (RECEIVED, COMPRESSING, COMPRESSED, UPLOADING, UPLOADED, FAILED)
TRANSIENT_STATES = {COMPRESSING: RECEIVED, UPLOADING: COMPRESSED}

_BATCH_MAX = 256


class StoreClosed(Exception):
    """The store is shutting down and takes no more writes."""


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class ReceivedInstance:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    peer_address: str
    transfer_syntax: str
    size: int
    sha256: str
    path: str


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
    # MPPS (gateway/mpps.py).
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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
]


def _record_instance(inst: ReceivedInstance, now: str) -> WriteFn[list[str]]:
    def write(conn: sqlite3.Connection) -> list[str]:
        row = conn.execute(
            "SELECT path, upload_path FROM instances WHERE sop_instance_uid = ?",
            (inst.sop_instance_uid,),
        ).fetchone()
        conn.execute(
            """
            INSERT INTO instances (
                sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,
                calling_ae, peer_address, transfer_syntax, size, sha256, path,
                received_at, state, attempts, next_attempt_at, last_error, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, NULL, ?)
            ON CONFLICT (sop_instance_uid) DO UPDATE SET
                sop_class_uid = excluded.sop_class_uid,
                study_instance_uid = excluded.study_instance_uid,
                series_instance_uid = excluded.series_instance_uid,
                calling_ae = excluded.calling_ae,
                peer_address = excluded.peer_address,
                transfer_syntax = excluded.transfer_syntax,
                size = excluded.size,
                sha256 = excluded.sha256,
                path = excluded.path,
                received_at = excluded.received_at,
                state = excluded.state,
                attempts = 0,
                next_attempt_at = excluded.next_attempt_at,
                last_error = NULL,
                upload_path = NULL,
                upload_size = NULL,
                upload_transfer_syntax = NULL,
                transcode_outcome = NULL,
                transcode_reason = NULL,
                uploaded_at = NULL,
                updated_at = excluded.updated_at
            """,
            (
                inst.sop_instance_uid,
                inst.sop_class_uid,
                inst.study_instance_uid,
                inst.series_instance_uid,
                inst.calling_ae,
                inst.peer_address,
                inst.transfer_syntax,
                inst.size,
                inst.sha256,
                inst.path,
                now,
                RECEIVED,
                now,
                now,
            ),
        )
        if row is None:
            return []
        return [p for p in {row["path"], row["upload_path"]} if p and p != inst.path]

    return write


class _Write(NamedTuple):
    fn: WriteFn[Any]
    future: Future[Any]
    durable: bool


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
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
        self._thread = threading.Thread(
            target=self._writer, args=(conn,), name="store-writer", daemon=True
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

    def close(self) -> None:
        """Finish every write already submitted, then stop the writer."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        for conn in self._readers:
            conn.close()
        self._readers.clear()

    # -- writes ---------------------------------------------------------------------
    def submit(self, fn: WriteFn[T], durable: bool = True) -> Future[T]:
        """Run *fn* in the writer's next transaction.

        ``durable=False`` is for queue transitions that are safe to lose and redo (a
        claim, a compression or upload outcome): they commit without waiting for the
        disk, and become durable with the next durable commit, which fsyncs the WAL
        and everything before it.  Whatever acknowledges or deletes data is durable.
        """
        fut: Future[T] = Future()
        with self._lock:
            if self._closing:
                raise StoreClosed("the queue database is closing")
            self._queue.put(_Write(fn, fut, durable))
        return fut

    def record_instance(self, inst: ReceivedInstance) -> Future[list[str]]:
        """Insert or replace the queue row; the future gives the replaced files' paths."""
        return self.submit(_record_instance(inst, utcnow()))

    def _writer(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                item = self._queue.get()
                batch = []
                stop = item is None
                if item is not None:
                    batch.append(item)
                while not stop and len(batch) < _BATCH_MAX:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                    else:
                        batch.append(more)
                if batch:
                    self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Write]) -> None:
        results: list[tuple[Future[Any], bool, Any]] = []
        synchronous = "FULL" if any(w.durable for w in batch) else "NORMAL"
        try:
            if synchronous != self._synchronous:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                self._synchronous = synchronous
            conn.execute("BEGIN IMMEDIATE")
            for i, (fn, fut, _) in enumerate(batch):
                conn.execute(f"SAVEPOINT w{i}")
                try:
                    value = fn(conn)
                except Exception as exc:  # handed to the caller through its future
                    conn.execute(f"ROLLBACK TO w{i}")
                    results.append((fut, False, exc))
                else:
                    results.append((fut, True, value))
                conn.execute(f"RELEASE w{i}")
            conn.execute("COMMIT")
        except Exception as exc:
            log.error("queue database commit failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, fut, _ in batch:
                fut.set_exception(exc)
            return
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

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

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self.reader() as conn:
            return conn.execute(sql, params).fetchall()

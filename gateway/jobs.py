"""The queue state machine that moves acknowledged instances to the archive.

    received --compress--> compressing --> compressed --upload--> uploading --> uploaded
                                               ^                      |
                                               +--- retry (backoff) --+--> failed

Every transition is a write through the store's single writer.  A stage claims rows by
moving them into its transient state; a crash leaves them there and the start-up
reconciler hands them back.  Completions are guarded by the row's sha256 and state,
so an instance re-received while it was being processed is not marked with the
outcome of its older copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import random
import signal
import sqlite3
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .config import Config
from .spool import Spool
from .store import (
    COMPRESSED,
    COMPRESSING,
    FAILED,
    RECEIVED,
    UPLOADED,
    UPLOADING,
    Store,
    utcnow,
)
from .transcode import TranscodeResult, transcode
from .upload import InstanceOutcome, Item, RequestFailed, StowClient

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long an idle stage sleeps before looking at the queue again (an operator's
#: ``queue retry`` from another process is picked up within this).
_IDLE_POLL_S = 5.0
_RETENTION_INTERVAL_S = 60.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Claimed:
    sop_instance_uid: str
    study_instance_uid: str
    sha256: str
    path: str
    upload_path: str
    transfer_syntax: str
    size: int
    attempts: int


def _die_with_parent() -> None:
    """Process-pool initializer: a worker whose gateway was SIGKILLed exits too,
    instead of living on and writing into a spool the next start already reconciled."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    # spawn, not fork: the gateway has many threads (pynetdicom, SQLite writer).
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_die_with_parent,
    )


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter: attempt n waits between half and all of
    ``min(maximum, initial * 2**(n-1))``, so boxes that lost the archive together do
    not all come back at the same second."""
    ceiling = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _at(seconds_from_now: float) -> str:
    when = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return when.isoformat(timespec="microseconds")


# -- database transitions (run in the store's writer thread) ---------------------------


def _claim_for_compression(limit: int) -> Callable[[sqlite3.Connection], list[Claimed]]:
    def write(conn: sqlite3.Connection) -> list[Claimed]:
        rows = conn.execute(
            """
            UPDATE instances SET state = ?, updated_at = ?
            WHERE sop_instance_uid IN (
                SELECT sop_instance_uid FROM instances WHERE state = ?
                ORDER BY received_at LIMIT ?)
            RETURNING sop_instance_uid, study_instance_uid, sha256, path, upload_path,
                      transfer_syntax, size, attempts
            """,
            (COMPRESSING, utcnow(), RECEIVED, limit),
        ).fetchall()
        return [Claimed(**{**dict(r), "upload_path": r["upload_path"] or ""}) for r in rows]

    return write


def _mark_compressed(
    claimed: Claimed, upload_path: str, upload_size: int, result: TranscodeResult
) -> Callable[[sqlite3.Connection], bool]:
    def write(conn: sqlite3.Connection) -> bool:
        now = utcnow()
        cur = conn.execute(
            """
            UPDATE instances SET state = ?, upload_path = ?, upload_size = ?,
                upload_transfer_syntax = ?, transcode_outcome = ?, transcode_reason = ?,
                next_attempt_at = ?, updated_at = ?
            WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?
            """,
            (
                COMPRESSED, upload_path, upload_size, result.transfer_syntax, result.outcome,
                result.reason or None, now, now,
                claimed.sop_instance_uid, claimed.sha256, COMPRESSING,
            ),
        )  # fmt: skip
        return cur.rowcount == 1

    return write


def _claim_upload_batch(
    max_instances: int, max_bytes: int
) -> Callable[[sqlite3.Connection], list[Claimed]]:
    def write(conn: sqlite3.Connection) -> list[Claimed]:
        now = utcnow()
        first = conn.execute(
            "SELECT study_instance_uid FROM instances WHERE state = ? AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at, received_at LIMIT 1",
            (COMPRESSED, now),
        ).fetchone()
        if first is None:
            return []
        rows = conn.execute(
            """
            SELECT sop_instance_uid, study_instance_uid, sha256, path, upload_path,
                   transfer_syntax, upload_size AS size, attempts
            FROM instances
            WHERE state = ? AND study_instance_uid = ? AND next_attempt_at <= ?
            ORDER BY received_at LIMIT ?
            """,
            (COMPRESSED, first["study_instance_uid"], now, max_instances),
        ).fetchall()
        batch: list[Claimed] = []
        total = 0
        for r in rows:
            if batch and total + r["size"] > max_bytes:
                break
            total += r["size"]
            batch.append(Claimed(**dict(r)))
        conn.executemany(
            "UPDATE instances SET state = ?, updated_at = ? WHERE sop_instance_uid = ?",
            [(UPLOADING, now, c.sop_instance_uid) for c in batch],
        )
        return batch

    return write


def _next_due(conn: sqlite3.Connection) -> str | None:
    row = conn.execute(
        "SELECT min(next_attempt_at) AS due FROM instances WHERE state = ?", (COMPRESSED,)
    ).fetchone()
    return row["due"] if row else None


def _finish_uploads(
    results: list[tuple[Claimed, InstanceOutcome]], backoff: Callable[[int], float]
) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        now = utcnow()
        for claimed, outcome in results:
            guard = (claimed.sop_instance_uid, claimed.sha256, UPLOADING)
            if outcome.stored:
                conn.execute(
                    "UPDATE instances SET state = ?, uploaded_at = ?, attempts = attempts + 1,"
                    " last_error = NULL, updated_at = ?"
                    " WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
                    (UPLOADED, now, now, *guard),
                )
            elif outcome.retryable:
                conn.execute(
                    "UPDATE instances SET state = ?, attempts = attempts + 1, last_error = ?,"
                    " next_attempt_at = ?, updated_at = ?"
                    " WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
                    (COMPRESSED, outcome.reason, _at(backoff(claimed.attempts + 1)), now, *guard),
                )
            else:
                conn.execute(
                    "UPDATE instances SET state = ?, attempts = attempts + 1, last_error = ?,"
                    " updated_at = ? WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
                    (FAILED, outcome.reason, now, *guard),
                )

    return write


def retry_failed(conn: sqlite3.Connection, sop_instance_uids: list[str] | None) -> int:
    """Operator action: send failed instances again (all of them when *uids* is None)."""
    now = utcnow()
    sql = (
        "UPDATE instances SET state = CASE WHEN upload_path IS NULL THEN ? ELSE ? END,"
        " attempts = 0, last_error = NULL, next_attempt_at = ?, updated_at = ?"
        " WHERE state = ?"
    )
    params: list[Any] = [RECEIVED, COMPRESSED, now, now, FAILED]
    if sop_instance_uids is not None:
        sql += f" AND sop_instance_uid IN ({','.join('?' * len(sop_instance_uids))})"
        params += sop_instance_uids
    return conn.execute(sql, params).rowcount


def _prune(keep_bytes: int, keep_hours: float) -> Callable[[sqlite3.Connection], list[str]]:
    """Uploaded instances beyond the local cache (newest kept first) lose their files."""

    def write(conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            "SELECT sop_instance_uid, path, upload_path, size, upload_size, uploaded_at"
            " FROM instances WHERE state = ? AND (path IS NOT NULL OR upload_path IS NOT NULL)"
            " ORDER BY uploaded_at DESC",
            (UPLOADED,),
        ).fetchall()
        oldest_kept = _at(-keep_hours * 3600) if keep_hours else ""
        total = 0
        doomed: list[str] = []
        files: list[str] = []
        for r in rows:
            total += (r["size"] or 0) + (
                r["upload_size"] or 0 if r["upload_path"] not in (None, r["path"]) else 0
            )
            if total <= keep_bytes and r["uploaded_at"] >= oldest_kept:
                continue
            doomed.append(r["sop_instance_uid"])
            files += [p for p in {r["path"], r["upload_path"]} if p]
        conn.executemany(
            "UPDATE instances SET path = NULL, upload_path = NULL WHERE sop_instance_uid = ?",
            [(uid,) for uid in doomed],
        )
        return files

    return write


class Pipeline:
    """Compress and upload stages, fed by the receiver through :meth:`wake`."""

    def __init__(
        self, config: Config, spool: Spool, store: Store, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.spool = spool
        self.store = store
        self.metrics = metrics
        self.paused = False
        self.last_upload_ok_at: str | None = None
        self.last_upload_error: str | None = None
        self.last_upload_error_at: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._compress_wake = asyncio.Event()
        self._upload_wake = asyncio.Event()
        self._prune_wake = asyncio.Event()
        self._pool: ProcessPoolExecutor | None = None

    # -- wiring -------------------------------------------------------------------------
    def wake(self) -> None:
        """Thread-safe: new work arrived (called from the receiver's threads)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing: the next start sees it
                loop.call_soon_threadsafe(self._compress_wake.set)

    def pause(self) -> None:
        """Operator action: send nothing new (requests in flight finish)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self._upload_wake.set()

    def kick(self) -> None:
        """On the loop: rows were handed back to the queue (an operator's retry)."""
        self._compress_wake.set()
        self._upload_wake.set()

    async def _db(self, fn: Callable[[sqlite3.Connection], T], durable: bool = False) -> T:
        # Pipeline transitions are redone if lost (see Store.submit); deletions are not.
        return await asyncio.wrap_future(self.store.submit(fn, durable=durable))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        c = self.config.upload
        if c.compression != "none":
            self._pool = _new_pool(c.compress_workers)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._compress_loop(), name="compress")
                tg.create_task(self._retention_loop(), name="retention")
                if c.dicomweb_url:
                    tg.create_task(self._upload_loop(), name="upload")
                else:
                    log.warning("upload.dicomweb_url is not set: instances stay in the spool")
        finally:
            self._shutdown_pool()

    def _shutdown_pool(self) -> None:
        if self._pool is None:
            return
        # A J2K encode of a large instance can take many seconds; it is redone after
        # restart, so the workers are stopped rather than waited for.
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for proc in processes:
            proc.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    # -- compress -----------------------------------------------------------------------
    async def _compress_loop(self) -> None:
        workers = self.config.upload.compress_workers
        while True:
            if self.spool.problem is not None:
                # The spool is gone or replaced (Spool.check): nothing to read or write.
                await _wait(self._compress_wake, _IDLE_POLL_S)
                continue
            claimed = await self._db(_claim_for_compression(workers * 2))
            if not claimed:
                await _wait(self._compress_wake, _IDLE_POLL_S)
                continue
            await asyncio.gather(*(self._compress_one(c) for c in claimed))
            self._upload_wake.set()

    async def _compress_one(self, claimed: Claimed) -> None:
        src = self.spool.path_of(claimed.path)
        dst = self.spool.tmp_dir / f"j2k-{uuid.uuid4().hex}.dcm"
        if self._pool is None:
            result = TranscodeResult(
                "passthrough", "compression is off", claimed.transfer_syntax,
                claimed.size, claimed.size, 0.0,
            )  # fmt: skip
        else:
            result = await self._transcode(src, dst, claimed)
        upload_path, upload_size = claimed.path, claimed.size
        if result.outcome == "compressed":
            try:
                spooled = await asyncio.to_thread(self.spool.commit_file, dst)
            except OSError as exc:  # e.g. the spool vanished meanwhile (Spool.check)
                log.error("sop=%s: keeping its J2K copy failed: %s", claimed.sop_instance_uid, exc)
                # The encoder wrote by path: if another directory is there now, this
                # takes back the one file it put into it.
                with contextlib.suppress(OSError):
                    dst.unlink()
                result = TranscodeResult(
                    "fallback", f"spool error: {exc}", claimed.transfer_syntax,
                    claimed.size, claimed.size, 0.0,
                )  # fmt: skip
            else:
                upload_path, upload_size = spooled.relpath, spooled.size
                if self.metrics is not None and spooled.size:
                    self.metrics.compression_ratio.observe(claimed.size / spooled.size)
        elif result.outcome == "fallback":
            log.warning("sop=%s sent uncompressed: %s", claimed.sop_instance_uid, result.reason)
        marked = await self._db(_mark_compressed(claimed, upload_path, upload_size, result))
        if not marked and upload_path != claimed.path:
            # Re-received while we worked: this output belongs to the old copy.
            self.spool.remove(upload_path)

    async def _transcode(self, src: Path, dst: Path, claimed: Claimed) -> TranscodeResult:
        assert self._pool is not None and self._loop is not None
        try:
            return await self._loop.run_in_executor(self._pool, transcode, src, dst)
        except BrokenProcessPool:
            # The encoder took its process down: rebuild the pool, send the original.
            log.error("J2K encoder process died on sop=%s", claimed.sop_instance_uid)
            self._shutdown_pool()
            self._pool = _new_pool(self.config.upload.compress_workers)
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            return TranscodeResult(
                "fallback", "encoder process crashed", claimed.transfer_syntax,
                claimed.size, claimed.size, 0.0,
            )  # fmt: skip
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            # Caught after BrokenProcessPool, itself a RuntimeError.  transcode() turns
            # bad data into a fallback itself, so this is a bug in it: logged in full,
            # and the instance goes up as received instead of taking the pipeline
            # down (and, after the restart, down again).
            log.exception("transcode of sop=%s raised", claimed.sop_instance_uid)
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            return TranscodeResult(
                "fallback", f"transcode error: {exc!r}", claimed.transfer_syntax,
                claimed.size, claimed.size, 0.0,
            )  # fmt: skip

    # -- upload -------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        c = self.config.upload
        return backoff_seconds(attempts, c.backoff_initial_seconds, c.backoff_max_seconds)

    async def _upload_loop(self) -> None:
        c = self.config.upload
        slots = asyncio.Semaphore(c.concurrent_requests)
        async with StowClient(c, self.metrics) as client, asyncio.TaskGroup() as tg:
            while True:
                if self.paused:
                    await _wait(self._upload_wake, _IDLE_POLL_S)
                    continue
                await slots.acquire()
                batch = await self._db(
                    _claim_upload_batch(c.batch_max_instances, c.batch_max_bytes)
                )
                if not batch:
                    slots.release()
                    await _wait(self._upload_wake, await self._idle_time())
                    continue
                tg.create_task(self._upload_batch(client, batch, slots))

    async def _idle_time(self) -> float:
        due = await asyncio.to_thread(self._read, _next_due)
        if due is None:
            return _IDLE_POLL_S
        wait = (datetime.fromisoformat(due) - datetime.now(UTC)).total_seconds()
        return min(_IDLE_POLL_S, max(0.05, wait))

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self.store.reader() as conn:
            return fn(conn)

    async def _upload_batch(
        self, client: StowClient, batch: list[Claimed], slots: asyncio.Semaphore
    ) -> None:
        try:
            items = [Item(c.sop_instance_uid, self.spool.path_of(c.upload_path)) for c in batch]
            try:
                outcomes = await client.store(items)
            except (RequestFailed, OSError) as exc:
                reason = str(exc)
                log.error("upload of %d instances failed: %s", len(batch), reason)
                self.last_upload_error = reason
                self.last_upload_error_at = utcnow()
                failed = InstanceOutcome(stored=False, retryable=True, reason=reason)
                outcomes = {c.sop_instance_uid: failed for c in batch}
            results = [(c, outcomes[c.sop_instance_uid]) for c in batch]
            await self._db(_finish_uploads(results, self._backoff))
        finally:
            slots.release()
        stored = sum(1 for _, o in results if o.stored)
        if self.metrics is not None:
            m = self.metrics
            for claimed, outcome in results:
                kind = "stored" if outcome.stored else "retry" if outcome.retryable else "failed"
                m.uploaded_instances.labels(kind).inc()
                if outcome.stored:
                    m.uploaded_bytes.inc(claimed.size)
        for claimed, outcome in results:
            if not outcome.stored and not outcome.retryable:
                log.error("sop=%s failed permanently: %s", claimed.sop_instance_uid, outcome.reason)
        if stored:
            self.last_upload_ok_at = utcnow()
            log.info("uploaded %d/%d instances of study %s", stored, len(batch),
                     batch[0].study_instance_uid)  # fmt: skip
            self._upload_wake.set()
            self._prune_wake.set()

    # -- retention ----------------------------------------------------------------------
    async def _retention_loop(self) -> None:
        r = self.config.retention
        while True:
            # Durable before any file goes: a row must never point at a deleted file.
            files = await self._db(_prune(r.keep_bytes, r.keep_hours), durable=True)
            for relpath in files:
                await asyncio.to_thread(self.spool.remove, relpath)
            await _wait(self._prune_wake, _RETENTION_INTERVAL_S)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    event.clear()

"""The queue state machine that moves acknowledged instances to the archive.

    received --compress--> compressing --> compressed --upload--> uploading --> uploaded
                                               ^                      |
                                               +--- retry (backoff) --+--> failed

Every transition is a write through the store's single writer, one of the queue
table's functions (gateway/instances.py, the only place with its SQL).  A stage claims
rows by moving them into its transient state; a crash leaves them there and the
start-up reconciler hands them back.  Completions are guarded by the row's sha256 and state,
so an instance re-received while it was being processed is not marked with the
outcome of its older copy.

Failure isolation: whatever goes wrong with one instance or one batch stays with it.
An instance the compress stage cannot handle is quarantined as ``failed`` with the
reason; an encode that hangs past its timeout or kills its worker goes up
uncompressed, and only that one (the pool's other images are redone, each alone).
Any error of one upload request is a retryable outcome of that batch; HTTP 413
splits the batch, a timeout halves the following ones; retries end (``failed``, with
the reason) after ``upload.max_attempts`` or ``upload.give_up_after_hours``.  A
stage that still crashes (its database writes fail) takes the pipeline down, and the
gateway restarts it in-process (gateway.app); :meth:`Pipeline.run` hands back what it
had leased.

The archive's profile (``upload.archive``, gateway/pipeline/archives.py) bounds each request's
bytes, and an instance larger than the archive takes fails without being sent.  What
the archive says it already holds is counted as uploaded only once its copy matches
ours (WADO-RS metadata, :meth:`Pipeline._verify`); a copy that differs fails with the
difference, and a check that cannot be made is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pydicom
from pydicom.errors import InvalidDicomError

from .. import instances
from ..aio import set_from_thread, wait_event
from ..backoff import backoff_seconds
from ..clock import utcnow
from ..commitment import requests as commitment_requests
from ..config import Config
from ..instances import Claimed, QueueState
from ..spool import Spool
from ..store import Store
from . import archives
from .archives import (
    ArchiveProfile,
    identity_differences,
    identity_of_dataset,
    identity_of_json,
)
from .bandwidth import Bandwidth
from .confirm import Confirmer
from .iffaster import Decision, IfFaster
from .transcode import (
    ENCODER_NICENESS,
    TranscodeOutcome,
    TranscodeResult,
    init_encoder_process,
    transcode,
)
from .upload import (
    InstanceOutcome,
    Item,
    RequestFailed,
    RequestTooBig,
    StowClient,
    warning_code,
)

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long an idle stage sleeps before looking at the queue again (an operator's
#: ``queue retry`` from another process is picked up within this).
_IDLE_POLL_S = 5.0
#: How often an if-faster stage waiting for its first figures looks again.
_MEASURE_POLL_S = 0.05
_RETENTION_INTERVAL_S = 60.0
_BATCH_GROW_AFTER = 10
#: WADO-RS metadata requests in flight at once to verify one batch's instances.
_VERIFY_CONCURRENCY = 4


#: Encoder processes run at this niceness: the receiver and the uploader come first.
_ENCODER_NICENESS = ENCODER_NICENESS


def _new_pool(workers: int) -> ProcessPoolExecutor:
    """*workers* encoder processes, started now rather than at the first instance.

    spawn, not fork: the gateway has many threads (pynetdicom, SQLite writer).  The
    initializer (:func:`gateway.pipeline.transcode.init_encoder_process`) lives with the codec,
    so an encoder imports only that module, and loads the codecs as it starts: the
    first instances then find the encoders ready instead of waiting for them to start
    (about half a CPU-second each).  Only paths cross to an encoder, never pixels.
    """
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_encoder_process,
    )
    # The pool starts a process per task while none is idle, up to max_workers.
    for _ in range(workers):
        pool.submit(os.getpid)
    return pool


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    # A J2K encode of a large instance can take many seconds; it is redone after
    # restart, so the workers are stopped rather than waited for (and a hung one is
    # killed: terminate() is SIGTERM, which a worker stuck in C may not act on).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _fallback(claimed: Claimed, reason: str) -> TranscodeResult:
    """Send the original as it was received, saying why it was not compressed."""
    return TranscodeResult(
        TranscodeOutcome.FALLBACK, reason, claimed.transfer_syntax, claimed.size, claimed.size, 0.0
    )


def _since(received_at: str) -> float:
    """Seconds from *received_at* (ISO 8601) to now; 0 if the clock was set back."""
    return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(received_at)).total_seconds())


@dataclass(frozen=True)
class GiveUp:
    """When retrying an upload stops and the instance becomes ``failed``."""

    max_attempts: int
    after_hours: float

    def reason(self, attempts: int, failing_since: str, now: str) -> str | None:
        """Why to stop now after *attempts* failed attempts, or None to go on."""
        if attempts >= self.max_attempts:
            return f"gave up after {attempts} attempts (upload.max_attempts)"
        hours = (datetime.fromisoformat(now) - datetime.fromisoformat(failing_since)) / timedelta(
            hours=1
        )
        if hours >= self.after_hours:
            return (
                f"gave up after {hours:.0f} hours of failed attempts ({attempts} attempts,"
                " upload.give_up_after_hours)"
            )
        return None


def _identity_of(path: Path) -> dict[str, str]:
    """Our spool copy's identifying attributes, for :meth:`Pipeline._verify`."""
    return identity_of_dataset(pydicom.dcmread(path, stop_before_pixels=True))


def _finish_uploads(
    results: list[tuple[Claimed, InstanceOutcome]],
    backoff: Callable[[int], float],
    give_up: GiveUp,
    confirm: bool = True,
) -> Callable[[sqlite3.Connection], list[tuple[Claimed, InstanceOutcome]]]:
    """Record each outcome (:func:`gateway.instances.finish_uploads`); returns them as
    recorded (a retryable failure past *give_up*'s limits is recorded, and returned, as
    a permanent one).  With *confirm* a stored instance is confirmed as well."""
    record = instances.finish_uploads(results, backoff, give_up.reason, confirm)

    def write(conn: sqlite3.Connection) -> list[tuple[Claimed, InstanceOutcome]]:
        gave_up = record(conn)
        return [
            (c, InstanceOutcome(stored=False, reason=gave_up[c.sop_instance_uid]))
            if c.sop_instance_uid in gave_up
            else (c, o)
            for c, o in results
        ]

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
        #: What the archive's answers mean and how large a request may be.
        self.profile: ArchiveProfile = archives.profile(config.upload.archive)
        self.paused = False
        self.last_upload_ok_at: str | None = None
        self.last_upload_error: str | None = None
        self.last_upload_error_at: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._compress_wake = asyncio.Event()
        self._upload_wake = asyncio.Event()
        self._prune_wake = asyncio.Event()
        self._pool: ProcessPoolExecutor | None = None
        self._seen_errors: set[str] = set()
        #: Instances per request after a timeout (None: upload.batch_max_instances).
        self._batch_limit: int | None = None
        self._batch_successes = 0
        self._encoder_slots = asyncio.Semaphore(config.upload.encoder_processes)
        u = config.upload
        #: The cap, the windows and the priority lane (tests may replace it: its clock).
        self.bandwidth = Bandwidth(u.max_bytes_per_second, u.windows, u.priority_aets)
        #: The figures of ``upload.compress_when = "if-faster"`` (None: always compress).
        self.if_faster = (
            IfFaster(u.max_bytes_per_second) if u.compress_when == "if-faster" else None
        )
        #: Called on the loop when instances were confirmed by the archive (Storage
        #: Commitment's reporter decides then); set by the gateway.
        self.on_confirmed: Callable[[], None] | None = None
        #: A STOW-RS success confirms an instance, unless a search must find it too.
        self.confirm_on_store = config.commitment.verify == "stow"
        self.confirmer = Confirmer(config, store, self._confirmed)

    # -- wiring -------------------------------------------------------------------------
    def _confirmed(self) -> None:
        if self.on_confirmed is not None:
            self.on_confirmed()

    def wake_retention(self) -> None:
        """On the loop: files may go now (a Storage Commitment report was delivered)."""
        self._prune_wake.set()

    def wake(self) -> None:
        """Thread-safe: new work arrived (called from the receiver's threads)."""
        set_from_thread(self._loop, self._compress_wake)

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
        # Shielded: a cancelled stage (a stop, or a sibling stage's crash before an
        # in-process restart) must not cancel the submitted write's own future, which
        # the writer completes anyway (a cancelled one used to kill the writer thread).
        return await self.store.run(fn, durable, shield=True)

    async def run(self) -> None:
        """Run the stages until cancelled.  May be called again after it raised (the
        gateway restarts a crashed pipeline): rows a crashed run left leased are
        handed back first, as the start-up reconciler does."""
        self._loop = asyncio.get_running_loop()
        c = self.config.upload
        returned = await self._db(instances.hand_back_leases)
        if returned:
            log.warning("%d instances left in progress by the last run are queued again",
                        returned)  # fmt: skip
        if c.compression != "none":
            self._pool = _new_pool(c.encoder_processes)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._compress_loop(), name="compress")
                tg.create_task(self._retention_loop(), name="retention")
                if c.dicomweb_url:
                    tg.create_task(self._upload_loop(), name="upload")
                    if not self.confirm_on_store:
                        tg.create_task(self._confirm_loop(), name="confirm")
                else:
                    log.warning("upload.dicomweb_url is not set: instances stay in the spool")
        finally:
            self._shutdown_pool()

    def _shutdown_pool(self) -> None:
        if self._pool is None:
            return
        _stop_pool(self._pool)
        self._pool = None

    # -- compress -----------------------------------------------------------------------
    async def _compress_loop(self) -> None:
        """Keep every encoder busy: up to two instances per encoder process are in
        hand (one encoding, one ready for the moment its encoder is free), and another
        is claimed as soon as one is done, so a large instance holds one encoder, not
        the instances claimed with it.  Each one done wakes the uploader."""
        window = self.config.upload.encoder_processes * 2
        running: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._upload_wake.set()

        try:
            while True:
                if self.spool.problem is not None:
                    # The spool is gone or replaced (Spool.check): nothing to read or write.
                    await wait_event(self._compress_wake, _IDLE_POLL_S)
                    continue
                if len(running) >= window:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if self.if_faster is not None and not self.if_faster.ready():
                    # if-faster waits for its first figures (gateway/pipeline/iffaster.py).
                    await wait_event(self._compress_wake, _MEASURE_POLL_S)
                    continue
                claimed = await self._db(instances.claim_for_compression(window - len(running)))
                if not claimed:
                    # More work only comes with a wake (or a retry, seen within the poll).
                    await wait_event(self._compress_wake, _IDLE_POLL_S)
                    continue
                decisions = await self._decide(claimed)
                for c, d in zip(claimed, decisions, strict=True):
                    task = asyncio.create_task(self._compress_isolated(c, d))
                    running.add(task)
                    task.add_done_callback(done)
        finally:
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _decide(self, claimed: list[Claimed]) -> list[Decision | None]:
        """With ``if-faster``: for each instance whether to compress it (None: do)."""
        if self.if_faster is None or self._pool is None:
            return [None] * len(claimed)
        backlog, pending = await asyncio.to_thread(self.store.read, instances.queued_bytes)
        workers = self.config.upload.encoder_processes
        plan = self.if_faster.plan([c.size for c in claimed], backlog, pending, workers)
        return list(plan)

    async def _compress_isolated(self, claimed: Claimed, decision: Decision | None = None) -> None:
        """One instance through the compress stage; whatever goes wrong with it stays
        with it: it is quarantined as ``failed`` with the reason, and the stage goes on."""
        try:
            await self._compress_one(claimed, decision)
        except Exception as exc:
            reason = f"compress stage error: {exc!r}"
            log.exception("sop=%s: %s", claimed.sop_instance_uid, reason)
            # If the database itself fails here, the row stays `compressing` and is
            # handed back when the pipeline (or the gateway) next starts.
            with contextlib.suppress(Exception):
                await self._db(instances.quarantine(claimed, QueueState.COMPRESSING, reason))

    async def _compress_one(self, claimed: Claimed, decision: Decision | None = None) -> None:
        # Registered as in use, so the temp sweep leaves it alone however long it takes.
        with self.spool.temp_output("j2k-") as dst:
            await self._compress_into(claimed, dst, decision)

    async def _compress_into(
        self, claimed: Claimed, dst: Path, decision: Decision | None = None
    ) -> None:
        src = self.spool.path_of(claimed.path)
        if self._pool is None or (decision is not None and not decision.compress):
            why = "compression is off" if decision is None else decision.reason
            result = TranscodeResult(
                TranscodeOutcome.PASSTHROUGH, why, claimed.transfer_syntax,
                claimed.size, claimed.size, 0.0,
            )  # fmt: skip
        else:
            result = await self._transcode(src, dst, claimed)
            if self.if_faster is not None and result.outcome == TranscodeOutcome.COMPRESSED:
                self.if_faster.encoder.add(result.size_in, result.size_out, result.seconds)
        upload_path, upload_size = claimed.path, claimed.size
        pinned = False
        if result.outcome == TranscodeOutcome.COMPRESSED:
            try:
                spooled = await asyncio.to_thread(self.spool.commit_file, dst)
            except OSError as exc:  # e.g. the spool vanished meanwhile (Spool.check)
                log.error("sop=%s: keeping its J2K copy failed: %s", claimed.sop_instance_uid, exc)
                # The encoder wrote by path: if another directory is there now, this
                # takes back the one file it put into it.
                with contextlib.suppress(OSError):
                    dst.unlink()
                result = _fallback(claimed, f"spool error: {exc}")
            else:
                upload_path, upload_size, pinned = spooled.relpath, spooled.size, True
                if self.metrics is not None and spooled.size:
                    self.metrics.compression_ratio.observe(claimed.size / spooled.size)
        elif result.outcome == TranscodeOutcome.FALLBACK:
            log.warning("sop=%s sent uncompressed: %s", claimed.sop_instance_uid, result.reason)
        if decision is not None and result.outcome == TranscodeOutcome.COMPRESSED:
            # The queue row says why it was compressed too.
            result = TranscodeResult(
                result.outcome, decision.reason, result.transfer_syntax,
                result.size_in, result.size_out, result.seconds,
            )  # fmt: skip
        mark = instances.mark_compressed(claimed, upload_path, upload_size, result)
        # commit_file pinned the output until the write naming it is resolved.
        unpin = (lambda: self.spool.release(upload_path)) if pinned else None
        await self.store.run(mark, durable=False, when_done=unpin)
        if result.outcome == TranscodeOutcome.PASSTHROUGH and decision is not None:
            self._upload_wake.set()  # the link is idle: it need not wait for the others

    def _transcode_timeout(self, claimed: Claimed) -> float:
        # One second per MB beyond the configured floor: a 500 MB multi-frame may take
        # minutes, a hung encoder on a CT slice is noticed within the floor.
        return max(self.config.upload.compress_timeout_seconds, claimed.size / 1_000_000)

    async def _transcode(self, src: Path, dst: Path, claimed: Claimed) -> TranscodeResult:
        """Encode in the shared pool.  A worker that dies breaks the pool for every
        image in it; the others are then encoded again, each in a process of its own,
        so only the image that killed its worker goes up uncompressed."""
        try:
            return await self._run_encoder(src, dst, claimed, isolated=False)
        except BrokenProcessPool:
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        try:
            return await self._run_encoder(src, dst, claimed, isolated=True)
        except BrokenProcessPool:
            log.error("J2K encoder process died on sop=%s", claimed.sop_instance_uid)
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            return _fallback(claimed, "encoder process crashed")

    async def _run_encoder(
        self, src: Path, dst: Path, claimed: Claimed, *, isolated: bool
    ) -> TranscodeResult:
        """One transcode, in the shared pool or in a pool of one of its own; raises
        BrokenProcessPool when the worker died (not when we killed it on timeout)."""
        timeout = self._transcode_timeout(claimed)
        # No more images are encoded at once than there are workers: the timeout then
        # measures this image's encode, not a wait behind another one, and the
        # encoders redone alone after a crash do not take more cores than configured.
        async with self._encoder_slots:
            return await self._encode_in(src, dst, claimed, isolated=isolated, timeout=timeout)

    async def _encode_in(
        self, src: Path, dst: Path, claimed: Claimed, *, isolated: bool, timeout: float
    ) -> TranscodeResult:
        assert self._loop is not None
        pool = _new_pool(1) if isolated else self._pool
        assert pool is not None
        try:
            codec = self.config.upload.compression
            future = self._loop.run_in_executor(pool, transcode, src, dst, codec)
            async with asyncio.timeout(timeout):  # not wait_for: see gateway.aio
                return await future
        except TimeoutError:
            log.error("J2K encode of sop=%s took over %.0f s: its worker is stopped",
                      claimed.sop_instance_uid, timeout)  # fmt: skip
            # There is no telling which worker runs it: the whole pool is replaced, and
            # whatever else it was encoding gets BrokenProcessPool and is redone alone.
            self._replace_pool(pool)
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            return _fallback(claimed, f"encoder timed out after {timeout:.0f} s")
        except BrokenProcessPool:
            self._replace_pool(pool)
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            # Not us: the pool was shut down under this image (another one's timeout)
            # before a worker took it.  Like a broken pool, it is redone alone.
            raise BrokenProcessPool("the encoder pool was replaced") from None
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            # transcode() turns bad data into a fallback itself, so this is a bug in
            # it: logged in full, and the instance goes up as received instead of
            # taking the pipeline down (and, after the restart, down again).
            log.exception("transcode of sop=%s raised", claimed.sop_instance_uid)
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
            return _fallback(claimed, f"transcode error: {exc!r}")
        finally:
            if isolated:
                _stop_pool(pool)

    def _replace_pool(self, broken: ProcessPoolExecutor) -> None:
        """Stop *broken* and, if it is the shared pool, start a new one (once, however
        many of its images noticed)."""
        if broken is self._pool:
            self._pool = _new_pool(self.config.upload.encoder_processes)
        _stop_pool(broken)

    # -- upload -------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        c = self.config.upload
        return backoff_seconds(attempts, c.backoff_initial_seconds, c.backoff_max_seconds)

    async def _upload_loop(self) -> None:
        c = self.config.upload
        bw = self.bandwidth
        budget = self.profile.request_budget(
            c.batch_max_bytes, c.batch_max_instances, c.min_bytes_per_second
        )
        slots = asyncio.Semaphore(c.concurrent_requests)
        # The priority lane has a request slot of its own: a STAT image does not wait
        # behind paced batches that hold every other slot.
        lane_slot = asyncio.Semaphore(1)
        async with StowClient(c, self.metrics, bw.bucket) as client, asyncio.TaskGroup() as tg:
            while True:
                if self.paused:
                    await wait_event(self._upload_wake, _IDLE_POLL_S)
                    continue
                limit = self._batch_limit or c.batch_max_instances
                if bw.priority_aets and not lane_slot.locked():
                    batch, _ = await self._db(
                        instances.claim_upload_batch(limit, budget, bw.priority_aets, others=False)
                    )  # fmt: skip
                    if batch:
                        await lane_slot.acquire()
                        tg.create_task(self._upload_batch(client, batch, lane_slot, True))
                        continue
                if slots.locked():
                    # Woken when a request finishes (or new work arrives).
                    await wait_event(self._upload_wake, _IDLE_POLL_S)
                    continue
                await slots.acquire()
                window_open = bw.window_open()
                claim = instances.claim_upload_batch(
                    limit, budget, bw.priority_aets, others=window_open
                )
                batch, priority = await self._db(claim)
                if not batch:
                    slots.release()
                    # A closed window is looked at again within the idle poll (the rows
                    # it holds are due, which would otherwise mean a busy loop).
                    idle = await self._idle_time() if window_open else _IDLE_POLL_S
                    await wait_event(self._upload_wake, idle)
                    continue
                tg.create_task(self._upload_batch(client, batch, slots, priority))

    async def _idle_time(self) -> float:
        due = await asyncio.to_thread(self.store.read, instances.next_due)
        if due is None:
            return _IDLE_POLL_S
        wait = (datetime.fromisoformat(due) - datetime.now(UTC)).total_seconds()
        return min(_IDLE_POLL_S, max(0.05, wait))

    async def _upload_batch(
        self,
        client: StowClient,
        batch: list[Claimed],
        slots: asyncio.Semaphore,
        priority: bool = False,
    ) -> None:
        try:
            results = await self._send_checked(client, batch, priority)
            c = self.config.upload
            results = await self._db(
                _finish_uploads(
                    results, self._backoff, GiveUp(c.max_attempts, c.give_up_after_hours),
                    self.confirm_on_store,
                )
            )  # fmt: skip
        except Exception:
            # Not even the outcome could be recorded (a database error): the rows stay
            # `uploading` until the pipeline restarts and hands them back.
            log.exception("upload of %d instances could not be recorded", len(batch))
            raise
        finally:
            slots.release()
            # The loop may be idling with no retry due in sight (these rows were
            # `uploading` when it looked): it looks again now.
            self._upload_wake.set()
        stored = sum(1 for _, o in results if o.stored)
        if self.metrics is not None:
            m = self.metrics
            for claimed, outcome in results:
                kind = "stored" if outcome.stored else "retry" if outcome.retryable else "failed"
                m.uploaded_instances.labels(kind).inc()
                if outcome.stored:
                    m.uploaded_bytes.inc(claimed.size)
                    if claimed.received_at:  # every upload claim reads it
                        m.end_to_end.observe(_since(claimed.received_at))
                    for warning in outcome.warnings:
                        m.stow_warnings.labels(warning_code(warning)).inc()
        for claimed, outcome in results:
            if not outcome.stored and not outcome.retryable:
                log.error("sop=%s failed permanently: %s", claimed.sop_instance_uid, outcome.reason)
        if stored:
            self._batch_stored()
            self.last_upload_ok_at = utcnow()
            log.info("uploaded %d/%d instances of study %s", stored, len(batch),
                     batch[0].study_instance_uid)  # fmt: skip
            self._upload_wake.set()
            self._prune_wake.set()
            if not self.confirm_on_store:
                self.confirmer.wake()
        if (stored and self.confirm_on_store) or any(
            not o.stored and not o.retryable for _, o in results
        ):
            self._confirmed()  # confirmed, or failed for good: a commitment may be decided

    async def _confirm_loop(self) -> None:
        """commitment.verify = "qido": search the archive for what it stored."""
        async with StowClient(self.config.upload, self.metrics) as client:
            await self.confirmer.run(client)

    async def _send_checked(
        self, client: StowClient, batch: list[Claimed], priority: bool = False
    ) -> list[tuple[Claimed, InstanceOutcome]]:
        """:meth:`_send` *batch*, but not what the archive cannot take (too large: failed
        without a request), and then verify what the archive says it already holds."""
        outcomes: dict[str, InstanceOutcome] = {}
        sendable = []
        for c in batch:
            why = self.profile.too_large(c.size)
            if why is None:
                sendable.append(c)
            else:
                outcomes[c.sop_instance_uid] = InstanceOutcome(stored=False, reason=why)
        if sendable:
            sent = await self._verify(client, await self._send(client, sendable, priority))
            outcomes.update((c.sop_instance_uid, o) for c, o in sent)
        return [(c, outcomes[c.sop_instance_uid]) for c in batch]

    async def _verify(
        self, client: StowClient, results: list[tuple[Claimed, InstanceOutcome]]
    ) -> list[tuple[Claimed, InstanceOutcome]]:
        """An instance the archive says it already holds counts as stored only when its
        copy is ours (PS3.18 leaves "already stored" to the archive: it may be another
        instance under the same UID).  So is a re-send the archive reports stored, where
        the profile says a conflicting copy can be kept silently (``verify_resends``)."""
        slots = asyncio.Semaphore(_VERIFY_CONCURRENCY)

        async def check(claimed: Claimed, outcome: InstanceOutcome) -> InstanceOutcome:
            resent = outcome.stored and self.profile.verify_resends and claimed.sends > 0
            if not (outcome.duplicate or resent):
                return outcome
            async with slots:
                return await self._verify_one(client, claimed, outcome)

        checked = await asyncio.gather(*(check(c, o) for c, o in results))
        return [(c, o) for (c, _), o in zip(results, checked, strict=True)]

    async def _verify_one(
        self, client: StowClient, claimed: Claimed, outcome: InstanceOutcome
    ) -> InstanceOutcome:
        uid = claimed.sop_instance_uid
        said = outcome.reason if outcome.duplicate else "archive confirmed a re-send"
        try:
            ours = await asyncio.to_thread(_identity_of, self.spool.path_of(claimed.upload_path))
            metadata = await client.instance_metadata(
                claimed.study_instance_uid, claimed.series_instance_uid, uid
            )
        except (RequestFailed, OSError, ValueError, InvalidDicomError) as exc:
            # Never uploaded unchecked: tried again later (the whole request).
            self._count_verification("error")
            return InstanceOutcome(
                stored=False, retryable=True,
                reason=f"{said}; its copy could not be checked: {exc}",
            )  # fmt: skip
        if metadata is None:
            self._count_verification("absent")
            p = self.profile
            absent = f"{said}; but it serves no instance under these UIDs (WADO-RS metadata: 404)"
            if p.absent_hint:
                absent += f": {p.absent_hint}"
            then = p.duplicate_absent if outcome.duplicate else p.resend_absent
            return InstanceOutcome(stored=False, retryable=then == "retry", reason=absent)
        differences = identity_differences(ours, identity_of_json(metadata))
        if differences:
            self._count_verification("mismatch")
            return InstanceOutcome(
                stored=False,
                reason=(
                    "archive holds a different instance under this UID: "
                    + "; ".join(differences)
                    + f" ({said})"
                ),
            )
        self._count_verification("match")
        log.info("sop=%s: the archive's copy is ours (%s)", uid, said)
        return InstanceOutcome(stored=True, duplicate=outcome.duplicate, warnings=outcome.warnings)

    def _count_verification(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.verifications.labels(result).inc()

    async def _send(
        self, client: StowClient, batch: list[Claimed], priority: bool = False
    ) -> list[tuple[Claimed, InstanceOutcome]]:
        """One STOW-RS request for *batch*.  A batch too large for the archive (HTTP
        413, a quick verdict) is sent again at once in halves, down to one instance
        each.  A batch that timed out is retried with backoff, and the next requests
        carry half as many instances, down to one (a stalled archive would otherwise
        hold this slot for a timeout per half)."""
        items = [Item(c.sop_instance_uid, self.spool.path_of(c.upload_path)) for c in batch]
        try:
            outcomes = await self._store_measured(client, items, priority, batch)
        except RequestTooBig as exc:
            reason = str(exc)
            if len(batch) > 1 and exc.refused:
                log.warning("%s: splitting the batch of %d", exc, len(batch))
                half = len(batch) // 2
                return await self._send(client, batch[:half], priority) + await self._send(
                    client, batch[half:], priority
                )
            if len(batch) > 1:
                self._batch_limit = len(batch) // 2
                self._batch_successes = 0
                reason += f"; the next requests carry at most {self._batch_limit} instances"
            log.error("upload of %d instances failed: %s", len(batch), reason)
            self._note_upload_error(reason)
            # 413 for one instance is the archive's verdict on it; a timeout is not.
            failed = InstanceOutcome(stored=False, retryable=not exc.refused, reason=reason)
            outcomes = {c.sop_instance_uid: failed for c in batch}
        except (RequestFailed, OSError) as exc:
            reason = str(exc) or repr(exc)
            log.error("upload of %d instances failed: %s", len(batch), reason)
            self._note_upload_error(reason)
            failed = InstanceOutcome(stored=False, retryable=True, reason=reason)
            outcomes = {c.sop_instance_uid: failed for c in batch}
        except Exception as exc:
            # Something this code does not understand (a bug, a library surprise): it
            # fails this batch only, which is retried with backoff like any other.
            # The traceback is logged the first time each kind is met.
            kind = type(exc).__qualname__
            log.error("upload of %d instances raised %r", len(batch), exc,
                      exc_info=kind not in self._seen_errors)  # fmt: skip
            self._seen_errors.add(kind)
            reason = f"upload error: {exc!r}"
            self._note_upload_error(reason)
            failed = InstanceOutcome(stored=False, retryable=True, reason=reason)
            outcomes = {c.sop_instance_uid: failed for c in batch}
        unnamed = [c for c in batch if outcomes[c.sop_instance_uid].ambiguous]
        if len(batch) > 1 and unnamed:
            # The archive refused a part without naming it: the unconfirmed instances go
            # again in halves, at once, until the one it refuses is alone in a request.
            log.warning("archive refused an instance it did not name: %d sent again in halves",
                        len(unnamed))  # fmt: skip
            half = max(1, len(unnamed) // 2)
            for part in (unnamed[:half], unnamed[half:]):
                if part:
                    outcomes.update(
                        (c.sop_instance_uid, o) for c, o in await self._send(client, part, priority)
                    )
        return [(c, outcomes[c.sop_instance_uid]) for c in batch]

    async def _store_measured(
        self, client: StowClient, items: list[Item], priority: bool, batch: list[Claimed]
    ) -> dict[str, InstanceOutcome]:
        """client.store, timed for ``if-faster``'s link rate."""
        if self.if_faster is None:
            return await client.store(items, priority)
        meter = self.if_faster.link
        meter.started()
        outcomes: dict[str, InstanceOutcome] = {}
        try:
            outcomes = await client.store(items, priority)
            return outcomes
        finally:
            delivered = sum(
                c.size for c in batch if (o := outcomes.get(c.sop_instance_uid)) and o.stored
            )
            meter.finished(delivered, ok=delivered > 0)

    def _batch_stored(self) -> None:
        """After a timeout shrank the batches, they grow again (double) once this
        many requests in a row got through: a line that carries only small requests
        does not time out every other one."""
        if self._batch_limit is None:
            return
        self._batch_successes += 1
        if self._batch_successes >= _BATCH_GROW_AFTER:
            self._batch_successes = 0
            doubled = self._batch_limit * 2
            self._batch_limit = (
                None if doubled >= self.config.upload.batch_max_instances else doubled
            )

    def _note_upload_error(self, reason: str) -> None:
        self.last_upload_error = reason
        self.last_upload_error_at = utcnow()

    # -- retention ----------------------------------------------------------------------
    async def _retention_loop(self) -> None:
        """Files of archived instances beyond the local cache go; never those of a
        Storage Commitment request not yet reported to its modality."""
        r = self.config.retention
        while True:
            try:
                # Chosen on a reader, so the write lock is held only to clear the rows.
                held = commitment_requests.held_among
                candidates = await asyncio.to_thread(
                    self.store.read, instances.prune_candidates(r.keep_bytes, r.keep_hours, held)
                )
                if candidates:
                    # Durable before any file goes: a row must never point at a deleted
                    # file.  The writer removes the files (gateway.store.discard_files).
                    await self._db(instances.prune(candidates, held), durable=True)
                if len(candidates) >= instances.PRUNE_MAX_ROWS:
                    continue  # more are due: go on at once
            except Exception:
                # A file left behind costs disk, not data: tried again next round.
                log.exception("retention round failed")
            await wait_event(self._prune_wake, _RETENTION_INTERVAL_S)

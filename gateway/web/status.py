"""Builds the status document (:mod:`gateway.web.status_doc`) that the status page,
``/api/status``, ``/metrics`` and the heartbeat report.

The database part is a snapshot taken in a worker thread (never on the event loop)
with queries that stay cheap on a large queue: counts use the ``state`` indexes,
time ranges the ``received_at`` / ``uploaded_at`` covering indexes of migration 5.
A request is answered from the latest snapshot and, when that is older than
:data:`MAX_AGE_S`, starts one refresh in the background (stale-while-revalidate): a
slow query never holds a request, let alone the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__, instances, studies
from ..commitment import requests as commitment_requests
from ..commitment.requests import RequestState
from ..config import Config
from ..heartbeat_body import COMMITMENT_AES_MAX
from ..instances import QueueState
from ..mpps import outbox as mpps_outbox
from ..mpps.outbox import OutboxState
from ..store import Store
from ..studies import StudyProgress
from .status_doc import (
    ArchiveState,
    ArchiveStatus,
    CertificateStatus,
    CommitmentRequester,
    CommitmentStatus,
    ComponentRestart,
    ConfigSummary,
    DiskStatus,
    FailedInstance,
    Health,
    Modality,
    MppsFailedMessage,
    MppsStatus,
    QueueStatus,
    RecentError,
    RetryingInstance,
    SpoolStatus,
    StatusDoc,
    ThroughputMinute,
    UploadsStatus,
    WarnedInstance,
    WarningsStatus,
    WorklistSource,
)

if TYPE_CHECKING:
    from ..dicom.receivers import ReceiverPool
    from ..pipeline.jobs import Pipeline
    from ..spool import Spool
    from ..worklist.service import Worklist

log = logging.getLogger(__name__)

#: A snapshot older than this is refreshed (in the background) on the next request.
MAX_AGE_S = 1.0
#: Older than this, a request waits for the refresh instead of showing stale counts
#: (so a look after a quiet spell is never more than this behind).
STALE_S = 3.0
#: A stop waits this long for a snapshot in progress, then interrupts its query
#: (gateway.app.stop_budget_seconds counts it).
STATUS_CLOSE_S = 3.0
#: An instance waiting longer than this makes the gateway "degraded".
PENDING_TOO_OLD_S = 3600.0
CERT_WARN_DAYS = 30
THROUGHPUT_MINUTES = 60
FAILED_SHOWN = 50
#: Instances stored with warnings shown on the page and in /api/status, newest first.
WARNED_SHOWN = 20
RECENT_ERRORS = 20
#: Studies shown on the page and in /api/status (``/api/studies`` gives more).
STUDIES_SHOWN = 10
#: A component restarted after a crash shows as "degraded" for this long.
RESTART_SHOWN_S = 600.0
#: A Storage Commitment report due and not delivered this long makes it "degraded".
REPORT_STUCK_S = 3600.0
#: Requesting AEs with undelivered reports listed: as many as a heartbeat carries.
COMMITMENT_AES_SHOWN = COMMITMENT_AES_MAX
PENDING_STATES = (QueueState.RECEIVED, QueueState.COMPRESSING, QueueState.COMPRESSED)


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


class RecentErrors(logging.Handler):
    """The last warnings and errors the gateway logged, for the status page."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[RecentError] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a status page must not break logging
            at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
            message = record.getMessage()[:500]
            last = self.records[-1] if self.records else None
            if last is not None and last.message == message:
                # An outage repeats the same line on every retry: count it instead.
                self.records[-1] = dataclasses.replace(last, at=at, count=last.count + 1)
                return
            self.records.append(
                RecentError(at=at, level=record.levelname, source=record.name,
                            message=message, count=1)
            )  # fmt: skip

    def latest(self) -> tuple[RecentError, ...]:
        return tuple(reversed(self.records))


@dataclass
class _CertCache:
    key: tuple[str, int] | None = None
    not_after: datetime | None = None


_NO_CERTIFICATE = CertificateStatus(
    path=None, not_after=None, not_after_ts=None, days_left=None, warning=False, error=None
)


def certificate_expiry(path: Path | None, cache: _CertCache) -> CertificateStatus:
    """notAfter of the client certificate (read again only when the file changes)."""
    if path is None:
        return _NO_CERTIFICATE
    try:
        key = (str(path), os.stat(path).st_mtime_ns)
        if cache.key != key or cache.not_after is None:
            from cryptography import x509

            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cache.key, cache.not_after = key, cert.not_valid_after_utc
    except (OSError, ValueError) as exc:
        return dataclasses.replace(_NO_CERTIFICATE, path=str(path), error=f"cannot read: {exc}")
    not_after = cache.not_after
    days = (not_after - datetime.now(UTC)).total_seconds() / 86400
    return CertificateStatus(
        path=str(path),
        not_after=not_after.isoformat(),
        not_after_ts=not_after.timestamp(),
        days_left=int(days // 1),
        warning=days < CERT_WARN_DAYS,
        error=None,
    )


# -- SQL: every query of the snapshot ----------------------------------------------------
# The status only reads, from a reader connection in a worker thread.  The queries are
# shaped for the indexes of migrations 5 and 9 (bench: tests/bench/status.py), which is
# why they live here rather than with the owners of the tables they read: ``instances``
# (the queue) and ``mpps_outbox`` (the MPPS forwarder).  Worklist sources are the
# worklist's business: only its freshness() is read.  The Storage Commitment requests
# are few (kept 30 days once reported): their owner's summary() scans them.


_NO_WARNINGS = WarningsStatus(count=0, recent=())


@dataclass(frozen=True)
class QueueFacts:
    """What the snapshot read from ``instances``."""

    by_state: dict[str, int] = field(default_factory=lambda: dict.fromkeys(map(str, QueueState), 0))
    done_today: int = 0
    oldest_pending_at: str | None = None
    last_upload_at: str | None = None
    throughput: tuple[ThroughputMinute, ...] = ()
    modalities: tuple[Modality, ...] = ()
    failed: tuple[FailedInstance, ...] = ()
    retrying: tuple[RetryingInstance, ...] = ()
    warnings: WarningsStatus = _NO_WARNINGS
    spool_bytes: int = 0


@dataclass(frozen=True)
class OutboxFacts:
    """What the snapshot read from ``mpps_outbox`` (messages not yet sent)."""

    pending: int = 0
    sending: int = 0
    failed: int = 0
    oldest_pending_at: str | None = None
    failed_messages: tuple[MppsFailedMessage, ...] = ()


_NO_COMMITMENTS = commitment_requests.Summary(
    by_state=dict.fromkeys(RequestState, 0), some_failed=0, oldest_unreported_at=None,
    undelivered=(),
)  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """Every database fact the status shows (empty: no snapshot yet)."""

    queue: QueueFacts = QueueFacts()
    outbox: OutboxFacts = OutboxFacts()
    commitment: commitment_requests.Summary = _NO_COMMITMENTS
    worklist: tuple[WorklistSource, ...] = ()
    studies: tuple[StudyProgress, ...] = ()


def read_queue(conn: sqlite3.Connection, now: datetime) -> QueueFacts:
    """The queue's counts, ages, throughput, modalities and problem instances, through
    the queue table's owner (gateway/instances.py)."""
    by_state = {str(state): n for state, n in instances.count_by_state(conn).items()}
    local_midnight = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    done_today = instances.uploaded_since(
        conn, local_midnight.astimezone(UTC).isoformat(timespec="microseconds")
    )
    oldest = instances.oldest_received_at(conn, (*PENDING_STATES, QueueState.UPLOADING))

    since = (now - timedelta(minutes=THROUGHPUT_MINUTES - 1)).replace(second=0, microsecond=0)
    minutes = [(since + timedelta(minutes=i)).isoformat()[:16] for i in range(THROUGHPUT_MINUTES)]
    received, uploaded = instances.per_minute(conn, since.isoformat(timespec="microseconds"))
    throughput = tuple(
        ThroughputMinute(minute=m, received=received.get(m, (0, 0))[0],
                         received_bytes=received.get(m, (0, 0))[1],
                         uploaded=uploaded.get(m, (0, 0))[0],
                         uploaded_bytes=uploaded.get(m, (0, 0))[1])
        for m in minutes
    )  # fmt: skip

    day_ago = (now - timedelta(days=1)).isoformat(timespec="microseconds")
    modalities = tuple(
        Modality(**m, last_seen_ts=_ts(m["last_seen"]))
        for m in instances.calling_aes(conn, day_ago)
    )
    failed = tuple(FailedInstance(**r) for r in instances.failed(conn, FAILED_SHOWN))
    retrying = tuple(RetryingInstance(**r) for r in instances.retrying(conn))
    warned_count, warned_rows = instances.warned(conn, WARNED_SHOWN)
    warned = tuple(WarnedInstance(**{**r, "warnings": tuple(r["warnings"])}) for r in warned_rows)
    return QueueFacts(
        by_state=by_state,
        done_today=done_today,
        oldest_pending_at=oldest,
        last_upload_at=instances.last_uploaded_at(conn),
        throughput=throughput,
        modalities=modalities,
        failed=failed,
        retrying=retrying,
        warnings=WarningsStatus(count=warned_count, recent=warned),
        spool_bytes=instances.bytes_on_disk(conn),
    )


def read_mpps_outbox(conn: sqlite3.Connection) -> OutboxFacts:
    """MPPS messages not yet delivered: counts by state, the oldest, the refused,
    through the outbox's owner (gateway/mpps/outbox.py)."""
    counts = mpps_outbox.count_unsent(conn)
    return OutboxFacts(
        pending=counts[OutboxState.PENDING],
        sending=counts[OutboxState.SENDING],
        failed=counts[OutboxState.FAILED],
        oldest_pending_at=mpps_outbox.oldest_waiting_at(conn),
        failed_messages=tuple(
            MppsFailedMessage(**r) for r in mpps_outbox.failed_messages(conn, FAILED_SHOWN)
        ),
    )


def query_database(conn: sqlite3.Connection, now: datetime) -> Snapshot:
    """The snapshot's database part; each query uses an index (see module doc)."""
    return Snapshot(
        queue=read_queue(conn, now),
        outbox=read_mpps_outbox(conn),
        commitment=commitment_requests.summary(conn, COMMITMENT_AES_SHOWN),
    )


# -- the service ----------------------------------------------------------------------------


class StatusService:
    """Builds the status document; owns the snapshot and the recent-errors buffer."""

    def __init__(
        self,
        config: Config,
        store: Store,
        spool: Spool,
        pipeline: Pipeline,
        receiver: ReceiverPool,
        worklist: Worklist | None,
        started_at: float,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.pipeline = pipeline
        self.receiver = receiver
        self.worklist = worklist
        self.started_at = started_at
        self.errors = RecentErrors()
        self.boot_id = uuid.uuid4().hex
        self._db: Snapshot | None = None
        self._free_bytes: int | None = None
        self._total_bytes: int | None = None
        self._cert = _NO_CERTIFICATE
        self._cert_cache = _CertCache()
        self._taken = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        #: The reader connection of a snapshot in progress (close() may interrupt it).
        self._reading: sqlite3.Connection | None = None
        self.snapshot_error: str | None = None
        self.last: StatusDoc | None = None
        #: Components that crashed lately and were restarted: name -> what happened.
        self.restarts: dict[str, ComponentRestart] = {}

    def component_crashed(self, name: str, error: str, restart_in: float) -> None:
        """Called by the gateway's supervisor: *name* crashed and restarts shortly."""
        previous = self.restarts.get(name)
        self.restarts[name] = ComponentRestart(
            error=error,
            at=datetime.now(UTC).isoformat(timespec="seconds"),
            ts=time.time(),
            count=(previous.count if previous else 0) + 1,
            restart_in_seconds=restart_in,
        )

    # -- snapshot -------------------------------------------------------------------
    def _take(self) -> None:
        """In a worker thread: the disk, the database and the certificate."""
        # The disk first: it is known even when the database cannot be read.
        try:
            usage = shutil.disk_usage(self.spool.root)
            free, total = usage.free, usage.total
        except OSError:
            free = total = 0
        self._free_bytes, self._total_bytes = free, total
        with self.store.reader() as conn:
            self._reading = conn
            try:
                db = query_database(conn, datetime.now(UTC))
                recent = studies.recent(conn, STUDIES_SHOWN, self.config.study.quiet_seconds)
                db = dataclasses.replace(db, studies=tuple(recent))
                if self.worklist is not None:  # its reads use this thread's connection
                    db = dataclasses.replace(db, worklist=_worklist_sources(self.worklist))
            finally:
                self._reading = None
        self._cert = certificate_expiry(self.config.upload.client_cert, self._cert_cache)
        self._db = db
        self._taken = time.monotonic()

    async def _refresh(self) -> None:
        try:
            await asyncio.to_thread(self._take)
        except sqlite3.Error as exc:
            if self.snapshot_error is None:
                log.error("status snapshot failed: %s", exc)
            self.snapshot_error = f"queue database unreadable: {exc}"
        else:
            self.snapshot_error = None

    async def refresh(self, wait: bool = False) -> None:
        """Start (or join) one refresh; with *wait*, or with no usable snapshot, wait."""
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.create_task(self._refresh(), name="status")
        if wait or self._db is None or time.monotonic() - self._taken > STALE_S:
            await asyncio.shield(task)

    async def status(self, fresh: bool = False) -> StatusDoc:
        if fresh or time.monotonic() - self._taken > MAX_AGE_S:
            await self.refresh(wait=fresh)
        self.last = self.build()
        return self.last

    async def close(self, timeout: float = STATUS_CLOSE_S) -> None:
        """Wait for a snapshot in progress: its thread reads the database, which is
        closed next (a cancelled task would not stop the thread).  Half of *timeout*
        for it to finish, then its queries are interrupted until it gives up."""
        task = self._refreshing
        if task is None or task.done():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        done, _ = await asyncio.wait([task], timeout=timeout / 2)
        while not done and (left := deadline - loop.time()) > 0:
            # Again and again: between two statements an interrupt is a no-op.
            conn = self._reading
            if conn is not None:
                conn.interrupt()  # the query raises "interrupted": a failed snapshot
            done, _ = await asyncio.wait([task], timeout=min(0.05, left))
        if not done:
            log.error("status snapshot still running after %.0f s; not waited for", timeout)

    # -- the document ----------------------------------------------------------------
    def build(self) -> StatusDoc:
        """The status document from the snapshot plus in-memory state (on the loop)."""
        db = self._db or Snapshot()
        now = time.time()
        doc = StatusDoc(
            version=__version__,
            boot_id=self.boot_id,
            started_at=datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            uptime_seconds=round(now - self.started_at, 1),
            snapshot_age_seconds=(round(time.monotonic() - self._taken, 3) if self._db else None),
            queue=_queue(db.queue, now),
            archive=self._archive(db.queue),
            uploads=self._uploads(),
            associations_active=self.receiver.active_associations,
            throughput=db.queue.throughput,
            modalities=db.queue.modalities,
            failed=db.queue.failed,
            retrying=db.queue.retrying,
            warnings=db.queue.warnings,
            recent_errors=self.errors.latest(),
            disk=self._disk(db.queue),
            spool=SpoolStatus(dir=str(self.spool.root), problem=self.spool.problem),
            certificate=self._cert,
            worklist=db.worklist,
            mpps=self._mpps(db.outbox),
            commitment=self._commitment(db.commitment, now),
            studies=db.studies,
            # The file really open (an upgraded box may use one at the old default).
            config=dataclasses.replace(config_summary(self.config), database=str(self.store.path)),
            snapshot_error=self.snapshot_error,
            components={
                name: r for name, r in self.restarts.items() if now - r.ts < RESTART_SHOWN_S
            },
            health=_UNJUDGED,
        )
        return dataclasses.replace(doc, health=health(doc))

    def _archive(self, queue: QueueFacts) -> ArchiveStatus:
        p = self.pipeline
        ok_at = p.last_upload_ok_at or queue.last_upload_at
        error_at = p.last_upload_error_at
        state: ArchiveState
        if not self.config.upload.dicomweb_url:
            state = "not configured"
        elif error_at is not None and (ok_at is None or error_at > ok_at):
            state = "unreachable"
        elif ok_at is not None:
            state = "reachable"
        else:
            state = "unknown"
        return ArchiveStatus(
            url=self.config.upload.dicomweb_url,
            state=state,
            reachable=state == "reachable",
            last_success_at=ok_at,
            last_success_ts=_ts(ok_at),
            last_error=p.last_upload_error if state == "unreachable" else None,
            last_error_at=error_at,
        )

    def _uploads(self) -> UploadsStatus:
        bandwidth = self.pipeline.bandwidth.state()
        return UploadsStatus(
            paused=self.pipeline.paused,
            limit_bytes_per_second=bandwidth.limit_bytes_per_second,
            window_open=bandwidth.window_open,
            windows=bandwidth.windows,
            window_changes_at=bandwidth.window_changes_at,
            priority_aets=bandwidth.priority_aets,
        )

    def _disk(self, queue: QueueFacts) -> DiskStatus:
        free, watermark = self._free_bytes, self.spool.min_free_bytes
        return DiskStatus(
            free_bytes=free,
            total_bytes=self._total_bytes,
            spool_bytes=queue.spool_bytes,
            min_free_bytes=watermark,
            below_watermark=free is not None and free < watermark,
        )

    def _mpps(self, outbox: OutboxFacts) -> MppsStatus:
        c = self.config.mpps
        return MppsStatus(
            pending=outbox.pending,
            sending=outbox.sending,
            failed=outbox.failed,
            oldest_pending_at=outbox.oldest_pending_at,
            failed_messages=outbox.failed_messages,
            forwarding_to=(
                f"{c.upstream_ae}@{c.upstream_host}:{c.upstream_port}" if c.upstream_host else None
            ),
            oldest_pending_ts=_ts(outbox.oldest_pending_at),
        )

    def _commitment(self, facts: commitment_requests.Summary, now: float) -> CommitmentStatus:
        by_state = facts.by_state
        oldest_ts = _ts(facts.oldest_unreported_at)
        undelivered = []
        for u in facts.undelivered:
            remote = self.config.dimse.remote_ae(u.requesting_ae)
            undelivered.append(
                CommitmentRequester(
                    requesting_ae=u.requesting_ae,
                    address=f"{remote.host}:{remote.port}" if remote else None,
                    reports_due=u.reports,
                    due_since_at=u.due_since,
                    due_since_ts=datetime.fromisoformat(u.due_since).timestamp(),
                    attempts=u.attempts,
                    last_error=u.last_error,
                    last_error_at=u.last_error_at,
                    next_attempt_at=u.next_attempt_at,
                    next_attempt_ts=_ts(u.next_attempt_at),
                )
            )
        return CommitmentStatus(
            waiting=by_state[RequestState.WAITING],
            due=by_state[RequestState.DUE],
            reporting=by_state[RequestState.REPORTING],
            reported=by_state[RequestState.REPORTED],
            some_failed=facts.some_failed,
            oldest_unreported_at=facts.oldest_unreported_at,
            oldest_unreported_ts=oldest_ts,
            oldest_unreported_age_seconds=max(0.0, now - oldest_ts) if oldest_ts else None,
            undelivered=tuple(undelivered),
        )


def _queue(facts: QueueFacts, now: float) -> QueueStatus:
    by_state = facts.by_state
    oldest_ts = _ts(facts.oldest_pending_at)
    return QueueStatus(
        pending=sum(by_state[s] for s in PENDING_STATES),
        received=by_state[QueueState.RECEIVED],
        compressing=by_state[QueueState.COMPRESSING],
        pending_upload=by_state[QueueState.COMPRESSED],
        uploading=by_state[QueueState.UPLOADING],
        failed=by_state[QueueState.FAILED],
        done=by_state[QueueState.UPLOADED],
        done_today=facts.done_today,
        by_state=by_state,
        oldest_pending_at=facts.oldest_pending_at,
        oldest_pending_ts=oldest_ts,
        oldest_pending_age_seconds=max(0.0, now - oldest_ts) if oldest_ts else None,
    )


def _worklist_sources(worklist: Worklist) -> tuple[WorklistSource, ...]:
    """The worklist's freshness rows (blocking: in the snapshot's thread)."""
    intervals = worklist.refresh_intervals()
    return tuple(
        WorklistSource(
            source=w["source"],
            last_attempt_at=w["last_attempt_at"],
            last_success_at=w["last_success_at"],
            last_error=w["last_error"],
            item_count=w["item_count"],
            last_success_ts=_ts(w["last_success_at"]),
            refresh_interval_seconds=intervals.get(w["source"]),
        )
        for w in worklist.freshness()
    )


# -- health -------------------------------------------------------------------------------

#: Stands in for the verdict while the document it judges is being built.
_UNJUDGED = Health(state="ok", reasons=())


def health(doc: StatusDoc) -> Health:
    """OK / degraded / failing, and why.  Failing is what stops images coming in.
    Reads every part of *doc* but its ``health``."""
    failing: list[str] = []
    degraded: list[str] = []
    if doc.snapshot_error:
        failing.append(doc.snapshot_error + " (counts below may be stale)")
    if doc.spool.problem:
        failing.append(f"{doc.spool.problem}: C-STOREs are refused")
    disk = doc.disk
    if disk.below_watermark:
        failing.append(
            f"spool free space {_size(disk.free_bytes or 0)} is below the watermark"
            f" {_size(disk.min_free_bytes)}: C-STOREs are refused"
        )
    if doc.archive.state == "not configured":
        degraded.append("no archive configured (upload.dicomweb_url): images stay on this box")
    if doc.archive.state == "unreachable":
        degraded.append(f"archive unreachable: {doc.archive.last_error}")
    if doc.uploads.paused:
        degraded.append("uploads are paused")
    q = doc.queue
    if q.failed:
        degraded.append(f"{q.failed} instance(s) failed; retry them or check the reason")
    age = q.oldest_pending_age_seconds
    # A closed upload window holds the queue on purpose (upload.windows): not a fault.
    if age is not None and age > PENDING_TOO_OLD_S and doc.uploads.window_open:
        degraded.append(f"oldest pending instance waits for {age / 60:.0f} min")
    cert = doc.certificate
    if cert.error:
        degraded.append(f"client certificate: {cert.error}")
    elif cert.warning:
        degraded.append(f"client certificate expires in {cert.days_left} days")
    mpps = doc.mpps
    if mpps.failed:
        degraded.append(f"{mpps.failed} MPPS message(s) refused by the RIS; see MPPS below")
    waiting = mpps.oldest_pending_ts
    if waiting is not None and time.time() - waiting > PENDING_TOO_OLD_S:
        degraded.append(
            f"oldest MPPS message waits for {(time.time() - waiting) / 60:.0f} min to reach the RIS"
        )
    for ae in doc.commitment.undelivered:
        waited = time.time() - ae.due_since_ts
        if waited > REPORT_STUCK_S:
            degraded.append(
                f"Storage Commitment reports to {ae.requesting_ae} undelivered for"
                f" {waited / 60:.0f} min: {ae.last_error or 'not tried yet'}"
            )
    for name, r in doc.components.items():
        degraded.append(
            f"{name} restarting after error {r.error} ({r.count} restart(s), last at {r.at})"
        )
    for w in doc.worklist:
        if w.last_error:
            degraded.append(f"worklist source {w.source}: {w.last_error}")
    if failing:
        return Health(state="failing", reasons=(*failing, *degraded))
    if degraded:
        return Health(state="degraded", reasons=tuple(degraded))
    return Health(state="ok", reasons=())


def config_summary(c: Config) -> ConfigSummary:
    """What the page may show of the config: no password hashes, tokens or key contents."""
    return ConfigSummary(
        source=c.source,
        ae_title=c.dimse.ae_title,
        dimse=f"{c.dimse.bind}:{c.dimse.port}",
        allowed_aets=tuple(c.dimse.allowed_aets),
        remote_aes=tuple(f"{r.ae_title}@{r.host}:{r.port}" for r in c.dimse.remote),
        spool_dir=str(c.spool.dir),
        min_free_bytes=c.spool.min_free_bytes,
        database=str(c.database_path),
        dicomweb_url=c.upload.dicomweb_url,
        client_cert=str(c.upload.client_cert or ""),
        client_key=str(c.upload.client_key or ""),
        upload_auth=c.upload.auth.method,  # the method only: its files hold secrets
        compression=c.upload.compression,
        concurrent_requests=c.upload.concurrent_requests,
        retention_keep_bytes=c.retention.keep_bytes,
        worklist_upstream=(
            f"{c.worklist.upstream_ae}@{c.worklist.upstream_host}:{c.worklist.upstream_port}"
            if c.worklist.upstream_host
            else ""
        ),
        web=f"{c.web.bind}:{c.web.port}",
        web_auth=tuple(
            name
            for name, on in (
                ("password", c.web.password_hash),
                ("token", c.web.token_sha256),
                ("client certificate", c.web.client_ca_file),
            )
            if on
        ),
        heartbeat_url=c.heartbeat.url,
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover

"""Storage Commitment reporter: decides, then sends each N-EVENT-REPORT, until the
modality acknowledged it.

Runs in the gateway's main process as a supervised task (gateway/app.py), woken when
the SCP accepted a request (a receiver process says so), when instances were
confirmed or failed for good (the pipeline), and every second while a request waits
for decisions (its deadline, ``commitment.timeout_hours``, passes without anyone
saying so); rounds are spaced by at least a quarter of a second, and by twice what the
last deciding step took.  Each round:

1. decides what can be decided (gateway/commitment/decide.py), on a reader
   connection, and records it: a request whose every instance is decided is ``due``;
2. sends the due reports, one association per requesting AE (concurrently), to its
   ``[[dimse.remote]]`` entry (host and port; the gateway's own ``dimse.ae_title``
   calls it).  The association proposes the Storage Commitment Push Model SOP Class
   with SCP/SCU Role Selection, the gateway as SCP (PS3.4 J.3.3: the N-EVENT-REPORT
   goes from the SCP to the SCU); Event Type ID 1 when every instance is committed
   (Referenced SOP Sequence), 2 when some failed (Failed SOP Sequence with each
   Failure Reason, and the committed ones in Referenced SOP Sequence).

A request is ``reported`` only once the modality answered the N-EVENT-REPORT with a
success (or warning) status, and that write is durable before the next report goes.
No association, no answer, an abort or a failure status: the report stays ``due``
and is tried again after ``commitment.report_backoff_initial_seconds`` doubling to
``report_backoff_max_seconds`` (with jitter), as long as it takes; the other AEs'
reports go on meanwhile.  Its state lives in SQLite, so a restart or a ``kill -9``
loses nothing: a report being sent when the gateway died (``reporting``) is sent again
at start.  Each request is so reported once, except when the gateway dies between the
modality's answer and that durable write: then the modality receives the same report
twice (the same Transaction UID and content), which it may ignore.

The report never goes on the requester's own association (the standard allows it
when that association is still open): the N-ACTION was answered long before the
archive confirmed anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from ..aio import in_daemon_thread, wait_event
from ..backoff import backoff_seconds
from ..clock import utc_in, utcnow
from ..config import Config, RemoteAE
from ..dicom import negotiation, patches
from ..dicom.tcp import NO_DELAY_HANDLERS
from ..store import Store
from . import decide, requests
from .requests import Report

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

#: Reports looked at per round.
_BATCH = 100
#: While a request waits for decisions, a round at least this often (deadlines).
_DECIDE_POLL_S = 1.0
_IDLE_POLL_S = 5.0
#: Rounds are woken by every upload confirmation and N-ACTION, and each reads every
#: instance still waited on: the next round starts no sooner than _ROUND_GAP_S after
#: the last one started, nor than _ROUND_COST_FACTOR times its deciding step's own
#: time after that step ended, so that a large backlog confirmed in a burst (the WAN
#: back after an outage) costs at most a third of a core.
_ROUND_GAP_S = 0.25
_ROUND_COST_FACTOR = 2.0
#: Reported requests are kept this long (``commitment ls``, the per-study view).
_KEEP_DAYS = 30
_PRUNE_INTERVAL_S = 3600.0


class _NoAssociation(Exception):
    pass


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    reason: str = ""
    #: The request may have reached the modality (no answer, an abort).
    maybe: bool = False


def event_information(report: Report) -> Dataset:
    """The N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2)."""
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    committed, failed = [], []
    for item in report.items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.sop_class_uid
        ref.ReferencedSOPInstanceUID = item.sop_instance_uid
        if item.failure_reason is None:
            committed.append(ref)
        else:
            ref.FailureReason = item.failure_reason
            failed.append(ref)
    if committed:
        ds.ReferencedSOPSequence = Sequence(committed)
    if failed:
        ds.FailedSOPSequence = Sequence(failed)
    return ds


def classify(status: Dataset) -> Delivery:
    """What the modality's answer to an N-EVENT-REPORT means."""
    if "Status" not in status:
        return Delivery(False, "no answer from the modality (timeout or abort)", maybe=True)
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "")
    said = f"0x{code:04X}" + (f" {comment}" if comment else "")
    if code_to_category(code) in ("Success", "Warning"):
        return Delivery(True, "" if code == 0 else f"modality answered warning {said}")
    return Delivery(False, f"modality answered {said}")


class Reporter:
    """Decides Storage Commitment requests and reports them; fed through :meth:`wake`."""

    def __init__(self, config: Config, store: Store, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._pruned_at = -_PRUNE_INTERVAL_S
        self._next_round_at = 0.0
        #: Called on the loop when a report was delivered: retention may let its
        #: instances' files go now (set by the gateway).
        self.on_reported: Callable[[], None] | None = None

    def wake(self) -> None:
        """Thread-safe: a request was accepted, or instances were confirmed or failed."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing: the next start sees it
                loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        requeued = await self.store.run(requests.requeue_interrupted)
        if requeued:
            log.warning("Storage Commitment: %d reports were being sent when we stopped;"
                        " sending them again", requeued)  # fmt: skip
        while True:
            if time.monotonic() - self._pruned_at >= _PRUNE_INTERVAL_S:
                self._pruned_at = time.monotonic()
                await self.store.run(
                    lambda conn: requests.prune(conn, utc_in(-_KEEP_DAYS * 86400)), durable=False
                )
            pause = self._next_round_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            started = time.monotonic()
            waiting = await self._decide()
            ended = time.monotonic()
            self._next_round_at = max(
                started + _ROUND_GAP_S, ended + _ROUND_COST_FACTOR * (ended - started)
            )
            reports = await asyncio.to_thread(
                self.store.read, requests.due_reports(utcnow(), _BATCH)
            )
            by_ae: defaultdict[str, list[Report]] = defaultdict(list)
            for report in reports:
                by_ae[report.requesting_ae].append(report)
            # One association per AE, all at once: a modality that does not answer
            # holds up its own reports only.
            async with asyncio.TaskGroup() as tg:
                for ae_title, theirs in by_ae.items():
                    tg.create_task(self._report_to(ae_title, theirs))
            if len(reports) >= _BATCH:
                continue
            await wait_event(self._wake, await self._idle_time(waiting))

    async def _decide(self) -> bool:
        """One deciding round; True while some request still waits for decisions."""
        decisions = await asyncio.to_thread(self.store.read, decide.evaluate)
        if decisions:
            due = await self.store.run(decide.record(decisions), durable=False)
            for uid in due:
                log.info("Storage Commitment transaction %s decided; its report is due", uid)
        return await asyncio.to_thread(self.store.read, requests.has_waiting)

    async def _idle_time(self, waiting: bool) -> float:
        wait = _DECIDE_POLL_S if waiting else _IDLE_POLL_S
        due = await asyncio.to_thread(self.store.read, requests.next_report_at)
        if due is not None:
            left = (datetime.fromisoformat(due) - datetime.now(UTC)).total_seconds()
            wait = min(wait, max(0.05, left))
        return wait

    def _backoff(self, attempts: int) -> float:
        c = self.config.commitment
        return backoff_seconds(
            attempts, c.report_backoff_initial_seconds, c.report_backoff_max_seconds
        )

    async def _later(self, report: Report, reason: str, maybe: bool = False) -> float:
        delay = self._backoff(report.attempts + 1)
        await self.store.run(
            requests.retry_report(report.transaction_uid, reason, utc_in(delay), maybe),
            durable=False,
        )
        if self.metrics is not None:
            self.metrics.commitment_reports.labels("retry").inc()
        return delay

    async def _report_to(self, ae_title: str, reports: list[Report]) -> None:
        remote = self.config.dimse.remote_ae(ae_title)
        if remote is None:
            for report in reports:
                delay = await self._later(report, f"no [[dimse.remote]] entry for AE {ae_title}")
            log.error("Storage Commitment: %d reports for %r wait: it has no [[dimse.remote]]"
                      " entry (again in %.0f s)", len(reports), ae_title, delay)  # fmt: skip
            return
        ae = self._new_ae()
        try:
            assoc = await in_daemon_thread("commitment-report", self._associate, ae, remote)
        except asyncio.CancelledError:
            # Stopping: pynetdicom's DUL thread is no daemon, and a silent modality
            # would hold up the exit for the ACSE timeout.
            patches.stop_association_attempts(ae)
            raise
        except _NoAssociation as exc:
            for report in reports:
                delay = await self._later(report, str(exc))
            log.error("Storage Commitment: modality %s@%s:%d unreachable, %d reports wait"
                      " (again in %.0f s): %s", remote.ae_title, remote.host, remote.port,
                      len(reports), delay, exc)  # fmt: skip
            return
        released = False
        try:
            for n, report in enumerate(reports):
                await self.store.run(requests.mark_reporting(report.transaction_uid), False)
                delivery = await in_daemon_thread("commitment-report", self._send, assoc, report)
                if not delivery.delivered:
                    delay = await self._later(report, delivery.reason, delivery.maybe)
                    log.error("Storage Commitment report of transaction %s to %s not delivered"
                              " (again in %.0f s): %s", report.transaction_uid, ae_title, delay,
                              delivery.reason)  # fmt: skip
                    if not assoc.is_established:
                        for rest in reports[n + 1 :]:
                            await self._later(rest, "association lost")
                        return
                    continue
                # Durable before anything else: this is what stops it being sent again.
                await self.store.run(
                    requests.mark_reported(report.transaction_uid, delivery.reason), durable=True
                )
                self._delivered(report, ae_title, delivery)
                if self.on_reported is not None:
                    self.on_reported()
            await in_daemon_thread("commitment-report", assoc.release)
            released = True
        finally:
            if not released and assoc.is_established:
                assoc.abort()

    def _delivered(self, report: Report, ae_title: str, delivery: Delivery) -> None:
        failed = sum(1 for i in report.items if i.failure_reason is not None)
        log.info(
            "Storage Commitment report of transaction %s delivered to %s: event type %d,"
            " %d committed, %d failed%s%s",
            report.transaction_uid, ae_title, report.event_type, len(report.items) - failed,
            failed, " (sent again: it may have arrived before)" if report.maybe_reported else "",
            f"; {delivery.reason}" if delivery.reason else "",
        )  # fmt: skip
        if self.metrics is not None:
            outcome = (
                "all_committed"
                if report.event_type == requests.EVENT_ALL_COMMITTED
                else "some_failed"
            )
            self.metrics.commitment_reports.labels(outcome).inc()

    def _new_ae(self) -> AE:
        # A plain AE, not the receiving server's (as the MPPS forwarder's).
        ae = AE(ae_title=self.config.dimse.ae_title)
        timeout = self.config.commitment.report_timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.add_requested_context(
            negotiation.STORAGE_COMMITMENT, list(negotiation.SCU_TRANSFER_SYNTAXES)
        )
        return ae

    @staticmethod
    def _associate(ae: AE, remote: RemoteAE) -> Association:
        # PS3.4 J.3.3: the SCP sends the report; Role Selection says we are the SCP.
        role = build_role(negotiation.STORAGE_COMMITMENT, scu_role=False, scp_role=True)
        try:
            assoc = ae.associate(
                remote.host, remote.port, ae_title=remote.ae_title, ext_neg=[role],
                evt_handlers=NO_DELAY_HANDLERS,
            )  # fmt: skip
        except (OSError, RuntimeError) as exc:
            raise _NoAssociation(f"cannot connect: {exc}") from exc
        if not assoc.is_established:
            raise _NoAssociation("association refused, aborted or not answered")
        if not any(
            cx.abstract_syntax == negotiation.STORAGE_COMMITMENT for cx in assoc.accepted_contexts
        ):
            assoc.release()
            raise _NoAssociation("the modality does not accept the Storage Commitment SOP Class")
        return assoc

    @staticmethod
    def _send(assoc: Association, report: Report) -> Delivery:
        try:
            status, _ = assoc.send_n_event_report(
                event_information(report),
                report.event_type,
                negotiation.STORAGE_COMMITMENT,
                negotiation.STORAGE_COMMITMENT_INSTANCE,
            )
        except (OSError, RuntimeError, ValueError) as exc:
            return Delivery(False, f"sending failed: {exc!r}", maybe=True)
        return classify(status)

"""The gauges read from the status document at scrape time, in the gateway's registry
(gateway/metrics.py): health and archive state, queue depth by state, uploads, spool
space, worklist refreshes, the MPPS outbox, Storage Commitment, calling AEs, the
client certificate, uptime.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..commitment.requests import RequestState
from ..metrics import PREFIX
from ..mpps.outbox import OutboxState
from .status_doc import ArchiveState, HealthState, StatusDoc

#: The values of ``dicom_gateway_health_state{state}`` and ``..._archive_state{state}``.
HEALTH_STATES: tuple[str, ...] = typing.get_args(HealthState)
ARCHIVE_STATES: tuple[str, ...] = typing.get_args(ArchiveState)


class SnapshotCollector(Collector):
    """Gauges read from the latest status document (as built by gateway.web.status)."""

    def __init__(self, source: Callable[[], StatusDoc | None]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time, never at registration

    def collect(self) -> Iterator[Metric]:
        s = self.source()
        if s is None:
            return
        yield _state_set(
            "health_state",
            "1 for the gateway's health (ok, degraded, failing: the status page's verdict), 0"
            " for the others; failing means C-STOREs are refused",
            HEALTH_STATES,
            s.health.state,
        )
        yield _state_set(
            "archive_state",
            "1 for the archive's state as the uploads last found it, 0 for the others",
            ARCHIVE_STATES,
            s.archive.state,
        )
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_instances", "instances in the queue by state", labels=["state"]
        )
        for state, n in s.queue.by_state.items():
            depth.add_metric([state], n)
        yield depth
        yield _gauge(
            "queue_oldest_pending_enqueue_timestamp_seconds",
            "when the oldest instance not yet uploaded was received (0: none)",
            s.queue.oldest_pending_ts or 0,
        )
        yield _gauge("associations_active", "DIMSE associations open now", s.associations_active)
        yield _gauge(
            "last_successful_upload_timestamp_seconds",
            "when the archive last confirmed an instance (0: never)",
            s.archive.last_success_ts or 0,
        )
        uploads = s.uploads
        yield _gauge("uploads_paused", "1 when uploads are paused", int(uploads.paused))
        yield _gauge(
            "upload_limit_bytes_per_second",
            "upload.max_bytes_per_second, the cap on upload body bytes (0: unlimited)",
            uploads.limit_bytes_per_second,
        )
        yield _gauge(
            "upload_window_open",
            "1 when an upload window is open (or none is configured), 0 when uploads wait",
            int(uploads.window_open),
        )
        disk = s.disk
        yield _gauge("spool_bytes", "bytes of instances held in the spool", disk.spool_bytes)
        if disk.free_bytes is not None:  # None only before the first snapshot
            yield _gauge("spool_free_bytes", "free bytes on the spool file system", disk.free_bytes)
        if disk.total_bytes is not None:
            yield _gauge(
                "spool_filesystem_size_bytes", "size of the spool file system", disk.total_bytes
            )
        yield _gauge("spool_min_free_bytes", "below this C-STOREs are refused", disk.min_free_bytes)
        refreshed = GaugeMetricFamily(
            f"{PREFIX}_worklist_last_refresh_timestamp_seconds",
            "last successful worklist refresh per source (0: never)",
            labels=["source"],
        )
        interval = GaugeMetricFamily(
            f"{PREFIX}_worklist_refresh_interval_seconds",
            "seconds between two reads of each configured worklist source",
            labels=["source"],
        )
        for w in s.worklist:
            refreshed.add_metric([w.source], w.last_success_ts or 0)
            if w.refresh_interval_seconds is not None:
                interval.add_metric([w.source], w.refresh_interval_seconds)
        yield refreshed
        yield interval
        outbox = GaugeMetricFamily(
            f"{PREFIX}_mpps_outbox_messages",
            "MPPS messages not yet delivered to the RIS, by state",
            labels=["state"],
        )
        o = OutboxState
        for state, n in ((o.PENDING, s.mpps.pending), (o.SENDING, s.mpps.sending),
                         (o.FAILED, s.mpps.failed)):  # fmt: skip
            outbox.add_metric([state.value], n)
        yield outbox
        yield _gauge(
            "mpps_outbox_oldest_pending_timestamp_seconds",
            "when the oldest MPPS message still to be delivered came in (0: none)",
            s.mpps.oldest_pending_ts or 0,
        )
        yield from _commitment(s)
        # Bounded: the status document lists at most 200 calling AEs (gateway.instances).
        received = GaugeMetricFamily(
            f"{PREFIX}_calling_ae_instances_last_24h",
            "instances received in the last 24 hours, by calling AE title",
            labels=["calling_ae"],
        )
        seen = GaugeMetricFamily(
            f"{PREFIX}_calling_ae_last_seen_timestamp_seconds",
            "when an instance of this calling AE title was last received",
            labels=["calling_ae"],
        )
        for m in s.modalities:
            received.add_metric([m.calling_ae], m.last_24h)
            if m.last_seen_ts is not None:
                seen.add_metric([m.calling_ae], m.last_seen_ts)
        yield received
        yield seen
        cert = s.certificate
        if cert.not_after_ts is not None:
            yield _gauge(
                "client_certificate_expiry_timestamp_seconds",
                "notAfter of upload.client_cert",
                cert.not_after_ts,
            )
        yield _gauge("uptime_seconds", "seconds since the gateway started", s.uptime_seconds)


def _commitment(s: StatusDoc) -> Iterator[Metric]:
    c = s.commitment
    requests = GaugeMetricFamily(
        f"{PREFIX}_commitment_requests",
        "Storage Commitment requests by state: waiting (for the archive), due (the report),"
        " reporting (being sent), reported (kept 30 days)",
        labels=["state"],
    )
    r = RequestState
    for state, n in ((r.WAITING, c.waiting), (r.DUE, c.due), (r.REPORTING, c.reporting),
                     (r.REPORTED, c.reported)):  # fmt: skip
        requests.add_metric([state.value], n)
    yield requests
    yield _gauge(
        "commitment_oldest_unreported_timestamp_seconds",
        "when the oldest Storage Commitment request not yet reported came in (0: none)",
        c.oldest_unreported_ts or 0,
    )
    # Bounded by [[dimse.remote]]: only a listed AE's request is accepted.
    due = GaugeMetricFamily(
        f"{PREFIX}_commitment_report_due_timestamp_seconds",
        "when the oldest Storage Commitment report not yet delivered to this requesting AE"
        " became due (no series: none waits)",
        labels=["requesting_ae"],
    )
    for u in c.undelivered:
        due.add_metric([u.requesting_ae], u.due_since_ts)
    yield due


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _state_set(name: str, doc: str, states: tuple[str, ...], current: str) -> GaugeMetricFamily:
    """One sample per possible state, 1 for *current*: an alert can ask for a state
    by name, and a state never seen still has a series (at 0)."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["state"])
    for state in states:
        family.add_metric([state], int(state == current))
    return family

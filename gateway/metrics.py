"""Prometheus metrics: one registry per gateway, one prefix, base units.

Counters and histograms are incremented where things happen (receiver, pipeline,
STOW-RS client); they are thread-safe, so pynetdicom's threads may call them.  The
gauges that are database counts or file-system facts are not kept up to date by
anybody: :class:`SnapshotCollector` reads them at scrape time from the latest status
snapshot, which the web server refreshes off the event loop first.

A registry of its own (not prometheus_client's global one) lets several gateways live
in one process, as tests do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .mpps.outbox import OutboxState

if TYPE_CHECKING:
    from .web.status_doc import StatusDoc

PREFIX = "dicom_gateway"

#: C-STORE status -> ``result`` label of ``dicom_gateway_instances_received_total``.
STORE_RESULTS = {
    0x0000: "stored",
    0xA700: "out_of_resources",
    0xA900: "dataset_mismatch",
    0xC000: "invalid_uid",
    0xC210: "undecodable",
    0xC001: "processing_failure",
}

# Seconds: a STOW-RS request of one small instance on a LAN takes ~10 ms, a 64 MB
# batch over a thin uplink minutes.
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATIO_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
# Seconds from a study's first receipt to the archive's confirmation of its last
# instance: a few seconds on a LAN, hours through a WAN outage.
_STUDY_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            f"{PREFIX}_instances_received",
            "C-STORE requests answered, by result",
            ["result"],
            registry=r,
        )
        self.associations_accepted = Counter(
            f"{PREFIX}_associations_accepted", "DIMSE associations accepted", registry=r
        )
        self.associations_rejected = Counter(
            f"{PREFIX}_associations_rejected",
            "DIMSE associations rejected, by reason",
            ["reason"],
            registry=r,
        )
        self.stow_requests = Counter(
            f"{PREFIX}_stow_requests",
            'STOW-RS requests, by HTTP status code ("error": no HTTP answer)',
            ["code"],
            registry=r,
        )
        self.stow_duration = Histogram(
            f"{PREFIX}_stow_request_duration_seconds",
            "STOW-RS request duration",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.uploaded_bytes = Counter(
            f"{PREFIX}_uploaded_bytes", "bytes of instances the archive confirmed", registry=r
        )
        self.uploaded_instances = Counter(
            f"{PREFIX}_uploaded_instances",
            "instances sent by outcome (stored, retry, failed)",
            ["outcome"],
            registry=r,
        )
        self.stow_warnings = Counter(
            f"{PREFIX}_stow_warnings",
            "warnings of the archive about instances it stored, by code (WarningReason as"
            ' 0xNNNN, "attributes" for a FailedAttributesSequence entry)',
            ["code"],
            registry=r,
        )
        self.verifications = Counter(
            f"{PREFIX}_archive_verifications",
            "checks of the archive's copy of an instance it says it holds (WADO-RS"
            " metadata), by result (match, mismatch, absent, error)",
            ["result"],
            registry=r,
        )
        for result in ("match", "mismatch", "absent", "error"):
            self.verifications.labels(result)
        self.compression_ratio = Histogram(
            f"{PREFIX}_compression_ratio",
            "original size / compressed size of each instance compressed",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.component_restarts = Counter(
            f"{PREFIX}_component_restarts",
            "crashed components restarted in-process (pipeline, worklist, mpps, commitment,"
            " studies, heartbeat)",
            ["component"],
            registry=r,
        )
        for component in ("pipeline", "worklist", "mpps", "commitment", "studies", "heartbeat"):
            self.component_restarts.labels(component)
        self.commitment_reports = Counter(
            f"{PREFIX}_commitment_reports",
            "Storage Commitment N-EVENT-REPORTs sent, by outcome (all_committed,"
            " some_failed: the modality acknowledged it; retry: not delivered, tried again)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("all_committed", "some_failed", "retry"):
            self.commitment_reports.labels(outcome)
        self.study_confirmation = Histogram(
            f"{PREFIX}_study_confirmation_seconds",
            "per complete study: from its first receipt to the archive's confirmation of"
            " its last instance",
            buckets=_STUDY_BUCKETS,
            registry=r,
        )
        for result in STORE_RESULTS.values():
            self.instances_received.labels(result)
        for outcome in ("stored", "retry", "failed"):
            self.uploaded_instances.labels(outcome)
        Info(f"{PREFIX}_build", "version of this gateway", registry=r).info(
            {"version": __version__}
        )

    def store_answered(self, status: int) -> None:
        self.instances_received.labels(STORE_RESULTS.get(status, f"0x{status:04x}")).inc()

    def add_gauges(self, source: Callable[[], StatusDoc | None]) -> None:
        """Collect the snapshot gauges from *source* (see :class:`SnapshotCollector`)."""
        self.registry.register(SnapshotCollector(source))


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
        yield _gauge("spool_min_free_bytes", "below this C-STOREs are refused", disk.min_free_bytes)
        refreshed = GaugeMetricFamily(
            f"{PREFIX}_worklist_last_refresh_timestamp_seconds",
            "last successful worklist refresh per source (0: never)",
            labels=["source"],
        )
        for w in s.worklist:
            refreshed.add_metric([w.source], w.last_success_ts or 0)
        yield refreshed
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
        cert = s.certificate
        if cert.not_after_ts is not None:
            yield _gauge(
                "client_certificate_expiry_timestamp_seconds",
                "notAfter of upload.client_cert",
                cert.not_after_ts,
            )
        yield _gauge("uptime_seconds", "seconds since the gateway started", s.uptime_seconds)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

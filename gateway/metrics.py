"""Prometheus metrics: one registry per gateway, one prefix, base units.

Counters and histograms are incremented where things happen (receiver, pipeline,
STOW-RS client); they are thread-safe, so pynetdicom's threads may call them.  The
gauges that are database counts or file-system facts are not kept up to date by
anybody: gateway/web/gauges.py reads them at scrape time from the latest status
snapshot, which the web server refreshes off the event loop first.

A registry of its own (not prometheus_client's global one) lets several gateways live
in one process, as tests do.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from . import __version__

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
# Seconds from C-STORE to the archive's confirmation: seconds on a quiet LAN box, hours
# behind a closed upload window or an outage.
_END_TO_END_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
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
        self.end_to_end = Histogram(
            f"{PREFIX}_instance_end_to_end_seconds",
            "seconds from an instance's C-STORE answer to the archive's confirmation",
            buckets=_END_TO_END_BUCKETS,
            registry=r,
        )
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

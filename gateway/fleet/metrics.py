"""The fleet receiver's ``/metrics``: each box's last heartbeat as gauges labelled
``box``, read from the database at scrape time (in a worker thread).

Where a heartbeat carries the same fact a box exports itself, the gauge has the box's
own name and meaning (gateway/metrics.py), with ``box`` added: alert rules written for
boxes that Prometheus scrapes directly then also fire for boxes behind NAT.  The
receiver's own facts are prefixed ``dicom_gateway_fleet_``.  monitoring/FLEET_METRICS.md
is the list both sides keep to (tests/test_fleet.py checks it against a scrape).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..heartbeat_body import ArchiveState, HealthState, Heartbeat, timestamp
from ..metrics import PREFIX
from .boxes import Box
from .intake import RESULTS

FLEET = f"{PREFIX}_fleet"

HEALTH_STATES: tuple[str, ...] = typing.get_args(HealthState)
ARCHIVE_STATES: tuple[str, ...] = typing.get_args(ArchiveState)
#: Without ``queue.by_state`` (a box of an earlier release): the queue states its
#: summary counts say exactly.  Its ``pending`` is three states together; not exported.
SUMMARY_STATES = (("uploading", "uploading"), ("failed", "failed"), ("uploaded", "done"))

_DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class FleetMetrics:
    """The receiver's registry: its counters, and the boxes' gauges from *boxes*."""

    def __init__(self, boxes: Callable[[], tuple[float, float, list[Box]]]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.heartbeats = Counter(
            f"{FLEET}_heartbeats",
            "heartbeats received, by result (accepted, or why refused)",
            ["result"],
            registry=r,
        )
        for result in RESULTS:
            self.heartbeats.labels(result)
        self.duration = Histogram(
            f"{FLEET}_heartbeat_duration_seconds",
            "time to handle one heartbeat, from request to answer (TLS handshake excluded)",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        r.register(BoxCollector(boxes))


class BoxCollector(Collector):
    """*source* gives (now, stale_after_seconds, every box)."""

    def __init__(self, source: Callable[[], tuple[float, float, list[Box]]]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # collected only at scrape time, never at registration

    def collect(self) -> Iterator[Metric]:
        now, stale_after, boxes = self.source()
        g = _Gauges()
        g.plain(f"{FLEET}_boxes", "boxes the receiver has heard from", len(boxes))
        for b in boxes:
            g.add(
                f"{FLEET}_last_seen_timestamp_seconds",
                "when the receiver last accepted a heartbeat of the box",
                b,
                b.seen_at,
            )
            g.add(
                f"{FLEET}_box_stale",
                "1 when the box's last heartbeat is older than boxes.stale_after_seconds",
                b,
                int(now - b.seen_at > stale_after),
            )
            if b.cert_not_after is not None:
                g.add(
                    f"{PREFIX}_client_certificate_expiry_timestamp_seconds",
                    "notAfter of the client certificate the box heartbeats with",
                    b,
                    b.cert_not_after,
                )
            if b.heartbeat is not None:
                _from_heartbeat(g, b, b.heartbeat)
        yield from g.families.values()


def _from_heartbeat(g: _Gauges, b: Box, beat: Heartbeat) -> None:
    q, d = beat["queue"], beat["disk"]
    for state in HEALTH_STATES:
        g.add(
            f"{PREFIX}_health_state",
            "1 for the box's health (ok, degraded, failing), 0 for the others",
            b,
            int(beat["health"] == state),
            state=state,
        )
    for state in ARCHIVE_STATES:
        g.add(
            f"{PREFIX}_archive_state",
            "1 for the box's archive state as its uploads last found it, 0 for the others",
            b,
            int(beat["archive"]["state"] == state),
            state=state,
        )
    queue_doc = "instances in the box's queue by state"
    if "by_state" in q:
        for state, count in q["by_state"].items():
            g.add(f"{PREFIX}_queue_instances", queue_doc, b, count, state=state)
    else:
        summary = {"uploading": q["uploading"], "failed": q["failed"], "done": q["done"]}
        for state, key in SUMMARY_STATES:
            g.add(f"{PREFIX}_queue_instances", queue_doc, b, summary[key], state=state)
    g.add(
        f"{PREFIX}_queue_oldest_pending_enqueue_timestamp_seconds",
        "when the box's oldest instance not yet uploaded was received (0: none)",
        b,
        _ts(q["oldest_pending_at"]),
    )
    g.add(
        f"{PREFIX}_last_successful_upload_timestamp_seconds",
        "when the box's archive last confirmed an instance (0: never)",
        b,
        _ts(beat["archive"]["last_success_at"]),
    )
    g.add(
        f"{PREFIX}_uploads_paused",
        "1 when the box's uploads are paused",
        b,
        int(beat["uploads_paused"]),
    )
    if "uploads_window_open" in beat:
        g.add(
            f"{PREFIX}_upload_window_open",
            "1 when an upload window of the box is open (or"
            " none is configured), 0 when its uploads wait",
            b,
            int(beat["uploads_window_open"]),
        )
    g.add(
        f"{PREFIX}_spool_bytes", "bytes of instances held in the box's spool", b, d["spool_bytes"]
    )
    if d["free_bytes"] is not None:
        g.add(
            f"{PREFIX}_spool_free_bytes",
            "free bytes on the box's spool file system",
            b,
            d["free_bytes"],
        )
    g.add(
        f"{PREFIX}_spool_min_free_bytes",
        "below this the box refuses C-STOREs",
        b,
        d["min_free_bytes"],
    )
    for w in beat.get("worklist", []):
        g.add(
            f"{PREFIX}_worklist_last_refresh_timestamp_seconds",
            "the box's last successful worklist refresh per source (0: never)",
            b,
            _ts(w["last_success_at"]),
            source=w["source"],
        )
        if "refresh_interval_seconds" in w:
            g.add(
                f"{PREFIX}_worklist_refresh_interval_seconds",
                "seconds between two reads of each worklist source of the box",
                b,
                w["refresh_interval_seconds"],
                source=w["source"],
            )
    if "mpps" in beat:
        m = beat["mpps"]
        for state, count in (
            ("pending", m["pending"]),
            ("sending", m["sending"]),
            ("failed", m["failed"]),
        ):
            g.add(
                f"{PREFIX}_mpps_outbox_messages",
                "the box's MPPS messages not yet delivered to the RIS, by state",
                b,
                count,
                state=state,
            )
        g.add(
            f"{PREFIX}_mpps_outbox_oldest_pending_timestamp_seconds",
            "when the box's oldest MPPS message still to be delivered came in (0: none)",
            b,
            _ts(m["oldest_pending_at"]),
        )
    g.add(
        f"{PREFIX}_uptime_seconds",
        "seconds the box's gateway had been running",
        b,
        beat["uptime_seconds"],
    )
    g.add(f"{PREFIX}_build_info", "version of the box's gateway", b, 1, version=beat["version"])


def _ts(text: str | None) -> float:
    return timestamp(text) if text else 0.0


class _Gauges:
    """Gauge families built up box by box, each labelled ``box`` first."""

    def __init__(self) -> None:
        self.families: dict[str, GaugeMetricFamily] = {}

    def plain(self, name: str, doc: str, value: float) -> None:
        self.families[name] = GaugeMetricFamily(name, doc, value=value)

    def add(self, name: str, doc: str, box: Box, value: float, **labels: str) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = GaugeMetricFamily(name, doc, labels=["box", *labels])
        family.add_metric([box.box, *labels.values()], value)

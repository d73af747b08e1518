"""The fleet receiver's ``/metrics``: its own counters (a prometheus_client registry,
read at each scrape) followed by each box's last heartbeat as gauges labelled
``box``, written by :class:`BoxGauges` (built at most once per change,
gateway/fleet/views.py).

Where a heartbeat carries the same fact a box exports itself, the gauge has the box's
own name and meaning (gateway/metrics.py), with ``box`` added: alert rules written for
boxes that Prometheus scrapes directly then also fire for boxes behind NAT.  The
receiver's own facts are prefixed ``dicom_gateway_fleet_``.  monitoring/FLEET_METRICS.md
is the list both sides keep to (tests/test_fleet.py checks it against a scrape).

The boxes' gauges are written as text rather than through prometheus_client's metric
families: at 1,000 boxes that is some 30,000 samples, and its objects and formatting
cost about 7 microseconds a sample, most of a scrape's time.  The text is the same
format (0.0.4) with the same escaping, label order and number formatting
(``floatToGoString``); a test reads it back with prometheus_client's parser.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.utils import floatToGoString

from ..heartbeat_body import ArchiveState, HealthState, Heartbeat, HeartbeatCommitment, timestamp
from ..metrics import PREFIX
from .boxes import Box, is_stale
from .intake import RESULTS

FLEET = f"{PREFIX}_fleet"

HEALTH_STATES: tuple[str, ...] = typing.get_args(HealthState)
ARCHIVE_STATES: tuple[str, ...] = typing.get_args(ArchiveState)
#: Without ``queue.by_state`` (a box of an earlier release): the queue states its
#: summary counts say exactly.  Its ``pending`` is three states together; not exported.
SUMMARY_STATES = (("uploading", "uploading"), ("failed", "failed"), ("uploaded", "done"))
#: What :class:`~gateway.fleet.views.CachedView` builds, for ``..._view_builds_total``.
VIEWS = ("page", "metrics")

_DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class FleetMetrics:
    """The receiver's own registry: counters and the handling-time histogram."""

    def __init__(self) -> None:
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
        self.view_builds = Counter(
            f"{FLEET}_view_builds",
            "builds of the fleet page and of the boxes' metrics (each serves every request"
            " until the data changes)",
            ["view"],
            registry=r,
        )
        for view in VIEWS:
            self.view_builds.labels(view)


STALE = f"{FLEET}_box_stale"


class BoxGauges:
    """Writes the boxes' gauges, and remembers each box's lines until its row changes:
    at 1,000 boxes heartbeating every 30 s, a build every 2 s formats 70 of them anew
    and only copies the rest.  Not thread-safe: one build at a time (a
    :class:`~gateway.fleet.views.CachedView` runs one at a time)."""

    def __init__(self) -> None:
        self._headers: dict[str, str] = {}
        #: box -> (what its lines were written from, its samples by family)
        self._memo: dict[str, tuple[tuple[object, ...], dict[str, list[str]]]] = {}

    def exposition(self, now: float, stale_after: float, boxes: Sequence[Box]) -> bytes:
        """The boxes' gauges, in the text format, for a scrape at *now*."""
        boxes_name = f"{FLEET}_boxes"
        self._headers.setdefault(
            boxes_name, _header(boxes_name, "boxes the receiver has heard from")
        )
        families: dict[str, list[str]] = {boxes_name: [f"{boxes_name} {_value(len(boxes))}\n"]}
        memo: dict[str, tuple[tuple[object, ...], dict[str, list[str]]]] = {}
        for b in boxes:
            # A new heartbeat always has a newer sent_at; forgotten and back, a new first_seen_at.
            key = (b.sent_at, b.seen_at, b.first_seen_at, b.heartbeats, b.cert_not_after)
            known = self._memo.get(b.box)
            if known is None or known[0] != key:
                known = (key, self._samples(b))
            memo[b.box] = known
            for name, lines in known[1].items():
                into = families.setdefault(name, [])
                if name == STALE:  # the one that changes with time alone
                    stale = is_stale(b, now, stale_after)
                    into.append(f'{STALE}{{box="{_label(b.box)}"}} {_value(stale)}\n')
                else:
                    into.extend(lines)
        self._memo = memo
        return "".join(
            self._headers[name] + "".join(lines) for name, lines in families.items()
        ).encode()

    def _samples(self, b: Box) -> dict[str, list[str]]:
        g = _Gauges(self._headers)
        box = f'box="{_label(b.box)}"'
        g.add(
            f"{FLEET}_last_seen_timestamp_seconds",
            "when the receiver last accepted a heartbeat of the box",
            box,
            b.seen_at,
        )
        g.family(STALE, "1 when the box's last heartbeat is older than boxes.stale_after_seconds")
        if b.cert_not_after is not None:
            g.add(
                f"{PREFIX}_client_certificate_expiry_timestamp_seconds",
                "notAfter of the client certificate the box heartbeats with",
                box,
                b.cert_not_after,
            )
        if b.heartbeat is not None:
            _from_heartbeat(g, box, b.heartbeat)
        return g.samples


def _from_heartbeat(g: _Gauges, b: str, beat: Heartbeat) -> None:
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
    if "commitment" in beat:
        _commitment(g, b, beat["commitment"])
    g.add(
        f"{PREFIX}_uptime_seconds",
        "seconds the box's gateway had been running",
        b,
        beat["uptime_seconds"],
    )
    g.add(f"{PREFIX}_build_info", "version of the box's gateway", b, 1, version=beat["version"])


def _commitment(g: _Gauges, b: str, c: HeartbeatCommitment) -> None:
    # The state labels are the gateway's (gateway/commitment/requests.py RequestState).
    for state, count in (
        ("waiting", c["waiting"]),
        ("due", c["due"]),
        ("reporting", c["reporting"]),
        ("reported", c["reported"]),
    ):
        g.add(
            f"{PREFIX}_commitment_requests",
            "the box's Storage Commitment requests by state: waiting (for the archive),"
            " due (the report), reporting (being sent), reported (kept 30 days)",
            b,
            count,
            state=state,
        )
    g.add(
        f"{PREFIX}_commitment_oldest_unreported_timestamp_seconds",
        "when the box's oldest Storage Commitment request not yet reported came in (0: none)",
        b,
        _ts(c["oldest_unreported_at"]),
    )
    for u in c["undelivered"]:
        g.add(
            f"{PREFIX}_commitment_report_due_timestamp_seconds",
            "when the box's oldest Storage Commitment report not yet delivered to this"
            " requesting AE became due (no series: none waits)",
            b,
            _ts(u["due_since_at"]),
            requesting_ae=u["requesting_ae"],
        )


def _ts(text: str | None) -> float:
    return timestamp(text) if text else 0.0


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


#: prometheus_client's number formatting (untyped there).
_go = typing.cast(Callable[[float], str], floatToGoString)
#: The values most samples have (states, flags, small counts), formatted once.
_SMALL: dict[float, str] = {n: _go(n) for n in range(256)}


def _value(value: float) -> str:
    text = _SMALL.get(value)
    return text if text is not None else _go(value)


def _header(name: str, doc: str) -> str:
    help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {help_text}\n# TYPE {name} gauge\n"


class _Gauges:
    """One box's samples by family, each labelled ``box`` first; the families' HELP
    and TYPE lines go to *headers*."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.samples: dict[str, list[str]] = {}

    def family(self, name: str, doc: str) -> list[str]:
        lines = self.samples.get(name)
        if lines is None:
            lines = self.samples[name] = []
            if name not in self.headers:
                self.headers[name] = _header(name, doc)
        return lines

    def add(self, name: str, doc: str, box: str, value: float, **labels: str) -> None:
        """A sample of *name*; *box* is the box's label pair, already escaped."""
        extra = "".join(f',{k}="{_label(v)}"' for k, v in labels.items())
        self.family(name, doc).append(f"{name}{{{box}{extra}}} {_value(value)}\n")

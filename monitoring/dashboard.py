"""The Grafana dashboard of the dicom-gateway mixin, built with grafanalib.

``make dashboard`` writes it to monitoring/dashboard.json (``python
monitoring/dashboard.py OUT``); import that file into Grafana.  Every query reads
metrics a gateway exports (gateway/metrics.py) or the recording rules of
monitoring/rules.yml; tests/test_monitoring.py checks each name, so a renamed metric
fails the build instead of leaving an empty panel.

The variables pick boxes by ``job``, ``instance`` and ``box``: a gateway scraped
directly has no ``box`` label, a box behind the fleet receiver has one, and "All"
(``.*``) matches both.  Counters and histograms (throughput, latency) exist only for
boxes scraped directly; a heartbeat carries gauges only (monitoring/FLEET_METRICS.md).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from grafanalib._gen import write_dashboard
from grafanalib.core import (
    BarGauge,
    Dashboard,
    GridPos,
    Panel,
    RowPanel,
    Stat,
    Target,
    Template,
    Templating,
    Threshold,
    TimeSeries,
)

DATASOURCE = "${datasource}"
#: The boxes the variables pick; in every selector of the dashboard.
BOXES = 'job=~"$job", instance=~"$instance", box=~"$box"'
#: A box's name in legends: its fleet name, or the address it is scraped at.
WHO = "{{instance}} {{box}}"
RATE = "[$__rate_interval]"


def target(expr: str, legend: str = "", ref: str = "A") -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATASOURCE)


def timeseries(
    title: str,
    targets: list[Target],
    pos: tuple[int, int, int, int],
    unit: str = "short",
    description: str = "",
    stacked: bool = False,
) -> TimeSeries:
    x, y, w, h = pos
    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=targets,
        gridPos=GridPos(h=h, w=w, x=x, y=y),
        unit=unit,
        stacking={"mode": "normal", "group": "A"} if stacked else {},
        fillOpacity=30 if stacked else 0,
        legendDisplayMode="table",
        legendPlacement="right",
        legendCalcs=["lastNotNull", "max"],
    )


def variable(name: str, label: str, query: str) -> Template:
    return Template(
        name=name,
        label=label,
        dataSource=DATASOURCE,
        query=query,
        includeAll=True,
        multi=True,
        allValue=".*",
        default="$__all",
        refresh=2,  # on time range change: boxes come and go
    )


def dashboard() -> Dashboard:
    panels: list[Panel] = [
        RowPanel(title="Boxes", gridPos=GridPos(h=1, w=24, x=0, y=0)),
        Stat(
            title="Boxes by health",
            description="ok / degraded / failing (failing: C-STOREs are refused)",
            dataSource=DATASOURCE,
            targets=[
                target(f"sum by (state) (dicom_gateway_health_state{{{BOXES}}})", "{{state}}")
            ],
            gridPos=GridPos(h=5, w=6, x=0, y=1),
            reduceCalc="lastNotNull",
            textMode="value_and_name",
        ),
        Stat(
            title="Archive unreachable",
            description="boxes whose uploads last failed to reach the archive",
            dataSource=DATASOURCE,
            targets=[target(f'sum(dicom_gateway_archive_state{{state="unreachable", {BOXES}}})')],
            gridPos=GridPos(h=5, w=6, x=6, y=1),
            reduceCalc="lastNotNull",
            thresholds=[
                Threshold("green", 0, 0.0),
                Threshold("red", 1, 1.0),
            ],
        ),
        Stat(
            title="Failed instances",
            description="instances that need a person: retry them or read their reason",
            dataSource=DATASOURCE,
            targets=[target(f'sum(dicom_gateway_queue_instances{{state="failed", {BOXES}}})')],
            gridPos=GridPos(h=5, w=6, x=12, y=1),
            reduceCalc="lastNotNull",
            thresholds=[
                Threshold("green", 0, 0.0),
                Threshold("orange", 1, 1.0),
            ],
        ),
        BarGauge(
            title="Client certificate days left",
            description="the upload client certificate's notAfter; ClientCertificateExpiring"
            " fires under 21 days",
            dataSource=DATASOURCE,
            targets=[
                target(
                    "(dicom_gateway_client_certificate_expiry_timestamp_seconds"
                    f"{{{BOXES}}} - time()) / 86400",
                    WHO,
                )
            ],
            gridPos=GridPos(h=5, w=6, x=18, y=1),
            calc="lastNotNull",
            min=0,
            max=400,
            displayMode="basic",
            thresholds=[
                Threshold("red", 0, 0.0),
                Threshold("orange", 1, 21.0),
                Threshold("green", 2, 60.0),
            ],
        ),
        RowPanel(title="Queue", gridPos=GridPos(h=1, w=24, x=0, y=6)),
        timeseries(
            "Queue by state",
            [
                target(
                    f'sum by (state) (dicom_gateway_queue_instances{{state!="uploaded", {BOXES}}})',
                    "{{state}}",
                )
            ],
            (0, 7, 12, 8),
            description="instances not yet in the archive, and failed ones",
            stacked=True,
        ),
        timeseries(
            "Oldest pending instance",
            [
                target(
                    "time() - (dicom_gateway_queue_oldest_pending_enqueue_timestamp_seconds"
                    f"{{{BOXES}}} > 0)",
                    WHO,
                )
            ],
            (12, 7, 12, 8),
            unit="s",
            description="how long the oldest instance not yet uploaded has waited;"
            " OldestPendingTooOld fires past an hour",
        ),
        RowPanel(title="Throughput and latency", gridPos=GridPos(h=1, w=24, x=0, y=15)),
        timeseries(
            "Instances received and uploaded",
            [
                target(
                    "sum(rate(dicom_gateway_instances_received_total"
                    f'{{result="stored", {BOXES}}}{RATE}))',
                    "received",
                    "A",
                ),
                target(
                    "sum(rate(dicom_gateway_uploaded_instances_total"
                    f'{{outcome="stored", {BOXES}}}{RATE}))',
                    "uploaded",
                    "B",
                ),
                target(
                    "sum(rate(dicom_gateway_instances_received_total"
                    f'{{result!="stored", {BOXES}}}{RATE}))',
                    "refused",
                    "C",
                ),
            ],
            (0, 16, 12, 8),
            unit="ops",
            description="instances per second (boxes scraped directly)",
        ),
        timeseries(
            "Bytes uploaded",
            [
                target(
                    f"sum by (job, instance) (rate(dicom_gateway_uploaded_bytes_total{{{BOXES}}}"
                    f"{RATE}))",
                    "{{instance}}",
                )
            ],
            (12, 16, 12, 8),
            unit="Bps",
            description="bytes of instances the archive confirmed, per second",
        ),
        timeseries(
            "End-to-end latency",
            [
                target(
                    f"histogram_quantile({q}, sum by (le) (rate("
                    f"dicom_gateway_instance_end_to_end_seconds_bucket{{{BOXES}}}{RATE})))",
                    f"p{round(q * 100)}",
                    ref,
                )
                for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
            ],
            (0, 24, 12, 8),
            unit="s",
            description="C-STORE answer to the archive's confirmation, per instance",
        ),
        timeseries(
            "STOW-RS requests",
            [
                target(
                    f"sum by (code) (rate(dicom_gateway_stow_requests_total{{{BOXES}}}{RATE}))",
                    "{{code}}",
                    "A",
                ),
                target(
                    "histogram_quantile(0.95, sum by (le) (rate("
                    f"dicom_gateway_stow_request_duration_seconds_bucket{{{BOXES}}}{RATE})))",
                    "p95 duration (s)",
                    "B",
                ),
            ],
            (12, 24, 12, 8),
            unit="short",
            description="requests per second by HTTP status (error: no answer), and the"
            " 95th percentile of their duration",
        ),
        RowPanel(
            title="Disk, modalities, worklist, MPPS, Storage Commitment",
            gridPos=GridPos(h=1, w=24, x=0, y=32),
        ),
        timeseries(
            "Spool disk",
            [
                target(f"dicom_gateway_spool_free_bytes{{{BOXES}}}", f"free {WHO}", "A"),
                target(
                    f"2 * dicom_gateway_spool_min_free_bytes{{{BOXES}}}",
                    f"2x watermark {WHO}",
                    "B",
                ),
                target(f"dicom_gateway_spool_min_free_bytes{{{BOXES}}}", f"watermark {WHO}", "C"),
                target(f"dicom_gateway_spool_bytes{{{BOXES}}}", f"held {WHO}", "D"),
                target(f"dicom_gateway_spool_filesystem_size_bytes{{{BOXES}}}", f"size {WHO}", "E"),
            ],
            (0, 33, 12, 8),
            unit="bytes",
            description="free space on the spool file system against the watermark (below"
            " it C-STOREs are refused; SpoolSpaceLow fires under twice it)",
        ),
        BarGauge(
            title="Instances per calling AE (last 24 h)",
            description="per modality (calling AE title), the 200 seen last",
            dataSource=DATASOURCE,
            targets=[
                target(
                    f"sum by (calling_ae) (dicom_gateway_calling_ae_instances_last_24h{{{BOXES}}})",
                    "{{calling_ae}}",
                )
            ],
            gridPos=GridPos(h=8, w=6, x=12, y=33),
            calc="lastNotNull",
            max=None,
            displayMode="gradient",
        ),
        timeseries(
            "Calling AE last seen",
            [
                target(
                    "time() - max by (calling_ae) (dicom_gateway_calling_ae_last_seen_timestamp"
                    f"_seconds{{{BOXES}}})",
                    "{{calling_ae}}",
                )
            ],
            (18, 33, 6, 8),
            unit="s",
            description="seconds since each modality last sent an instance",
        ),
        timeseries(
            "Worklist source age",
            [
                target(
                    f"time() - dicom_gateway_worklist_last_refresh_timestamp_seconds{{{BOXES}}}",
                    f"{{{{source}}}} {WHO}",
                    "A",
                ),
                target(
                    f"3 * dicom_gateway_worklist_refresh_interval_seconds{{{BOXES}}}",
                    f"alert at {{{{source}}}} {WHO}",
                    "B",
                ),
            ],
            (0, 41, 12, 8),
            unit="s",
            description="seconds since each worklist source was last read; WorklistSourceStale"
            " fires past three refresh periods",
        ),
        timeseries(
            "MPPS outbox",
            [
                target(
                    f"sum by (state) (dicom_gateway_mpps_outbox_messages{{{BOXES}}})",
                    "{{state}}",
                )
            ],
            (12, 41, 12, 8),
            description="MPPS messages not yet delivered to the RIS (failed: refused by it)",
            stacked=True,
        ),
        timeseries(
            "Storage Commitment requests",
            [
                target(
                    f"sum by (state) (dicom_gateway_commitment_requests{{{BOXES}}})",
                    "{{state}}",
                )
            ],
            (0, 49, 12, 8),
            description="Storage Commitment requests by state: waiting for the archive, report"
            " due, being sent, reported (kept 30 days)",
        ),
        timeseries(
            "Storage Commitment report waiting",
            [
                target(
                    f"time() - dicom_gateway_commitment_report_due_timestamp_seconds{{{BOXES}}}",
                    f"{{{{requesting_ae}}}} {WHO}",
                )
            ],
            (12, 49, 12, 8),
            unit="s",
            description="per requesting AE, how long its oldest undelivered report has been"
            " due; CommitmentReportsStuck fires past an hour",
        ),
        RowPanel(title="Fleet (recording rules)", gridPos=GridPos(h=1, w=24, x=0, y=57)),
        timeseries(
            "Fleet throughput",
            [
                target("job:dicom_gateway_instances_received:rate5m", "received {{job}}", "A"),
                target("job:dicom_gateway_instances_uploaded:rate5m", "uploaded {{job}}", "B"),
            ],
            (0, 58, 8, 8),
            unit="ops",
        ),
        timeseries(
            "Fleet queue",
            [
                target("job:dicom_gateway_queue_waiting_instances:sum", "waiting {{job}}", "A"),
                target("job:dicom_gateway_queue_failed_instances:sum", "failed {{job}}", "B"),
            ],
            (8, 58, 8, 8),
        ),
        timeseries(
            "Fleet upload health",
            [
                target(
                    "job:dicom_gateway_stow_requests_failed:ratio_rate5m",
                    "failed requests {{job}}",
                    "A",
                ),
            ],
            (16, 58, 8, 8),
            unit="percentunit",
        ),
    ]
    return Dashboard(
        title="DICOM gateway",
        uid="dicom-gateway",
        description="Queues, uploads and health of dicom-gateway boxes (monitoring/)",
        tags=["dicom-gateway"],
        timezone="browser",
        refresh="30s",
        schemaVersion=39,
        templating=Templating(
            list=[
                Template(
                    name="datasource",
                    label="Data source",
                    query="prometheus",
                    type="datasource",
                    includeAll=False,
                ),
                variable("job", "Job", "label_values(dicom_gateway_health_state, job)"),
                variable(
                    "instance",
                    "Instance",
                    'label_values(dicom_gateway_health_state{job=~"$job"}, instance)',
                ),
                variable(
                    "box",
                    "Box (fleet)",
                    'label_values(dicom_gateway_health_state{job=~"$job"}, box)',
                ),
            ]
        ),
        panels=panels,
    ).auto_panel_ids()


def render() -> str:
    out = io.StringIO()
    write_dashboard(dashboard(), out)
    return out.getvalue()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python monitoring/dashboard.py OUT.json", file=sys.stderr)
        return 2
    Path(argv[1]).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

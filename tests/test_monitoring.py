"""The Prometheus mixin of monitoring/ (issue 16): promtool checks the rules and runs
their unit tests, every metric name in a rule or a dashboard query is one the gateway
exports, every alert has a runbook section in the README, the dashboard is what its
generator makes, and a real Prometheus scraping a real gateway fires
ArchiveUnreachable while the archive is stopped and resolves it once it is back.

Real peers: promtool and Prometheus (Debian package ``prometheus``), the gateway
process, Orthanc behind nginx with mutual TLS (tests/support/archive.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from markdown_it import MarkdownIt

from gateway.metrics import Metrics
from gateway.web.gauges import SnapshotCollector
from gateway.web.status_doc import Modality, WorklistSource

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.peers import storescu
from .support.prometheus import MONITORING, PROMTOOL, PrometheusProcess, rules_for_tests
from .support.status_sample import sample_doc
from .support.web_client import web_port
from .test_upload import _upload_config

REPO = MONITORING.parent
RULE_FILES = (MONITORING / "rules.yml", MONITORING / "alerts.yml")
UNIT_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "dashboard.json"
#: Prometheus's own metric, which GatewayDown and FleetReceiverDown read.
PROMETHEUS_OWN = {"up"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return _rules(MONITORING / "alerts.yml")


# -- promtool -----------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", *map(str, RULE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULE_FILES), done.stdout


def test_promtool_unit_tests_pass() -> None:
    assert UNIT_TESTS, "no promtool unit tests in monitoring/tests/"
    done = _promtool("test", "rules", *map(str, UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(UNIT_TESTS), done.stdout


def test_each_alert_has_a_unit_test_that_fires_and_resolves_it() -> None:
    """In one promtool test, the alert is expected firing at some time and expected
    gone at a later one."""
    fired_then_resolved: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            checks = case.get("alert_rule_test", [])
            for name in {c["alertname"] for c in checks}:
                times = [(_minutes(c["eval_time"]), bool(c["exp_alerts"]))
                         for c in checks if c["alertname"] == name]  # fmt: skip
                fired = [t for t, firing in times if firing]
                if fired and any(not firing and t > min(fired) for t, firing in times):
                    fired_then_resolved.add(name)
    names = {a["alert"] for a in _alerts()}
    assert names - fired_then_resolved == set(), "alerts without a fire-and-resolve test"


def _minutes(duration: str) -> float:
    match = re.fullmatch(r"(\d+)([smh])", duration)
    assert match, duration
    return int(match[1]) * {"s": 1 / 60, "m": 1, "h": 60}[match[2]]


# -- alerts: labels, annotations, runbooks ---------------------------------------------------


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ dropped,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _readme_anchors() -> set[str]:
    tokens = MarkdownIt().parse((REPO / "README.md").read_text())
    return {
        _github_anchor(tokens[i + 1].content)
        for i, t in enumerate(tokens)
        if t.type == "heading_open"
    }


def test_github_anchor_rules() -> None:
    assert _github_anchor("Alert: ArchiveUnreachable") == "alert-archiveunreachable"
    assert (
        _github_anchor("The Prometheus mixin (`monitoring/`)") == "the-prometheus-mixin-monitoring"
    )


def test_each_alert_has_severity_summary_and_a_runbook_section() -> None:
    anchors = _readme_anchors()
    assert "alert-archiveunreachable" in anchors
    assert "the-prometheus-mixin-monitoring" in anchors
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert alert["annotations"]["summary"].strip(), name
        url = alert["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "README.md", url
        assert anchor == f"alert-{name.lower()}", url
        assert anchor in anchors, f"{name}: no README heading for {url}"


# -- metric names: only what the gateway exports ---------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_metric_names() -> set[str]:
    """Every series name the gateway's own registry (gateway/metrics.py) exports, with
    a status document that fills every snapshot gauge."""
    doc = sample_doc(
        certificate__not_after_ts=2e9,
        worklist=(WorklistSource("upstream-mwl", None, None, None, 1, 1.7e9, 300.0),),
        modalities=(Modality("CT_ROOM1", 1, "2026-01-01T00:00:00+00:00", 1.7e9),),
    )
    m = Metrics()
    m.registry.register(SnapshotCollector(lambda: doc))
    names: set[str] = set()
    for family in m.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    return names


def _fleet_only_names() -> set[str]:
    """The receiver's own metrics, from its contract (monitoring/FLEET_METRICS.md)."""
    text = (MONITORING / "FLEET_METRICS.md").read_text()
    section = text.split("## Receiver-only metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(dicom_gateway_fleet_\w+)` \|", section, re.M))


def _metric_names(expr: str) -> set[str]:
    # Grafana's interval variable is not PromQL; any duration parses the same.
    parsed = promql_parser.parse(expr.replace("$__rate_interval", "5m"))
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr}"
            names.add(node.name)
        return True

    promql_parser.walk(parsed, visit)
    return names


def _recorded() -> set[str]:
    return {r["record"] for r in _rules(MONITORING / "rules.yml")}


def test_metric_name_extraction() -> None:
    assert _metric_names(
        'sum by (le) (rate(a_bucket{x=~"$job"}[$__rate_interval])) / on() group_left b:c'
        " unless time() - d > 3 * e"
    ) == {"a_bucket", "b:c", "d", "e"}


def test_exported_names_come_from_the_registry() -> None:
    names = exported_metric_names()
    assert "dicom_gateway_instances_received_total" in names
    assert "dicom_gateway_instance_end_to_end_seconds_bucket" in names
    assert "dicom_gateway_health_state" in names
    assert "dicom_gateway_build_info" in names
    assert "dicom_gateway_instances_received" not in names  # a counter's family name only
    assert _fleet_only_names() >= {
        "dicom_gateway_fleet_last_seen_timestamp_seconds",
        "dicom_gateway_fleet_box_stale",
    }


def test_rules_use_only_metrics_the_gateway_exports() -> None:
    exported = exported_metric_names()
    recorded = _recorded()
    for rule in _rules(MONITORING / "rules.yml"):
        unknown = _metric_names(rule["expr"]) - exported - recorded
        assert not unknown, f"{rule['record']}: {sorted(unknown)} not exported by the gateway"
    allowed = exported | recorded | PROMETHEUS_OWN | _fleet_only_names()
    for alert in _alerts():
        unknown = _metric_names(alert["expr"]) - allowed
        assert not unknown, f"{alert['alert']}: {sorted(unknown)} not exported by the gateway"


# -- the dashboard --------------------------------------------------------------------------


def _generate(out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(MONITORING / "dashboard.py"), str(out)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            yield panel["title"], t["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"])
            assert match, var["query"]
            yield f"variable {var['name']}", match[1]


def test_the_dashboard_is_generated_and_up_to_date(tmp_path: Path) -> None:
    fresh = _generate(tmp_path / "dashboard.json")
    assert json.loads(DASHBOARD.read_text()) == fresh, "run `make dashboard` and commit it"


def test_the_dashboard_is_a_valid_dashboard(tmp_path: Path) -> None:
    d = _generate(tmp_path / "dashboard.json")
    assert d["title"] and d["uid"] == "dicom-gateway"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}  # fmt: skip
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "bargauge"), p["type"]
        assert p["datasource"] == "${datasource}", p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"] and t["datasource"] == "${datasource}"
    titles = {p["title"] for p in panels}
    for wanted in ("Queue by state", "Instances received and uploaded", "Bytes uploaded",
                   "End-to-end latency", "Spool disk", "Client certificate days left",
                   "Instances per calling AE (last 24 h)"):  # fmt: skip
        assert wanted in titles


def test_every_dashboard_query_uses_only_metrics_the_gateway_exports(tmp_path: Path) -> None:
    allowed = exported_metric_names() | _recorded()
    queries = list(_queries(_generate(tmp_path / "dashboard.json")))
    assert len(queries) > 20
    for where, expr in queries:
        unknown = _metric_names(expr) - allowed
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the gateway ({expr})"


def test_a_renamed_metric_is_caught(tmp_path: Path) -> None:
    """The check above can fail: a dashboard with one metric misspelt does."""
    d = _generate(tmp_path / "dashboard.json")
    text = json.dumps(d).replace("dicom_gateway_spool_free_bytes", "dicom_gateway_spool_free")
    allowed = exported_metric_names() | _recorded()
    unknown = set().union(*(_metric_names(e) for _, e in _queries(json.loads(text)))) - allowed
    assert unknown == {"dicom_gateway_spool_free"}


# -- a real Prometheus ----------------------------------------------------------------------


def _wait(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def test_a_real_prometheus_fires_archive_unreachable_and_resolves_it(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    """Prometheus scrapes the gateway every second and evaluates the shipped rules,
    except that this copy of alerts.yml has every ``for:`` cut to 2 s (the shipped
    ArchiveUnreachable waits 15 minutes)."""
    gw = gateway_factory(upload=_upload_config(archive_lab))
    target = f"127.0.0.1:{web_port(gw)}"
    alerts = rules_for_tests(MONITORING / "alerts.yml", tmp_path / "alerts-test.yml", 2)
    prometheus = PrometheusProcess(
        tmp_path / "prometheus",
        [MONITORING / "rules.yml", alerts],
        {"dicom-gateway": [target]},
    )
    try:
        prometheus.start()
        _wait(
            "a scrape of the gateway",
            lambda: bool(prometheus.query('up{job="dicom-gateway"} == 1')),
        )
        _wait(
            "the rules evaluated",
            lambda: bool(prometheus.query("dicom_gateway:queue_waiting_instances:sum")),
        )
        assert prometheus.alerts("ArchiveUnreachable") == []

        archive_lab.stop_nginx()
        path = tmp_path / "ct.dcm"
        corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path).save_as(path)
        assert storescu(gw.port, [path], calling="CT_ROOM1").acknowledged == 1

        def firing() -> bool:
            return [a["state"] for a in prometheus.alerts("ArchiveUnreachable")] == ["firing"]

        _wait("ArchiveUnreachable firing", firing)
        (alert,) = prometheus.alerts("ArchiveUnreachable")
        assert alert["labels"]["instance"] == target
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook_url"] == "README.md#alert-archiveunreachable"
        assert alert["annotations"]["summary"] == (
            f"Gateway {target} cannot upload to its archive."
        )

        archive_lab.start_nginx()
        _wait("ArchiveUnreachable resolved", lambda: prometheus.alerts("ArchiveUnreachable") == [])
        assert prometheus.query('dicom_gateway_archive_state{state="reachable"} == 1')
    finally:
        prometheus.stop()

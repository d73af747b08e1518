"""Issue 16, done-when 3: three real gateways heartbeat to one fleet receiver over
mutual TLS; Chromium (Debian's, through Playwright) shows all three on the fleet page;
one is stopped and is marked stale, and the heartbeat-missing alert fires in a real
Prometheus scraping the receiver; a fourth gateway, whose certificate comes from
another CA, is refused by the TLS handshake and appears nowhere.

The rules are the ones monitoring/ ships (rules.yml, and alerts.yml with its
``HeartbeatMissing``), loaded through tests/support/prometheus.py's
``rules_for_tests`` with every ``for:`` cut to 2 s instead of minutes; the receiver
calls a box stale after 3 s without a heartbeat (boxes send one every 0.5 s).

A box's worklist sources travel the same way: their intervals reach the receiver's
/metrics and WorklistSourceStale fires for a NATed box.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import Browser, expect

from .support.fleet import FleetPki, FleetReceiverProcess
from .support.gateway_proc import GatewayProcess
from .support.peers import free_port
from .support.prometheus import MONITORING, PrometheusProcess, rules_for_tests
from .test_upload import wait_until
from .test_web_browser import _screenshot, browser

__all__ = ["browser"]

WAIT_MS = 30_000
BOXES = ("box-a", "box-b", "box-c")
STRANGER = "stranger-box"
#: The ``for:`` of every alert in the test copy of monitoring/alerts.yml.
FOR_SECONDS = 2


def _alert_rules(directory: Path) -> list[Path]:
    """The shipped rule files as the test's Prometheus loads them."""
    directory.mkdir(parents=True, exist_ok=True)
    alerts = rules_for_tests(MONITORING / "alerts.yml", directory / "alerts.yml", FOR_SECONDS)
    return [MONITORING / "rules.yml", alerts]


def _heartbeat_missing(rule_file: Path) -> dict[str, object]:
    doc = yaml.safe_load(rule_file.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "HeartbeatMissing"]
    return dict(rule)


def test_the_rule_is_the_shipped_one(tmp_path: Path) -> None:
    """The HeartbeatMissing the test below evaluates is monitoring/alerts.yml's, only
    its ``for`` shortened; and it watches the receiver's stale mark
    (monitoring/FLEET_METRICS.md)."""
    shipped = _heartbeat_missing(MONITORING / "alerts.yml")
    (_, test_copy) = _alert_rules(tmp_path)
    assert shipped["for"] != f"{FOR_SECONDS}s"
    assert _heartbeat_missing(test_copy) == {**shipped, "for": f"{FOR_SECONDS}s"}
    assert shipped["expr"] == "dicom_gateway_fleet_box_stale == 1"
    assert "`dicom_gateway_fleet_box_stale`" in (MONITORING / "FLEET_METRICS.md").read_text()


def _gateway(root: Path, pki: FleetPki, receiver: FleetReceiverProcess, name: str,
             stranger: bool = False, **sections: dict[str, Any]) -> GatewayProcess:  # fmt: skip
    cert = pki.box(name, stranger=stranger)
    return GatewayProcess(
        root / name,
        dimse={"ae_title": name.upper().replace("-", "_")[:16], "receiver_processes": 1},
        upload={"client_cert": str(cert.cert), "client_key": str(cert.key),
                "compress_workers": 1},
        heartbeat={"url": receiver.url, "interval_seconds": 0.5, "ca_file": str(pki.ca_file)},
        **sections,
    )  # fmt: skip


def _start_all(gateways: list[GatewayProcess]) -> None:
    """Start them side by side (each start waits for its receiver processes)."""
    errors: list[BaseException] = []

    def start(gw: GatewayProcess) -> None:
        try:
            gw.start()
        except BaseException as exc:  # handed to the test below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(gw,)) for gw in gateways]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[FleetPki, FleetReceiverProcess]]:
    pki = FleetPki(tmp_path / "pki")
    receiver = FleetReceiverProcess(
        tmp_path / "fleet", pki, boxes={"stale_after_seconds": 3.0}, view={"refresh_seconds": 1}
    )
    receiver.start()
    yield pki, receiver
    receiver.kill()


def test_three_boxes_on_the_page_one_goes_stale_and_the_alert_fires(
    fleet: tuple[FleetPki, FleetReceiverProcess], browser: Browser, tmp_path: Path
) -> None:
    pki, receiver = fleet
    gateways = [_gateway(tmp_path, pki, receiver, name) for name in BOXES]
    stranger = _gateway(tmp_path, pki, receiver, STRANGER, stranger=True)
    prometheus = PrometheusProcess(
        tmp_path / "prometheus",
        _alert_rules(tmp_path / "rules"),
        {"dicom-gateway-fleet": [f"127.0.0.1:{receiver.view_port}"]},
    )
    try:
        _start_all([*gateways, stranger])
        prometheus.start()
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"http://127.0.0.1:{receiver.view_port}/")
        # The page reloads itself (view.refresh_seconds): no reload from the test.
        for name in BOXES:
            row = page.locator(f'tr[data-box="{name}"]')
            expect(row).to_be_visible(timeout=WAIT_MS)
            expect(row).not_to_have_class("box stale")
            expect(row.locator("td.ae")).to_have_text(name.upper().replace("-", "_"))
            expect(row.locator("td.archive")).to_have_text("not configured")
        expect(page.locator("#summary")).to_contain_text("3 boxes, 0 stale")
        _screenshot(page, tmp_path, "fleet-three-boxes.png")

        # The stranger's gateway tried all along and the handshake refused it.
        wait_until("the stranger's failure", lambda: "heartbeat to " in stranger.log)
        assert f"heartbeat to {receiver.url} failed" in stranger.log

        gateways[1].stop()
        stale = page.locator('tr[data-box="box-b"]')
        expect(stale).to_have_class("box stale", timeout=WAIT_MS)
        expect(stale).to_contain_text("STALE")
        expect(page.locator("#summary")).to_contain_text("3 boxes, 1 stale")
        for name in ("box-a", "box-c"):
            expect(page.locator(f'tr[data-box="{name}"]')).to_have_class("box")
        _screenshot(page, tmp_path, "fleet-one-stale.png")

        wait_until(
            "HeartbeatMissing firing for box-b",
            lambda: any(a["state"] == "firing" and a["labels"].get("box") == "box-b"
                        for a in prometheus.alerts("HeartbeatMissing")),
            timeout=45,
        )  # fmt: skip
        (alert,) = prometheus.alerts("HeartbeatMissing")  # no other box's
        assert alert["labels"]["box"] == "box-b"
        assert alert["labels"]["job"] == "dicom-gateway-fleet"
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook_url"] == "README.md#alert-heartbeatmissing"
        assert "box-b" in alert["annotations"]["summary"]

        # The fourth box appears nowhere, and got no further than the handshake.  The
        # browser's page reloads itself every second, so it is asked through retrying
        # locators, and the HTML it loads is read straight from the receiver.
        expect(page.locator(f'tr[data-box="{STRANGER}"]')).to_have_count(0)
        expect(page.locator("body")).not_to_contain_text(STRANGER.upper().replace("-", "_"))
        status, html = receiver.view("/")
        assert status == 200
        assert STRANGER not in html and STRANGER.upper() not in html
        assert STRANGER not in receiver.metrics()
        conn = sqlite3.connect(receiver.db_path)
        try:
            names = {r[0] for r in conn.execute("SELECT box FROM boxes")}
        finally:
            conn.close()
        assert names == set(BOXES)
        assert "refused" not in receiver.log  # no request of it reached a handler
    finally:
        prometheus.stop()
        for gw in [*gateways, stranger]:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.kill()


def test_a_natted_boxs_worklist_source_goes_stale_in_prometheus(
    fleet: tuple[FleetPki, FleetReceiverProcess], tmp_path: Path
) -> None:
    """A box reads two worklist sources: a drop folder (every 5 s, fine) and an
    upstream MWL where nothing listens (never read).  Its heartbeat carries each
    source's interval, the receiver exports it per box and source, and the shipped
    WorklistSourceStale fires in Prometheus for the upstream source alone."""
    pki, receiver = fleet
    drop = tmp_path / "drop"
    drop.mkdir()
    gw = _gateway(tmp_path, pki, receiver, "box-wl", worklist={
        "drop_folder": str(drop), "drop_scan_seconds": 5, "upstream_host": "127.0.0.1",
        "upstream_port": free_port(), "upstream_ae": "RIS", "refresh_seconds": 60,
    })  # fmt: skip
    prometheus = PrometheusProcess(
        tmp_path / "prometheus",
        _alert_rules(tmp_path / "rules"),
        {"dicom-gateway-fleet": [f"127.0.0.1:{receiver.view_port}"]},
    )
    intervals = (
        'dicom_gateway_worklist_refresh_interval_seconds{box="box-wl",source="drop-folder"} 5.0',
        'dicom_gateway_worklist_refresh_interval_seconds{box="box-wl",source="upstream-mwl"} 60.0',
    )
    try:
        gw.start()
        wait_until(
            "both intervals on the receiver's /metrics",
            lambda: all(line in receiver.metrics() for line in intervals),
        )
        prometheus.start()

        def firing() -> list[dict[str, Any]]:
            return [a for a in prometheus.alerts("WorklistSourceStale") if a["state"] == "firing"]

        wait_until("WorklistSourceStale firing", lambda: bool(firing()), timeout=45)
        (alert,) = firing()
        assert alert["labels"]["box"] == "box-wl"
        assert alert["labels"]["source"] == "upstream-mwl"
        assert alert["annotations"]["runbook_url"] == "README.md#alert-worklistsourcestale"
        assert [a["labels"]["source"] for a in prometheus.alerts("WorklistSourceStale")] == [
            "upstream-mwl"
        ]  # the drop folder, read every 5 s, is not even pending
    finally:
        prometheus.stop()
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()

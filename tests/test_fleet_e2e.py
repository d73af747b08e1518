"""Issue 16, done-when 3: three real gateways heartbeat to one fleet receiver over
mutual TLS; Chromium (Debian's, through Playwright) shows all three on the fleet page;
one is stopped and is marked stale, and the heartbeat-missing alert fires in a real
Prometheus scraping the receiver; a fourth gateway, whose certificate comes from
another CA, is refused by the TLS handshake and appears nowhere.

The rule is the one monitoring/alerts.yml ships (``HeartbeatMissing``), loaded with
``for: 2s`` instead of minutes; the receiver calls a box stale after 3 s without a
heartbeat (boxes send one every 0.5 s).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from .support.fleet import (
    HEARTBEAT_MISSING_EXPR,
    FleetPki,
    FleetPrometheus,
    FleetReceiverProcess,
)
from .support.gateway_proc import GatewayProcess
from .test_upload import wait_until
from .test_web_browser import _screenshot, browser

__all__ = ["browser"]

REPO = Path(__file__).resolve().parent.parent
WAIT_MS = 30_000
BOXES = ("box-a", "box-b", "box-c")
STRANGER = "stranger-box"

RULES = json.dumps(  # JSON is YAML
    {
        "groups": [
            {
                "name": "fleet-test",
                "rules": [
                    {
                        "alert": "HeartbeatMissing",
                        "expr": HEARTBEAT_MISSING_EXPR,
                        "for": "2s",  # minutes in monitoring/alerts.yml
                        "labels": {"severity": "critical"},
                        "annotations": {"summary": "Box {{ $labels.box }} sends no heartbeat."},
                    }
                ],
            }
        ]
    }
)


def test_the_rule_is_the_shipped_one() -> None:
    """The test copy above says what monitoring/alerts.yml says (once both branches
    are in; until then FLEET_METRICS.md's expression is the contract)."""
    alerts = REPO / "monitoring" / "alerts.yml"
    if not alerts.exists():
        pytest.skip("monitoring/alerts.yml not merged yet")
    text = alerts.read_text()
    rule = text[text.index("alert: HeartbeatMissing") :].split("- alert:")[0]
    assert f"expr: {HEARTBEAT_MISSING_EXPR}" in rule


def _gateway(root: Path, pki: FleetPki, receiver: FleetReceiverProcess, name: str,
             stranger: bool = False) -> GatewayProcess:  # fmt: skip
    cert = pki.box(name, stranger=stranger)
    return GatewayProcess(
        root / name,
        dimse={"ae_title": name.upper().replace("-", "_")[:16], "receiver_processes": 1},
        upload={"client_cert": str(cert.cert), "client_key": str(cert.key),
                "compress_workers": 1},
        heartbeat={"url": receiver.url, "interval_seconds": 0.5, "ca_file": str(pki.ca_file)},
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
    prometheus = FleetPrometheus(tmp_path / "prometheus", receiver, RULES)
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
        others = {a["labels"].get("box") for a in prometheus.alerts("HeartbeatMissing")}
        assert others == {"box-b"}, others

        # The fourth box appears nowhere, and got no further than the handshake.
        html = page.content()
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

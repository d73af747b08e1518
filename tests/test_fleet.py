"""The fleet receiver (`dicom-gateway fleet serve`, gateway/fleet/): a real receiver
process over mutual TLS, spoken to as a box would (http.client with the box's client
certificate).  What it accepts is stored and shown; every kind of bad input gets a
4xx (or no TLS session at all) and leaves no trace in the database, the page or
/metrics.  tests/test_fleet_e2e.py runs it with real gateways, Chromium and Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.commitment.requests import RequestState
from gateway.config import ConfigError, documented_keys
from gateway.fleet import boxes, page
from gateway.fleet import config as fleet_config
from gateway.fleet.boxes import Box
from gateway.fleet.metrics import BoxGauges
from gateway.fleet.views import Built, CachedView
from gateway.heartbeat_body import COMMITMENT_AES_MAX, BadHeartbeat, Heartbeat, decode

from .support.fleet import (
    FleetPki,
    FleetReceiverProcess,
    earlier_release,
    encoded,
    heartbeat,
    post,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return FleetPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def receiver(
    pki: FleetPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetReceiverProcess]:
    r = FleetReceiverProcess(tmp_path_factory.mktemp("fleet"), pki)
    r.start()
    yield r
    assert r.stop() == 0, r.log


def _rows(receiver: FleetReceiverProcess) -> dict[str, tuple[float, str]]:
    """The database as it is on disk: box -> (sent_at, stored heartbeat)."""
    conn = sqlite3.connect(receiver.db_path)
    try:
        return {
            r[0]: (r[1], r[2]) for r in conn.execute("SELECT box, sent_at, heartbeat FROM boxes")
        }
    finally:
        conn.close()


def _nowhere(receiver: FleetReceiverProcess, text: str) -> None:
    """*text* is in no stored row, nor on the page, nor in /metrics (built after it
    was refused)."""
    assert not any(text in name or text in body for name, (_, body) in _rows(receiver).items())
    metrics, html = receiver.settled()
    assert text not in html
    assert text not in metrics


def _refused_count(receiver: FleetReceiverProcess, result: str) -> float:
    line = f'dicom_gateway_fleet_heartbeats_total{{result="{result}"}} '
    (value,) = [ln[len(line) :] for ln in receiver.metrics().splitlines() if ln.startswith(line)]
    return float(value)


# -- accepted --------------------------------------------------------------------------


def test_a_box_is_its_certificate_not_what_its_body_says(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    cert = pki.box("clinic-7-gw1")
    q = heartbeat()["queue"]
    beat = heartbeat(ae_title="CLAIMS-OTHER", queue={**q, "by_state": {"compressed": 2}})
    reply = post(receiver, cert, encoded(beat))
    assert reply.status == 204, reply
    assert reply.headers["Server-Timing"].startswith("handle;dur=")
    stored = receiver.boxes()["clinic-7-gw1"]
    assert stored["heartbeat"] == beat  # every field as sent, nothing added
    assert not stale(stored)
    assert "CLAIMS-OTHER" not in receiver.boxes()  # never a box of its own
    metrics, html = receiver.settled()
    assert 'dicom_gateway_queue_instances{box="clinic-7-gw1",state="compressed"} 2.0' in metrics
    assert 'dicom_gateway_fleet_last_seen_timestamp_seconds{box="clinic-7-gw1"}' in metrics
    assert 'dicom_gateway_archive_state{box="clinic-7-gw1",state="reachable"} 1.0' in metrics
    assert 'dicom_gateway_build_info{box="clinic-7-gw1",version="0.test"} 1.0' in metrics
    assert 'data-box="clinic-7-gw1"' in html and "CLAIMS-OTHER" in html


def stale(entry: dict[str, object]) -> bool:
    return bool(entry["stale"])


# monitoring/FLEET_METRICS.md (the mixin's contract): each name, with the box label.
CONTRACT = (
    "dicom_gateway_fleet_last_seen_timestamp_seconds", "dicom_gateway_fleet_box_stale",
    "dicom_gateway_health_state", "dicom_gateway_archive_state",
    "dicom_gateway_queue_instances", "dicom_gateway_queue_oldest_pending_enqueue_timestamp_seconds",
    "dicom_gateway_spool_free_bytes", "dicom_gateway_spool_min_free_bytes",
    "dicom_gateway_spool_bytes", "dicom_gateway_uploads_paused",
    "dicom_gateway_client_certificate_expiry_timestamp_seconds", "dicom_gateway_build_info",
    "dicom_gateway_uptime_seconds",
    # the optional ones
    "dicom_gateway_upload_window_open", "dicom_gateway_worklist_last_refresh_timestamp_seconds",
    "dicom_gateway_worklist_refresh_interval_seconds",
    "dicom_gateway_mpps_outbox_messages",
    "dicom_gateway_mpps_outbox_oldest_pending_timestamp_seconds",
    "dicom_gateway_commitment_requests",
    "dicom_gateway_commitment_oldest_unreported_timestamp_seconds",
    "dicom_gateway_commitment_report_due_timestamp_seconds",
)  # fmt: skip


def _samples(metrics: str, box: str) -> dict[str, list[str]]:
    """The samples of *box* in a scrape, by metric name."""
    found: dict[str, list[str]] = {}
    for line in metrics.splitlines():
        if f'box="{box}"' in line and not line.startswith("#"):
            found.setdefault(line.split("{")[0], []).append(line)
    return found


def test_every_contract_metric_is_exported_per_box(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    cert = pki.box("box-contract")
    mpps = {
        "pending": 2,
        "sending": 1,
        "failed": 1,
        "oldest_pending_at": "2026-01-01T00:00:00+00:00",
    }
    beat = heartbeat(health="degraded", archive={"state": "unreachable", "last_success_at": None},
                     uploads_window_open=False, mpps=mpps)  # fmt: skip
    assert post(receiver, cert, encoded(beat)).status == 204
    samples = _samples(receiver.settled()[0], "box-contract")
    assert set(CONTRACT) <= set(samples), set(CONTRACT) - set(samples)
    text = "\n".join(line for lines in samples.values() for line in lines)
    for sample in (
        'dicom_gateway_health_state{box="box-contract",state="degraded"} 1.0',
        'dicom_gateway_health_state{box="box-contract",state="ok"} 0.0',
        'dicom_gateway_archive_state{box="box-contract",state="unreachable"} 1.0',
        'dicom_gateway_archive_state{box="box-contract",state="not configured"} 0.0',
        'dicom_gateway_queue_instances{box="box-contract",state="received"} 1.0',
        'dicom_gateway_upload_window_open{box="box-contract"} 0.0',
        'dicom_gateway_mpps_outbox_messages{box="box-contract",state="failed"} 1.0',
        'dicom_gateway_mpps_outbox_oldest_pending_timestamp_seconds{box="box-contract"}'
        " 1.7672256e+09",
        'dicom_gateway_worklist_last_refresh_timestamp_seconds{box="box-contract",source="upstream"}',
        'dicom_gateway_worklist_refresh_interval_seconds{box="box-contract",source="upstream"}'
        " 60.0",
        'dicom_gateway_fleet_box_stale{box="box-contract"} 0.0',
    ):
        assert sample in text, sample
    expiry = samples["dicom_gateway_client_certificate_expiry_timestamp_seconds"][0]
    not_after = pki.certificate_not_after(cert)
    assert float(expiry.split()[-1]) == not_after  # from the certificate, not the body


def test_a_box_of_an_earlier_release_is_heard(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    """Without the keys a heartbeat gained later: accepted, and its queue exported by
    the states its summary says exactly."""
    old = earlier_release(heartbeat(queue={**heartbeat()["queue"], "failed": 3}))
    assert post(receiver, pki.box("box-older"), encoded(old)).status == 204
    samples = _samples(receiver.settled()[0], "box-older")
    states = {
        line.split('state="')[1].split('"')[0] for line in samples["dicom_gateway_queue_instances"]
    }
    assert states == {"uploading", "failed", "uploaded"}
    assert (
        'dicom_gateway_queue_instances{box="box-older",state="failed"} 3.0'
        in samples["dicom_gateway_queue_instances"]
    )
    assert "dicom_gateway_mpps_outbox_messages" not in samples
    assert not any(name.startswith("dicom_gateway_commitment_") for name in samples)
    assert receiver.boxes()["box-older"]["heartbeat"] == old


def test_storage_commitment_travels_to_the_boxs_gauges(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    """What CommitmentReportsStuck asks, for a box behind NAT: the gateway's three
    names and labels (gateway/web/gauges.py), with ``box`` added."""
    commitment = {
        "waiting": 4, "due": 3, "reporting": 1, "reported": 12,
        "oldest_unreported_at": "2026-01-01T00:00:00+00:00",
        "undelivered": [
            {"requesting_ae": "CT_ROOM1", "reports_due": 2,
             "due_since_at": "2026-01-01T01:00:00.250000+00:00"},
            {"requesting_ae": "US ROOM 2", "reports_due": 1,
             "due_since_at": "2026-01-01T02:00:00+01:00"},
        ],
    }  # fmt: skip
    beat = heartbeat(commitment=commitment)
    assert post(receiver, pki.box("box-commit"), encoded(beat)).status == 204
    assert receiver.boxes()["box-commit"]["heartbeat"]["commitment"] == commitment
    parsed = _parsed(_boxes_part(receiver.settled()[0]))
    requests = parsed["dicom_gateway_commitment_requests"]["box-commit"]
    assert {labels["state"]: value for labels, value in requests} == {
        "waiting": 4.0, "due": 3.0, "reporting": 1.0, "reported": 12.0
    }  # fmt: skip
    assert parsed["dicom_gateway_commitment_oldest_unreported_timestamp_seconds"]["box-commit"] == [
        ({}, 1767225600.0)
    ]
    due = parsed["dicom_gateway_commitment_report_due_timestamp_seconds"]["box-commit"]
    assert sorted((labels["requesting_ae"], value) for labels, value in due) == [
        ("CT_ROOM1", 1767229200.25), ("US ROOM 2", 1767229200.0)
    ]  # fmt: skip


def test_a_newer_heartbeat_replaces_the_last(pki: FleetPki, receiver: FleetReceiverProcess) -> None:
    cert = pki.box("box-newer")
    now = datetime.now(UTC)
    assert (
        post(receiver, cert, encoded(heartbeat(sent_at=now - timedelta(seconds=2)))).status == 204
    )
    later = heartbeat(sent_at=now, health="degraded", reasons=["archive unreachable"])
    assert post(receiver, cert, encoded(later)).status == 204
    entry = receiver.boxes()["box-newer"]
    assert entry["heartbeat"]["health"] == "degraded" and entry["heartbeats"] == 2


# -- refused ---------------------------------------------------------------------------


def test_a_replayed_or_older_heartbeat_is_refused(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    cert = pki.box("box-replay")
    now = datetime.now(UTC)
    first = encoded(heartbeat(sent_at=now, uploads_paused=True))
    assert post(receiver, cert, first).status == 204
    before = _refused_count(receiver, "replayed")
    again = post(receiver, cert, first)  # the same body, byte for byte
    assert again.status == 409 and "not newer" in again.error, again
    older = post(receiver, cert, encoded(heartbeat(sent_at=now - timedelta(seconds=5))))
    assert older.status == 409, older
    assert _refused_count(receiver, "replayed") == before + 2
    entry = receiver.boxes()["box-replay"]
    assert entry["heartbeat"]["uploads_paused"] is True and entry["heartbeats"] == 1


@pytest.mark.parametrize("offset", [timedelta(minutes=-10), timedelta(minutes=10)])
def test_a_heartbeat_far_from_the_receivers_clock_is_refused(
    pki: FleetPki, receiver: FleetReceiverProcess, offset: timedelta
) -> None:
    name = f"box-skew-{'ahead' if offset > timedelta(0) else 'behind'}"
    reply = post(receiver, pki.box(name), encoded(heartbeat(sent_at=datetime.now(UTC) + offset)))
    assert reply.status == 400 and "receiver's clock" in reply.error, reply
    _nowhere(receiver, name)


def test_an_oversized_body_is_refused(pki: FleetPki, receiver: FleetReceiverProcess) -> None:
    beat = heartbeat(reasons=["x" * 200] * 5, version="v" * 64)
    body = encoded(beat)[:-1] + b"," + b'"pad": "' + b"p" * 70_000 + b'"}'
    assert len(body) > 65536
    reply = post(receiver, pki.box("box-large"), body)
    assert reply.status == 413 and "max_body_bytes" in reply.error, reply
    _nowhere(receiver, "box-large")


def _due(ae: str, since: str = "2026-01-01T00:00:00+00:00") -> dict[str, object]:
    return {"requesting_ae": ae, "reports_due": 1, "due_since_at": since}


def _commitment(**changes: object) -> bytes:
    """A heartbeat whose commitment section has *changes*."""
    beat = heartbeat()
    return encoded({**beat, "commitment": {**beat["commitment"], **changes}})


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "Expected `object`"),
        (encoded({**heartbeat(), "health": "splendid"}), "$.health"),
        (encoded({**heartbeat(), "queue": {"pending": -1}}), "$.queue"),
        (encoded({k: v for k, v in heartbeat().items() if k != "sent_at"}), "sent_at"),
        (encoded({**heartbeat(), "sent_at": "yesterday-ish"}), "ISO 8601"),
        (encoded({**heartbeat(), "sent_at": "2026-01-01T00:00:00"}), "UTC offset"),
        (encoded({**heartbeat(), "uploads_paused": "no"}), "$.uploads_paused"),
        (encoded({**heartbeat(), "reasons": ["r"] * 6}), "$.reasons"),
        (encoded({**heartbeat(), "ae_title": "A" * 17}), "$.ae_title"),
        # Storage Commitment: an AE title too long, too many AEs, a negative count, a
        # time without offset.
        (_commitment(undelivered=[_due("A" * 17)]), "$.commitment.undelivered[0].requesting_ae"),
        (_commitment(undelivered=[_due(f"AE{i}") for i in range(51)]), "$.commitment.undelivered"),
        (_commitment(due=-1), "$.commitment.due"),
        (_commitment(undelivered=[_due("CT", "2026-01-01T00:00:00")]), "UTC offset"),
    ],
)
def test_a_body_that_is_not_a_heartbeat_is_refused(
    pki: FleetPki, receiver: FleetReceiverProcess, body: bytes, words: str
) -> None:
    reply = post(receiver, pki.box("box-bad-body"), body)
    assert reply.status == 400 and words in reply.error, reply
    _nowhere(receiver, "box-bad-body")


def test_another_content_type_is_refused(pki: FleetPki, receiver: FleetReceiverProcess) -> None:
    reply = post(receiver, pki.box("box-form"), encoded(heartbeat()), "text/plain")
    assert reply.status == 415, reply
    _nowhere(receiver, "box-form")


def test_a_certificate_without_a_cn_is_refused(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    before = set(_rows(receiver))
    reply = post(receiver, pki.box("no-cn", common_name=None), encoded(heartbeat()))
    assert reply.status == 403 and "CN" in reply.error, reply
    assert set(_rows(receiver)) == before


def test_a_certificate_of_another_ca_fails_the_handshake(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        post(receiver, pki.box("stranger-box", stranger=True), encoded(heartbeat()))
    _nowhere(receiver, "stranger-box")


def test_no_certificate_fails_the_handshake(receiver: FleetReceiverProcess) -> None:
    before = set(_rows(receiver))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        post(receiver, None, encoded(heartbeat(ae_title="NOCERT")))
    assert set(_rows(receiver)) == before
    _nowhere(receiver, "NOCERT")


def test_what_a_box_says_is_escaped_on_the_page(
    pki: FleetPki, receiver: FleetReceiverProcess
) -> None:
    cn = '<img src=x onerror="alert(1)">'
    beat = heartbeat(ae_title="<b>AE</b>", version="<script>", reasons=["<i>why</i>"])
    assert post(receiver, pki.box("evil", common_name=cn), encoded(beat)).status == 204
    html = receiver.settled()[1]
    for raw in (cn, "<b>AE</b>", "<script>", "<i>why</i>"):
        assert raw not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "&lt;b&gt;AE&lt;/b&gt;" in html


# -- the page ------------------------------------------------------------------------------


def _box(name: str, seen_at: float, **changes: object) -> Box:
    # Sent when seen; its oldest pending instance arrived 4 minutes before.
    beat = heartbeat(sent_at=datetime.fromtimestamp(seen_at, UTC), **changes)
    return Box(name, "ab" * 32, None, "127.0.0.1", seen_at, seen_at, seen_at, 1, beat)


def test_the_page_marks_stale_boxes_and_lists_them_first() -> None:
    now = 1_800_000_000.0
    rows = [
        _box("a-fresh", now - 10),
        _box("b-stale", now - 600, queue={**heartbeat()["queue"], "pending": 17}),
        _box("c-fresh", now - 179, archive={"state": "unreachable", "last_success_at": None}),
    ]
    html = page.render(rows, now, stale_after=180, refresh_seconds=10)
    assert "3 boxes, 1 stale" in html
    assert html.index('data-box="b-stale"') < html.index('data-box="a-fresh"')
    assert '<tr class="box stale" data-box="b-stale">' in html
    assert '<tr class="box" data-box="a-fresh">' in html
    assert '<tr class="box" data-box="c-fresh">' in html
    assert html.count("STALE") == 1
    stale_row = html[html.index('data-box="b-stale"') :].split("</tr>")[0]
    assert '<td class="n pending">17</td>' in stale_row and "10 min ago" in stale_row
    fresh_row = html[html.index('data-box="c-fresh"') :].split("</tr>")[0]
    assert ">unreachable<" in fresh_row and '<td class="oldest">7 min</td>' in fresh_row


def test_an_empty_fleet_says_so() -> None:
    assert "no heartbeat received yet" in page.render([], 0.0, 180, 10)


# -- the database ------------------------------------------------------------------------------


def test_the_replay_check_is_made_in_the_write(tmp_path: Path) -> None:
    from gateway.fleet.database import FleetDatabase

    db = FleetDatabase(tmp_path / "fleet.sqlite3")
    db.open()
    try:

        def arrival(sent_at: float) -> boxes.Arrival:
            return boxes.Arrival("b", "f", None, "p", sent_at, 5.0, heartbeat())

        assert db.submit(boxes.record(arrival(100.0))).result() is None
        assert db.submit(boxes.record(arrival(100.0))).result() == 100.0
        assert db.submit(boxes.record(arrival(99.0))).result() == 100.0
        assert db.submit(boxes.record(arrival(100.5))).result() is None
        (row,) = db.read(boxes.listing)
        assert row.sent_at == 100.5 and row.heartbeats == 2
        assert db.submit(boxes.forget(["b", "nobody"])).result() == 1
        assert db.read(boxes.listing) == []
    finally:
        db.close()
    assert (
        sqlite3.connect(tmp_path / "fleet.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
        == "wal"
    )


def test_a_listing_decodes_only_the_rows_that_changed(tmp_path: Path) -> None:
    from gateway.fleet.database import FleetDatabase

    db = FleetDatabase(tmp_path / "fleet.sqlite3")
    db.open()
    try:

        def store(box: str, sent_at: float, seen_at: float, **changes: object) -> None:
            beat = heartbeat(**changes)  # type: ignore[arg-type]
            assert db.submit(boxes.record(boxes.Arrival(box, "f", None, "p", sent_at, seen_at,
                                                        beat))).result() is None  # fmt: skip

        store("a", 100.0, 100.5)
        store("b", 100.0, 100.5)
        first = {b.box: b for b in db.read(boxes.listing)}
        store("b", 101.0, 101.5, health="failing")
        a, b = db.read(lambda conn: boxes.listing(conn, first))
        assert a is first["a"]  # as it was: not decoded again
        assert b is not first["b"] and b.heartbeat is not None
        assert b.heartbeat["health"] == "failing" and b.heartbeats == 2
        assert db.submit(boxes.forget(["b"])).result() == 1
        store("b", 100.0, 102.5)  # forgotten and back, with the sent_at of before
        (_, again) = db.read(lambda conn: boxes.listing(conn, first))
        assert again is not first["b"] and again.heartbeats == 1
    finally:
        db.close()


def test_fleet_forget_removes_a_box(pki: FleetPki, tmp_path: Path) -> None:
    r = FleetReceiverProcess(tmp_path / "fleet", pki).start()
    try:
        assert post(r, pki.box("retired-box"), encoded(heartbeat())).status == 204
        assert post(r, pki.box("kept-box"), encoded(heartbeat())).status == 204
    finally:
        assert r.stop() == 0
    cli = [sys.executable, "-m", "gateway", "fleet", "forget", "--config", str(r.config_path)]
    done = subprocess.run([*cli, "retired-box"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "1 box(es) forgotten" in done.stdout, done
    assert set(_rows(r)) == {"kept-box"}
    again = subprocess.run([*cli, "retired-box"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1


# -- configuration -----------------------------------------------------------------------------


def test_the_receiver_needs_its_certificates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"receiver\.tls_cert: required"):
        fleet_config.from_dict({}, "fleet.toml")
    path = tmp_path / "fleet.toml"
    path.write_text('[receiver]\ntls_cert = "/x.pem"\ntls_key = "/x.key"\n')
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "fleet", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 78, done
    assert done.stderr.strip() == (
        f"dicom-gateway: config error: {path}: receiver.client_ca_file: required"
        " (the receiver speaks mutual TLS only)"
    )


CERTS = {"tls_cert": "/c.pem", "tls_key": "/c.key", "client_ca_file": "/ca.pem"}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"view": {"bind": "0.0.0.0"}}, "view.bind"),
        ({"view": {"client_ca_file": "/ca.pem"}}, "view.client_ca_file"),
        ({"view": {"tls_cert": "/v.pem"}}, "view.tls_key"),
        ({"receiver": {**CERTS, "max_body_bytes": 10}}, "receiver.max_body_bytes"),
        ({"receiver": {**CERTS, "max_clock_skew_seconds": 0}}, "receiver.max_clock_skew_seconds"),
        ({"receiver": {**CERTS, "port": 70000}}, "receiver.port"),
        ({"boxes": {"stale_after_seconds": -1}}, "boxes.stale_after_seconds"),
        ({"boxes": {"stale_after": 1}}, "boxes.stale_after"),
        ({"fleet": {}}, "fleet"),
        ({"logging": {"level": "LOUD"}}, "logging.level"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(
    raw: dict[str, dict[str, object]], key: str
) -> None:
    raw = {"receiver": CERTS, **raw}
    with pytest.raises(ConfigError) as caught:
        fleet_config.from_dict(raw, "fleet.toml")
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_the_view_may_leave_loopback_with_client_certificates() -> None:
    c = fleet_config.from_dict(
        {"receiver": CERTS, "view": {"bind": "0.0.0.0", "tls_cert": "/v.pem",
                                     "tls_key": "/v.key", "client_ca_file": "/ops-ca.pem"}}
    )  # fmt: skip
    assert c.view.bind == "0.0.0.0" and c.boxes.stale_after_seconds == 180.0


def test_every_fleet_key_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    keys = documented_keys(fleet_config.SECTIONS)
    assert "receiver.client_ca_file" in keys and "boxes.stale_after_seconds" in keys
    section = readme[readme.index("### The fleet receiver") :]
    undocumented = [k for k in keys if f"`{k}`" not in section]
    assert not undocumented, (
        f"fleet keys missing from README's fleet receiver section: {undocumented}"
    )


# -- the body ------------------------------------------------------------------------------------


def test_the_senders_body_is_what_the_receiver_accepts() -> None:
    from gateway.web.heartbeat import compact

    from .support.status_sample import sample_doc

    body = compact(sample_doc(), "DICOMGW")
    assert decode(json.dumps(body).encode()) == body
    assert len(body["sent_at"]) == len("2026-01-01T00:00:00.000+00:00")  # milliseconds
    long = compact(sample_doc(health__reasons=tuple(f"{i}" * 900 for i in range(9))), "X")
    assert len(long["reasons"]) == 5 and all(len(r) == 300 for r in long["reasons"])
    decode(json.dumps(long).encode())
    with pytest.raises(BadHeartbeat):
        decode(json.dumps({**body, "queue": None}).encode())


def test_the_sender_names_each_worklist_sources_interval() -> None:
    """The interval travels (the receiver's gauge for WorklistSourceStale), as a float;
    a source with none known (no longer configured) travels without it."""
    from gateway.web.heartbeat import compact
    from gateway.web.status_doc import WorklistSource

    from .support.status_sample import sample_doc

    def source(name: str, interval: float | None) -> WorklistSource:
        return WorklistSource(
            source=name, last_attempt_at=None, last_success_at="2026-01-01T00:00:00+00:00",
            last_error=None, item_count=3, last_success_ts=1767225600.0,
            refresh_interval_seconds=interval,
        )  # fmt: skip

    doc = sample_doc(worklist=(source("upstream-mwl", 300), source("gone", None)))
    body = compact(doc, "DICOMGW")
    assert body["worklist"] == [
        {"source": "upstream-mwl", "last_success_at": "2026-01-01T00:00:00+00:00",
         "refresh_interval_seconds": 300.0},
        {"source": "gone", "last_success_at": "2026-01-01T00:00:00+00:00"},
    ]  # fmt: skip
    assert decode(json.dumps(body).encode()) == body


def test_the_sender_carries_storage_commitment() -> None:
    """Counts by state, the oldest unreported, and the AEs waiting longest first, cut
    to what the receiver takes; an AE title it would refuse stays home."""
    from gateway.web.heartbeat import compact
    from gateway.web.status_doc import CommitmentRequester

    from .support.status_sample import sample_doc

    def due(ae: str, minute: int) -> CommitmentRequester:
        at = datetime(2026, 1, 1, 0, minute, tzinfo=UTC)
        return CommitmentRequester(
            requesting_ae=ae, address=None, reports_due=minute + 1, due_since_at=at.isoformat(),
            due_since_ts=at.timestamp(), attempts=3, last_error="cannot connect",
            last_error_at=None, next_attempt_at=None, next_attempt_ts=None,
        )  # fmt: skip

    waiting = (due("X" * 17, 0), *(due(f"AE{i}", i) for i in range(COMMITMENT_AES_MAX + 2)))
    doc = sample_doc(
        commitment__waiting=5, commitment__due=60, commitment__reporting=1,
        commitment__reported=9, commitment__oldest_unreported_at="2026-01-01T00:00:00+00:00",
        commitment__undelivered=waiting,
    )  # fmt: skip
    body = compact(doc, "DICOMGW")
    c = body["commitment"]
    assert (c["waiting"], c["due"], c["reporting"], c["reported"]) == (5, 60, 1, 9)
    assert c["oldest_unreported_at"] == "2026-01-01T00:00:00+00:00"
    assert len(c["undelivered"]) == COMMITMENT_AES_MAX
    assert c["undelivered"][:2] == [
        {"requesting_ae": "AE0", "reports_due": 1, "due_since_at": "2026-01-01T00:00:00+00:00"},
        {"requesting_ae": "AE1", "reports_due": 2, "due_since_at": "2026-01-01T00:01:00+00:00"},
    ]
    assert c["undelivered"][-1]["requesting_ae"] == f"AE{COMMITMENT_AES_MAX - 1}"
    assert decode(json.dumps(body).encode()) == body


def test_the_receiver_exports_commitment_as_the_gateway_does() -> None:
    """The same status document, as the gateway's own gauges and as the receiver's
    from its heartbeat: the same names, labels (but ``box``) and values."""
    from gateway.web.gauges import SnapshotCollector
    from gateway.web.heartbeat import compact
    from gateway.web.status_doc import CommitmentRequester

    from .support.status_sample import sample_doc

    at = datetime(2026, 1, 1, 3, 0, 0, 500000, tzinfo=UTC)
    doc = sample_doc(
        commitment__waiting=2, commitment__due=1, commitment__reporting=1,
        commitment__reported=7, commitment__oldest_unreported_at="2026-01-01T02:00:00+00:00",
        commitment__oldest_unreported_ts=1767232800.0,
        commitment__undelivered=(CommitmentRequester(
            requesting_ae="MR_3", address="10.0.0.9:104", reports_due=2,
            due_since_at=at.isoformat(), due_since_ts=at.timestamp(), attempts=1,
            last_error=None, last_error_at=None, next_attempt_at=None, next_attempt_ts=None,
        ),),
    )  # fmt: skip
    gateway = {
        f.name: sorted((sorted(s.labels.items()), s.value) for s in f.samples)
        for f in SnapshotCollector(lambda: doc).collect()
        if f.name.startswith("dicom_gateway_commitment_")
    }
    beat = compact(doc, "DICOMGW")
    row = Box("box-same", "ab" * 32, None, "127.0.0.1", 1.0, 1.0, 1.0, 1, beat)
    fleet = {
        name: sorted((sorted(labels.items()), value) for labels, value in boxes["box-same"])
        for name, boxes in _parsed(BoxGauges().exposition(2.0, 180, [row]).decode()).items()
        if name.startswith("dicom_gateway_commitment_")
    }
    assert len(gateway) == 3 and fleet == gateway
    states = {dict(labels)["state"] for labels, _ in fleet["dicom_gateway_commitment_requests"]}
    assert states == {s.value for s in RequestState}


# -- the views: built once per change, served from the loop ----------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class _Source:
    """A view's build: counts its calls, its body says which build it was."""

    def __init__(self) -> None:
        self.generation = 0
        self.builds = 0
        self.valid_until = math.inf
        self.fail = False

    def build(self) -> Built:
        if self.fail:
            raise RuntimeError("the listing failed")
        self.builds += 1
        return Built(f"build {self.builds}".encode(), self.valid_until)


def _view(source: _Source, clock: _Clock, min_interval: float = 2.0) -> CachedView:
    return CachedView("test", source.build, lambda: source.generation,
                      min_interval=min_interval, max_age=60.0, clock=clock)  # fmt: skip


@pytest.mark.asyncio
async def test_a_view_is_built_once_per_change_at_most_every_min_interval() -> None:
    source, clock = _Source(), _Clock()
    view = _view(source, clock)
    assert await view.get() == b"build 1"
    assert await view.get() == b"build 1"  # back to back
    clock.now += 30
    assert await view.get() == b"build 1"  # older, but nothing changed
    source.generation += 1  # a heartbeat accepted
    assert await view.get() == b"build 2"
    source.generation += 1
    clock.now += 1
    assert await view.get() == b"build 2"  # changed, but built 1 s ago: as it is
    clock.now += 1
    assert await view.get() == b"build 3"
    assert await view.get() == b"build 3"
    clock.now += 60  # max_age: what the generation does not see (fleet forget)
    assert await view.get() == b"build 4"
    clock.now -= 3600  # the wall clock went back: its age means nothing
    assert await view.get() == b"build 5"
    assert source.builds == view.builds == 5


@pytest.mark.asyncio
async def test_a_view_is_rebuilt_when_a_box_turns_stale() -> None:
    source, clock = _Source(), _Clock()
    view = _view(source, clock)
    source.valid_until = clock.now + 10  # the build's next stale crossing
    assert await view.get() == b"build 1"
    clock.now += 9
    assert await view.get() == b"build 1"
    clock.now += 1
    assert await view.get() == b"build 2"  # no heartbeat, yet a box went stale


@pytest.mark.asyncio
async def test_requests_during_a_build_share_it() -> None:
    started, release = threading.Event(), threading.Event()
    builds = 0

    def slow() -> Built:
        nonlocal builds
        builds += 1
        started.set()
        release.wait(30)
        return Built(b"shared")

    view = CachedView("test", slow, lambda: 0, min_interval=1.0, max_age=1.0)
    waiting = [asyncio.create_task(view.get()) for _ in range(20)]
    assert await asyncio.to_thread(started.wait, 30)
    await asyncio.sleep(0)  # every request is waiting now
    waiting[0].cancel()  # one goes away: the build goes on for the others
    release.set()
    results = await asyncio.gather(*waiting[1:])
    assert results == [b"shared"] * 19 and builds == 1 and view.builds == 1
    assert waiting[0].cancelled()


@pytest.mark.asyncio
async def test_a_failed_build_fails_its_requests_and_the_next_one_builds_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, clock = _Source(), _Clock()
    view = _view(source, clock)
    source.fail = True
    with pytest.raises(RuntimeError, match="listing failed"):
        await view.get()
    assert "building the fleet test failed" in caplog.text
    source.fail = False
    assert await view.get() == b"build 1"


def _parsed(text: str) -> dict[str, dict[str, list[tuple[dict[str, str], float]]]]:
    """{family: {box: [(labels without box, value)]}} read back by prometheus_client."""
    out: dict[str, dict[str, list[tuple[dict[str, str], float]]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family
        for sample in family.samples:
            labels = dict(sample.labels)
            box = labels.pop("box", "")
            out.setdefault(family.name, {}).setdefault(box, []).append((labels, sample.value))
    return out


def test_the_boxes_metrics_read_back_as_prometheus_text() -> None:
    now = 1_800_000_000.0
    odd = 'clinic "7"\\gw\nnew line'  # a CN is a peer's value: escaped, not trusted
    old = cast(Heartbeat, earlier_release(heartbeat(sent_at=datetime.fromtimestamp(now, UTC))))
    rows = [
        _box(odd, now - 10),
        _box("b-stale", now - 600, mpps={"pending": 4, "sending": 0, "failed": 1,
                                         "oldest_pending_at": None}),
        Box("c-older", "cd" * 32, 2e9, "10.0.0.3", now - 5, now - 5, now - 50, 3, old),
    ]  # fmt: skip
    gauges = BoxGauges()
    text = gauges.exposition(now, 180, rows).decode()
    parsed = _parsed(text)
    assert parsed["dicom_gateway_fleet_boxes"] == {"": [({}, 3.0)]}
    assert set(CONTRACT) <= set(parsed), set(CONTRACT) - set(parsed)
    for name in CONTRACT:
        if name != "dicom_gateway_client_certificate_expiry_timestamp_seconds":
            assert odd in parsed[name] and "b-stale" in parsed[name], name
    stale = parsed["dicom_gateway_fleet_box_stale"]
    assert stale == {odd: [({}, 0.0)], "b-stale": [({}, 1.0)], "c-older": [({}, 0.0)]}
    assert parsed["dicom_gateway_client_certificate_expiry_timestamp_seconds"] == {
        "c-older": [({}, 2e9)]
    }
    health = {
        labels["state"]: value for labels, value in parsed["dicom_gateway_health_state"]["b-stale"]
    }
    assert health == {"ok": 1.0, "degraded": 0.0, "failing": 0.0}
    assert ({"state": "failed"}, 1.0) in parsed["dicom_gateway_mpps_outbox_messages"]["b-stale"]
    queue = parsed["dicom_gateway_queue_instances"]["c-older"]
    assert {labels["state"] for labels, _ in queue} == {"uploading", "failed", "uploaded"}
    assert "c-older" not in parsed["dicom_gateway_mpps_outbox_messages"]
    assert parsed["dicom_gateway_build_info"]["c-older"] == [({"version": "0.test"}, 1.0)]

    # Built again: a box whose row changed anew, the others copied; the stale gauge
    # follows the time alone.  The same text as a build from nothing.
    newer = _box("b-stale", now + 100, health="failing")
    rows[1] = newer
    later = now + 200
    again = gauges.exposition(later, 180, rows)
    assert again == BoxGauges().exposition(later, 180, rows)
    parsed = _parsed(again.decode())
    assert parsed["dicom_gateway_fleet_box_stale"][odd] == [({}, 1.0)]
    assert parsed["dicom_gateway_fleet_box_stale"]["b-stale"] == [({}, 0.0)]
    assert ({"state": "failing"}, 1.0) in parsed["dicom_gateway_health_state"]["b-stale"]
    # A box forgotten is gone from the next build.
    assert (
        "c-older"
        not in _parsed(gauges.exposition(later, 180, rows[:2]).decode())[
            "dicom_gateway_fleet_last_seen_timestamp_seconds"
        ]
    )


def _builds(metrics: str) -> float:
    line = 'dicom_gateway_fleet_view_builds_total{view="metrics"} '
    (value,) = [ln[len(line) :] for ln in metrics.splitlines() if ln.startswith(line)]
    return float(value)


def _boxes_part(metrics: str) -> str:
    return metrics[metrics.index("# HELP dicom_gateway_fleet_boxes ") :]


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_the_views_follow_heartbeats_and_are_not_rebuilt_per_request(
    pki: FleetPki, tmp_path: Path
) -> None:
    r = FleetReceiverProcess(tmp_path / "fleet", pki, boxes={"stale_after_seconds": 2.0}).start()
    try:
        assert post(r, pki.box("views-one"), encoded(heartbeat())).status == 204
        one = 'dicom_gateway_fleet_box_stale{box="views-one"}'
        _wait_for("views-one in /metrics", lambda: f"{one} 0.0" in r.metrics())
        # No heartbeat since: its turning stale alone rebuilds the page and /metrics.
        _wait_for("views-one stale in /metrics", lambda: f"{one} 1.0" in r.metrics())
        stale_row = '<tr class="box stale" data-box="views-one">'
        _wait_for("views-one stale on the page", lambda: stale_row in r.view("/")[1])
        # Nothing changes now: back-to-back requests get the one build.
        first, second = r.metrics(), r.metrics()
        assert _builds(second) == _builds(first)
        assert _boxes_part(second) == _boxes_part(first)

        assert post(r, pki.box("views-two"), encoded(heartbeat())).status == 204
        two = 'dicom_gateway_fleet_last_seen_timestamp_seconds{box="views-two"}'
        _wait_for("views-two in /metrics", lambda: two in r.metrics())
        _wait_for("views-two on the page", lambda: 'data-box="views-two"' in r.view("/")[1])
        assert _builds(r.metrics()) > _builds(second)
        assert 'data-box="views-one"' in r.view("/")[1]
    finally:
        assert r.stop() == 0, r.log

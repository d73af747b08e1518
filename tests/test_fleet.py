"""The fleet receiver (`dicom-gateway fleet serve`, gateway/fleet/): a real receiver
process over mutual TLS, spoken to as a box would (http.client with the box's client
certificate).  What it accepts is stored and shown; every kind of bad input gets a
4xx (or no TLS session at all) and leaves no trace in the database, the page or
/metrics.  tests/test_fleet_e2e.py runs it with real gateways, Chromium and Prometheus.
"""

from __future__ import annotations

import json
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.config import ConfigError, documented_keys
from gateway.fleet import boxes, page
from gateway.fleet import config as fleet_config
from gateway.fleet.boxes import Box
from gateway.heartbeat_body import BadHeartbeat, decode

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
    """*text* is in no stored row, nor on the page, nor in /metrics."""
    assert not any(text in name or text in body for name, (_, body) in _rows(receiver).items())
    assert text not in receiver.view("/")[1]
    assert text not in receiver.metrics()


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
    metrics = receiver.metrics()
    assert 'dicom_gateway_queue_instances{box="clinic-7-gw1",state="compressed"} 2.0' in metrics
    assert 'dicom_gateway_fleet_last_seen_timestamp_seconds{box="clinic-7-gw1"}' in metrics
    assert 'dicom_gateway_archive_state{box="clinic-7-gw1",state="reachable"} 1.0' in metrics
    assert 'dicom_gateway_build_info{box="clinic-7-gw1",version="0.test"} 1.0' in metrics
    status, html = receiver.view("/")
    assert status == 200 and 'data-box="clinic-7-gw1"' in html and "CLAIMS-OTHER" in html


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
    samples = _samples(receiver.metrics(), "box-contract")
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
    samples = _samples(receiver.metrics(), "box-older")
    states = {
        line.split('state="')[1].split('"')[0] for line in samples["dicom_gateway_queue_instances"]
    }
    assert states == {"uploading", "failed", "uploaded"}
    assert (
        'dicom_gateway_queue_instances{box="box-older",state="failed"} 3.0'
        in samples["dicom_gateway_queue_instances"]
    )
    assert "dicom_gateway_mpps_outbox_messages" not in samples
    assert receiver.boxes()["box-older"]["heartbeat"] == old


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
    html = receiver.view("/")[1]
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

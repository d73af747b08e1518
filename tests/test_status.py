"""The status document: its JSON key tree, health verdicts, the config summary, the
chart, a real snapshot round-tripped through its JSON, and a bounded close()."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import app as app_module
from gateway import config
from gateway.commitment import requests as commitment_requests
from gateway.commitment.requests import RequestedItem
from gateway.metrics import Metrics
from gateway.web import auth as webauth
from gateway.web import status
from gateway.web.gauges import SnapshotCollector
from gateway.web.heartbeat import compact
from gateway.web.page import chart, render_page
from gateway.web.status import config_summary, health
from gateway.web.status_doc import (
    CommitmentRequester,
    CommitmentStatus,
    ComponentRestart,
    Modality,
    StatusDoc,
    WorklistSource,
    status_body,
    status_json,
)

from .support.status_sample import from_json, key_tree, sample_doc

# What /api/status returns, key by key (tests/support/status_sample.py, key_tree): a field of
# gateway/web/status_doc.py renamed, moved, retyped or made nullable changes the API, which
# scripts and monitoring read.  Change this only with the README's API description.
_ROW = "str"
GOLDEN: dict[str, Any] = {
    "version": "str", "boot_id": "str", "started_at": "str", "uptime_seconds": "number",
    "snapshot_age_seconds": "number|null",
    "queue": {
        "pending": "int", "received": "int", "compressing": "int", "pending_upload": "int",
        "uploading": "int", "failed": "int", "done": "int", "done_today": "int",
        "by_state": {"*": "int"}, "oldest_pending_at": "str|null",
        "oldest_pending_ts": "number|null", "oldest_pending_age_seconds": "number|null",
    },
    "archive": {
        "url": "str", "state": "str", "reachable": "bool", "last_success_at": "str|null",
        "last_success_ts": "number|null", "last_error": "str|null", "last_error_at": "str|null",
    },
    "uploads": {
        "paused": "bool", "limit_bytes_per_second": "int", "window_open": "bool",
        "windows": ["str"], "window_changes_at": "str|null", "priority_aets": ["str"],
    },
    "associations_active": "int",
    "throughput": [{"minute": "str", "received": "int", "received_bytes": "int",
                    "uploaded": "int", "uploaded_bytes": "int"}],
    "modalities": [{"calling_ae": "str", "last_24h": "int", "last_seen": "str|null",
                    "last_seen_ts": "number|null"}],
    "failed": [{"sop_instance_uid": "str", "study_instance_uid": "str",
                "calling_ae": "str|null", "attempts": "int", "received_at": "str",
                "updated_at": "str", "last_error": "str|null"}],
    "retrying": [{"sop_instance_uid": "str", "attempts": "int",
                  "next_attempt_at": "str|null", "last_error": "str|null"}],
    "warnings": {
        "count": "int",
        "recent": [{"sop_instance_uid": "str", "study_instance_uid": "str",
                    "calling_ae": "str|null", "uploaded_at": "str|null", "warnings": ["str"]}],
    },
    "recent_errors": [{"at": "str", "level": "str", "source": "str", "message": "str",
                       "count": "int"}],
    "disk": {"free_bytes": "int|null", "total_bytes": "int|null", "spool_bytes": "int",
             "min_free_bytes": "int", "below_watermark": "bool"},
    "spool": {"dir": "str", "problem": "str|null"},
    "certificate": {"path": "str|null", "not_after": "str|null", "not_after_ts": "number|null",
                    "days_left": "int|null", "warning": "bool", "error": "str|null"},
    "worklist": [{"source": "str", "last_attempt_at": "str|null", "last_success_at": "str|null",
                  "last_error": "str|null", "item_count": "int|null",
                  "last_success_ts": "number|null", "refresh_interval_seconds": "number|null"}],
    "mpps": {
        "pending": "int", "sending": "int", "failed": "int", "oldest_pending_at": "str|null",
        "failed_messages": [{"seq": "int", "sop_instance_uid": "str", "kind": "str",
                             "received_at": "str", "last_error": "str|null"}],
        "forwarding_to": "str|null", "oldest_pending_ts": "number|null",
    },
    "commitment": {
        "waiting": "int", "due": "int", "reporting": "int", "reported": "int",
        "some_failed": "int", "oldest_unreported_at": "str|null",
        "oldest_unreported_ts": "number|null", "oldest_unreported_age_seconds": "number|null",
        "undelivered": [{"requesting_ae": "str", "address": "str|null", "reports_due": "int",
                         "due_since_at": "str", "due_since_ts": "number", "attempts": "int",
                         "last_error": "str|null", "last_error_at": "str|null",
                         "next_attempt_at": "str|null", "next_attempt_ts": "number|null"}],
    },
    "studies": [{
        "study_instance_uid": "str", "calling_aes": ["str"], "instances": "int",
        "stage": "str", "complete": "bool", "complete_at": "str",
        **{stage: {"count": "int", "first_at": "str|null", "last_at": "str|null"}
           for stage in ("received", "compressed", "uploaded", "confirmed", "committed")},
        "failed": "int", "seconds_to_confirmed": "number|null",
    }],
    "config": {
        "source": "str", "ae_title": "str", "dimse": "str", "allowed_aets": ["str"],
        "remote_aes": ["str"], "spool_dir": "str", "min_free_bytes": "int", "database": "str",
        "dicomweb_url": "str", "client_cert": "str", "client_key": "str", "upload_auth": "str",
        "compression": "str",
        "concurrent_requests": "int", "retention_keep_bytes": "int",
        "worklist_upstream": "str", "web": "str", "web_auth": ["str"], "heartbeat_url": "str",
    },
    "snapshot_error": "str|null",
    "components": {"*": {"error": "str", "at": "str", "ts": "number", "count": "int",
                         "restart_in_seconds": "number"}},
    "health": {"state": "str", "reasons": ["str"]},
}  # fmt: skip

# The heartbeat's body (gateway.web.heartbeat.compact), which the fleet receiver parses
# (gateway/heartbeat_body.py).
HEARTBEAT_GOLDEN = {
    "ae_title": "str", "version": "str", "boot_id": "str", "sent_at": "str",
    "uptime_seconds": "float", "health": "str", "reasons": "list", "queue": {
        "pending": "int", "uploading": "int", "failed": "int", "done": "int",
        "done_today": "int", "oldest_pending_at": "NoneType", "by_state": {},
    },
    "archive": {"state": "str", "last_success_at": "NoneType"}, "uploads_paused": "bool",
    "disk": {"free_bytes": "int", "min_free_bytes": "int", "spool_bytes": "int"},
    "certificate_days_left": "int", "uploads_window_open": "bool", "worklist": "list",
    "mpps": {"pending": "int", "sending": "int", "failed": "int", "oldest_pending_at": "NoneType"},
    "commitment": {"waiting": "int", "due": "int", "reporting": "int", "reported": "int",
                   "oldest_unreported_at": "NoneType", "undelivered": "list"},
}  # fmt: skip


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


def test_the_api_keeps_its_golden_key_tree() -> None:
    # Key order too: json.dumps keeps it, and people read the API with their eyes.
    assert json.dumps(key_tree(StatusDoc)) == json.dumps(GOLDEN)


def test_the_heartbeat_keeps_its_golden_key_tree() -> None:
    body = compact(sample_doc(), "DICOMGW")
    assert json.dumps(_shape(body)) == json.dumps(HEARTBEAT_GOLDEN)
    assert json.loads(json.dumps(body)) == body  # plain JSON, nothing converted


def _undelivered(due_since_ts: float, **changes: Any) -> CommitmentStatus:
    """Two reports due to CT_ROOM1 since *due_since_ts*, tried and failed."""
    due_since = datetime.fromtimestamp(due_since_ts, UTC).isoformat()
    requester = CommitmentRequester(
        requesting_ae="CT_ROOM1", address="10.20.0.11:104", reports_due=2,
        due_since_at=due_since, due_since_ts=due_since_ts, attempts=4,
        last_error="association refused, aborted or not answered", last_error_at=due_since,
        next_attempt_at=datetime.fromtimestamp(time.time() + 40, UTC).isoformat(),
        next_attempt_ts=time.time() + 40,
    )  # fmt: skip
    return dataclasses.replace(
        sample_doc().commitment, waiting=1, due=2, reported=5, some_failed=1,
        oldest_unreported_at=due_since, oldest_unreported_ts=due_since_ts,
        oldest_unreported_age_seconds=time.time() - due_since_ts,
        undelivered=(dataclasses.replace(requester, **changes),),
    )  # fmt: skip


def test_health_ok_degraded_failing() -> None:
    def judge(**changes: Any) -> tuple[str, tuple[str, ...]]:
        verdict = health(sample_doc(**changes))
        return verdict.state, verdict.reasons

    assert judge() == ("ok", ())
    state, reasons = judge(archive__state="unreachable", archive__last_error="HTTP 503")
    assert state == "degraded" and "HTTP 503" in reasons[0]
    assert judge(uploads__paused=True)[0] == "degraded"
    state, reasons = judge(archive__state="not configured")
    assert state == "degraded" and "upload.dicomweb_url" in reasons[0]
    assert judge(queue__failed=2)[0] == "degraded"
    assert judge(queue__oldest_pending_age_seconds=7200)[0] == "degraded"
    # ...unless an upload window is closed: then the queue waits on purpose.
    assert judge(queue__oldest_pending_age_seconds=7200, uploads__window_open=False)[0] == "ok"
    state, reasons = judge(certificate__warning=True, certificate__days_left=12)
    assert state == "degraded" and "12 days" in reasons[0]
    state, reasons = judge(certificate__error="cannot read: no such file")
    assert state == "degraded" and "no such file" in reasons[0]
    stale = WorklistSource("ris", None, None, "timed out", None, None, 300.0)
    assert judge(worklist=(stale,))[0] == "degraded"
    state, reasons = judge(mpps__failed=1)
    assert state == "degraded" and "MPPS" in reasons[0]
    state, reasons = judge(mpps__oldest_pending_ts=time.time() - 7200)
    assert state == "degraded" and "MPPS" in reasons[0]
    assert judge(mpps__oldest_pending_ts=time.time() - 5)[0] == "ok"
    # A Storage Commitment report undeliverable for over an hour, and only then.
    state, reasons = judge(commitment=_undelivered(time.time() - 7200))
    assert state == "degraded" and reasons == (
        "Storage Commitment reports to CT_ROOM1 undelivered for 120 min:"
        " association refused, aborted or not answered",
    )
    assert judge(commitment=_undelivered(time.time() - 600))[0] == "ok"
    crash = ComponentRestart("RuntimeError('x')", "2026-01-01T00:00:00+00:00", 0.0, 2, 1.0)
    state, reasons = judge(components={"pipeline": crash})
    assert state == "degraded" and reasons[0].startswith("pipeline restarting after error")
    state, reasons = judge(disk__below_watermark=True, archive__state="unreachable")
    assert state == "failing" and len(reasons) == 2 and "below the watermark" in reasons[0]
    state, reasons = judge(spool__problem="spool directory replaced")
    assert state == "failing" and "C-STOREs are refused" in reasons[0]
    assert judge(snapshot_error="queue database unreadable: disk I/O error")[0] == "failing"


def test_config_summary_has_no_secrets() -> None:
    password_hash = webauth.hash_password("a long password")
    token = webauth.token_sha256("token")
    c = config.from_dict(
        {
            "web": {"bind": "0.0.0.0", "password_hash": password_hash, "token_sha256": token},
            "upload": {
                "dicomweb_url": "https://archive.example/dicom-web",
                "client_cert": "/etc/gw/box.pem",
                "client_key": "/etc/gw/box.key",
            },
        }
    )
    summary = config_summary(c)
    text = repr(summary) + json.dumps(status_json(sample_doc(config=summary)))
    assert password_hash not in text and token not in text
    assert "/etc/gw/box.key" in text  # the path, never the contents
    assert summary.web_auth == ("password", "token")
    assert summary.upload_auth == "mtls"


def _page(doc: StatusDoc) -> str:
    return render_page(doc, csrf=None, user="u", refresh_seconds=5, can_logout=False)


def _section(page: str, heading: str) -> str:
    return page.split(f"<h2>{heading}</h2>", 1)[1].split("<h2>", 1)[0]


def test_the_page_shows_storage_commitment_only_where_it_is_used() -> None:
    assert "Storage Commitment" not in _page(sample_doc())
    configured = _section(
        _page(sample_doc(config__remote_aes=("CT_ROOM1@10.20.0.11:104",))), "Storage Commitment"
    )
    assert '<b id="c-waiting">0</b>' in configured and '<b id="c-due">0</b>' in configured
    assert "Reports go to: CT_ROOM1@10.20.0.11:104" in configured
    assert "commitment-undelivered" not in configured and "with failures" not in configured

    # Requests without [[dimse.remote]] (taken out of the config since): shown, with
    # the requester's values escaped.
    stuck = _undelivered(time.time() - 7200, requesting_ae="CT<1>", last_error="refused <b>now</b>")
    page = _page(sample_doc(commitment=stuck))
    section = _section(page, "Storage Commitment")
    for ident, value in (("c-waiting", 1), ("c-due", 2), ("c-reported", 5)):
        assert f'<b id="{ident}">{value}</b>' in section
    assert "1 with failures" in section and '<span id="c-oldest">2.0 h</span>' in section
    assert "Reports go to" not in section
    row = section.split('<tr data-ae="CT&lt;1&gt;">', 1)[1].split("</tr>", 1)[0]
    assert "<td>CT&lt;1&gt; (10.20.0.11:104)</td><td>2</td>" in row
    assert "(2.0 h ago)</td><td>4</td>" in row
    assert re.search(
        r"<span class=bad>refused &lt;b&gt;now&lt;/b&gt;</span>, next try in \d+ s</td>", row
    ), row
    assert "<b>now</b>" not in page

    sending = _section(
        _page(sample_doc(commitment=_undelivered(time.time(), last_error=None,
                                                 next_attempt_at=None, next_attempt_ts=None))),
        "Storage Commitment",
    )  # fmt: skip
    assert "<td>sending</td>" in sending
    first = _section(
        _page(sample_doc(commitment=_undelivered(time.time(), last_error=None,
                                                 next_attempt_ts=time.time() - 1))),
        "Storage Commitment",
    )  # fmt: skip
    assert "<td>first try now</td>" in first


def test_chart_scales_to_the_busiest_minute() -> None:
    svg = chart([(i, 0) for i in range(60)], "instances")
    assert svg.startswith("<svg") and "(max 59)" in svg
    assert svg.count("<polyline") == 2
    assert "(max 2.0)" in chart([(2 * 1024 * 1024, 0)], "MB", scale=1024 * 1024)


# -- a real snapshot -----------------------------------------------------------------------


def _gateway(tmp_path: Path, **sections: Any) -> app_module.Gateway:
    c = config.from_dict(
        {
            "spool": {"dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "database": {"path": str(tmp_path / "q.sqlite3")},
            "dimse": {"port": 0},
            "web": {"port": 0},
            **sections,
        }
    )
    (tmp_path / "spool").mkdir()
    gw = app_module.Gateway(c)
    gw.store.open()
    return gw


def _fill(path: Path) -> None:
    """One row of each kind the status lists: every list in the document has an item."""
    now = datetime.now(UTC)

    def iso(minutes: float) -> str:
        return (now - timedelta(minutes=minutes)).isoformat(timespec="microseconds")

    conn = sqlite3.connect(path)
    rows = [
        ("1.1", "failed", None, "HTTP 400", None, None),
        ("1.2", "compressed", iso(-5), "HTTP 503", None, None),
        ("1.3", "uploaded", None, None, iso(1), '["coerced <PatientName>"]'),
        ("1.4", "received", None, None, None, None),
    ]
    for i, (uid, state, next_at, error, uploaded_at, warnings) in enumerate(rows):
        conn.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
            " series_instance_uid, calling_ae, transfer_syntax, size, sha256, path,"
            " received_at, state, attempts, next_attempt_at, last_error, updated_at,"
            " upload_size, uploaded_at, warnings) VALUES (?, '1.2', '1.3', '1.4', 'CT1',"
            " '1.2.840.10008.1.2.1', 100, 'x', ?, ?, ?, 1, ?, ?, ?, 50, ?, ?)",
            (uid, f"/spool/{i}", iso(i + 2), state, next_at, error, iso(i), uploaded_at, warnings),
        )
    conn.execute(
        "INSERT INTO mpps_outbox (sop_instance_uid, kind, dataset, received_at, state,"
        " last_error, updated_at) VALUES ('9.1', 'create', x'00', ?, 'failed', 'refused', ?)",
        (iso(90), iso(0)),
    )
    conn.execute(
        "INSERT INTO worklist_sources VALUES ('ris', ?, ?, 'timed out', 3)", (iso(1), iso(5))
    )
    conn.commit()
    conn.close()


@pytest.mark.asyncio
async def test_a_real_snapshot_round_trips_through_its_json(tmp_path: Path) -> None:
    """What the builder really produces has exactly the document's keys and types
    (so the golden tree above is the API's), and the JSON keeps every value."""
    remote = {"ae_title": "CT_ROOM1", "host": "10.20.0.11", "port": 104}
    gw = _gateway(
        tmp_path,
        mpps={"upstream_host": "ris.example", "upstream_ae": "RIS"},
        dimse={"port": 0, "remote": [remote]},
    )
    try:
        _fill(gw.store.path)
        # A Storage Commitment request decided two hours ago (an instance of a class
        # the gateway does not store), its report refused since.
        two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
        item = RequestedItem("1.2.840.10008.5.1.4.1.1.4", "7.1", 0x0122, "not stored")
        gw.store.submit(commitment_requests.record_request(
            "7", "CT_ROOM1", "10.20.0.11:5000", [item], two_hours_ago, two_hours_ago
        )).result()  # fmt: skip
        gw.store.submit(commitment_requests.retry_report(
            "7", "association refused, aborted or not answered",
            (datetime.now(UTC) + timedelta(minutes=5)).isoformat(), False,
        )).result()  # fmt: skip
        gw.status.component_crashed("worklist", "OSError('x')", 2.0)
        gw.status.errors.handle(
            logging.LogRecord(
                "gateway.pipeline.jobs", logging.WARNING, __file__, 1, "busy", (), None
            )
        )
        doc = await gw.status.status(fresh=True)
        for part in (doc.throughput, doc.modalities, doc.failed, doc.retrying,
                     doc.warnings.recent, doc.recent_errors, doc.worklist,
                     doc.mpps.failed_messages, doc.components, doc.studies,
                     doc.commitment.undelivered):  # fmt: skip
            assert part, "the sample leaves a list of the document empty"
        text = json.dumps(status_json(doc))
        assert from_json(StatusDoc, json.loads(text)) == doc
        # /api/status's body (msgspec) is the same JSON, key order included.
        body = json.loads(status_body(doc))
        assert body == json.loads(text)
        assert json.dumps(body) == text
        assert doc.health.state == "degraded" and doc.warnings.recent[0].warnings == (
            "coerced <PatientName>",
        )
        c = doc.commitment
        assert (c.due, c.some_failed, c.oldest_unreported_at) == (1, 1, two_hours_ago)
        (ae,) = c.undelivered
        assert (ae.address, ae.attempts, ae.due_since_at) == ("10.20.0.11:104", 1, two_hours_ago)
        assert doc.config.remote_aes == ("CT_ROOM1@10.20.0.11:104",)
        assert any(
            r.startswith(
                "Storage Commitment reports to CT_ROOM1 undelivered for 120 min:"
                " association refused"
            )
            for r in doc.health.reasons
        ), doc.health.reasons
    finally:
        await gw.status.close()
        gw.store.close()


@pytest.mark.asyncio
async def test_close_interrupts_a_snapshot_that_overruns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status.close() is bounded (gateway.app.stop_budget_seconds counts it): a query
    still running then is interrupted, so the store may close its connection."""
    gw = _gateway(tmp_path)
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def endless(conn: sqlite3.Connection, now: datetime) -> status.Snapshot:
        loop.call_soon_threadsafe(started.set)
        conn.execute(  # some seconds of counting, should the interrupt never come
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2e7)"
            " SELECT count(*) FROM c"
        ).fetchone()
        raise AssertionError("the query was not interrupted")

    monkeypatch.setattr(status, "query_database", endless)
    try:
        request = asyncio.create_task(gw.status.status())  # waits: no snapshot yet
        await started.wait()
        await gw.status.close(timeout=0.3)
        task = gw.status._refreshing
        assert task is not None and task.done()
        assert gw.status.snapshot_error == "queue database unreadable: interrupted"
        assert (await request).snapshot_error == gw.status.snapshot_error
    finally:
        if gw.status._refreshing is not None:
            # Should close() not have stopped it: closing the store's connections
            # under a running query would crash the interpreter.
            await gw.status._refreshing
        gw.store.close()


def _samples(doc: StatusDoc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    m = Metrics()
    m.registry.register(SnapshotCollector(lambda: doc))
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in m.registry.collect()
        for s in family.samples
    }


def test_metrics_gauges_follow_the_status_document() -> None:
    """/metrics's snapshot gauges are the document's facts (the alerts of monitoring/
    read them): each state of a state set has a series, 1 for the current one."""
    p = "dicom_gateway_"
    now = time.time()
    doc = sample_doc(
        archive__state="unreachable",
        mpps__oldest_pending_ts=now - 60,
        worklist=(
            WorklistSource("upstream-mwl", None, None, None, 3, now - 5, 300.0),
            WorklistSource("ris-gone", None, None, None, 1, now - 9999, None),
        ),
        modalities=(Modality("CT_ROOM1", 7, "2026-01-01T00:00:00+00:00", 1767225600.0),),
    )
    doc = dataclasses.replace(doc, health=health(doc))
    m = _samples(doc)
    assert m[p + "health_state", (("state", "degraded"),)] == 1
    assert m[p + "health_state", (("state", "ok"),)] == 0
    assert m[p + "health_state", (("state", "failing"),)] == 0
    assert m[p + "archive_state", (("state", "unreachable"),)] == 1
    assert m[p + "archive_state", (("state", "reachable"),)] == 0
    assert m[p + "archive_state", (("state", "not configured"),)] == 0
    assert m[p + "mpps_outbox_oldest_pending_timestamp_seconds", ()] == now - 60
    assert m[p + "worklist_refresh_interval_seconds", (("source", "upstream-mwl"),)] == 300
    assert m[p + "worklist_last_refresh_timestamp_seconds", (("source", "upstream-mwl"),)] == (
        now - 5
    )
    # A source no longer configured keeps its last refresh, but has no interval: the
    # WorklistSourceStale alert does not fire for it forever.
    assert (p + "worklist_refresh_interval_seconds", (("source", "ris-gone"),)) not in m
    assert m[p + "calling_ae_instances_last_24h", (("calling_ae", "CT_ROOM1"),)] == 7
    assert m[p + "calling_ae_last_seen_timestamp_seconds", (("calling_ae", "CT_ROOM1"),)] == (
        1767225600.0
    )
    assert m[p + "spool_filesystem_size_bytes", ()] == 10**11
    # Nothing waiting: the timestamps say 0 (the alerts ignore 0).
    quiet = _samples(sample_doc())
    assert quiet[p + "mpps_outbox_oldest_pending_timestamp_seconds", ()] == 0
    assert quiet[p + "health_state", (("state", "ok"),)] == 1
    assert not any(name.startswith(p + "commitment_report_due") for name, _ in quiet)
    assert quiet[p + "commitment_oldest_unreported_timestamp_seconds", ()] == 0
    failing = sample_doc(disk__below_watermark=True)
    failing = dataclasses.replace(failing, health=health(failing))
    assert _samples(failing)[p + "health_state", (("state", "failing"),)] == 1


def test_commitment_gauges_follow_the_status_document() -> None:
    p = "dicom_gateway_commitment_"
    m = _samples(sample_doc(commitment=_undelivered(1.7e9)))
    assert {labels: v for (name, labels), v in m.items() if name == p + "requests"} == {
        (("state", "waiting"),): 1, (("state", "due"),): 2, (("state", "reporting"),): 0,
        (("state", "reported"),): 5,
    }  # fmt: skip
    assert m[p + "oldest_unreported_timestamp_seconds", ()] == 1.7e9
    assert m[p + "report_due_timestamp_seconds", (("requesting_ae", "CT_ROOM1"),)] == 1.7e9

"""Pure parts of the status: health verdicts, the config summary, the chart."""

from __future__ import annotations

import time
from typing import Any

from gateway import config, webauth
from gateway.page import chart
from gateway.status import config_summary, health


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "disk": {"below_watermark": False, "free_bytes": 10**10, "min_free_bytes": 10**9},
        "archive": {"state": "reachable", "last_error": None},
        "uploads": {"paused": False},
        "queue": {"failed": 0, "oldest_pending_age_seconds": None},
        "certificate": {"error": None, "warning": False, "days_left": 400},
        "worklist": [],
        "mpps": {"failed": 0, "oldest_pending_ts": None},
        "snapshot_error": None,
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc[section] = {**doc[section], field: value}
        else:
            doc[section] = value
    return doc


def test_health_ok_degraded_failing() -> None:
    assert health(_doc()) == {"state": "ok", "reasons": []}
    outage = health(_doc(archive__state="unreachable", archive__last_error="HTTP 503"))
    assert outage["state"] == "degraded" and "HTTP 503" in outage["reasons"][0]
    assert health(_doc(uploads__paused=True))["state"] == "degraded"
    nowhere = health(_doc(archive__state="not configured"))
    assert nowhere["state"] == "degraded" and "upload.dicomweb_url" in nowhere["reasons"][0]
    assert health(_doc(queue__failed=2))["state"] == "degraded"
    assert health(_doc(queue__oldest_pending_age_seconds=7200))["state"] == "degraded"
    # ...unless an upload window is closed: then the queue waits on purpose.
    held = _doc(queue__oldest_pending_age_seconds=7200, uploads__window_open=False)
    assert health(held)["state"] == "ok"
    cert = health(_doc(certificate__warning=True, certificate__days_left=12))
    assert cert["state"] == "degraded" and "12 days" in cert["reasons"][0]
    stale = health(_doc(worklist=[{"source": "ris", "last_error": "timed out"}]))
    assert stale["state"] == "degraded"
    refused = health(_doc(mpps__failed=1))
    assert refused["state"] == "degraded" and "MPPS" in refused["reasons"][0]
    stuck = health(_doc(mpps__oldest_pending_ts=time.time() - 7200))
    assert stuck["state"] == "degraded" and "MPPS" in stuck["reasons"][0]
    assert health(_doc(mpps__oldest_pending_ts=time.time() - 5))["state"] == "ok"
    full = health(_doc(disk__below_watermark=True, archive__state="unreachable"))
    assert full["state"] == "failing" and len(full["reasons"]) == 2
    broken = health(_doc(snapshot_error="queue database unreadable: disk I/O error"))
    assert broken["state"] == "failing"


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
    text = repr(config_summary(c))
    assert password_hash not in text and token not in text
    assert "/etc/gw/box.key" in text  # the path, never the contents
    assert config_summary(c)["web_auth"] == ["password", "token"]
    assert config_summary(c)["upload_auth"] == "mtls"


def test_chart_scales_to_the_busiest_minute() -> None:
    minutes = [
        {"received": i, "uploaded": 0, "received_bytes": 0, "uploaded_bytes": 0} for i in range(60)
    ]
    svg = chart(minutes, "", "instances")
    assert svg.startswith("<svg") and "(max 59)" in svg
    assert svg.count("<polyline") == 2

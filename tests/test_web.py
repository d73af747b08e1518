"""Status page, JSON API, /metrics, health and access control against the real gateway.

Every gateway here is the real process (tests/support/gateway_proc.py); modalities are DCMTK
storescu, the archive is Orthanc behind nginx with mutual TLS (tests/support/archive.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import EXIT_CONFIG
from gateway.web import auth as webauth
from gateway.web.heartbeat import compact
from gateway.web.status_doc import StatusDoc

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.gateway_proc import GatewayProcess
from .support.peers import storescu
from .support.status_sample import from_json
from .support.web_client import WebClient, web_port
from .test_upload import _upload_config, wait_until

PASSWORD = "correct horse battery"
TOKEN = "test-token-not-a-secret"


def _client(gw: GatewayProcess) -> WebClient:
    return WebClient(web_port(gw))


def _send(gw: GatewayProcess, tmp_path: Path, name: str = "CT_small.dcm", **kw: Any) -> Path:
    path = tmp_path / f"{time.monotonic_ns()}-{name}"
    ds = corpus.with_new_uids(corpus.testdata(name), path)
    for keyword, value in kw.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    result = storescu(gw.port, [path], calling="CT_ROOM1")
    assert result.acknowledged == 1, result.output
    return path


def _waiting(status: dict[str, Any]) -> int:
    """Not yet in the archive: pending, or in an upload attempt right now."""
    return int(status["queue"]["pending"] + status["queue"]["uploading"])


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family: Any, suffix: str = "", **labels: str) -> float:
    for s in family.samples:
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {family.name}{suffix} {labels} in {family.samples}")


def test_metrics_after_an_upload(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = gateway_factory(upload=_upload_config(archive_lab))
    web = _client(gw)
    _send(gw, tmp_path)
    # An association with the wrong called AE title is rejected, and counted.
    refused = storescu(gw.port, [corpus.testdata("CT_small.dcm")], called="NOT_US")
    assert refused.acknowledged == 0
    wait_until("uploaded", lambda: web.status()["queue"]["done"] == 1)

    reply = web.get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    m = _families(reply.text)
    p = "dicom_gateway_"
    assert _value(m[p + "instances_received"], "_total", result="stored") == 1
    assert _value(m[p + "associations_accepted"], "_total") >= 1
    assert _value(m[p + "associations_rejected"], "_total", reason="called_ae_unknown") == 1
    assert _value(m[p + "associations_active"]) >= 0
    assert _value(m[p + "queue_instances"], state="uploaded") == 1
    assert _value(m[p + "queue_instances"], state="compressed") == 0
    assert _value(m[p + "queue_oldest_pending_enqueue_timestamp_seconds"]) == 0  # none left
    assert _value(m[p + "stow_requests"], "_total", code="200") >= 1
    assert _value(m[p + "stow_request_duration_seconds"], "_count") >= 1
    assert 0 < _value(m[p + "stow_request_duration_seconds"], "_sum") < 60
    assert _value(m[p + "uploaded_bytes"], "_total") > 1000
    assert _value(m[p + "uploaded_instances"], "_total", outcome="stored") == 1
    # CT_small is 16-bit uncompressed: J2K lossless makes it smaller.
    assert _value(m[p + "compression_ratio"], "_count") == 1
    assert _value(m[p + "compression_ratio"], "_sum") > 1.0
    now = time.time()
    assert now - 120 < _value(m[p + "last_successful_upload_timestamp_seconds"]) <= now + 1
    assert _value(m[p + "spool_free_bytes"]) > 0
    assert _value(m[p + "spool_bytes"]) >= 0
    assert p + "worklist_last_refresh_timestamp_seconds" in m  # no source configured
    # trustme certificates are valid for about ten years.
    assert _value(m[p + "client_certificate_expiry_timestamp_seconds"]) > now + 300 * 86400
    assert _value(m[p + "build_info"], version=web.status()["version"]) == 1
    assert _value(m[p + "uploads_paused"]) == 0
    assert _value(m[p + "upload_limit_bytes_per_second"]) == 0  # no cap
    assert _value(m[p + "upload_window_open"]) == 1  # no windows: always open
    assert _value(m[p + "instance_end_to_end_seconds"], "_count") == 1
    assert 0 < _value(m[p + "instance_end_to_end_seconds"], "_sum") < 120
    assert _value(m[p + "health_state"], state="ok") == 1
    assert _value(m[p + "health_state"], state="failing") == 0
    assert _value(m[p + "archive_state"], state="reachable") == 1
    assert _value(m[p + "archive_state"], state="unreachable") == 0
    assert _value(m[p + "calling_ae_instances_last_24h"], calling_ae="CT_ROOM1") == 1
    assert now - 120 < _value(m[p + "calling_ae_last_seen_timestamp_seconds"]) <= now + 1
    assert _value(m[p + "spool_filesystem_size_bytes"]) > _value(m[p + "spool_free_bytes"])
    assert _value(m[p + "mpps_outbox_oldest_pending_timestamp_seconds"]) == 0

    status = web.status()
    assert status["queue"]["pending"] == 0 and status["queue"]["done_today"] == 1
    assert status["archive"]["state"] == "reachable"
    assert status["health"]["state"] == "ok", status["health"]
    assert status["modalities"][0]["calling_ae"] == "CT_ROOM1"
    assert status["certificate"]["days_left"] > 300 and not status["certificate"]["warning"]


def test_archive_outage_is_degraded_not_unready(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = gateway_factory(upload=_upload_config(archive_lab))
    web = _client(gw)
    archive_lab.stop_nginx()
    _send(gw, tmp_path)
    wait_until("archive unreachable", lambda: web.status()["archive"]["state"] == "unreachable")
    status = web.status()
    assert status["health"]["state"] == "degraded"
    assert any("archive unreachable" in r for r in status["health"]["reasons"])
    # A retry in progress holds the row in "uploading" for a moment.
    assert _waiting(status) == 1
    assert status["queue"]["oldest_pending_age_seconds"] is not None
    assert web.get("/livez").status == 200
    ready = web.get("/readyz")
    assert ready.status == 200, ready.text
    # and images keep coming in
    _send(gw, tmp_path)
    assert _waiting(web.status()) == 2

    archive_lab.start_nginx()
    wait_until("drained", lambda: web.status()["queue"]["done"] == 2)
    status = web.status()
    assert _waiting(status) == 0 and status["archive"]["state"] == "reachable"


def test_below_watermark_is_failing_and_unready(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(spool={"min_free_bytes": 2**62})
    web = _client(gw)
    assert web.get("/livez").status == 200
    ready = web.get("/readyz")
    assert ready.status == 503
    assert any("below min_free_bytes" in p for p in ready.json()["problems"])
    status = web.status()
    assert status["health"]["state"] == "failing"
    assert status["disk"]["below_watermark"] is True


def test_readyz_when_the_spool_tmp_dir_is_moved_away(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory()
    web = _client(gw)
    assert web.get("/readyz").status == 200
    tmp = gw.spool / "tmp"
    tmp.rename(gw.spool / "tmp-moved")  # the gateway never writes into a stranger's tmp/
    try:
        ready = web.get("/readyz")
        assert ready.status == 503
        assert any(
            "spool directory is missing or replaced" in p and "tmp does not exist" in p
            for p in ready.json()["problems"]
        ), ready.text
    finally:
        (gw.spool / "tmp-moved").rename(tmp)
    assert web.get("/readyz").status == 200


def test_retry_and_pause_from_the_api(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = gateway_factory(start=False, upload=_upload_config(archive_lab))
    # The archive refuses an instance without Series Instance UID (HTTP 400, 0xC000):
    # a permanent failure that only an operator's retry sends again.  The gateway's
    # own C-STORE check refuses such an instance, so it is queued directly.
    bad = tmp_path / "no-series.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), bad)
    del ds.SeriesInstanceUID
    ds.save_as(bad)
    gw.enqueue_unchecked(bad)
    gw.start()
    web = _client(gw)
    wait_until("failed", lambda: web.status()["queue"]["failed"] == 1)
    failed = web.get("/api/queue?state=failed&limit=10").json()["items"]
    assert [f["sop_instance_uid"] for f in failed] == [pydicom.dcmread(bad).SOPInstanceUID]
    assert "0xC000" in failed[0]["last_error"]
    assert web.status()["health"]["state"] == "degraded"
    assert web.get("/api/queue?state=bogus").status == 400
    assert web.get("/api/queue?limit=0").status == 400

    # An action without the session's CSRF token is refused, even on loopback.
    uid = failed[0]["sop_instance_uid"]
    refused = web.post("/api/queue/retry", json_body={"sop_instance_uids": [uid]})
    assert refused.status == 403
    csrf = web.get("/api/session").json()["csrf"]
    cross = web.post(
        "/api/queue/retry",
        json_body={"sop_instance_uids": [uid]},
        headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    )
    assert cross.status == 403
    ok = web.post(
        "/api/queue/retry", json_body={"sop_instance_uids": [uid]}, headers={"X-CSRF-Token": csrf}
    )
    assert ok.status == 200 and ok.json() == {"retried": 1}
    assert gw.rows("SELECT attempts FROM instances")[0]["attempts"] <= 1
    wait_until("failed again", lambda: web.status()["queue"]["failed"] == 1)

    h = {"X-CSRF-Token": csrf}
    assert web.post("/api/uploads/pause", headers=h).json() == {"paused": True}
    assert web.status()["uploads"]["paused"] is True
    assert "uploads are paused" in web.status()["health"]["reasons"]
    _send(gw, tmp_path)
    wait_until("compressed", lambda: web.status()["queue"]["pending_upload"] == 1)
    time.sleep(1.5)  # an unpaused pipeline sends within a few milliseconds
    assert web.status()["queue"]["done"] == 0 and archive_lab.instance_count() == 0
    assert web.post("/api/uploads/resume", headers=h).json() == {"paused": False}
    wait_until("uploaded after resume", lambda: web.status()["queue"]["done"] == 1)


def test_page_is_escaped_and_shows_no_secrets(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    password_hash = webauth.hash_password(PASSWORD)
    gw = gateway_factory(
        web={"password_hash": password_hash, "token_sha256": webauth.token_sha256(TOKEN)}
    )
    web = _client(gw)
    path = tmp_path / "x.dcm"
    corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    assert storescu(gw.port, [path], calling="<b>AE&").acknowledged == 1
    page = web.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert "&lt;b&gt;AE&amp;" in page and "<b>AE&" not in page
    assert password_hash not in page and webauth.token_sha256(TOKEN) not in page
    assert PASSWORD not in page and TOKEN not in page
    api = web.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert password_hash not in api and webauth.token_sha256(TOKEN) not in api
    assert '<meta name="viewport"' in page and "<svg" in page


def test_beyond_localhost_everything_needs_auth(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(
        web={
            "bind": "0.0.0.0",
            "password_hash": webauth.hash_password(PASSWORD),
            "token_sha256": webauth.token_sha256(TOKEN),
        }
    )
    anon = _client(gw)
    for path in ("/api/status", "/api/queue", "/metrics", "/api/session", "/api/studies",
                 "/api/studies/1.2.3"):  # fmt: skip
        assert anon.get(path).status == 401, path
    assert anon.get("/", headers={"Accept": "text/html"}).status == 303  # to /login
    for path in ("/api/uploads/pause", "/api/uploads/resume", "/api/queue/retry"):
        assert anon.post(path, json_body={"all": True}).status == 401, path
    assert anon.post("/api/uploads/pause", headers={"Authorization": "Bearer nope"}).status == 401
    assert anon.get("/livez").status == 200 and anon.get("/readyz").status == 200

    # A script with the token: no cookie, no CSRF token needed.
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert anon.post("/api/uploads/pause", headers=bearer).json() == {"paused": True}
    assert anon.get("/metrics", headers=bearer).status == 200

    # HTTP Basic reads, but cannot act without a session's CSRF token.
    import base64

    basic = {"Authorization": "Basic " + base64.b64encode(f"x:{PASSWORD}".encode()).decode()}
    assert anon.get("/api/status", headers=basic).status == 200
    assert anon.post("/api/uploads/resume", headers=basic).status == 403
    wrong = {"Authorization": "Basic " + base64.b64encode(b"x:guess").decode()}
    assert anon.get("/api/status", headers=wrong).status == 401

    # A browser: log in, then act with the CSRF token from the page.
    browser = _client(gw)
    assert browser.post("/login", form={"password": "guess"}).status == 401
    assert "gw_session" not in browser.cookies
    login = browser.post("/login", form={"password": PASSWORD})
    assert login.status == 303 and "gw_session" in browser.cookies
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = browser.get("/").text
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert browser.post("/api/uploads/resume", form={}).status == 403
    assert browser.post("/api/uploads/resume", form={"csrf": "forged"}).status == 403
    evil = browser.post(
        "/api/uploads/resume", form={"csrf": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert evil.status == 403
    done = browser.post("/api/uploads/resume", form={"csrf": csrf})
    assert done.status == 303 and done.headers["location"] == "/"
    assert browser.get("/api/status").json()["uploads"]["paused"] is False
    # Logging out ends the session.
    assert browser.post("/logout", form={"csrf": csrf}).status == 303
    assert browser.get("/api/status").status == 401


def test_loopback_page_refuses_a_foreign_host_name(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory()
    web = _client(gw)
    assert web.get("/api/status").status == 200
    rebound = web.get("/api/status", headers={"Host": f"evil.example:{web.port}"})
    assert rebound.status == 421


def test_refuses_to_start_beyond_localhost_without_auth(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(start=False, web={"bind": "0.0.0.0"})
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "web.bind" in lines[0] and "not a loopback" in lines[0]


def test_hash_password_command_makes_a_hash_that_verifies() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "hash-password"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    line = result.stdout.strip()
    assert line.startswith('password_hash = "scrypt$')
    stored = line.split('"')[1]
    assert webauth.verify_password(PASSWORD, stored)
    assert not webauth.verify_password(PASSWORD + "x", stored)
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "hash-password", "--token"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    raw = token.split(": ", 1)[1].split("\n", 1)[0]
    assert f'token_sha256 = "{webauth.token_sha256(raw)}"' in token


@pytest.mark.parametrize("interval", [0.5])
def test_heartbeat_reaches_the_archive_over_mutual_tls(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, interval: float
) -> None:
    """The heartbeat endpoint is a location in the lab's nginx (``return 204``), behind
    the same ``ssl_verify_client on`` as the archive."""
    url = f"https://localhost:{archive_lab.nginx_port}/heartbeat"
    gw = gateway_factory(
        upload=_upload_config(archive_lab),
        heartbeat={"url": url, "interval_seconds": interval},
    )
    log = archive_lab.nginx_access_log(wait_for='"POST /heartbeat HTTP/1.1" 204')
    assert log.count("POST /heartbeat") >= 1
    assert "heartbeat to" not in gw.log  # no failure logged
    # What is sent: compact, no secrets, no patient data.
    # The API's JSON back into the document (every key and type checked on the way).
    body = compact(from_json(StatusDoc, _client(gw).status()), "DICOMGW")
    assert body["health"] == "ok" and body["queue"]["pending"] == 0
    assert body["certificate_days_left"] > 300
    text = json.dumps(body)
    assert len(text) < 2000 and "client.key" not in text


def test_client_certificate_requirement(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    """``web.client_ca_file``: HTTPS that refuses a client without a certificate signed
    by that CA; a certified browser still needs the CSRF token to act."""
    import http.client
    import ssl

    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "web.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    operator = ca.issue_cert("operator-laptop")
    stranger = trustme.CA().issue_cert("stranger")
    gw = gateway_factory(
        web={
            "bind": "0.0.0.0",
            "tls_cert": str(tmp_path / "web.pem"),
            "tls_key": str(tmp_path / "web.pem"),
            "client_ca_file": str(tmp_path / "clients-ca.pem"),
        }
    )
    port = web_port(gw)

    def connect(client: Any | None) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        if client is not None:
            client.configure_cert(ctx)
        return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)

    for client in (None, stranger):
        conn = connect(client)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn.request("GET", "/api/status")
            conn.getresponse().read()
        conn.close()

    conn = connect(operator)
    conn.request("GET", "/api/status")
    ok = conn.getresponse()
    assert ok.status == 200 and json.loads(ok.read())["queue"]["pending"] == 0
    conn.request("POST", "/api/uploads/pause")
    refused = conn.getresponse()
    assert refused.status == 403, refused.read()
    refused.read()
    conn.request("GET", "/api/session")
    reply = conn.getresponse()
    cookie = reply.getheader("Set-Cookie", "").split(";", 1)[0]
    assert "Secure" in reply.getheader("Set-Cookie", "")
    csrf = json.loads(reply.read())["csrf"]
    conn.request("POST", "/api/uploads/pause", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    done = conn.getresponse()
    assert done.status == 200 and json.loads(done.read()) == {"paused": True}
    conn.close()


def test_failing_heartbeat_is_logged_once_and_harms_nothing(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    from .support.peers import free_port

    url = f"https://localhost:{free_port()}/heartbeat"  # nothing listens there
    gw = gateway_factory(heartbeat={"url": url, "interval_seconds": 0.2})
    wait_until("heartbeat failure logged", lambda: f"heartbeat to {url} failed" in gw.log)
    _send(gw, tmp_path)  # still receiving
    web = _client(gw)
    wait_until("shown on the page", lambda: "heartbeat to" in web.get("/").text)
    assert gw.log.count(f"heartbeat to {url} failed") == 1
    assert web.get("/readyz").status == 200


def test_web_port_in_use_is_a_start_failure(gateway_factory: GatewayFactory) -> None:
    import socket

    from gateway.cli import EXIT_START_FAILED

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = gateway_factory(start=False, web={"port": port})
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(gw.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == EXIT_START_FAILED, result.stderr
    assert "cannot start" in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr


def test_every_route_is_documented_in_the_readme() -> None:
    from gateway.app import Gateway
    from gateway.config import Config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    app = Gateway(Config()).web.app()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else "?"
        assert f"{route.method} {path}" in readme, f"`{route.method} {path}` not in README"

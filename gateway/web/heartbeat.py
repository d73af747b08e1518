"""Optional heartbeat: POST a compact status to ``heartbeat.url`` every interval.

For boxes behind NAT that a monitoring service cannot reach: the box calls out, over
the same verified, mutual TLS as its uploads (``upload.client_cert``; the endpoint's
certificate checked against ``heartbeat.ca_file``, else ``upload.ca_file``), so the
receiving end knows which box is speaking without any inbound connection.  The
request credentials of ``[upload.auth]`` (gateway.auth) go along only when
``heartbeat.url`` has the archive's origin (scheme, host and port of
``upload.dicomweb_url``): a fleet receiver run by someone else gets the client
certificate alone, never the archive's token or signature.  The body is
gateway/heartbeat_body.py's :class:`Heartbeat`; `dicom-gateway fleet serve`
(gateway/fleet/) is a receiver for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from datetime import UTC, datetime

import aiohttp

from .. import auth as auth_module
from ..auth import AuthError
from ..config import Config
from ..heartbeat_body import (
    AE_TITLE_CHARS,
    COMMITMENT_AES_MAX,
    REASON_CHARS,
    REASONS_MAX,
    WORKLIST_SOURCES_MAX,
    Heartbeat,
    HeartbeatCommitment,
    HeartbeatCommitmentRequester,
    HeartbeatWorklistSource,
)
from ..https import http_hint, ssl_context
from .status import StatusService
from .status_doc import CommitmentStatus, StatusDoc, WorklistSource

log = logging.getLogger(__name__)


def compact(doc: StatusDoc, ae_title: str) -> Heartbeat:
    q, a, d, m = doc.queue, doc.archive, doc.disk, doc.mpps
    return {
        "ae_title": ae_title,
        "version": doc.version,
        "boot_id": doc.boot_id,
        # Milliseconds: the receiver refuses a heartbeat not newer than the last one.
        "sent_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "uptime_seconds": doc.uptime_seconds,
        "health": doc.health.state,
        "reasons": [r[:REASON_CHARS] for r in doc.health.reasons[:REASONS_MAX]],
        "queue": {
            "pending": q.pending,
            "uploading": q.uploading,
            "failed": q.failed,
            "done": q.done,
            "done_today": q.done_today,
            "oldest_pending_at": q.oldest_pending_at,
            "by_state": dict(q.by_state),
        },
        "archive": {"state": a.state, "last_success_at": a.last_success_at},
        "uploads_paused": doc.uploads.paused,
        "disk": {
            "free_bytes": d.free_bytes,
            "min_free_bytes": d.min_free_bytes,
            "spool_bytes": d.spool_bytes,
        },
        "certificate_days_left": doc.certificate.days_left,
        "uploads_window_open": doc.uploads.window_open,
        "worklist": [_worklist_source(w) for w in doc.worklist[:WORKLIST_SOURCES_MAX]],
        "mpps": {
            "pending": m.pending,
            "sending": m.sending,
            "failed": m.failed,
            "oldest_pending_at": m.oldest_pending_at,
        },
        "commitment": _commitment(doc.commitment),
    }


def _worklist_source(w: WorklistSource) -> HeartbeatWorklistSource:
    out: HeartbeatWorklistSource = {"source": w.source, "last_success_at": w.last_success_at}
    # The interval lets the receiver export the gauge WorklistSourceStale compares
    # with; a source no longer configured has none.
    if w.refresh_interval_seconds is not None and w.refresh_interval_seconds > 0:
        out["refresh_interval_seconds"] = float(w.refresh_interval_seconds)
    return out


def _commitment(c: CommitmentStatus) -> HeartbeatCommitment:
    # The longest waiting first, so the cut keeps what CommitmentReportsStuck asks.
    # An AE title the receiver would refuse (a DICOM one has 1 to 16 characters) stays
    # home rather than costing the box its whole heartbeat.
    undelivered: list[HeartbeatCommitmentRequester] = [
        {"requesting_ae": u.requesting_ae, "reports_due": u.reports_due,
         "due_since_at": u.due_since_at}
        for u in c.undelivered
        if 0 < len(u.requesting_ae) <= AE_TITLE_CHARS
    ]  # fmt: skip
    return {
        "waiting": c.waiting,
        "due": c.due,
        "reporting": c.reporting,
        "reported": c.reported,
        "oldest_unreported_at": c.oldest_unreported_at,
        "undelivered": undelivered[:COMMITMENT_AES_MAX],
    }


async def run_heartbeat(config: Config, status: StatusService) -> None:
    hb = config.heartbeat
    auth = auth_module.for_origin(config.upload, hb.url)
    headers = {"Content-Type": "application/json"}
    tls = config.upload
    if hb.ca_file is not None:  # the endpoint's CA, when it is not the archive's
        tls = dataclasses.replace(tls, ca_file=hb.ca_file)
    connector = aiohttp.TCPConnector(ssl=ssl_context(tls), limit=1)
    timeout = aiohttp.ClientTimeout(total=min(30.0, hb.interval_seconds))
    failing = False
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while True:
            doc = compact(await status.status(fresh=True), config.dimse.ae_title)
            body = json.dumps(doc).encode()
            try:
                reply = await auth.send(session, "POST", hb.url, headers=headers, body=body)
                problem = None
                if reply.status >= 300:
                    problem = http_hint(
                        "the heartbeat endpoint", reply.status, reply.body, auth,
                        reply.headers.get("WWW-Authenticate", ""), reply.reason,
                    )  # fmt: skip
            except AuthError as exc:
                problem = f"{exc} (fix: {exc.fix})"
            except (TimeoutError, aiohttp.ClientError) as exc:
                problem = repr(exc)
            if problem and not failing:
                log.warning("heartbeat to %s failed: %s", hb.url, problem)
            elif not problem and failing:
                log.info("heartbeat to %s delivered again", hb.url)
            failing = problem is not None
            await asyncio.sleep(hb.interval_seconds)

"""Optional heartbeat: POST a compact status to ``heartbeat.url`` every interval.

For boxes behind NAT that a monitoring service cannot reach: the box calls out, over
the same verified, mutual TLS as its uploads (``upload.ca_file``/``client_cert``) and
with the same request credentials (``[upload.auth]``, gateway.auth), so the receiving
end knows which box is speaking without any inbound connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import TypedDict

import aiohttp

from .. import auth as auth_module
from ..auth import AuthError
from ..config import Config
from ..https import http_hint, ssl_context
from .status import StatusService
from .status_doc import StatusDoc

log = logging.getLogger(__name__)


class HeartbeatQueue(TypedDict):
    pending: int
    uploading: int
    failed: int
    done: int
    done_today: int
    oldest_pending_at: str | None


class HeartbeatArchive(TypedDict):
    state: str
    last_success_at: str | None


class HeartbeatDisk(TypedDict):
    free_bytes: int | None
    min_free_bytes: int
    spool_bytes: int


class Heartbeat(TypedDict):
    """The body POSTed to ``heartbeat.url`` (JSON): a few facts, no patient data."""

    ae_title: str
    version: str
    boot_id: str
    sent_at: str
    uptime_seconds: float
    health: str
    reasons: list[str]
    queue: HeartbeatQueue
    archive: HeartbeatArchive
    uploads_paused: bool
    disk: HeartbeatDisk
    certificate_days_left: int | None


def compact(doc: StatusDoc, ae_title: str) -> Heartbeat:
    q, a, d = doc.queue, doc.archive, doc.disk
    return {
        "ae_title": ae_title,
        "version": doc.version,
        "boot_id": doc.boot_id,
        "sent_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "uptime_seconds": doc.uptime_seconds,
        "health": doc.health.state,
        "reasons": list(doc.health.reasons[:5]),
        "queue": {
            "pending": q.pending,
            "uploading": q.uploading,
            "failed": q.failed,
            "done": q.done,
            "done_today": q.done_today,
            "oldest_pending_at": q.oldest_pending_at,
        },
        "archive": {"state": a.state, "last_success_at": a.last_success_at},
        "uploads_paused": doc.uploads.paused,
        "disk": {
            "free_bytes": d.free_bytes,
            "min_free_bytes": d.min_free_bytes,
            "spool_bytes": d.spool_bytes,
        },
        "certificate_days_left": doc.certificate.days_left,
    }


async def run_heartbeat(config: Config, status: StatusService) -> None:
    hb = config.heartbeat
    auth = auth_module.shared(config.upload)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(ssl=ssl_context(config.upload), limit=1)
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

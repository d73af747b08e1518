"""The status page: server-rendered HTML and an SVG chart, no front-end build.

Every value that comes from the queue or a peer (AE titles, UIDs, error texts) is
escaped; the page carries no secret (see :func:`gateway.web.status.config_summary`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from ..studies import StudyProgress
from .status_doc import (
    ArchiveStatus,
    CertificateStatus,
    CommitmentStatus,
    DiskStatus,
    FailedInstance,
    Modality,
    MppsStatus,
    QueueStatus,
    RecentError,
    RetryingInstance,
    StatusDoc,
    ThroughputMinute,
    UploadsStatus,
    WarningsStatus,
    WorklistSource,
)

_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:0 12px 24px;color:#222;background:#f6f7f9}
h1{font-size:20px;margin:12px 0 4px}h2{font-size:16px;margin:18px 0 6px}
.health{padding:10px 12px;border-radius:6px;font-weight:600;margin:8px 0}
.ok{background:#d9f2dd;color:#14532d}.degraded{background:#fff1c2;color:#713f12}
.failing{background:#fde0e0;color:#7f1d1d}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:8px}
.tile{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.tile b{display:block;font-size:22px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
.wrap{overflow-x:auto}.warn{color:#b45309;font-weight:600}.bad{color:#b91c1c;font-weight:600}
.good{color:#15803d;font-weight:600}button{font:inherit;padding:4px 10px}
form{display:inline}svg{width:100%;height:auto;background:#fff;border:1px solid #ddd}
small{color:#666}code{word-break:break-all}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value))


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _in(ts: float | None) -> str:
    """A time to come, from now: "in 40 s" ("now" when it has passed)."""
    if ts is None:
        return "now"
    seconds = ts - datetime.now(UTC).timestamp()
    return f"in {_age(seconds)}" if seconds >= 1 else "now"


def _ago(iso: str | None) -> str:
    if not iso:
        return "never"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    return f"{_e(iso[:19].replace('T', ' '))} UTC ({_age(max(0.0, seconds))} ago)"


def _form(action: str, csrf: str | None, label: str, **fields: str) -> str:
    if csrf is None:
        return ""
    hidden = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in fields.items()
    )
    return (
        f'<form method="post" action="{_e(action)}"><input type="hidden" name="csrf"'
        f' value="{_e(csrf)}">{hidden}<button type="submit">{_e(label)}</button></form>'
    )


def chart(points: Sequence[tuple[float, float]], title: str, scale: float = 1.0) -> str:
    """Received vs uploaded per minute (*points*, divided by *scale*) as two polylines
    (server-side SVG)."""
    w, h, pad = 600, 110, 22
    n = max(1, len(points))
    values = [(r / scale, u / scale) for r, u in points]
    top = max([1.0, *(max(r, u) for r, u in values)])

    def line(index: int) -> str:
        xy = []
        for i, pair in enumerate(values):
            x = pad + i * (w - 2 * pad) / max(1, n - 1)
            y = h - pad - pair[index] / top * (h - 2 * pad)
            xy.append(f"{x:.1f},{y:.1f}")
        return " ".join(xy)

    label = f"{top:.1f}" if scale != 1.0 else f"{top:.0f}"
    return (
        f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{_e(title)}">'
        f'<text x="{pad}" y="14" font-size="12">{_e(title)} per minute, last hour'
        f" (max {label})</text>"
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{line(0)}"/>'
        f'<polyline fill="none" stroke="#16a34a" stroke-width="2" points="{line(1)}"/>'
        f'<text x="{w - 200}" y="14" font-size="12" fill="#2563eb">received</text>'
        f'<text x="{w - 120}" y="14" font-size="12" fill="#16a34a">uploaded</text>'
        f'<text x="{pad}" y="{h - 6}" font-size="10">-60 min</text>'
        f'<text x="{w - pad - 24}" y="{h - 6}" font-size="10">now</text></svg>'
    )


def render_page(
    doc: StatusDoc,
    *,
    csrf: str | None,
    user: str,
    refresh_seconds: int,
    can_logout: bool,
) -> str:
    """The whole page: one section after the other, top to bottom."""
    return "".join(
        [
            _head(doc, refresh_seconds),
            _queue(doc.queue),
            _archive(doc.archive, doc.uploads, csrf),
            _throughput(doc.throughput),
            _modalities(doc.modalities),
            _studies(doc.studies),
            _failed(doc.queue.failed, doc.failed, csrf),
            _warnings(doc.warnings),
            _errors(doc.retrying, doc.recent_errors),
            _disk(doc.disk),
            _certificate(doc.certificate),
            _worklist(doc.worklist),
            _mpps(doc.mpps),
            _commitment(doc.commitment, doc.config.remote_aes),
            _gateway(doc, csrf, user, refresh_seconds, can_logout),
        ]
    )


def _head(doc: StatusDoc, refresh_seconds: int) -> str:
    ae, health = doc.config.ae_title, doc.health
    why = "; ".join(health.reasons)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">'
        f"<title>dicom-gateway {_e(ae)}: {_e(health.state)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>dicom-gateway <small>{_e(ae)} · v{_e(doc.version)}</small></h1>"
        f'<div id="health" class="health {_e(health.state)}">{_e(health.state.upper())}'
        f"{': ' + _e(why) if why else ''}</div>"
    )


def _queue(q: QueueStatus) -> str:
    tiles = [
        ("pending", "pending (all)", q.pending),
        ("received", "received", q.received),
        ("compressing", "compressing", q.compressing),
        ("pending-upload", "pending upload", q.pending_upload),
        ("uploading", "uploading", q.uploading),
        ("failed", "failed", q.failed),
        ("done-today", "done today", q.done_today),
    ]
    out = ["<h2>Queue</h2><div class=grid>"]
    for ident, label, value in tiles:
        out.append(f'<div class=tile>{_e(label)}<b id="q-{ident}">{value}</b></div>')
    out.append("</div>")
    out.append(
        f'<p>Oldest pending: <span id="oldest-pending">{_age(q.oldest_pending_age_seconds)}'
        "</span></p>"
    )
    return "".join(out)


def _archive(a: ArchiveStatus, u: UploadsStatus, csrf: str | None) -> str:
    """The archive's state, and the uploads: paused or running, the bandwidth."""
    state_class = {"reachable": "good", "unreachable": "bad"}.get(a.state, "warn")
    out = [
        "<h2>Archive</h2>",
        f'<p>Archive <code>{_e(a.url) or "-"}</code>: <span id="archive-state"'
        f' class="{state_class}">{_e(a.state)}</span><br>',
        f'Last successful upload: <span id="last-upload">{_ago(a.last_success_at)}</span>',
    ]
    if a.last_error:
        out.append(f'<br>Last error: <span id="archive-error">{_e(a.last_error)}</span>')
    out.append(
        f'<br>Uploads: <span id="uploads-state" class="{"warn" if u.paused else "good"}">'
        f"{'paused' if u.paused else 'running'}</span> "
    )
    out.append(
        _form("/api/uploads/resume", csrf, "Resume uploads")
        if u.paused
        else _form("/api/uploads/pause", csrf, "Pause uploads")
    )
    out.append(_bandwidth(u))
    out.append("</p>")
    return "".join(out)


def _bandwidth(u: UploadsStatus) -> str:
    """The cap, the window and the priority lane (upload.max_bytes_per_second...)."""
    limit = u.limit_bytes_per_second
    text = f'<br>Limit: <span id="upload-limit">{_size(limit) + "/s" if limit else "none"}</span>'
    if u.windows:
        state = "open" if u.window_open else "closed: only the priority lane is sent"
        cls = "good" if u.window_open else "warn"
        text += (
            f'<br>Upload window: <span id="upload-window" class="{cls}">{_e(state)}</span>'
            f" ({_e(', '.join(u.windows))})"
        )
        if u.window_changes_at:
            verb = "closes" if u.window_open else "opens"
            text += f" · {verb} {_e(u.window_changes_at.replace('T', ' '))}"
    else:
        text += '<br>Upload window: <span id="upload-window" class="good">always open</span>'
    if u.priority_aets:
        text += f"<br>Priority lane: {_e(', '.join(u.priority_aets))}"
    return text


def _throughput(minutes: Sequence[ThroughputMinute]) -> str:
    return "".join(
        [
            "<h2>Throughput</h2>",
            chart([(t.received, t.uploaded) for t in minutes], "instances"),
            chart(
                [(t.received_bytes, t.uploaded_bytes) for t in minutes],
                "MB",
                scale=1024 * 1024,
            ),
        ]
    )


def _modalities(modalities: Sequence[Modality]) -> str:
    out = ["<h2>Modalities (calling AE)</h2><div class=wrap><table id=modalities>"]
    out.append("<tr><th>calling AE</th><th>last 24 h</th><th>last seen</th></tr>")
    for m in modalities:
        out.append(
            f"<tr><td>{_e(m.calling_ae)}</td><td>{_e(m.last_24h)}</td>"
            f"<td>{_ago(m.last_seen)}</td></tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _studies(studies: Sequence[StudyProgress]) -> str:
    """The last studies and how far each got: received, compressed, uploaded,
    confirmed (and committed) instances, and the study's stage."""
    out = ["<h2>Recent studies</h2><div class=wrap><table id=studies>"]
    out.append(
        "<tr><th>Study Instance UID</th><th>calling AE</th><th>stage</th><th>received</th>"
        "<th>compressed</th><th>uploaded</th><th>confirmed</th><th>committed</th>"
        "<th>last received</th></tr>"
    )
    for p in studies:
        cls = {"failed": "bad", "receiving": "warn"}.get(p.stage, "good")
        if p.stage in ("received", "compressed", "uploaded"):
            cls = "warn"
        out.append(
            f'<tr data-study="{_e(p.study_instance_uid)}"><td><code>{_e(p.study_instance_uid)}'
            f"</code></td><td>{_e(', '.join(p.calling_aes))}</td>"
            f'<td class="{cls} stage">{_e(p.stage)}</td>'
            f"<td>{p.received.count}</td><td>{p.compressed.count}</td>"
            f"<td>{p.uploaded.count}</td><td>{p.confirmed.count}</td>"
            f"<td>{p.committed.count}</td><td>{_ago(p.received.last_at)}</td></tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _failed(count: int, failed: Sequence[FailedInstance], csrf: str | None) -> str:
    out = [f"<h2>Failed instances ({count})</h2>"]
    if count:
        out.append(_form("/api/queue/retry", csrf, "Retry all failed", all="1"))
        out.append("<div class=wrap><table id=failed><tr><th>SOP Instance UID</th>")
        out.append("<th>calling AE</th><th>attempts</th><th>reason</th><th></th></tr>")
        for f in failed:
            uid = f.sop_instance_uid
            out.append(
                f"<tr><td><code>{_e(uid)}</code></td><td>{_e(f.calling_ae)}</td>"
                f"<td>{_e(f.attempts)}</td><td>{_e(f.last_error)}</td>"
                f"<td>{_form('/api/queue/retry', csrf, 'Retry', sop_instance_uid=uid)}</td></tr>"
            )
        out.append("</table></div>")
    return "".join(out)


def _warnings(warned: WarningsStatus) -> str:
    out = [f'<h2>Stored with warnings (<span id="warned-count">{warned.count}</span>)</h2>']
    if warned.recent:
        out.append("<div class=wrap><table id=warnings><tr><th>SOP Instance UID</th>")
        out.append("<th>calling AE</th><th>uploaded</th><th>what the archive said</th></tr>")
        for w in warned.recent:
            said = "<br>".join(_e(text) for text in w.warnings)
            out.append(
                f"<tr><td><code>{_e(w.sop_instance_uid)}</code></td>"
                f"<td>{_e(w.calling_ae)}</td><td>{_e((w.uploaded_at or '')[:19])}</td>"
                f"<td>{said}</td></tr>"
            )
        out.append("</table></div>")
        out.append(
            "<p><small>Stored by the archive, which changed, dropped or could not index"
            " something in them; the newest shown.</small></p>"
        )
    return "".join(out)


def _errors(retrying: Sequence[RetryingInstance], recent: Sequence[RecentError]) -> str:
    """Instances waiting for a retry, then what the gateway logged lately."""
    out = ["<h2>Recent errors</h2>"]
    if not (recent or retrying):
        out.append("<p>none</p>")
        return "".join(out)
    out.append("<div class=wrap><table id=errors><tr><th>when</th><th>what</th></tr>")
    for r in retrying:
        out.append(
            f"<tr><td>retry at {_e((r.next_attempt_at or '')[:19])}</td>"
            f"<td>{_e(r.sop_instance_uid)}: {_e(r.last_error)}</td></tr>"
        )
    for e in recent:
        times = f" <b>&times;{e.count}</b>" if e.count > 1 else ""
        out.append(
            f"<tr><td>{_e(e.at[:19].replace('T', ' '))}</td>"
            f"<td>{_e(e.level)} {_e(e.message)}{times}</td></tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _disk(d: DiskStatus) -> str:
    used = (d.total_bytes or 0) - (d.free_bytes or 0)
    disk_class = "bad" if d.below_watermark else "good"
    return (
        "<h2>Disk</h2>"
        f'<p>Spool free: <span id="disk-free" class="{disk_class}">{_size(d.free_bytes)}'
        f"</span> of {_size(d.total_bytes)} (used {_size(used)}); watermark"
        f" {_size(d.min_free_bytes)}; instances held {_size(d.spool_bytes)}</p>"
    )


def _certificate(cert: CertificateStatus) -> str:
    out = ["<h2>TLS client certificate</h2><p id=certificate>"]
    if cert.error:
        out.append(f"<span class=bad>{_e(cert.error)}</span>")
    elif cert.not_after is None:
        out.append("none configured")
    else:
        cls = "warn" if cert.warning else "good"
        out.append(
            f"expires {_e(cert.not_after[:10])}: <span class={cls}>{cert.days_left}"
            " days left</span>"
        )
    out.append("</p>")
    return "".join(out)


def _worklist(sources: Sequence[WorklistSource]) -> str:
    out = ["<h2>Worklist cache</h2>"]
    if not sources:
        out.append("<p>no source configured or refreshed yet</p>")
        return "".join(out)
    out.append("<div class=wrap><table id=worklist><tr><th>source</th><th>items</th>")
    out.append("<th>last refresh</th><th>last error</th></tr>")
    for w in sources:
        out.append(
            f"<tr><td>{_e(w.source)}</td><td>{_e(w.item_count)}</td>"
            f"<td>{_ago(w.last_success_at)}</td><td>{_e(w.last_error)}</td></tr>"
        )
    out.append("</table></div>")
    return "".join(out)


def _mpps(m: MppsStatus) -> str:
    out = ["<h2>MPPS</h2><p id=mpps>"]
    target = m.forwarding_to
    out.append(f"forwarding to <code>{_e(target)}</code>" if target else "kept here, not forwarded")
    out.append(
        f"; waiting {m.pending + m.sending}, refused {m.failed}"
        f"; oldest waiting: {_ago(m.oldest_pending_at)}</p>"
    )
    if m.failed_messages:
        out.append("<div class=wrap><table id=mpps-failed><tr><th>step</th><th>message</th>")
        out.append("<th>received</th><th>reason</th></tr>")
        for f in m.failed_messages:
            out.append(
                f"<tr><td><code>{_e(f.sop_instance_uid)}</code></td><td>N-{_e(f.kind).upper()}"
                f"</td><td>{_e(f.received_at)}</td><td>{_e(f.last_error)}</td></tr>"
            )
        out.append("</table></div>")
        out.append(
            "<p><small>Once the RIS is fixed, <code>dicom-gateway mpps retry --all</code>"
            " sends them again in order.</small></p>"
        )
    return "".join(out)


def _commitment(c: CommitmentStatus, remote_aes: Sequence[str]) -> str:
    """Storage Commitment: requests by state, the oldest unreported, and each modality
    whose reports wait, with why.  Only on a box that uses it."""
    if not (remote_aes or c.waiting or c.due or c.reporting or c.reported):
        return ""
    failed = f" (<span class=warn>{c.some_failed} with failures</span>)" if c.some_failed else ""
    out = [
        "<h2>Storage Commitment</h2><p id=commitment>",
        f'waiting for the archive <b id="c-waiting">{c.waiting}</b>;'
        f' report due <b id="c-due">{c.due + c.reporting}</b>;'
        f' reported <b id="c-reported">{c.reported}</b>{failed}',
        f'; oldest unreported: <span id="c-oldest">{_age(c.oldest_unreported_age_seconds)}</span>',
    ]
    if remote_aes:
        out.append(f"<br>Reports go to: {_e(', '.join(remote_aes))}")
    out.append("</p>")
    if c.undelivered:
        out.append("<div class=wrap><table id=commitment-undelivered><tr><th>requesting AE</th>")
        out.append("<th>reports due</th><th>due since</th><th>tries</th><th>last error</th></tr>")
        for r in c.undelivered:
            where = f" ({_e(r.address)})" if r.address else " (no [[dimse.remote]] entry)"
            if r.last_error:
                why = (
                    f"<span class=bad>{_e(r.last_error)}</span>, next try {_in(r.next_attempt_ts)}"
                )
            else:
                why = (
                    "sending"
                    if r.next_attempt_at is None
                    else f"first try {_in(r.next_attempt_ts)}"
                )
            out.append(
                f'<tr data-ae="{_e(r.requesting_ae)}"><td>{_e(r.requesting_ae)}{where}</td>'
                f"<td>{r.reports_due}</td><td>{_ago(r.due_since_at)}</td><td>{r.attempts}</td>"
                f"<td>{why}</td></tr>"
            )
        out.append("</table></div>")
    return "".join(out)


def _gateway(
    doc: StatusDoc, csrf: str | None, user: str, refresh_seconds: int, can_logout: bool
) -> str:
    """The gateway's facts and config summary (its field names as row labels), then
    the page's footer."""
    out = ["<h2>Gateway</h2><div class=wrap><table id=config>"]
    out.append(
        f"<tr><th>version</th><td>{_e(doc.version)}</td></tr>"
        f"<tr><th>uptime</th><td>{_age(doc.uptime_seconds)}</td></tr>"
        f"<tr><th>associations open</th><td>{doc.associations_active}</td></tr>"
    )
    for f in dataclasses.fields(doc.config):
        value = getattr(doc.config, f.name)
        shown = ", ".join(map(str, value)) if isinstance(value, tuple) else value
        out.append(f"<tr><th>{_e(f.name)}</th><td><code>{_e(shown)}</code></td></tr>")
    out.append("</table></div>")
    out.append(f"<p><small>signed in as {_e(user)}; refreshes every {refresh_seconds} s</small> ")
    if can_logout:
        out.append(_form("/logout", csrf, "Log out"))
    out.append("</p></body></html>")
    return "".join(out)


def render_login(error: str | None) -> str:
    message = f'<p class="bad">{_e(error)}</p>' if error else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dicom-gateway: sign in</title><style>{_CSS}</style></head><body>"
        f"<h1>dicom-gateway</h1>{message}"
        '<form method="post" action="/login"><label>Password '
        '<input type="password" name="password" autocomplete="current-password" autofocus>'
        "</label> <button type=submit>Sign in</button></form></body></html>"
    )

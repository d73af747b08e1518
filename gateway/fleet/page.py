"""The fleet page: one row per box, server-rendered HTML, no JavaScript; it reloads
itself every ``view.refresh_seconds``.

Stale boxes (no heartbeat for ``boxes.stale_after_seconds``) come first and are
marked.  Every value from a box (its certificate's CN, AE title, version, health
reasons) is escaped: a box's certificate and body are a peer's input like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from .. import __version__
from ..heartbeat_body import timestamp
from .boxes import Box, is_stale

_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:0 12px 24px;color:#222;background:#f6f7f9}
h1{font-size:20px;margin:12px 0 4px}
.summary{padding:10px 12px;border-radius:6px;font-weight:600;margin:8px 0;background:#fff;
border:1px solid #ddd}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top}
td.n{text-align:right}.wrap{overflow-x:auto}
tr.stale{background:#fde0e0}.badge{font-weight:700;color:#7f1d1d}
.ok{color:#15803d;font-weight:600}.degraded{color:#b45309;font-weight:600}
.failing,.bad{color:#b91c1c;font-weight:600}small{color:#666}
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _row(b: Box, now: float, stale: bool) -> str:
    seen = f"{_when(b.seen_at)} <small>({_age(now - b.seen_at)} ago)</small>" + (
        ' <span class="badge">STALE</span>' if stale else ""
    )
    head = (
        f'<tr class="box{" stale" if stale else ""}" data-box="{_e(b.box)}">'
        f'<td class="name"><b>{_e(b.box)}</b><br><small title="SHA-256 of its certificate">'
        f"{_e(b.fingerprint[:16])}</small></td>"
    )
    beat = b.heartbeat
    if beat is None:
        return (
            head
            + f'<td colspan="8">stored heartbeat unreadable</td><td class="seen">{seen}</td></tr>'
        )
    q, a = beat["queue"], beat["archive"]
    oldest = q["oldest_pending_at"]
    oldest_cell = _age(now - timestamp(oldest)) if oldest else "-"
    reasons = "; ".join(beat["reasons"])
    archive_class = (
        "ok" if a["state"] == "reachable" else "bad" if a["state"] == "unreachable" else ""
    )
    return (
        head
        + f'<td class="ae">{_e(beat["ae_title"])}</td>'
        + f'<td class="health"><span class="{_e(beat["health"])}">{_e(beat["health"].upper())}'
        + f"</span>{'<br><small>' + _e(reasons) + '</small>' if reasons else ''}</td>"
        + f'<td class="n pending">{q["pending"]}</td>'
        + f'<td class="n uploading">{q["uploading"]}</td>'
        + f'<td class="n failed{" bad" if q["failed"] else ""}">{q["failed"]}</td>'
        + f'<td class="oldest">{oldest_cell}</td>'
        + f'<td class="archive"><span class="{archive_class}">{_e(a["state"])}</span></td>'
        + f'<td class="version">{_e(beat["version"])}</td>'
        + f'<td class="seen">{seen}</td></tr>'
    )


def render(boxes: Sequence[Box], now: float, stale_after: float, refresh_seconds: int) -> str:
    stale = {b.box for b in boxes if is_stale(b, now, stale_after)}
    ordered = sorted(boxes, key=lambda b: (b.box not in stale, b.box))
    rows = "".join(_row(b, now, b.box in stale) for b in ordered)
    if not boxes:
        rows = '<tr><td colspan="10">no heartbeat received yet</td></tr>'
    summary = f"{len(boxes)} boxes, {len(stale)} stale"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Fleet: {summary}</title><style>{_CSS}</style></head><body>"
        "<h1>dicom-gateway fleet</h1>"
        f'<div class="summary" id="summary">{summary} <small>(stale: no heartbeat for'
        f" {_age(stale_after)}; as of {_when(now)})</small></div>"
        '<div class="wrap"><table id="boxes"><thead><tr><th>Box (certificate CN)</th>'
        "<th>AE title</th><th>Health</th><th>Pending</th><th>Uploading</th><th>Failed</th>"
        "<th>Oldest pending</th><th>Archive</th><th>Version</th><th>Last seen</th></tr>"
        f"</thead><tbody>{rows}</tbody></table></div>"
        f"<p><small>fleet receiver {_e(__version__)}</small></p></body></html>"
    )

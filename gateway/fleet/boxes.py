"""The ``boxes`` table: each box's last accepted heartbeat, and every statement on it.

A box is the subject CN of the client certificate it presented (checked by the TLS
handshake against ``receiver.client_ca_file``), never a value from the body.  A row
is replaced only by a heartbeat whose ``sent_at`` is newer than the one it holds, and
that comparison is made inside the writer's transaction, so two requests racing for
the same box cannot both win, and a replayed heartbeat never replaces a newer one.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..heartbeat_body import BadHeartbeat, Heartbeat, decode, encode

log = logging.getLogger(__name__)


def _migration_1(conn: sqlite3.Connection) -> None:
    # sent_at: the box's clock (replay check); seen_at: the receiver's (stale, last seen).
    conn.execute(
        "CREATE TABLE boxes (box TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
        " cert_not_after REAL, peer TEXT NOT NULL, sent_at REAL NOT NULL,"
        " seen_at REAL NOT NULL, first_seen_at REAL NOT NULL,"
        " heartbeats INTEGER NOT NULL DEFAULT 1, heartbeat TEXT NOT NULL)"
    )


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migration_1]


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"{path}: schema version {version} is newer than this receiver understands"
            f" ({len(MIGRATIONS)}); refusing to touch it"
        )
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


@dataclass(frozen=True)
class Arrival:
    """One heartbeat that passed every check but the replay check."""

    box: str
    fingerprint: str
    cert_not_after: float | None
    peer: str
    sent_at: float
    seen_at: float
    heartbeat: Heartbeat


@dataclass(frozen=True)
class Box:
    """A row, for the page and ``/metrics``; ``heartbeat`` None: the stored body no
    longer reads (a newer receiver's row), shown as such until the next heartbeat."""

    box: str
    fingerprint: str
    cert_not_after: float | None
    peer: str
    sent_at: float
    seen_at: float
    first_seen_at: float
    heartbeats: int
    heartbeat: Heartbeat | None


def is_stale(box: Box, now: float, stale_after: float) -> bool:
    """No heartbeat for more than *stale_after* seconds: the page's mark and the
    ``box_stale`` gauge, one judgement."""
    return now - box.seen_at > stale_after


def next_stale_change(rows: Iterable[Box], now: float, stale_after: float) -> float:
    """When the next of *rows* not stale at *now* turns stale (``math.inf``: none)."""
    return min((b.seen_at + stale_after for b in rows if not is_stale(b, now, stale_after)),
               default=math.inf)  # fmt: skip


def record(arrival: Arrival) -> Callable[[sqlite3.Connection], float | None]:
    """A write that stores *arrival* unless the row holds a ``sent_at`` as new or
    newer: it returns None when stored, else that ``sent_at`` (a replay)."""
    a = arrival

    def write(conn: sqlite3.Connection) -> float | None:
        cur = conn.execute(
            "INSERT INTO boxes (box, fingerprint, cert_not_after, peer, sent_at, seen_at,"
            " first_seen_at, heartbeats, heartbeat) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)"
            " ON CONFLICT (box) DO UPDATE SET fingerprint = excluded.fingerprint,"
            " cert_not_after = excluded.cert_not_after, peer = excluded.peer,"
            " sent_at = excluded.sent_at, seen_at = excluded.seen_at,"
            " heartbeats = boxes.heartbeats + 1, heartbeat = excluded.heartbeat"
            " WHERE excluded.sent_at > boxes.sent_at",
            (a.box, a.fingerprint, a.cert_not_after, a.peer, a.sent_at, a.seen_at, a.seen_at,
             encode(a.heartbeat).decode()),
        )  # fmt: skip
        if cur.rowcount == 1:
            return None
        row = conn.execute("SELECT sent_at FROM boxes WHERE box = ?", (a.box,)).fetchone()
        return float(row[0])

    return write


def listing(conn: sqlite3.Connection, known: Mapping[str, Box] | None = None) -> list[Box]:
    """Every box, by name.  A row that is as it was in *known* (an earlier listing) is
    taken from there rather than decoded again: each heartbeat has a newer
    ``sent_at``, a box forgotten and back a new ``first_seen_at``."""
    rows = conn.execute(
        "SELECT box, fingerprint, cert_not_after, peer, sent_at, seen_at, first_seen_at,"
        " heartbeats, heartbeat FROM boxes ORDER BY box"
    ).fetchall()
    known = known or {}
    out = []
    for box, fingerprint, not_after, peer, sent_at, seen_at, first, count, body in rows:
        same = known.get(box)
        if (
            same is not None
            and same.sent_at == sent_at
            and same.first_seen_at == first
            and same.heartbeats == count
            and same.seen_at == seen_at
            and same.fingerprint == fingerprint
            and same.cert_not_after == not_after
            and same.peer == peer
        ):
            out.append(same)
            continue
        try:
            beat: Heartbeat | None = decode(body.encode())
        except BadHeartbeat as exc:
            log.debug("box %s: stored heartbeat unreadable: %s", box, exc)
            beat = None
        out.append(Box(box, fingerprint, not_after, peer, sent_at, seen_at, first, count, beat))
    return out


def forget(names: Sequence[str]) -> Callable[[sqlite3.Connection], int]:
    """A write that removes the named boxes (a box taken out of service); returns how
    many there were."""

    def write(conn: sqlite3.Connection) -> int:
        removed = 0
        for name in names:
            removed += conn.execute("DELETE FROM boxes WHERE box = ?", (name,)).rowcount
        return removed

    return write

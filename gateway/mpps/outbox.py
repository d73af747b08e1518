"""The MPPS tables, ``mpps`` and ``mpps_outbox``, and every statement on them.

``mpps`` holds each Performed Procedure Step as it stands now (the N-CREATE with every
accepted N-SET merged in), to validate the next N-SET against.  ``mpps_outbox`` holds
every accepted N-CREATE / N-SET, forwarded upstream in ``seq`` order.  Both are written
in the same transaction when the SCP accepts a message, and pruned together, so one
module owns both.  The SCP (gateway/mpps/scp.py), the forwarder (gateway/mpps/forwarder.py),
the CLI and the status call the functions here; nothing else writes SQL against these
tables.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..clock import utcnow


class OutboxState(StrEnum):
    """The ``state`` column of ``mpps_outbox``."""

    PENDING = "pending"
    SENDING = "sending"  # a crash leaves it here: re-sent, and it may have arrived
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class Message:
    """An outbox row, as the forwarder sends it."""

    seq: int
    sop_instance_uid: str
    kind: str
    dataset: bytes
    final: bool
    maybe_delivered: bool


@dataclass(frozen=True)
class Step:
    """A ``mpps`` row: the step's status and its attributes (Explicit VR Little Endian)."""

    status: str
    dataset: bytes


# -- the SCP (inside its write functions, in the writer thread) --------------------------


def has_step(conn: sqlite3.Connection, uid: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM mpps WHERE sop_instance_uid = ?", (uid,)).fetchone() is not None
    )


def step(conn: sqlite3.Connection, uid: str) -> Step | None:
    row = conn.execute(
        "SELECT status, dataset FROM mpps WHERE sop_instance_uid = ?", (uid,)
    ).fetchone()
    return Step(row["status"], row["dataset"]) if row is not None else None


def create_step(
    conn: sqlite3.Connection, uid: str, status: str, data: bytes, calling_ae: str, now: str
) -> None:
    conn.execute(
        "INSERT INTO mpps (sop_instance_uid, status, dataset, calling_ae, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        (uid, status, data, calling_ae, now, now),
    )


def update_step(conn: sqlite3.Connection, uid: str, status: str, data: bytes, now: str) -> None:
    conn.execute(
        "UPDATE mpps SET status = ?, dataset = ?, updated_at = ? WHERE sop_instance_uid = ?",
        (status, data, now, uid),
    )


def enqueue(
    conn: sqlite3.Connection, uid: str, kind: str, data: bytes, final: bool, now: str
) -> int:
    """Queue a message for the upstream; gives its ``seq`` (its place in line)."""
    row = conn.execute(
        "INSERT INTO mpps_outbox (sop_instance_uid, kind, dataset, final, received_at, state,"
        " next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        (uid, kind, data, int(final), now, OutboxState.PENDING, now, now),
    ).fetchone()
    return int(row["seq"])


# -- the forwarder (write functions) -----------------------------------------------------


def requeue_interrupted(conn: sqlite3.Connection) -> int:
    """At start: a message we were sending when we stopped may have arrived."""
    return int(
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, maybe_delivered = 1, updated_at = ? WHERE state = ?",
            (OutboxState.PENDING, utcnow(), OutboxState.SENDING),
        ).rowcount
    )


def next_batch(limit: int) -> Callable[[sqlite3.Connection], list[Message]]:
    """The next *limit* pending messages in delivery order; first, a step whose earlier
    message failed upstream has its later ones failed too (they can never be delivered)."""

    def write(conn: sqlite3.Connection) -> list[Message]:
        now = utcnow()
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, updated_at = ?,"
            " last_error = 'not sent: an earlier message of this step failed upstream'"
            " WHERE state = ? AND EXISTS (SELECT 1 FROM mpps_outbox e"
            "  WHERE e.sop_instance_uid = mpps_outbox.sop_instance_uid"
            "  AND e.seq < mpps_outbox.seq AND e.state = ?)",
            (OutboxState.FAILED, now, OutboxState.PENDING, OutboxState.FAILED),
        )
        rows = conn.execute(
            "SELECT seq, sop_instance_uid, kind, dataset, final, maybe_delivered"
            " FROM mpps_outbox WHERE state = ? ORDER BY seq LIMIT ?",
            (OutboxState.PENDING, limit),
        ).fetchall()
        return [
            Message(
                seq=r["seq"],
                sop_instance_uid=r["sop_instance_uid"],
                kind=r["kind"],
                dataset=r["dataset"],
                final=bool(r["final"]),
                maybe_delivered=bool(r["maybe_delivered"]),
            )
            for r in rows
        ]

    return write


def mark_sending(seq: int) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, updated_at = ? WHERE seq = ?",
            (OutboxState.SENDING, utcnow(), seq),
        )

    return write


def finish(seq: int, delivered: bool, reason: str) -> Callable[[sqlite3.Connection], None]:
    """The upstream's final answer: *delivered* (``sent``, *reason* a warning or "")
    or refused for good (``failed`` with *reason*)."""

    def write(conn: sqlite3.Connection) -> None:
        now = utcnow()
        if delivered:
            conn.execute(
                "UPDATE mpps_outbox SET state = ?, attempts = attempts + 1, sent_at = ?,"
                " last_error = ?, updated_at = ? WHERE seq = ?",
                (OutboxState.SENT, now, reason or None, now, seq),
            )
        else:
            conn.execute(
                "UPDATE mpps_outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " updated_at = ? WHERE seq = ?",
                (OutboxState.FAILED, reason, now, seq),
            )

    return write


def retry_later(
    seq: int, reason: str, next_attempt_at: str, maybe_delivered: bool
) -> Callable[[sqlite3.Connection], None]:
    """The message stays first in line; its row shows the error and the next try."""

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
            " next_attempt_at = ?, maybe_delivered = maybe_delivered | ?, updated_at = ?"
            " WHERE seq = ?",
            (OutboxState.PENDING, reason, next_attempt_at, int(maybe_delivered), utcnow(), seq),
        )

    return write


def prune(conn: sqlite3.Connection, cutoff: str, finished: Collection[str]) -> int:
    """Delivered messages sent before *cutoff* go, and so do steps in a *finished*
    status, last updated before *cutoff*, that no message refers to any more."""
    pruned = conn.execute(
        "DELETE FROM mpps_outbox WHERE state = ? AND sent_at < ?", (OutboxState.SENT, cutoff)
    ).rowcount
    statuses = sorted(finished)
    pruned += conn.execute(
        f"DELETE FROM mpps WHERE status IN ({','.join('?' * len(statuses))})"
        " AND updated_at < ? AND NOT EXISTS"
        " (SELECT 1 FROM mpps_outbox o WHERE o.sop_instance_uid = mpps.sop_instance_uid)",
        (*statuses, cutoff),
    ).rowcount
    return int(pruned)


# -- the operator (CLI) ------------------------------------------------------------------


def retry_failed(conn: sqlite3.Connection, sop_instance_uids: list[str] | None) -> int:
    """Operator action: send the failed messages of these steps (all steps when None)
    again, in their original order; the upstream answers them afresh."""
    sql = (
        "UPDATE mpps_outbox SET state = ?, attempts = 0, next_attempt_at = NULL,"
        " updated_at = ? WHERE state = ?"
    )
    params: list[Any] = [OutboxState.PENDING, utcnow(), OutboxState.FAILED]
    if sop_instance_uids is not None:
        sql += f" AND sop_instance_uid IN ({','.join('?' * len(sop_instance_uids))})"
        params += sop_instance_uids
    return int(conn.execute(sql, params).rowcount)


def listing(conn: sqlite3.Connection, state: str | None, limit: int) -> list[dict[str, Any]]:
    """Messages for ``mpps ls``: in *state* (None: any), at most *limit*, in delivery
    order."""
    where, params = ("WHERE state = ?", (state,)) if state else ("", ())
    rows = conn.execute(
        "SELECT seq, sop_instance_uid, kind, state, attempts, received_at, last_error"
        f" FROM mpps_outbox {where} ORDER BY seq LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [dict(r) for r in rows]


# -- the status page, /api/status, /metrics (reads) ---------------------------------------


def count_unsent(conn: sqlite3.Connection) -> dict[OutboxState, int]:
    """Messages in each state but ``sent`` (0 when none)."""
    counts = dict.fromkeys((OutboxState.PENDING, OutboxState.SENDING, OutboxState.FAILED), 0)
    for row in conn.execute(
        "SELECT state, count(*) AS n FROM mpps_outbox WHERE state != ? GROUP BY state",
        (OutboxState.SENT,),
    ):
        counts[row["state"]] = row["n"]
    return counts


def oldest_waiting_at(conn: sqlite3.Connection) -> str | None:
    """When the oldest message still to be delivered (pending or sending) came in."""
    value = conn.execute(
        "SELECT min(received_at) FROM mpps_outbox WHERE state IN (?, ?)",
        (OutboxState.PENDING, OutboxState.SENDING),
    ).fetchone()[0]
    return str(value) if value is not None else None


def failed_messages(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest *limit* messages the upstream refused for good."""
    return [
        dict(r)
        for r in conn.execute(
            "SELECT seq, sop_instance_uid, kind, received_at, last_error FROM mpps_outbox"
            " WHERE state = ? ORDER BY seq DESC LIMIT ?",
            (OutboxState.FAILED, limit),
        )
    ]

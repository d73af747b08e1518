"""The Storage Commitment tables, ``commitment_requests`` and ``commitment_items``, and
every statement on them.

``commitment_requests`` holds one row per N-ACTION, keyed by its Transaction UID:

    waiting --every item decided--> due --sending--> reporting --acknowledged--> reported
                                     ^                   |
                                     +--- retry later ---+   (unreachable, no answer,
                                                              a failure status)

``commitment_items`` holds the SOP instances it names, in the request's order, each
with its decision once made: ``committed``, or ``failed`` with the PS3.4 J.3 Failure
Reason.  A crash while ``reporting`` leaves the row there; at start it is ``due`` again
with ``maybe_reported`` set (the modality may have the report: it gets it again).

The SCP (gateway/commitment/scp.py), the deciding round (decide.py), the reporter
(reporter.py), retention (gateway/instances.py's prune asks :func:`held_among`),
the per-study view (gateway/studies.py), the CLI and the status call the functions
here; nothing else writes SQL against these tables.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from ..clock import utcnow


class RequestState(StrEnum):
    """The ``state`` column of ``commitment_requests``."""

    WAITING = "waiting"  # some instance is not decided yet
    DUE = "due"  # every instance decided: the report is to be sent
    REPORTING = "reporting"  # being sent; a crash leaves it here (sent again at start)
    REPORTED = "reported"  # the modality answered the N-EVENT-REPORT with success


#: Not yet acknowledged by the modality: what retention keeps (held_among).
UNREPORTED = (RequestState.WAITING, RequestState.DUE, RequestState.REPORTING)


class ItemOutcome(StrEnum):
    """The ``outcome`` column of ``commitment_items`` (NULL: not decided yet)."""

    COMMITTED = "committed"
    FAILED = "failed"


#: N-EVENT-REPORT Event Type ID (PS3.4 J.3.3): all committed, or some failed.
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2


@dataclass(frozen=True)
class RequestedItem:
    """One item of a request's Referenced SOP Sequence; *failure_reason* set when the
    SCP already knows it fails (a SOP class the gateway does not store)."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None = None
    detail: str = ""


class Recorded(Enum):
    NEW = "new"
    REPEAT = "repeat"  # the same request again (same AE, same instances): nothing new
    CONFLICT = "conflict"  # the Transaction UID names another request


@dataclass(frozen=True)
class Undecided:
    """An item still to decide, with its request's deadline."""

    transaction_uid: str
    position: int
    sop_class_uid: str
    sop_instance_uid: str
    deadline_at: str


@dataclass(frozen=True)
class Decision:
    transaction_uid: str
    position: int
    outcome: ItemOutcome
    failure_reason: int | None = None
    detail: str = ""
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class ReportItem:
    sop_class_uid: str
    sop_instance_uid: str
    #: None: committed.
    failure_reason: int | None


@dataclass(frozen=True)
class Report:
    """A decided request, as the reporter sends it."""

    transaction_uid: str
    requesting_ae: str
    event_type: int
    attempts: int
    maybe_reported: bool
    items: tuple[ReportItem, ...]


# -- the SCP (a write function, in the writer thread) -----------------------------------


def record_request(
    transaction_uid: str,
    requesting_ae: str,
    peer_address: str,
    items: Sequence[RequestedItem],
    now: str,
    deadline_at: str,
) -> Callable[[sqlite3.Connection], Recorded]:
    """Record an N-ACTION: its row and its items, in one transaction."""

    def write(conn: sqlite3.Connection) -> Recorded:
        row = conn.execute(
            "SELECT requesting_ae FROM commitment_requests WHERE transaction_uid = ?",
            (transaction_uid,),
        ).fetchone()
        if row is not None:
            known = [
                (r["sop_class_uid"], r["sop_instance_uid"])
                for r in conn.execute(
                    "SELECT sop_class_uid, sop_instance_uid FROM commitment_items"
                    " WHERE transaction_uid = ? ORDER BY position",
                    (transaction_uid,),
                )
            ]
            asked = [(i.sop_class_uid, i.sop_instance_uid) for i in items]
            same = row["requesting_ae"] == requesting_ae and known == asked
            return Recorded.REPEAT if same else Recorded.CONFLICT
        conn.execute(
            "INSERT INTO commitment_requests (transaction_uid, requesting_ae, peer_address,"
            " received_at, deadline_at, state, item_count, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (transaction_uid, requesting_ae, peer_address, now, deadline_at,
             RequestState.WAITING, len(items), now),
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO commitment_items (transaction_uid, position, sop_class_uid,"
            " sop_instance_uid, outcome, failure_reason, detail, decided_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    transaction_uid, n, i.sop_class_uid, i.sop_instance_uid,
                    None if i.failure_reason is None else ItemOutcome.FAILED,
                    i.failure_reason, i.detail or None,
                    None if i.failure_reason is None else now,
                )
                for n, i in enumerate(items)
            ],
        )  # fmt: skip
        _settle(conn, [transaction_uid], now)
        return Recorded.NEW

    return write


def _settle(conn: sqlite3.Connection, transaction_uids: Collection[str], now: str) -> list[str]:
    """Waiting requests among *transaction_uids* with every item decided become due;
    gives those."""
    due = []
    for uid in transaction_uids:
        row = conn.execute(
            "UPDATE commitment_requests SET state = :due, decided_at = :now,"
            " next_attempt_at = :now, updated_at = :now, event_type = CASE WHEN EXISTS"
            " (SELECT 1 FROM commitment_items WHERE transaction_uid = :uid"
            "  AND outcome = :failed) THEN :some_failed ELSE :all_committed END"
            " WHERE transaction_uid = :uid AND state = :waiting AND NOT EXISTS (SELECT 1"
            "  FROM commitment_items WHERE transaction_uid = :uid AND outcome IS NULL)"
            " RETURNING transaction_uid",
            {"uid": uid, "due": RequestState.DUE, "now": now, "failed": ItemOutcome.FAILED,
             "some_failed": EVENT_SOME_FAILED, "all_committed": EVENT_ALL_COMMITTED,
             "waiting": RequestState.WAITING},
        ).fetchone()  # fmt: skip
        if row is not None:
            due.append(uid)
    return due


# -- deciding (gateway/commitment/decide.py) ---------------------------------------------


def undecided_instances(conn: sqlite3.Connection) -> list[Undecided]:
    """Each SOP instance (with its SOP class) that items of waiting requests still
    wait on, once, with the earliest deadline among those requests
    (``transaction_uid`` empty, ``position`` -1): enough to tell whether any of them can
    be decided now (decide.py), without reading every item."""
    rows = conn.execute(
        "SELECT i.sop_instance_uid, i.sop_class_uid, MIN(r.deadline_at) AS deadline_at"
        " FROM commitment_items i INDEXED BY commitment_items_undecided"
        " JOIN commitment_requests r ON r.transaction_uid = i.transaction_uid"
        " WHERE i.outcome IS NULL AND r.state = ?"
        " GROUP BY i.sop_instance_uid, i.sop_class_uid",
        (RequestState.WAITING,),
    ).fetchall()
    return [
        Undecided("", -1, r["sop_class_uid"], r["sop_instance_uid"], r["deadline_at"]) for r in rows
    ]


def undecided_items(conn: sqlite3.Connection, sop_instance_uids: Sequence[str]) -> list[Undecided]:
    """The items of waiting requests still to decide that name one of *sop_instance_uids*."""
    if not sop_instance_uids:
        return []
    rows = conn.execute(
        "SELECT i.transaction_uid, i.position, i.sop_class_uid, i.sop_instance_uid,"
        " r.deadline_at FROM commitment_items i INDEXED BY commitment_items_instance"
        " JOIN commitment_requests r ON r.transaction_uid = i.transaction_uid"
        " WHERE i.sop_instance_uid IN (SELECT value FROM json_each(?))"
        " AND i.outcome IS NULL AND r.state = ?",
        (json.dumps(list(sop_instance_uids)), RequestState.WAITING),
    ).fetchall()
    return [Undecided(**dict(r)) for r in rows]


def record_decisions(
    conn: sqlite3.Connection, decisions: Sequence[Decision], now: str
) -> list[str]:
    """Record each decision (of an item still undecided); gives the requests that
    became due."""
    conn.executemany(
        "UPDATE commitment_items SET outcome = ?, failure_reason = ?, detail = ?,"
        " study_instance_uid = ?, decided_at = ?"
        " WHERE transaction_uid = ? AND position = ? AND outcome IS NULL",
        [
            (d.outcome, d.failure_reason, d.detail or None, d.study_instance_uid, now,
             d.transaction_uid, d.position)
            for d in decisions
        ],
    )  # fmt: skip
    return _settle(conn, dict.fromkeys(d.transaction_uid for d in decisions), now)


def has_waiting(conn: sqlite3.Connection) -> bool:
    """Is any request still waiting for decisions?"""
    return (
        conn.execute(
            "SELECT 1 FROM commitment_requests WHERE state = ? LIMIT 1", (RequestState.WAITING,)
        ).fetchone()
        is not None
    )


# -- the reporter (write functions) ------------------------------------------------------


def requeue_interrupted(conn: sqlite3.Connection) -> int:
    """At start: a report we were sending when we stopped may have arrived; it is sent
    again."""
    return int(
        conn.execute(
            "UPDATE commitment_requests SET state = ?, maybe_reported = 1, updated_at = ?"
            " WHERE state = ?",
            (RequestState.DUE, utcnow(), RequestState.REPORTING),
        ).rowcount
    )


def due_reports(now: str, limit: int) -> Callable[[sqlite3.Connection], list[Report]]:
    """Requests whose report is due at *now*, oldest first, with their items."""

    def read(conn: sqlite3.Connection) -> list[Report]:
        rows = conn.execute(
            "SELECT transaction_uid, requesting_ae, event_type, attempts, maybe_reported"
            " FROM commitment_requests WHERE state = ? AND next_attempt_at <= ?"
            " ORDER BY received_at LIMIT ?",
            (RequestState.DUE, now, limit),
        ).fetchall()
        reports = []
        for r in rows:
            items = tuple(
                ReportItem(
                    i["sop_class_uid"],
                    i["sop_instance_uid"],
                    None if i["outcome"] == ItemOutcome.COMMITTED else i["failure_reason"],
                )
                for i in conn.execute(
                    "SELECT sop_class_uid, sop_instance_uid, outcome, failure_reason"
                    " FROM commitment_items WHERE transaction_uid = ? ORDER BY position",
                    (r["transaction_uid"],),
                )
            )
            reports.append(
                Report(
                    transaction_uid=r["transaction_uid"],
                    requesting_ae=r["requesting_ae"],
                    event_type=int(r["event_type"]),
                    attempts=int(r["attempts"]),
                    maybe_reported=bool(r["maybe_reported"]),
                    items=items,
                )
            )
        return reports

    return read


def next_report_at(conn: sqlite3.Connection) -> str | None:
    """When the next due report may be sent (None: none is due)."""
    value = conn.execute(
        "SELECT min(next_attempt_at) FROM commitment_requests WHERE state = ?",
        (RequestState.DUE,),
    ).fetchone()[0]
    return str(value) if value is not None else None


def mark_reporting(transaction_uid: str) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE commitment_requests SET state = ?, updated_at = ?"
            " WHERE transaction_uid = ? AND state = ?",
            (RequestState.REPORTING, utcnow(), transaction_uid, RequestState.DUE),
        )

    return write


def mark_reported(transaction_uid: str, note: str = "") -> Callable[[sqlite3.Connection], None]:
    """The modality answered the report with success (*note*: its warning, if any)."""

    def write(conn: sqlite3.Connection) -> None:
        now = utcnow()
        conn.execute(
            "UPDATE commitment_requests SET state = ?, reported_at = ?, attempts = attempts + 1,"
            " last_error = ?, updated_at = ? WHERE transaction_uid = ?",
            (RequestState.REPORTED, now, note or None, now, transaction_uid),
        )

    return write


def retry_report(
    transaction_uid: str, reason: str, next_attempt_at: str, maybe_reported: bool
) -> Callable[[sqlite3.Connection], None]:
    """The report could not be delivered now: due again at *next_attempt_at*."""

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE commitment_requests SET state = ?, attempts = attempts + 1, last_error = ?,"
            " next_attempt_at = ?, maybe_reported = maybe_reported | ?, updated_at = ?"
            " WHERE transaction_uid = ?",
            (RequestState.DUE, reason, next_attempt_at, int(maybe_reported), utcnow(),
             transaction_uid),
        )  # fmt: skip

    return write


def prune(conn: sqlite3.Connection, cutoff: str) -> int:
    """Requests reported before *cutoff* go, with their items."""
    return int(
        conn.execute(
            "DELETE FROM commitment_requests WHERE state = ? AND reported_at < ?",
            (RequestState.REPORTED, cutoff),
        ).rowcount
    )


# -- retention (inside gateway/instances.py's prune) -------------------------------------


def held_among(conn: sqlite3.Connection, uids: Sequence[str]) -> set[str]:
    """Of *uids*, the SOP Instance UIDs named by a request the modality has not yet
    acknowledged a report of: their spool files stay (retention's
    :func:`gateway.instances.prune_candidates` and :func:`~gateway.instances.prune`)."""
    if not uids:
        return set()
    return {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT i.sop_instance_uid FROM commitment_items i"
            " JOIN commitment_requests r ON r.transaction_uid = i.transaction_uid"
            " WHERE i.sop_instance_uid IN (SELECT value FROM json_each(?))"
            f" AND r.state IN ({','.join('?' * len(UNREPORTED))})",
            (json.dumps(list(uids)), *UNREPORTED),
        )
    }


# -- the per-study view (gateway/studies.py), the CLI, the status (reads) ----------------


def committed_by_study(
    conn: sqlite3.Connection, study_uids: Sequence[str]
) -> dict[str, tuple[int, str | None, str | None]]:
    """For each study of *study_uids* with any: how many of its instances a report the
    modality acknowledged said committed, and when the first and the last such report
    went."""
    if not study_uids:
        return {}
    rows = conn.execute(
        "SELECT i.study_instance_uid AS study, count(DISTINCT i.sop_instance_uid) AS n,"
        " min(r.reported_at) AS first, max(r.reported_at) AS last FROM commitment_items i"
        " INDEXED BY commitment_items_study"
        " JOIN commitment_requests r ON r.transaction_uid = i.transaction_uid"
        f" WHERE i.study_instance_uid IN ({','.join('?' * len(study_uids))})"
        " AND i.outcome = ? AND r.state = ? GROUP BY i.study_instance_uid",
        (*study_uids, ItemOutcome.COMMITTED, RequestState.REPORTED),
    ).fetchall()
    return {r["study"]: (int(r["n"]), r["first"], r["last"]) for r in rows}


def count_by_state(conn: sqlite3.Connection) -> dict[RequestState, int]:
    counts = dict.fromkeys(RequestState, 0)
    for row in conn.execute("SELECT state, count(*) AS n FROM commitment_requests GROUP BY state"):
        counts[RequestState(row["state"])] = row["n"]
    return counts


@dataclass(frozen=True)
class Undelivered:
    """A requesting AE's reports that are due and not yet acknowledged by it."""

    requesting_ae: str
    reports: int
    #: When the oldest of them became due (every instance decided).
    due_since: str
    #: The most tries any of them had.
    attempts: int
    #: Why the latest try failed (None: not tried yet), and when.
    last_error: str | None
    last_error_at: str | None
    #: When the next try is (None: one is being sent now).
    next_attempt_at: str | None


@dataclass(frozen=True)
class Summary:
    """What the status shows of Storage Commitment (gateway/web/status.py)."""

    by_state: dict[RequestState, int]
    #: Requests, reported or not, whose report says some instance failed (refused by
    #: the archive, never received, not confirmed in time), of those kept.
    some_failed: int
    oldest_unreported_at: str | None
    #: Per requesting AE with reports due, the AE waiting longest first.
    undelivered: tuple[Undelivered, ...]


def summary(conn: sqlite3.Connection, max_aes: int) -> Summary:
    """Counts by state, the oldest unreported request, and the reports due per
    requesting AE (at most *max_aes* AEs): a scan of the requests, which are kept
    30 days once reported."""
    counts = dict.fromkeys(RequestState, 0)
    some_failed = 0
    for row in conn.execute(
        "SELECT state, count(*) AS n, total(event_type = ?) AS failed"
        " FROM commitment_requests GROUP BY state",
        (EVENT_SOME_FAILED,),
    ):
        counts[RequestState(row["state"])] = int(row["n"])
        some_failed += int(row["failed"])
    unsent = (RequestState.DUE, RequestState.REPORTING)
    rows = conn.execute(
        "SELECT requesting_ae, count(*) AS reports, min(decided_at) AS due_since,"
        " max(attempts) AS attempts,"
        " min(CASE WHEN state = ? THEN next_attempt_at END) AS next_attempt_at"
        " FROM commitment_requests WHERE state IN (?, ?)"
        " GROUP BY requesting_ae ORDER BY due_since, requesting_ae LIMIT ?",
        (RequestState.DUE, *unsent, max_aes),
    ).fetchall()
    undelivered = []
    for r in rows:
        error = conn.execute(
            "SELECT last_error, updated_at FROM commitment_requests"
            " WHERE requesting_ae = ? AND state IN (?, ?) AND last_error IS NOT NULL"
            " ORDER BY updated_at DESC LIMIT 1",
            (r["requesting_ae"], *unsent),
        ).fetchone()
        undelivered.append(
            Undelivered(
                requesting_ae=r["requesting_ae"],
                reports=int(r["reports"]),
                due_since=r["due_since"],
                attempts=int(r["attempts"]),
                last_error=error["last_error"] if error else None,
                last_error_at=error["updated_at"] if error else None,
                next_attempt_at=r["next_attempt_at"],
            )
        )
    return Summary(
        by_state=counts,
        some_failed=some_failed,
        oldest_unreported_at=oldest_unreported_at(conn),
        undelivered=tuple(undelivered),
    )


def oldest_unreported_at(conn: sqlite3.Connection) -> str | None:
    value = conn.execute(
        "SELECT min(received_at) FROM commitment_requests"
        f" WHERE state IN ({','.join('?' * len(UNREPORTED))})",
        UNREPORTED,
    ).fetchone()[0]
    return str(value) if value is not None else None


def listing(conn: sqlite3.Connection, state: str | None, limit: int) -> list[dict[str, Any]]:
    """Requests for ``commitment ls``: in *state* (None: any), at most *limit*, newest
    first, each with its failed items (``failures``: SOP Instance UID, reason, detail)."""
    where, params = ("WHERE state = ?", (state,)) if state else ("", ())
    rows = conn.execute(
        "SELECT transaction_uid, requesting_ae, state, item_count, event_type, received_at,"
        " decided_at, reported_at, attempts, next_attempt_at, last_error"
        f" FROM commitment_requests {where} ORDER BY received_at DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    out = []
    for r in rows:
        failures = [
            dict(f)
            for f in conn.execute(
                "SELECT sop_instance_uid, failure_reason, detail FROM commitment_items"
                " WHERE transaction_uid = ? AND outcome = ? ORDER BY position",
                (r["transaction_uid"], ItemOutcome.FAILED),
            )
        ]
        out.append({**dict(r), "failures": failures})
    return out

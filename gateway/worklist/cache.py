"""The worklist cache's tables and every statement on them.

* ``worklist_items``: one row per item and source, the item kept as DICOM JSON, with
  columns for the SQL prefilter that hold a value only when the item has exactly that
  one value (one step, one value); NULL means "cannot narrow, always pass".
* ``worklist_sources``: per source, its last attempt, last success, last error and
  item count.
* ``worklist_mpps``: the MPPS status of worklist items, keyed by the item's identity
  (``worklist_items.item_id``) in a table of its own, so a refresh that replaces the
  items keeps it.

The worklist (gateway/worklist/service.py) fills and reads the cache; the MPPS SCP
(gateway/mpps/scp.py) marks the items a step refers to.  Both call the functions here;
nothing else writes SQL against these tables.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ..clock import utcnow

#: A DICOM DA value: YYYYMMDD.
DICOM_DATE = re.compile(r"\d{8}")
_DATE_RANGE = re.compile(r"(\d{8})?-(\d{8})?")


@dataclass(frozen=True)
class CachedItem:
    item_id: str
    scheduled_date: str
    dataset_json: str
    # For the SQL prefilter: a value only when the item has exactly that one value.
    step_date: str | None = None
    modality: str | None = None
    station_ae: str | None = None
    patient_id: str | None = None
    accession: str | None = None


# -- refreshes (write functions) ---------------------------------------------------------


def replace_source(
    source: str, items: list[CachedItem], error: str | None = None
) -> Callable[[sqlite3.Connection], tuple[int, list[str]]]:
    """Replace what *source* holds; *error* names what it skipped. Gives the count and
    the IDs of the items that are gone."""

    def write(conn: sqlite3.Connection) -> tuple[int, list[str]]:
        now = utcnow()
        before = {
            r[0]
            for r in conn.execute("SELECT item_id FROM worklist_items WHERE source = ?", (source,))
        }
        conn.execute("DELETE FROM worklist_items WHERE source = ?", (source,))
        conn.executemany(
            "INSERT OR REPLACE INTO worklist_items"
            " (item_id, source, scheduled_date, dataset, last_seen_at, step_date, modality,"
            " station_ae, patient_id, accession) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (i.item_id, source, i.scheduled_date, i.dataset_json, now, i.step_date,
                 i.modality, i.station_ae, i.patient_id, i.accession)
                for i in items
            ],
        )  # fmt: skip
        ids = {i.item_id for i in items}
        conn.execute(
            "INSERT INTO worklist_sources (source, last_attempt_at, last_success_at, last_error,"
            " item_count) VALUES (?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
            " last_attempt_at = excluded.last_attempt_at,"
            " last_success_at = excluded.last_success_at, last_error = excluded.last_error,"
            " item_count = excluded.item_count",
            (source, now, now, error, len(ids)),
        )
        return len(ids), sorted(before - ids)

    return write


def record_unchanged(source: str) -> Callable[[sqlite3.Connection], None]:
    """*source* was looked at and has not changed: a success, nothing to replace."""

    def write(conn: sqlite3.Connection) -> None:
        now = utcnow()
        conn.execute(
            "UPDATE worklist_sources SET last_attempt_at = ?, last_success_at = ? WHERE source = ?",
            (now, now, source),
        )

    return write


def record_failure(source: str, error: str) -> Callable[[sqlite3.Connection], None]:
    """*source* could not be read: its items stay, the error is recorded."""

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO worklist_sources (source, last_attempt_at, last_error, item_count)"
            " VALUES (?, ?, ?, 0) ON CONFLICT (source) DO UPDATE SET"
            " last_attempt_at = excluded.last_attempt_at, last_error = excluded.last_error",
            (source, utcnow(), error),
        )

    return write


def expire(before: str) -> Callable[[sqlite3.Connection], list[str]]:
    """Items scheduled before *before* (YYYYMMDD) go; gives their IDs."""

    def write(conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            "DELETE FROM worklist_items WHERE scheduled_date != '' AND scheduled_date < ?"
            " RETURNING item_id",
            (before,),
        ).fetchall()
        return [r[0] for r in rows]

    return write


# -- queries (reads) ---------------------------------------------------------------------


def _text_clause(column: str, value: object) -> tuple[str, list[str]] | None:
    """SQL that keeps every row the matcher could accept for this key (PS3.4 C.2.2.2);
    None when the key cannot narrow the rows safely."""
    if not isinstance(value, str):  # absent, several values, or undecoded
        return None
    text = value.strip(" \x00")
    if not text or set(text) == {"*"} or text == '""':
        return None
    if "*" in text or "?" in text:
        if "[" in text or "]" in text:  # GLOB would read these as a character class
            return None
        return f"({column} IS NULL OR {column} GLOB ?)", [text]
    return f"({column} IS NULL OR {column} = ?)", [text]


def _date_clause(value: object) -> tuple[str, list[str]] | None:
    if not isinstance(value, str):
        return None
    text = value.replace(" ", "").strip("\x00")
    if DICOM_DATE.fullmatch(text):
        low = high = text
    elif (m := _DATE_RANGE.fullmatch(text)) and (m.group(1) or m.group(2)):
        low, high = m.group(1) or "00000000", m.group(2) or "99999999"
    else:
        return None
    return "(step_date IS NULL OR step_date BETWEEN ? AND ?)", [low, high]


def prefilter(query: Dataset) -> tuple[list[str], list[str]]:
    """WHERE clauses and parameters that narrow the cache for *query*, never too much."""
    steps = query.get("ScheduledProcedureStepSequence")
    step = steps[0] if isinstance(steps, Sequence) and len(steps) else None
    clauses = [
        _date_clause(step.get("ScheduledProcedureStepStartDate") if step is not None else None),
        _text_clause("modality", step.get("Modality") if step is not None else None),
        _text_clause(
            "station_ae", step.get("ScheduledStationAETitle") if step is not None else None
        ),
        _text_clause("patient_id", query.get("PatientID")),
        _text_clause("accession", query.get("AccessionNumber")),
    ]
    where: list[str] = []
    params: list[str] = []
    for clause in clauses:
        if clause is not None:
            where.append(clause[0])
            params.extend(clause[1])
    return where, params


def unexpired(
    conn: sqlite3.Connection, not_before: str, query: Dataset | None
) -> list[tuple[str, str, str | None]]:
    """(item ID, DICOM JSON, MPPS status) of the items scheduled on or after
    *not_before* (or undated), narrowed for *query* when given.

    With what MPPS told us (gateway/mpps/scp.py): a step the modality COMPLETED is left out
    (it is done; offering it again invites a second exam under the same accession); one
    IN PROGRESS or DISCONTINUED stays, for the worklist to show as STARTED or
    DISCONTINUED, so it can be resumed or redone.
    """
    where, params = (
        ["(w.scheduled_date = '' OR w.scheduled_date >= ?)",
         "(m.mpps_status IS NULL OR m.mpps_status != 'COMPLETED')"],
        [not_before],
    )  # fmt: skip
    if query is not None:
        more, more_params = prefilter(query)
        where += more
        params += more_params
    sql = (
        "SELECT w.item_id, w.dataset, m.mpps_status FROM worklist_items w"
        " LEFT JOIN worklist_mpps m ON m.item_id = w.item_id WHERE " + " AND ".join(where)
    )
    return [(r["item_id"], r["dataset"], r["mpps_status"]) for r in conn.execute(sql, params)]


def freshness(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per source: last attempt, last success, last error, item count."""
    return [dict(r) for r in conn.execute("SELECT * FROM worklist_sources")]


# -- MPPS marks --------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRef:
    """What an MPPS says about the worklist item it performs."""

    study_instance_uid: str
    accession_number: str
    requested_procedure_id: str
    scheduled_procedure_step_id: str


def _json_text(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0] or "")


def refers_to(ref: StepRef, item_json: dict[str, Any]) -> bool:
    """Whether *ref* names the cached worklist item (DICOM JSON): every identifier
    both carry is equal, and at least one of Study Instance UID, Accession Number or
    Scheduled Procedure Step ID is carried by both."""
    steps = item_json.get("00400100", {}).get("Value") or [{}]
    pairs = [
        (ref.study_instance_uid, _json_text(item_json, "0020000D")),
        (ref.accession_number, _json_text(item_json, "00080050")),
        (ref.requested_procedure_id, _json_text(item_json, "00401001")),
        (ref.scheduled_procedure_step_id, _json_text(steps[0], "00400009")),
    ]
    both = [(i, a == b) for i, (a, b) in enumerate(pairs) if a and b]
    # A Requested Procedure ID alone is not enough: it is only unique per accession.
    return any(i != 2 for i, _ in both) and all(same for _, same in both)


def mark_mpps(
    conn: sqlite3.Connection, mpps_uid: str, refs: list[StepRef], status: str, now: str
) -> int:
    """In the MPPS SCP's write: the items *refs* name now have MPPS *mpps_uid* in
    *status*.  Gives how many were marked."""
    # Only items whose JSON holds one of the identifiers are parsed: this runs in the
    # writer thread, which C-STORE acknowledgements wait for.
    needles = sorted(
        {json.dumps(v) for r in refs for v in (r.study_instance_uid, r.accession_number,
                                               r.scheduled_procedure_step_id) if v}
    )  # fmt: skip
    if not needles:
        return 0
    where = " OR ".join(["instr(dataset, ?) > 0"] * len(needles))
    marked = []
    for row in conn.execute(f"SELECT item_id, dataset FROM worklist_items WHERE {where}", needles):
        item = json.loads(row["dataset"])
        if any(refers_to(ref, item) for ref in refs):
            marked.append(row["item_id"])
    conn.executemany(
        "INSERT INTO worklist_mpps (item_id, mpps_instance_uid, mpps_status, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (item_id) DO UPDATE SET"
        " mpps_instance_uid = excluded.mpps_instance_uid,"
        " mpps_status = excluded.mpps_status, updated_at = excluded.updated_at",
        [(item_id, mpps_uid, status, now) for item_id in marked],
    )
    return len(marked)


def follow_mpps(conn: sqlite3.Connection, mpps_uid: str, status: str, now: str) -> None:
    """In the MPPS SCP's write: the items marked with *mpps_uid* follow its new status."""
    conn.execute(
        "UPDATE worklist_mpps SET mpps_status = ?, updated_at = ? WHERE mpps_instance_uid = ?",
        (status, now, mpps_uid),
    )


def prune_mpps_marks(conn: sqlite3.Connection, cutoff: str) -> int:
    """Marks last updated before *cutoff* whose item is no longer cached go."""
    return int(
        conn.execute(
            "DELETE FROM worklist_mpps WHERE updated_at < ? AND item_id NOT IN"
            " (SELECT item_id FROM worklist_items)",
            (cutoff,),
        ).rowcount
    )

"""The ``instances`` table: the upload queue, its states, and every statement on it.

One row per SOP Instance UID, from the C-STORE that made it durable to the archive's
answer (and, with retention, until its files are pruned).  Nothing else writes SQL
against this table: the receiver, the pipeline stages (gateway/pipeline/jobs.py), the start-up
reconciler, the retention loop and the operator's commands call the functions here.
Each write function runs in the store's writer thread (:meth:`gateway.store.Store.submit`),
each read on a reader connection (:meth:`gateway.store.Store.reader`).

    received --compress--> compressing --> compressed --upload--> uploading --> uploaded
                                               ^                      |
                                               +--- retry (backoff) --+--> failed

A stage claims rows by moving them into its transient state (a lease); a crash leaves
them there and :func:`hand_back_leases` returns them.  Completions are guarded by the
row's sha256 and state, so an instance re-received while it was being processed is not
marked with the outcome of its older copy.

The spool files a row refers to (``path``, ``upload_path``) are removed only by the
store's writer, once no row refers to them (:func:`discard_files`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from .clock import utc_in, utcnow


class QueueState(StrEnum):
    """The ``state`` column.  RECEIVED is where the receiver leaves a row; the
    transient states are leases that a crash can leave behind."""

    RECEIVED = "received"
    COMPRESSING = "compressing"
    COMPRESSED = "compressed"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    FAILED = "failed"


#: Each lease and the state it goes back to.
TRANSIENT_STATES = {
    QueueState.COMPRESSING: QueueState.RECEIVED,
    QueueState.UPLOADING: QueueState.COMPRESSED,
}


@dataclass(frozen=True)
class ReceivedInstance:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    peer_address: str
    transfer_syntax: str
    size: int
    sha256: str
    path: str


@dataclass(frozen=True)
class Claimed:
    """A row a stage leased: what it needs to compress or send it."""

    sop_instance_uid: str
    study_instance_uid: str
    sha256: str
    path: str
    upload_path: str
    transfer_syntax: str
    size: int
    attempts: int
    series_instance_uid: str = ""
    #: STOW-RS requests that carried this UID before this one.
    sends: int = 0
    #: When the C-STORE was answered (ISO 8601, UTC), for the end-to-end latency.
    received_at: str = ""


class Transcoded(Protocol):
    """What the compress stage decided for an instance
    (gateway.pipeline.transcode.TranscodeResult)."""

    @property
    def outcome(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def transfer_syntax(self) -> str: ...


class Uploaded(Protocol):
    """What the archive said about an instance (gateway.pipeline.upload.InstanceOutcome)."""

    @property
    def stored(self) -> bool: ...
    @property
    def retryable(self) -> bool: ...
    @property
    def reason(self) -> str: ...
    @property
    def warnings(self) -> tuple[str, ...]: ...


#: Why retrying an upload stops now: (failed attempts, failing since, now) -> reason or None.
GiveUpRule = Callable[[int, str, str], str | None]


def decode_warnings(value: str | None) -> list[str]:
    """The ``warnings`` column as a list of texts (empty: none)."""
    if not value:
        return []
    try:
        decoded = json.loads(value)
    except ValueError:
        return [value]
    return [str(w) for w in decoded] if isinstance(decoded, list) else [str(decoded)]


# -- spool files no row refers to any more ------------------------------------------------


def create_discard_table(conn: sqlite3.Connection) -> None:
    """On the writer's connection, once: where :func:`discard_files` notes its paths."""
    conn.execute("CREATE TEMP TABLE discarded_files (path TEXT PRIMARY KEY)")


def discard_files(conn: sqlite3.Connection, relpaths: list[str]) -> None:
    """In a write function: these spool files may go once this transaction commits.

    Each is removed only if, at the end of the writer's transaction, no row refers to
    it by ``path`` or ``upload_path``, and no one holds it pinned.  A write that is
    rolled back discards nothing (the list lives in a temp table of the transaction).
    """
    conn.executemany(
        "INSERT OR IGNORE INTO temp.discarded_files (path) VALUES (?)",
        [(p,) for p in relpaths if p],
    )


def unreferenced_discards(conn: sqlite3.Connection) -> list[str]:
    """At the end of the writer's batch, inside its transaction: the discarded files
    no row refers to (and the list starts empty again)."""
    if conn.execute("SELECT 1 FROM temp.discarded_files LIMIT 1").fetchone() is None:
        return []  # the common batch: C-STOREs of new instances, queue transitions
    rows = conn.execute(
        "SELECT path FROM temp.discarded_files AS d"
        " WHERE NOT EXISTS (SELECT 1 FROM instances WHERE path = d.path)"
        " AND NOT EXISTS (SELECT 1 FROM instances WHERE upload_path = d.path)"
    ).fetchall()
    conn.execute("DELETE FROM temp.discarded_files")
    return [r[0] for r in rows]


def is_referenced(conn: sqlite3.Connection, relpath: str) -> bool:
    """Does any row refer to *relpath*, as ``path`` or ``upload_path``?"""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM instances WHERE path = ?)"
        " OR EXISTS (SELECT 1 FROM instances WHERE upload_path = ?)",
        (relpath, relpath),
    ).fetchone()
    return bool(row[0])


# -- the receiver -------------------------------------------------------------------------


def record_received(inst: ReceivedInstance, now: str) -> Callable[[sqlite3.Connection], list[str]]:
    """Insert or replace the row of a C-STORE; gives the replaced files' paths (removed
    by the writer once nothing refers to them: see :func:`discard_files`)."""

    def write(conn: sqlite3.Connection) -> list[str]:
        row = conn.execute(
            "SELECT path, upload_path FROM instances WHERE sop_instance_uid = ?",
            (inst.sop_instance_uid,),
        ).fetchone()
        conn.execute(
            """
            INSERT INTO instances (
                sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid,
                calling_ae, peer_address, transfer_syntax, size, sha256, path,
                received_at, state, attempts, next_attempt_at, last_error, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, NULL, ?)
            ON CONFLICT (sop_instance_uid) DO UPDATE SET
                sop_class_uid = excluded.sop_class_uid,
                study_instance_uid = excluded.study_instance_uid,
                series_instance_uid = excluded.series_instance_uid,
                calling_ae = excluded.calling_ae,
                peer_address = excluded.peer_address,
                transfer_syntax = excluded.transfer_syntax,
                size = excluded.size,
                sha256 = excluded.sha256,
                path = excluded.path,
                received_at = excluded.received_at,
                state = excluded.state,
                attempts = 0,
                next_attempt_at = excluded.next_attempt_at,
                last_error = NULL,
                upload_path = NULL,
                upload_size = NULL,
                upload_transfer_syntax = NULL,
                transcode_outcome = NULL,
                transcode_reason = NULL,
                uploaded_at = NULL,
                warnings = NULL,
                compressed_at = NULL,
                confirmed_at = NULL,
                updated_at = excluded.updated_at
            """,
            (
                inst.sop_instance_uid,
                inst.sop_class_uid,
                inst.study_instance_uid,
                inst.series_instance_uid,
                inst.calling_ae,
                inst.peer_address,
                inst.transfer_syntax,
                inst.size,
                inst.sha256,
                inst.path,
                now,
                QueueState.RECEIVED,
                now,
                now,
            ),
        )
        if row is None:
            return []
        replaced = [p for p in {row["path"], row["upload_path"]} if p and p != inst.path]
        discard_files(conn, replaced)
        return replaced

    return write


def backfill_stage_times(conn: sqlite3.Connection) -> None:
    """Migration 11: rows from before ``compressed_at`` and ``confirmed_at`` existed get
    their best estimate (an uploaded row was confirmed when it was uploaded)."""
    s = QueueState
    conn.execute(
        "UPDATE instances SET compressed_at = coalesce(uploaded_at, updated_at)"
        " WHERE state IN (?, ?, ?)",
        (s.COMPRESSED, s.UPLOADING, s.UPLOADED),
    )
    conn.execute("UPDATE instances SET confirmed_at = uploaded_at WHERE state = ?", (s.UPLOADED,))


# -- leases -------------------------------------------------------------------------------


def hand_back_leases(conn: sqlite3.Connection) -> int:
    """Rows a stage had claimed go back to the state before it: what a crash (at
    start-up, the reconciler) or a crashed run of the pipeline leaves behind."""
    now = utcnow()
    return sum(
        conn.execute(
            "UPDATE instances SET state = ?, updated_at = ? WHERE state = ?", (back, now, leased)
        ).rowcount
        for leased, back in TRANSIENT_STATES.items()
    )


def file_references(conn: sqlite3.Connection) -> list[tuple[str | None, str | None]]:
    """Every row's ``(path, upload_path)``: what the start-up reconciler compares with
    the spool."""
    return [(r["path"], r["upload_path"]) for r in conn.execute(
        "SELECT path, upload_path FROM instances"
    )]  # fmt: skip


def repair_missing_files(
    missing: set[str], missing_copies: set[str]
) -> Callable[[sqlite3.Connection], tuple[int, int]]:
    """At start-up, after a crash: hand the leases back, fail the rows whose received
    file (*missing*) is gone, and send back to compression those still to be uploaded
    whose J2K copy (*missing_copies*) is gone (the others only lose the dangling
    ``upload_path``).  Gives (leases handed back, rows to compress again)."""

    def write(conn: sqlite3.Connection) -> tuple[int, int]:
        now = utcnow()
        requeued = hand_back_leases(conn)
        for relpath in missing:
            conn.execute(
                "UPDATE instances SET state = ?, last_error = ?, updated_at = ? WHERE path = ?",
                (QueueState.FAILED, "spool file missing at start-up", now, relpath),
            )
        recompress = 0
        for relpath in missing_copies:
            # After the transient states went back: UPLOADING is COMPRESSED by now.
            recompress += conn.execute(
                "UPDATE instances SET state = ?, compressed_at = NULL, updated_at = ?"
                " WHERE upload_path = ?"
                " AND state IN (?, ?)",
                (QueueState.RECEIVED, now, relpath, QueueState.COMPRESSED, QueueState.UPLOADING),
            ).rowcount
            conn.execute(
                "UPDATE instances SET upload_path = NULL, upload_size = NULL,"
                " upload_transfer_syntax = NULL, transcode_outcome = NULL,"
                " transcode_reason = NULL, updated_at = ? WHERE upload_path = ?",
                (now, relpath),
            )
        return requeued, recompress

    return write


# -- the compress stage -------------------------------------------------------------------


def claim_for_compression(limit: int) -> Callable[[sqlite3.Connection], list[Claimed]]:
    """Lease up to *limit* received rows, oldest first."""

    def write(conn: sqlite3.Connection) -> list[Claimed]:
        rows = conn.execute(
            """
            UPDATE instances SET state = ?, updated_at = ?
            WHERE sop_instance_uid IN (
                SELECT sop_instance_uid FROM instances WHERE state = ?
                ORDER BY received_at LIMIT ?)
            RETURNING sop_instance_uid, study_instance_uid, sha256, path, upload_path,
                      transfer_syntax, size, attempts, series_instance_uid, sends, received_at
            """,
            (QueueState.COMPRESSING, utcnow(), QueueState.RECEIVED, limit),
        ).fetchall()
        return [Claimed(**{**dict(r), "upload_path": r["upload_path"] or ""}) for r in rows]

    return write


def mark_compressed(
    claimed: Claimed, upload_path: str, upload_size: int, result: Transcoded
) -> Callable[[sqlite3.Connection], bool]:
    """The claimed row is ready to upload *upload_path*; False (and the output is
    discarded) when it was re-received meanwhile."""

    def write(conn: sqlite3.Connection) -> bool:
        now = utcnow()
        cur = conn.execute(
            """
            UPDATE instances SET state = ?, upload_path = ?, upload_size = ?,
                upload_transfer_syntax = ?, transcode_outcome = ?, transcode_reason = ?,
                next_attempt_at = ?, compressed_at = ?, updated_at = ?
            WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?
            """,
            (
                QueueState.COMPRESSED, upload_path, upload_size, result.transfer_syntax,
                result.outcome, result.reason or None, now, now, now,
                claimed.sop_instance_uid, claimed.sha256, QueueState.COMPRESSING,
            ),
        )  # fmt: skip
        if cur.rowcount == 1:
            return True
        if upload_path != claimed.path:
            # Re-received while we worked: this output belongs to the old copy.
            discard_files(conn, [upload_path])
        return False

    return write


def quarantine(
    claimed: Claimed, state: QueueState, reason: str
) -> Callable[[sqlite3.Connection], bool]:
    """A row a stage cannot handle becomes ``failed`` with the reason (if it is still
    the copy the stage claimed, in *state*)."""

    def write(conn: sqlite3.Connection) -> bool:
        now = utcnow()
        cur = conn.execute(
            "UPDATE instances SET state = ?, last_error = ?, updated_at = ?"
            " WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
            (QueueState.FAILED, reason, now, claimed.sop_instance_uid, claimed.sha256, state),
        )
        return cur.rowcount == 1

    return write


def queued_bytes(conn: sqlite3.Connection) -> tuple[int, int]:
    """Bytes the link has still to carry (waiting to go up or going up), and bytes the
    compress stage has still to decide on (received or being compressed)."""
    s = QueueState
    rows = conn.execute(
        "SELECT state, coalesce(sum(upload_size), 0) AS up, coalesce(sum(size), 0) AS n"
        " FROM instances WHERE state IN (?, ?, ?, ?) GROUP BY state",
        (s.COMPRESSED, s.UPLOADING, s.RECEIVED, s.COMPRESSING),
    ).fetchall()
    link = sum(int(r["up"]) for r in rows if r["state"] in (s.COMPRESSED, s.UPLOADING))
    pending = sum(int(r["n"]) for r in rows if r["state"] in (s.RECEIVED, s.COMPRESSING))
    return link, pending


# -- the upload stage ---------------------------------------------------------------------


def claim_upload_batch(
    max_instances: int,
    max_bytes: int,
    priority_aets: tuple[str, ...] = (),
    *,
    others: bool = True,
) -> Callable[[sqlite3.Connection], tuple[list[Claimed], bool]]:
    """Claim the next batch: instances of one study, oldest first.  The priority lane
    comes first: the oldest due instance from one of *priority_aets* picks the study,
    and only that study's instances from those AEs go in.  Otherwise (and only when
    *others*: an upload window is open) the study of the oldest due instance.  Returns
    the batch and whether it is the priority lane's."""

    def write(conn: sqlite3.Connection) -> tuple[list[Claimed], bool]:
        now = utcnow()
        first = None
        lane = ""
        lane_params: tuple[str, ...] = ()
        if priority_aets:
            # Unary +: not along the (calling_ae, received_at) index, which would walk
            # every row ever received from these AEs; the due rows are few.
            lane = f" AND +calling_ae IN ({','.join('?' * len(priority_aets))})"
            lane_params = priority_aets
            first = conn.execute(
                "SELECT study_instance_uid FROM instances WHERE state = ? AND next_attempt_at <= ?"
                f"{lane} ORDER BY next_attempt_at, received_at LIMIT 1",
                (QueueState.COMPRESSED, now, *lane_params),
            ).fetchone()
        priority = first is not None
        if first is None and others:
            lane, lane_params = "", ()
            first = conn.execute(
                "SELECT study_instance_uid FROM instances WHERE state = ? AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, received_at LIMIT 1",
                (QueueState.COMPRESSED, now),
            ).fetchone()
        if first is None:
            return [], False
        rows = conn.execute(
            f"""
            SELECT sop_instance_uid, study_instance_uid, sha256, path, upload_path,
                   transfer_syntax, upload_size AS size, attempts, series_instance_uid, sends,
                   received_at
            FROM instances
            WHERE state = ? AND study_instance_uid = ? AND next_attempt_at <= ?{lane}
            ORDER BY received_at LIMIT ?
            """,
            (QueueState.COMPRESSED, first["study_instance_uid"], now, *lane_params,
             max_instances),
        ).fetchall()  # fmt: skip
        batch: list[Claimed] = []
        total = 0
        for r in rows:
            if batch and total + r["size"] > max_bytes:
                break
            total += r["size"]
            batch.append(Claimed(**dict(r)))
        # sends is counted at the claim: a crash after the request leaves it counted.
        conn.executemany(
            "UPDATE instances SET state = ?, sends = sends + 1, updated_at = ?"
            " WHERE sop_instance_uid = ?",
            [(QueueState.UPLOADING, now, c.sop_instance_uid) for c in batch],
        )
        return batch, priority

    return write


def next_due(conn: sqlite3.Connection) -> str | None:
    """When the next instance waiting to be uploaded is due (None: none waits)."""
    row = conn.execute(
        "SELECT min(next_attempt_at) AS due FROM instances WHERE state = ?",
        (QueueState.COMPRESSED,),
    ).fetchone()
    return row["due"] if row else None


def finish_uploads(
    results: Sequence[tuple[Claimed, Uploaded]],
    backoff: Callable[[int], float],
    give_up: GiveUpRule,
    confirm: bool = True,
) -> Callable[[sqlite3.Connection], dict[str, str]]:
    """Record each outcome: stored, retried after ``backoff(attempts)`` seconds, or
    failed.  A retryable failure that *give_up* ends is recorded as failed: the result
    gives, for each of those, the reason recorded (the archive's and *give_up*'s).
    With *confirm*, a stored instance is also confirmed (``commitment.verify = "stow"``;
    with "qido", :func:`mark_confirmed` does it once a search finds it)."""

    def write(conn: sqlite3.Connection) -> dict[str, str]:
        now = utcnow()
        gave_up: dict[str, str] = {}
        for claimed, outcome in results:
            guard = (claimed.sop_instance_uid, claimed.sha256, QueueState.UPLOADING)
            if outcome.stored:
                warnings = json.dumps(list(outcome.warnings)) if outcome.warnings else None
                conn.execute(
                    "UPDATE instances SET state = ?, uploaded_at = ?, attempts = attempts + 1,"
                    " last_error = NULL, failing_since = NULL, warnings = ?, confirmed_at = ?,"
                    " updated_at = ? WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
                    (QueueState.UPLOADED, now, warnings, now if confirm else None, now, *guard),
                )
                continue
            attempts = claimed.attempts + 1
            reason = outcome.reason
            if outcome.retryable:
                row = conn.execute(
                    "SELECT failing_since, received_at FROM instances WHERE sop_instance_uid = ?",
                    (claimed.sop_instance_uid,),
                ).fetchone()
                since = row["failing_since"] if row is not None else None
                if since is None or (row is not None and since < row["received_at"]):
                    since = now  # the first failure since it was (re-)received
                why = give_up(attempts, since, now)
                if why is None:
                    conn.execute(
                        "UPDATE instances SET state = ?, attempts = ?, last_error = ?,"
                        " failing_since = ?, next_attempt_at = ?, updated_at = ?"
                        " WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
                        (QueueState.COMPRESSED, attempts, reason, since,
                         utc_in(backoff(attempts)), now, *guard),
                    )  # fmt: skip
                    continue
                reason = f"{reason}; {why}"
                gave_up[claimed.sop_instance_uid] = reason
            conn.execute(
                "UPDATE instances SET state = ?, attempts = ?, last_error = ?,"
                " failing_since = NULL, updated_at = ?"
                " WHERE sop_instance_uid = ? AND sha256 = ? AND state = ?",
                (QueueState.FAILED, attempts, reason, now, *guard),
            )
        return gave_up

    return write


# -- the archive's confirmation (commitment.verify = "qido"; Storage Commitment) --------


@dataclass(frozen=True)
class Unconfirmed:
    """An uploaded instance the archive has yet to be found holding (QIDO-RS)."""

    sop_instance_uid: str
    sha256: str
    uploaded_at: str


def awaiting_confirmation(
    conn: sqlite3.Connection, studies: int, skip: Sequence[str] = ()
) -> dict[str, list[Unconfirmed]]:
    """Uploaded, unconfirmed instances of at most *studies* studies (not in *skip*),
    by study."""
    found: dict[str, list[Unconfirmed]] = {}
    exclude = f" AND study_instance_uid NOT IN ({','.join('?' * len(skip))})" if skip else ""
    for (study,) in conn.execute(
        "SELECT DISTINCT study_instance_uid FROM instances INDEXED BY idx_instances_unconfirmed"
        f" WHERE state = '{QueueState.UPLOADED}' AND confirmed_at IS NULL{exclude} LIMIT ?",
        (*skip, studies),
    ).fetchall():
        found[study] = [
            Unconfirmed(r["sop_instance_uid"], r["sha256"], r["uploaded_at"])
            for r in conn.execute(
                "SELECT sop_instance_uid, sha256, uploaded_at FROM instances"
                " INDEXED BY idx_instances_unconfirmed WHERE study_instance_uid = ?"
                f" AND state = '{QueueState.UPLOADED}' AND confirmed_at IS NULL",
                (study,),
            )
        ]
    return found


def mark_confirmed(items: Sequence[Unconfirmed]) -> Callable[[sqlite3.Connection], int]:
    """The archive was found holding these (the copies uploaded then): confirmed."""

    def write(conn: sqlite3.Connection) -> int:
        now = utcnow()
        return sum(
            conn.execute(
                "UPDATE instances SET confirmed_at = ?, updated_at = ? WHERE sop_instance_uid = ?"
                " AND sha256 = ? AND uploaded_at = ? AND state = ? AND confirmed_at IS NULL",
                (now, now, i.sop_instance_uid, i.sha256, i.uploaded_at, QueueState.UPLOADED),
            ).rowcount
            for i in items
        )

    return write


@dataclass(frozen=True)
class Confirmation:
    """What the queue knows of an instance a Storage Commitment request names."""

    sop_class_uid: str
    study_instance_uid: str
    state: QueueState
    #: The archive confirmed the copy held now (cleared when received again).
    confirmed: bool
    last_error: str | None


def confirmations(conn: sqlite3.Connection, uids: Sequence[str]) -> dict[str, Confirmation]:
    """The rows of *uids* that exist (one statement: primary key lookups)."""
    if not uids:
        return {}
    rows = conn.execute(
        "SELECT sop_instance_uid, sop_class_uid, study_instance_uid, state, confirmed_at,"
        " last_error FROM instances WHERE sop_instance_uid IN (SELECT value FROM json_each(?))",
        (json.dumps(list(dict.fromkeys(uids))),),
    ).fetchall()
    return {
        r["sop_instance_uid"]: Confirmation(
            r["sop_class_uid"],
            r["study_instance_uid"],
            QueueState(r["state"]),
            r["confirmed_at"] is not None and r["state"] == QueueState.UPLOADED,
            r["last_error"],
        )
        for r in rows
    }


# -- retention ----------------------------------------------------------------------------


#: Rows :func:`prune` clears per writer transaction (their files are unlinked by the writer).
PRUNE_MAX_ROWS = 500

#: Of the given SOP Instance UIDs, those whose files stay whatever the cache says (those
#: of a Storage Commitment not yet reported: gateway.commitment.requests.held_among).
HeldAmong = Callable[[sqlite3.Connection, Sequence[str]], set[str]]


@dataclass(frozen=True)
class PruneCandidate:
    """An uploaded instance beyond the local cache, as a read saw it."""

    sop_instance_uid: str
    uploaded_at: str


def prune_candidates(
    keep_bytes: int,
    keep_hours: float,
    held: HeldAmong | None = None,
    max_rows: int = PRUNE_MAX_ROWS,
) -> Callable[[sqlite3.Connection], list[PruneCandidate]]:
    """A read: uploaded instances beyond the local cache (newest kept first), not
    *held*, at most *max_rows*.  The choice is made here, on a reader connection, so
    that the write (:func:`prune`) holds the database's write lock, which C-STOREs and
    N-ACTIONs wait for, only to check and clear these rows."""

    def read(conn: sqlite3.Connection) -> list[PruneCandidate]:
        rows = conn.execute(
            "SELECT sop_instance_uid, path, upload_path, size, upload_size, uploaded_at"
            " FROM instances WHERE state = ? AND (path IS NOT NULL OR upload_path IS NOT NULL)"
            " ORDER BY uploaded_at DESC",
            (QueueState.UPLOADED,),
        ).fetchall()
        oldest_kept = utc_in(-keep_hours * 3600) if keep_hours else ""
        total = 0
        beyond: list[PruneCandidate] = []
        for r in rows:
            total += (r["size"] or 0) + (
                r["upload_size"] or 0 if r["upload_path"] not in (None, r["path"]) else 0
            )
            if total > keep_bytes or r["uploaded_at"] < oldest_kept:
                beyond.append(PruneCandidate(r["sop_instance_uid"], r["uploaded_at"]))
        chosen: list[PruneCandidate] = []
        for at in range(0, len(beyond), max_rows):
            chunk = beyond[at : at + max_rows]
            keep = held(conn, [c.sop_instance_uid for c in chunk]) if held else set()
            chosen += [c for c in chunk if c.sop_instance_uid not in keep]
            if len(chosen) >= max_rows:
                break
        return chosen[:max_rows]

    return read


def prune(
    candidates: Sequence[PruneCandidate], held: HeldAmong | None = None
) -> Callable[[sqlite3.Connection], list[str]]:
    """The write after :func:`prune_candidates`: each candidate still uploaded at the
    same time (not received again since) and not *held* (a commitment request may have
    named it since) loses its files, which the writer unlinks; C-STOREs wait for it."""

    def write(conn: sqlite3.Connection) -> list[str]:
        if not candidates:
            return []
        uids = [c.sop_instance_uid for c in candidates]
        keep = held(conn, uids) if held is not None else set()
        seen = {c.sop_instance_uid: c.uploaded_at for c in candidates}
        # "+state": look the rows up by primary key, not through an index on state.
        rows = conn.execute(
            "SELECT sop_instance_uid, path, upload_path, uploaded_at FROM instances"
            " WHERE sop_instance_uid IN (SELECT value FROM json_each(?)) AND +state = ?"
            " AND (path IS NOT NULL OR upload_path IS NOT NULL)",
            (json.dumps(uids), QueueState.UPLOADED),
        ).fetchall()
        doomed: list[str] = []
        files: list[str] = []
        for r in rows:
            uid = r["sop_instance_uid"]
            if r["uploaded_at"] != seen[uid] or uid in keep:
                continue
            doomed.append(uid)
            files += [p for p in {r["path"], r["upload_path"]} if p]
        conn.executemany(
            "UPDATE instances SET path = NULL, upload_path = NULL WHERE sop_instance_uid = ?",
            [(uid,) for uid in doomed],
        )
        # The writer removes them after the commit, those that no row (an identical
        # re-send) and no C-STORE in progress still has.
        discard_files(conn, files)
        return files

    return write


# -- the operator (CLI and web API) -------------------------------------------------------


def retry_failed(conn: sqlite3.Connection, sop_instance_uids: list[str] | None) -> int:
    """Operator action: send failed instances again (all of them when *uids* is None)."""
    now = utcnow()
    sql = (
        "UPDATE instances SET state = CASE WHEN upload_path IS NULL THEN ? ELSE ? END,"
        " compressed_at = CASE WHEN upload_path IS NULL THEN NULL ELSE compressed_at END,"
        " attempts = 0, last_error = NULL, failing_since = NULL, next_attempt_at = ?,"
        " updated_at = ?"
        " WHERE state = ?"
    )
    params: list[Any] = [QueueState.RECEIVED, QueueState.COMPRESSED, now, now, QueueState.FAILED]
    if sop_instance_uids is not None:
        sql += f" AND sop_instance_uid IN ({','.join('?' * len(sop_instance_uids))})"
        params += sop_instance_uids
    return int(conn.execute(sql, params).rowcount)


def listing(
    conn: sqlite3.Connection, state: str | None, limit: int, *, newest_first: bool = True
) -> list[dict[str, Any]]:
    """Rows for ``queue ls`` and ``/api/queue``: in *state* (None: any), at most
    *limit*, by reception time; ``warnings`` as a list of texts."""
    where, params = ("WHERE state = ?", (state,)) if state else ("", ())
    order = "DESC" if newest_first else "ASC"
    rows = conn.execute(
        "SELECT sop_instance_uid, study_instance_uid, series_instance_uid, calling_ae,"
        " state, attempts, size, upload_size, transfer_syntax, received_at,"
        " next_attempt_at, uploaded_at, last_error, transcode_outcome, warnings"
        f" FROM instances {where} ORDER BY received_at {order} LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [{**dict(r), "warnings": decode_warnings(r["warnings"])} for r in rows]


# -- the status page, /api/status, /metrics and the heartbeat (reads) ---------------------
# Each query stays cheap on a large queue: counts use the state indexes, time ranges
# the received_at / uploaded_at covering indexes (migration 5), warnings a partial
# index (migration 9).  gateway/web/status.py takes its snapshot from these.


def count_by_state(conn: sqlite3.Connection) -> dict[QueueState, int]:
    """Rows in each state (every state, 0 when none)."""
    counts = dict.fromkeys(QueueState, 0)
    for row in conn.execute("SELECT state, count(*) AS n FROM instances GROUP BY state"):
        counts[row["state"]] = row["n"]
    return counts


def uploaded_since(conn: sqlite3.Connection, since: str) -> int:
    """Instances uploaded at or after *since* (and still ``uploaded``)."""
    row = conn.execute(
        "SELECT count(*) FROM instances WHERE state = ? AND uploaded_at >= ?",
        (QueueState.UPLOADED, since),
    ).fetchone()
    return int(row[0])


def oldest_received_at(conn: sqlite3.Connection, states: Sequence[QueueState]) -> str | None:
    """When the oldest row in one of *states* was received (None: no such row); one
    index lookup per state."""
    oldest: str | None = None
    for state in states:
        value = conn.execute(
            "SELECT min(received_at) FROM instances WHERE state = ?", (state,)
        ).fetchone()[0]
        if value is not None and (oldest is None or value < oldest):
            oldest = value
    return oldest


def last_uploaded_at(conn: sqlite3.Connection) -> str | None:
    value = conn.execute("SELECT max(uploaded_at) FROM instances").fetchone()[0]
    return str(value) if value is not None else None


#: Per minute (``YYYY-MM-DDTHH:MM``): (instances, bytes).
PerMinute = dict[str, tuple[int, int]]


def per_minute(conn: sqlite3.Connection, since: str) -> tuple[PerMinute, PerMinute]:
    """Received and uploaded instances and bytes per minute, from *since* on."""
    received: PerMinute = {}
    for row in conn.execute(
        "SELECT substr(received_at, 1, 16) AS m, count(*) AS n, sum(size) AS b"
        " FROM instances WHERE received_at >= ? GROUP BY m",
        (since,),
    ):
        received[row["m"]] = (row["n"], row["b"] or 0)
    uploaded: PerMinute = {}
    for row in conn.execute(
        "SELECT substr(uploaded_at, 1, 16) AS m, count(*) AS n, sum(upload_size) AS b"
        " FROM instances WHERE uploaded_at >= ? GROUP BY m",
        (since,),
    ):
        uploaded[row["m"]] = (row["n"], row["b"] or 0)
    return received, uploaded


def calling_aes(conn: sqlite3.Connection, since: str, limit: int = 200) -> list[dict[str, Any]]:
    """Each calling AE (at most *limit*): ``calling_ae``, ``last_24h`` (instances
    received at or after *since*) and ``last_seen``, the most recently seen first."""
    # Distinct calling AEs by hopping along the (calling_ae, received_at) index, then
    # two index lookups each: O(AEs x log n), not a scan of the whole queue.
    aes = [
        r[0]
        for r in conn.execute(
            "WITH RECURSIVE ae(x) AS (SELECT min(calling_ae) FROM instances UNION ALL"
            " SELECT (SELECT min(calling_ae) FROM instances WHERE calling_ae > x)"
            " FROM ae WHERE x IS NOT NULL) SELECT x FROM ae WHERE x IS NOT NULL LIMIT ?",
            (limit,),
        )
    ]
    found = []
    for ae in aes:
        last, n = conn.execute(
            "SELECT max(received_at), (SELECT count(*) FROM instances"
            " WHERE calling_ae = ?1 AND received_at >= ?2) FROM instances WHERE calling_ae = ?1",
            (ae, since),
        ).fetchone()
        found.append({"calling_ae": ae, "last_24h": n, "last_seen": last})
    found.sort(key=lambda m: m["last_seen"] or "", reverse=True)
    return found


def failed(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest *limit* failed rows."""
    return [
        dict(r)
        for r in conn.execute(
            "SELECT sop_instance_uid, study_instance_uid, calling_ae, attempts, received_at,"
            " updated_at, last_error FROM instances WHERE state = ?"
            " ORDER BY received_at DESC LIMIT ?",
            (QueueState.FAILED, limit),
        )
    ]


def retrying(conn: sqlite3.Connection, limit: int = 10) -> list[dict[str, Any]]:
    """Instances waiting for a retry after a failed upload, soonest first."""
    return [
        dict(r)
        for r in conn.execute(
            # The partial index of migration 5, named: the planner otherwise walks every
            # waiting row along (state, next_attempt_at) looking for ones with an error.
            # The state is written out, not bound: only then does the index apply.
            "SELECT sop_instance_uid, attempts, next_attempt_at, last_error FROM instances"
            " INDEXED BY idx_instances_retrying"
            f" WHERE state = '{QueueState.COMPRESSED}' AND last_error IS NOT NULL"
            " ORDER BY next_attempt_at LIMIT ?",
            (limit,),
        )
    ]


def warned(conn: sqlite3.Connection, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """How many instances the archive stored with warnings, and the newest *limit* of
    them (``warnings`` as a list of texts)."""
    count = conn.execute("SELECT count(*) FROM instances WHERE warnings IS NOT NULL").fetchone()
    recent = [
        {**dict(r), "warnings": decode_warnings(r["warnings"])}
        for r in conn.execute(
            "SELECT sop_instance_uid, study_instance_uid, calling_ae, uploaded_at, warnings"
            " FROM instances WHERE warnings IS NOT NULL ORDER BY uploaded_at DESC LIMIT ?",
            (limit,),
        )
    ]
    return int(count[0]), recent


# -- the per-study view (gateway/studies.py, reads) ---------------------------------------


@dataclass(frozen=True)
class StudyRows:
    """A study's instances, counted by how far each went, with the first and last time
    of each stage (gateway/studies.py builds the proof of delivery from it)."""

    instances: int
    received_first: str
    received_last: str
    compressed: int
    compressed_first: str | None
    compressed_last: str | None
    uploaded: int
    uploaded_first: str | None
    uploaded_last: str | None
    confirmed: int
    confirmed_first: str | None
    confirmed_last: str | None
    failed: int
    calling_aes: tuple[str, ...]


def recent_studies(conn: sqlite3.Connection, limit: int) -> list[str]:
    """The Study Instance UIDs of the *limit* studies received most recently, newest
    first (walking the received_at index backwards until that many are found)."""
    found: dict[str, None] = {}
    cursor = conn.execute(
        "SELECT study_instance_uid FROM instances INDEXED BY idx_instances_received_size"
        " ORDER BY received_at DESC"
    )
    for (study,) in cursor:
        found.setdefault(study, None)
        if len(found) >= limit:
            break
    cursor.close()
    return list(found)


def study_rows(conn: sqlite3.Connection, study_instance_uid: str) -> StudyRows | None:
    """The stages of one study's instances (None: no instance of it is known)."""
    s = QueueState
    row = conn.execute(
        "SELECT count(*) AS n, min(received_at) AS r1, max(received_at) AS r2,"
        " sum(compressed_at IS NOT NULL) AS c, min(compressed_at) AS c1, max(compressed_at) AS c2,"
        " sum(state = :up) AS u, min(CASE WHEN state = :up THEN uploaded_at END) AS u1,"
        " max(CASE WHEN state = :up THEN uploaded_at END) AS u2,"
        " sum(state = :up AND confirmed_at IS NOT NULL) AS k, min(confirmed_at) AS k1,"
        " max(confirmed_at) AS k2, sum(state = :failed) AS f,"
        " group_concat(DISTINCT calling_ae) AS aes"
        " FROM instances WHERE study_instance_uid = :study",
        {"up": s.UPLOADED, "failed": s.FAILED, "study": study_instance_uid},
    ).fetchone()
    if not row["n"]:
        return None
    return StudyRows(
        instances=row["n"], received_first=row["r1"], received_last=row["r2"],
        compressed=row["c"], compressed_first=row["c1"], compressed_last=row["c2"],
        uploaded=row["u"], uploaded_first=row["u1"], uploaded_last=row["u2"],
        confirmed=row["k"], confirmed_first=row["k1"], confirmed_last=row["k2"],
        failed=row["f"],
        calling_aes=tuple(sorted(a for a in (row["aes"] or "").split(",") if a)),
    )  # fmt: skip


def bytes_on_disk(conn: sqlite3.Connection) -> int:
    """Bytes of the spool files rows refer to (a J2K copy counted besides its original)."""
    row = conn.execute(
        "SELECT coalesce(sum(size), 0) + coalesce(sum(CASE WHEN upload_path != path"
        " THEN upload_size END), 0) FROM instances WHERE path IS NOT NULL"
    ).fetchone()
    return int(row[0])

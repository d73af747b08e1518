"""Start-up reconciliation of the spool against the queue, before any association.

A crash can leave three kinds of debris, none of it acknowledged to a modality:
temp files of C-STOREs in progress, files renamed into ``objects/`` whose queue row
never committed, and rows left in a transient (leased) state by a stage that died.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from .spool import Spool
from .store import FAILED, TRANSIENT_STATES, Store, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciliation:
    temp_files_removed: int
    orphans_removed: int
    requeued: int
    missing_files: int


def reconcile(spool: Spool, store: Store) -> Reconciliation:
    temp_removed = spool.clean_tmp()

    referenced = {
        relpath
        for row in store.rows("SELECT path, upload_path FROM instances")
        for relpath in (row["path"], row["upload_path"])
        if relpath
    }
    on_disk = spool.stored_relpaths()
    orphans = on_disk - referenced
    for relpath in orphans:
        spool.remove(relpath)
    missing = referenced - on_disk

    def fix_rows(conn: sqlite3.Connection) -> int:
        now = utcnow()
        requeued = 0
        for transient, back_to in TRANSIENT_STATES.items():
            requeued += conn.execute(
                "UPDATE instances SET state = ?, updated_at = ? WHERE state = ?",
                (back_to, now, transient),
            ).rowcount
        for relpath in missing:
            conn.execute(
                "UPDATE instances SET state = ?, last_error = ?, updated_at = ? WHERE path = ?",
                (FAILED, "spool file missing at start-up", now, relpath),
            )
        return requeued

    requeued = store.submit(fix_rows).result()
    result = Reconciliation(temp_removed, len(orphans), requeued, len(missing))
    if missing:
        log.error("reconcile: %d queued files are missing from the spool", len(missing))
    log.info(
        "reconcile: removed %d temp files and %d orphan files, requeued %d rows",
        result.temp_files_removed,
        result.orphans_removed,
        result.requeued,
    )
    return result

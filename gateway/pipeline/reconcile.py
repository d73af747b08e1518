"""Start-up reconciliation of the spool against the queue, before any association.

A crash can leave three kinds of debris, none of it acknowledged to a modality:
temp files of C-STOREs in progress, files renamed into ``objects/`` whose queue row
never committed, and rows left in a transient (leased) state by a stage that died.

It runs before the listener and the pipeline start, and after the spool's instance
lock is taken (which the receiver processes of a killed gateway hold until they have
drained and exited: gateway/spool.py), so nothing can pin or re-create a spool file
meanwhile: a file is an orphan exactly when no row refers to it, by
``path`` or by ``upload_path``.

A row whose received file (``path``) is missing is failed with the reason.  A row whose
J2K copy (``upload_path``) is missing but whose received file is present loses nothing
that cannot be redone: if it was still to be uploaded it goes back to ``received`` to be
compressed again; otherwise (uploaded, failed) only the dangling ``upload_path`` is
cleared, so that a later retry compresses again rather than send a missing file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import instances
from ..spool import Spool
from ..store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reconciliation:
    temp_files_removed: int
    orphans_removed: int
    requeued: int
    missing_files: int
    recompress: int = 0


def reconcile(spool: Spool, store: Store) -> Reconciliation:
    temp_removed = spool.clean_tmp()

    rows = store.read(instances.file_references)
    referenced = {relpath for row in rows for relpath in row if relpath}
    on_disk = spool.stored_relpaths()
    orphans = on_disk - referenced
    for relpath in orphans:
        spool.remove(relpath)
    missing = {path for path, _ in rows if path and path not in on_disk}
    missing_copies = {
        upload_path
        for path, upload_path in rows
        if upload_path and upload_path not in on_disk and path in on_disk
    }
    requeued, recompress = store.submit(
        instances.repair_missing_files(missing, missing_copies)
    ).result()
    result = Reconciliation(temp_removed, len(orphans), requeued, len(missing), recompress)
    if missing:
        log.error("reconcile: %d queued files are missing from the spool", len(missing))
    if missing_copies:
        log.error("reconcile: %d compressed copies are missing from the spool; %d "
                  "instances go back to compression", len(missing_copies), recompress)  # fmt: skip
    log.info(
        "reconcile: removed %d temp files and %d orphan files, requeued %d rows",
        result.temp_files_removed,
        result.orphans_removed,
        result.requeued,
    )
    return result

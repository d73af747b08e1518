"""Per-study proof of delivery: how far each study is on its way to the archive.

A study's instances go through the stages

    received -> compressed -> uploaded -> confirmed (-> committed)

*received*: its queue row exists (the C-STORE was acknowledged); *compressed*: the
compress stage is done with the copy held (encoded, or kept as received);
*uploaded*: the archive's STOW-RS answer said stored; *confirmed*: the archive
confirmed that copy (the same answer, or with ``commitment.verify = "qido"`` a
QIDO-RS search after it); *committed*: a Storage Commitment report the modality
acknowledged said so.  :class:`StudyProgress` counts each stage with its first and
last time, from the queue (gateway/instances.py) and the commitments
(gateway/commitment/requests.py).  A study is *complete* once no new instance of it
arrived for ``study.quiet_seconds`` (as mercure's series-complete trigger); its
``stage`` is then the furthest stage every instance reached (``failed`` if the
archive refused one for good), and ``receiving`` before.

``dicom-gateway study ls`` / ``study show UID``, ``GET /api/studies`` and
``/api/studies/{uid}`` and the status page show it.  :class:`StudyTracker` observes,
for each complete study whose every instance is confirmed, the time from its first
receipt to the archive's confirmation of its last instance
(``dicom_gateway_study_confirmation_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from . import instances
from .commitment import requests as commitment_requests

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)

StudyStage = Literal[
    "receiving", "received", "compressed", "uploaded", "confirmed", "committed", "failed"
]
#: The stages in order (``stage`` is the furthest every instance of a complete study reached).
STAGES: tuple[StudyStage, ...] = ("received", "compressed", "uploaded", "confirmed", "committed")
#: How many recent studies the tracker looks at each round.
_TRACKED = 200
_TRACK_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Stage:
    """How many of a study's instances reached a stage, and when the first and the
    last of them did (None: none has)."""

    count: int
    first_at: str | None
    last_at: str | None


@dataclass(frozen=True)
class StudyProgress:
    study_instance_uid: str
    calling_aes: tuple[str, ...]
    instances: int
    stage: StudyStage
    #: No new instance for ``study.quiet_seconds``; ``complete_at``: when it was (or
    #: will be, if nothing more arrives).
    complete: bool
    complete_at: str
    received: Stage
    compressed: Stage
    uploaded: Stage
    confirmed: Stage
    committed: Stage
    #: Refused by the archive for good (``failed`` in the queue).
    failed: int
    #: From the first receipt to the archive's confirmation of the last instance, once
    #: every instance is confirmed (None: not yet).
    seconds_to_confirmed: float | None


def _seconds(start: str, end: str) -> float:
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def progress_of(
    study_instance_uid: str,
    rows: instances.StudyRows,
    committed: tuple[int, str | None, str | None] | None,
    quiet_seconds: float,
    now: datetime,
) -> StudyProgress:
    """The proof of delivery of one study (pure: from what the tables said at *now*)."""
    n = rows.instances
    complete_at = datetime.fromisoformat(rows.received_last) + timedelta(seconds=quiet_seconds)
    complete = now >= complete_at
    c_count, c_first, c_last = committed or (0, None, None)
    stages = {
        "received": Stage(n, rows.received_first, rows.received_last),
        "compressed": Stage(rows.compressed, rows.compressed_first, rows.compressed_last),
        "uploaded": Stage(rows.uploaded, rows.uploaded_first, rows.uploaded_last),
        "confirmed": Stage(rows.confirmed, rows.confirmed_first, rows.confirmed_last),
        "committed": Stage(min(c_count, n), c_first, c_last),
    }
    stage: StudyStage = "receiving"
    if complete:
        stage = "failed" if rows.failed else "received"
        if not rows.failed:
            for name in STAGES:
                if stages[name].count >= n:
                    stage = name
    all_confirmed = rows.confirmed >= n and rows.confirmed_last is not None
    return StudyProgress(
        study_instance_uid=study_instance_uid,
        calling_aes=rows.calling_aes,
        instances=n,
        stage=stage,
        complete=complete,
        complete_at=complete_at.isoformat(timespec="microseconds"),
        received=stages["received"],
        compressed=stages["compressed"],
        uploaded=stages["uploaded"],
        confirmed=stages["confirmed"],
        committed=stages["committed"],
        failed=rows.failed,
        seconds_to_confirmed=(
            _seconds(rows.received_first, rows.confirmed_last)  # type: ignore[arg-type]
            if all_confirmed
            else None
        ),
    )


def recent(conn: sqlite3.Connection, limit: int, quiet_seconds: float) -> list[StudyProgress]:
    """The *limit* studies received most recently, newest first (a read)."""
    uids = instances.recent_studies(conn, limit)
    committed = commitment_requests.committed_by_study(conn, uids)
    now = datetime.now(UTC)
    out = []
    for uid in uids:
        rows = instances.study_rows(conn, uid)
        if rows is not None:
            out.append(progress_of(uid, rows, committed.get(uid), quiet_seconds, now))
    return out


def one(
    conn: sqlite3.Connection, study_instance_uid: str, quiet_seconds: float
) -> StudyProgress | None:
    """One study's proof of delivery (None: no instance of it is known; a read)."""
    rows = instances.study_rows(conn, study_instance_uid)
    if rows is None:
        return None
    committed = commitment_requests.committed_by_study(conn, [study_instance_uid])
    return progress_of(
        study_instance_uid, rows, committed.get(study_instance_uid), quiet_seconds,
        datetime.now(UTC),
    )  # fmt: skip


class StudyTracker:
    """Observes ``dicom_gateway_study_confirmation_seconds`` (through *observe*, the
    histogram's) once per study that became complete and fully confirmed while the
    gateway ran (a study that gets more instances later and is confirmed again is
    observed again)."""

    def __init__(
        self, store: Store, quiet_seconds: float, observe: Callable[[float], None] | None
    ) -> None:
        self.store = store
        self.quiet_seconds = quiet_seconds
        self._observe = observe
        #: Study -> the last receipt it was observed with.
        self._seen: dict[str, str] = {}
        self._primed = False

    def observe(self, studies: list[StudyProgress]) -> int:
        """Observe the newly done among *studies* (the first call only notes what is
        done already: it was, before this start); gives how many were observed."""
        observed = 0
        for p in studies:
            if not (p.complete and p.seconds_to_confirmed is not None):
                continue
            last = p.received.last_at or ""
            if self._seen.get(p.study_instance_uid) == last:
                continue
            self._seen[p.study_instance_uid] = last
            if self._primed and self._observe is not None:
                self._observe(p.seconds_to_confirmed)
                observed += 1
        self._primed = True
        if len(self._seen) > 4 * _TRACKED:  # only the recent ones can come back
            keep = {p.study_instance_uid for p in studies}
            self._seen = {k: v for k, v in self._seen.items() if k in keep}
        return observed

    async def run(self) -> None:
        while True:
            studies = await asyncio.to_thread(
                self.store.read, lambda conn: recent(conn, _TRACKED, self.quiet_seconds)
            )
            self.observe(studies)
            await asyncio.sleep(_TRACK_INTERVAL_S)

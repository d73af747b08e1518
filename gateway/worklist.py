"""Modality Worklist: a local cache that keeps answering when the RIS or the WAN is down.

Sources fill the cache (so far: an upstream MWL SCP polled with C-FIND every
``worklist.refresh_seconds``); the MWL SCP answers modalities from the cache only.
Each refresh replaces what that source holds, so the cache follows the upstream
within one period; a failed refresh keeps the last good items and records the error.
Items whose scheduled date is more than ``worklist.expire_after_days`` in the past
are dropped.  Items are kept as DICOM JSON, with their Specific Character Set, so
names in any character set go back out as they came in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from .config import Config
from .store import Store, WriteFn, utcnow
from .worklist_match import find

log = logging.getLogger(__name__)

UPSTREAM_SOURCE = "upstream-mwl"

_PATIENT_KEYS = [
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "PatientWeight", "AdmissionID", "AccessionNumber",
    "RequestedProcedureID", "RequestedProcedureDescription", "RequestedProcedurePriority",
    "StudyInstanceUID", "ReferringPhysicianName", "RequestingPhysician",
]  # fmt: skip
_STEP_KEYS = [
    "Modality", "ScheduledStationAETitle", "ScheduledStationName",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID", "ScheduledProcedureStepLocation",
]  # fmt: skip

#: Scheduled Procedure Step Status shown for a step an MPPS reported on.
_SPS_STATUS = {"IN PROGRESS": "STARTED", "DISCONTINUED": "DISCONTINUED"}


def universal_query() -> Dataset:
    """Every item, with the attributes a modality's worklist screen uses."""
    query = Dataset()
    for key in _PATIENT_KEYS:
        # An empty Specific Character Set asks for the item's own, so names in any
        # character set arrive decodable.
        setattr(query, key, "")
    step = Dataset()
    for key in _STEP_KEYS:
        setattr(step, key, "")
    query.ScheduledProcedureStepSequence = Sequence([step])
    return query


@dataclass(frozen=True)
class CachedItem:
    item_id: str
    scheduled_date: str
    dataset_json: str


def _identity(source: str, ds: Dataset) -> str:
    steps = ds.get("ScheduledProcedureStepSequence") or [Dataset()]
    parts = [
        source,
        str(ds.get("AccessionNumber", "")),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("PatientID", "")),
        str(steps[0].get("ScheduledProcedureStepID", "")),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def to_cached(source: str, ds: Dataset) -> CachedItem:
    steps = ds.get("ScheduledProcedureStepSequence") or [Dataset()]
    return CachedItem(
        item_id=_identity(source, ds),
        scheduled_date=str(steps[0].get("ScheduledProcedureStepStartDate", "")),
        dataset_json=json.dumps(ds.to_json_dict()),
    )


def _replace_source(source: str, items: list[CachedItem]) -> WriteFn[int]:
    def write(conn: sqlite3.Connection) -> int:
        now = utcnow()
        conn.execute("DELETE FROM worklist_items WHERE source = ?", (source,))
        conn.executemany(
            "INSERT OR REPLACE INTO worklist_items"
            " (item_id, source, scheduled_date, dataset, last_seen_at) VALUES (?, ?, ?, ?, ?)",
            [(i.item_id, source, i.scheduled_date, i.dataset_json, now) for i in items],
        )
        conn.execute(
            "INSERT INTO worklist_sources (source, last_attempt_at, last_success_at, last_error,"
            " item_count) VALUES (?, ?, ?, NULL, ?) ON CONFLICT (source) DO UPDATE SET"
            " last_attempt_at = excluded.last_attempt_at,"
            " last_success_at = excluded.last_success_at, last_error = NULL,"
            " item_count = excluded.item_count",
            (source, now, now, len(items)),
        )
        return len(items)

    return write


def _record_failure(source: str, error: str) -> WriteFn[None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO worklist_sources (source, last_attempt_at, last_error, item_count)"
            " VALUES (?, ?, ?, 0) ON CONFLICT (source) DO UPDATE SET"
            " last_attempt_at = excluded.last_attempt_at, last_error = excluded.last_error",
            (source, utcnow(), error),
        )

    return write


def _expire(before: str) -> WriteFn[int]:
    def write(conn: sqlite3.Connection) -> int:
        return conn.execute(
            "DELETE FROM worklist_items WHERE scheduled_date != '' AND scheduled_date < ?",
            (before,),
        ).rowcount

    return write


def query_upstream(config: Config) -> list[Dataset]:
    """C-FIND every item from the upstream MWL SCP (blocking; run it in a thread)."""
    w = config.worklist
    ae = AE(ae_title=config.dimse.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate(w.upstream_host, w.upstream_port, ae_title=w.upstream_ae)
    if not assoc.is_established:
        raise ConnectionError(
            f"upstream worklist {w.upstream_ae}@{w.upstream_host}:{w.upstream_port} "
            "refused or did not answer the association"
        )
    items: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(
            universal_query(), ModalityWorklistInformationFind
        ):
            if not status:
                raise ConnectionError("upstream worklist: C-FIND got no response (timeout)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                items.append(identifier)
            elif code != 0x0000:
                raise ConnectionError(f"upstream worklist: C-FIND failed with 0x{code:04X}")
    finally:
        assoc.release()
    return items


class Worklist:
    """The cache, its refresh loop, and the C-FIND handler the receiver calls."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store

    async def run(self) -> None:
        w = self.config.worklist
        if not w.upstream_host:
            return
        while True:
            await self.refresh_upstream()
            await asyncio.sleep(w.refresh_seconds)

    async def refresh_upstream(self) -> None:
        try:
            datasets = await asyncio.to_thread(query_upstream, self.config)
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("worklist refresh from upstream failed, serving the cache: %s", exc)
            await asyncio.wrap_future(
                self.store.submit(_record_failure(UPSTREAM_SOURCE, str(exc)), durable=False)
            )
            return
        items = [to_cached(UPSTREAM_SOURCE, ds) for ds in datasets]
        count = await asyncio.wrap_future(
            self.store.submit(_replace_source(UPSTREAM_SOURCE, items))
        )
        expired = await asyncio.wrap_future(self.store.submit(_expire(self._expiry_cutoff())))
        log.info("worklist refreshed from upstream: %d items (%d expired)", count, expired)

    def _expiry_cutoff(self) -> str:
        days = self.config.worklist.expire_after_days
        return (date.today() - timedelta(days=days)).strftime("%Y%m%d")

    def cached(self) -> Iterator[Dataset]:
        """The items to answer from, with what MPPS told us (gateway/mpps.py): a step
        the modality COMPLETED is left out (it is done; offering it again invites a
        second exam under the same accession); one IN PROGRESS or DISCONTINUED stays,
        its Scheduled Procedure Step Status STARTED or DISCONTINUED, so it can be
        resumed or redone."""
        cutoff = self._expiry_cutoff()
        for row in self.store.rows(
            "SELECT w.dataset, m.mpps_status FROM worklist_items w"
            " LEFT JOIN worklist_mpps m ON m.item_id = w.item_id"
            " WHERE w.scheduled_date = '' OR w.scheduled_date >= ?",
            (cutoff,),
        ):
            mpps_status = row["mpps_status"]
            if mpps_status == "COMPLETED":
                continue
            ds = Dataset.from_json(row["dataset"])
            if mpps_status in _SPS_STATUS:
                for step in ds.get("ScheduledProcedureStepSequence") or []:
                    step.ScheduledProcedureStepStatus = _SPS_STATUS[mpps_status]
            yield ds

    def answer(self, query: Dataset) -> Iterator[Dataset]:
        """Responses for a modality's C-FIND, from the cache alone."""
        return find(self.cached(), query)

    def freshness(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store.rows("SELECT * FROM worklist_sources")]

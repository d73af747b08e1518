"""Modality Worklist: a local cache that keeps answering when the RIS or the WAN is down.

Sources fill the cache, in any combination: an upstream MWL SCP polled with C-FIND
and a UPS-RS worklist searched over HTTPS, both every ``worklist.refresh_seconds``,
and a drop folder of hand-made entries rescanned every ``worklist.drop_scan_seconds``
(:mod:`gateway.worklist.sources`).  The MWL SCP answers modalities from the cache only.
Each refresh replaces what that source holds, so the cache follows it within one
period; a failed refresh keeps the last good items and records the error.  Items whose
scheduled date is more than ``worklist.expire_after_days`` in the past are dropped.
Items are kept as DICOM JSON, with their Specific Character Set, so names in any
character set go back out as they came in (the cache's tables and their SQL:
gateway/worklist/cache.py).

A query is answered in two steps: SQL narrows the rows by the step's date, modality
and station and by patient ID and accession number, using columns that hold a value
only when it is certain (one step, one value); everything else (NULL) always passes.
The DICOM matching of :mod:`gateway.worklist.match` then decides on what is left.
Parsed items are kept in memory and reused while their stored JSON is unchanged, and
so are the responses to the last queries while the rows they came from are: a
modality asks the same question every minute or so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import date, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from ..config import Config
from ..dicom import negotiation
from ..dicom.dimse_status import FIND_PENDING, FIND_PENDING_WARNING, SUCCESS
from ..dicom.find_encoding import PreEncoded
from ..store import Store
from . import cache as worklist_cache
from .cache import DICOM_DATE, CachedItem
from .match import find
from .sources import DROP_SOURCE, UPS_SOURCE, DropFolder, SourceError, UpsClient, ups_to_mwl

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


def _identity(source: str, ds: Dataset, extra: str = "") -> str:
    steps = ds.get("ScheduledProcedureStepSequence") or [Dataset()]
    parts = [
        source,
        str(ds.get("AccessionNumber", "")),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("PatientID", "")),
        str(steps[0].get("ScheduledProcedureStepID", "")),
        extra,
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


_ANSWERS_KEPT = 64  # distinct queries whose responses are kept (one per modality, roughly)
# Parsed items and remembered responses kept, at most.  Each is a hundred or so Python
# objects that every full garbage collection walks, in every thread's time: 2,000 cost
# about 55 ms once in a while, 10,000 about 0.25 s.  A day's worklist for a few
# modalities fits; a query for everything is answered, just not all of it kept.
_PARSED_KEPT = 2000
_RESPONSES_KEPT = 2000


def _one_value(ds: Dataset | None, keyword: str) -> str | None:
    value = ds.get(keyword) if ds is not None else None
    if not isinstance(value, str):  # absent, or several values
        return None
    return value.strip(" \x00") or None


def to_cached(source: str, ds: Dataset, extra: str = "") -> CachedItem:
    """The row for *ds*; *extra* tells apart items the source has no other key for."""
    steps = ds.get("ScheduledProcedureStepSequence") or [Dataset()]
    step = steps[0] if len(steps) == 1 else None
    date = _one_value(step, "ScheduledProcedureStepStartDate")
    # For the expiry, compared as text: YYYYMMDD, also from an ACR-NEMA "YYYY.MM.DD";
    # anything else is kept ('' never expires) rather than guessed at.
    first = str(steps[0].get("ScheduledProcedureStepStartDate", "")).strip().replace(".", "")
    return CachedItem(
        item_id=_identity(source, ds, extra),
        scheduled_date=first if DICOM_DATE.fullmatch(first) else "",
        dataset_json=json.dumps(ds.to_json_dict()),
        step_date=date if date and DICOM_DATE.fullmatch(date) else None,
        modality=_one_value(step, "Modality"),
        station_ae=_one_value(step, "ScheduledStationAETitle"),
        patient_id=_one_value(ds, "PatientID"),
        accession=_one_value(ds, "AccessionNumber"),
    )


def _drop_row(name: str, index: int, ds: Dataset) -> CachedItem:
    return to_cached(DROP_SOURCE, ds, extra=f"{name}#{index}")


def query_upstream(config: Config) -> list[Dataset]:
    """C-FIND every item from the upstream MWL SCP (blocking; run it in a thread)."""
    w = config.worklist
    # A plain AE, not the receiving server's: it advertises pynetdicom's default
    # maximum PDU and dimse.max_pdu_size does not apply (gateway/dicom/patches.py).
    ae = AE(ae_title=config.dimse.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(
        ModalityWorklistInformationFind, list(negotiation.SCU_TRANSFER_SYNTAXES)
    )
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
            if code in (FIND_PENDING, FIND_PENDING_WARNING) and identifier is not None:
                items.append(identifier)
            elif code != SUCCESS:
                raise ConnectionError(f"upstream worklist: C-FIND failed with 0x{code:04X}")
    finally:
        assoc.release()
    return items


class Worklist:
    """The cache, its refresh loops, and the C-FIND handler the receiver calls."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        w = config.worklist
        self._drop = DropFolder(w.drop_folder, _drop_row) if w.drop_folder is not None else None
        self._drop_error_logged: str | None = None
        # item_id -> (stored JSON, parsed item); C-FIND threads share it (GIL-atomic ops).
        self._parsed: dict[str, tuple[tuple[str, str | None], Dataset]] = {}
        # query (as DICOM JSON) -> (the rows it was answered from, the responses).
        self._answers: dict[str, tuple[list[tuple[str, str, str | None]], list[Dataset]]] = {}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for seconds, refresh in self._sources().values():
                tg.create_task(self._every(seconds, refresh))

    def _sources(self) -> dict[str, tuple[float, Callable[[], Awaitable[None]]]]:
        """Each source :meth:`run` reads: seconds between two reads, and the read."""
        w = self.config.worklist
        sources: dict[str, tuple[float, Callable[[], Awaitable[None]]]] = {}
        if w.upstream_host:
            sources[UPSTREAM_SOURCE] = (w.refresh_seconds, self.refresh_upstream)
        if w.ups_url:
            sources[UPS_SOURCE] = (w.refresh_seconds, self.refresh_ups)
        if self._drop is not None:
            sources[DROP_SOURCE] = (w.drop_scan_seconds, self.scan_drop_folder)
        return sources

    def refresh_intervals(self) -> dict[str, float]:
        """Seconds between two reads of each configured source (the status shows them)."""
        return {source: seconds for source, (seconds, _) in self._sources().items()}

    @staticmethod
    async def _every(seconds: float, refresh: Callable[[], Awaitable[None]]) -> None:
        while True:
            await refresh()
            await asyncio.sleep(seconds)

    async def refresh_upstream(self) -> None:
        try:
            datasets = await asyncio.to_thread(query_upstream, self.config)
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("worklist refresh from upstream failed, serving the cache: %s", exc)
            await self._failed(UPSTREAM_SOURCE, str(exc))
            return
        items = await asyncio.to_thread(lambda: [to_cached(UPSTREAM_SOURCE, ds) for ds in datasets])
        count, expired = await self._replace(UPSTREAM_SOURCE, items)
        log.info("worklist refreshed from upstream: %d items (%d expired)", count, expired)

    async def refresh_ups(self) -> None:
        try:
            answer = await UpsClient(self.config).scheduled(self._expiry_cutoff())
        except SourceError as exc:
            log.error("worklist refresh from UPS-RS failed, serving the cache: %s", exc)
            await self._failed(UPS_SOURCE, str(exc))
            return

        def convert() -> tuple[list[CachedItem], list[str]]:
            items, problems = [], list(answer.problems)
            for ups in answer.workitems:
                uid = str(ups.get("SOPInstanceUID", ""))
                try:
                    items.append(to_cached(UPS_SOURCE, ups_to_mwl(ups), extra=uid))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    problems.append(f"workitem {uid or '(no UID)'}: {exc}")
            return items, problems

        items, problems = await asyncio.to_thread(convert)
        for problem in problems:
            log.warning("worklist UPS-RS: skipped %s", problem)
        count, expired = await self._replace(UPS_SOURCE, items, "; ".join(problems) or None)
        log.info("worklist refreshed from UPS-RS: %d items (%d expired)", count, expired)

    async def scan_drop_folder(self) -> None:
        assert self._drop is not None
        try:
            scan = await asyncio.to_thread(self._drop.scan)
        except SourceError as exc:
            # Rescanned every few seconds: say it once, until it changes.
            if str(exc) != self._drop_error_logged:
                log.error("worklist drop folder failed, serving the cache: %s", exc)
                self._drop_error_logged = str(exc)
            await self._failed(DROP_SOURCE, str(exc))
            return
        self._drop_error_logged = None
        if not scan.changed:
            await self.store.run(worklist_cache.record_unchanged(DROP_SOURCE), durable=False)
            return
        items = scan.items
        error = "; ".join(scan.errors) or None
        count, expired = await self._replace(DROP_SOURCE, items, error)
        log.info(
            "worklist drop folder loaded: %d items, %d files skipped (%d expired)",
            count,
            len(scan.errors),
            expired,
        )

    async def _failed(self, source: str, error: str) -> None:
        await self.store.run(worklist_cache.record_failure(source, error), durable=False)

    async def _replace(
        self, source: str, items: list[CachedItem], error: str | None = None
    ) -> tuple[int, int]:
        cutoff = self._expiry_cutoff()
        # Already past the expiry: not cached, and not counted as the source's items.
        items = [i for i in items if not (i.scheduled_date and i.scheduled_date < cutoff)]
        count, gone = await self.store.run(worklist_cache.replace_source(source, items, error))
        expired = await self.store.run(worklist_cache.expire(cutoff))
        for item_id in (*gone, *expired):
            self._parsed.pop(item_id, None)
        return count, len(expired)

    def _expiry_cutoff(self) -> str:
        days = self.config.worklist.expire_after_days
        return (date.today() - timedelta(days=days)).strftime("%Y%m%d")

    def _item(self, item_id: str, text: str, mpps_status: str | None) -> Dataset:
        hit = self._parsed.get(item_id)
        if hit is not None and hit[0] == (text, mpps_status):
            return hit[1]
        ds = Dataset.from_json(text)
        if mpps_status in _SPS_STATUS:
            for step in ds.get("ScheduledProcedureStepSequence") or []:
                step.ScheduledProcedureStepStatus = _SPS_STATUS[mpps_status]
        if len(self._parsed) >= _PARSED_KEPT:
            self._parsed.clear()
        self._parsed[item_id] = ((text, mpps_status), ds)
        return ds

    def _rows(self, query: Dataset | None) -> list[tuple[str, str, str | None]]:
        cutoff = self._expiry_cutoff()
        return self.store.read(lambda conn: worklist_cache.unexpired(conn, cutoff, query))

    def cached(self, query: Dataset | None = None) -> Iterator[Dataset]:
        """The unexpired items, narrowed for *query* when given (blocking: SQLite)."""
        for item_id, text, mpps_status in self._rows(query):
            yield self._item(item_id, text, mpps_status)

    def answer(self, query: Dataset) -> Iterator[Dataset]:
        """Responses for a modality's C-FIND, from the cache alone (blocking: SQLite)."""
        try:
            key: str | None = json.dumps(query.to_json_dict(), sort_keys=True)
        except (ValueError, TypeError, KeyError, AttributeError):
            key = None  # a query pydicom cannot write as JSON is answered, not remembered
        rows = self._rows(query)
        hit = self._answers.get(key) if key is not None else None
        if hit is not None and hit[0] == rows:
            # The same query over the same stored items: the same responses (they are
            # only read from here on, by the SCP encoding them).
            yield from hit[1]
            return
        responses: list[Dataset] = []
        for found in find((self._item(i, t, m) for i, t, m in rows), query):
            # Kept unchanged from here on: encoded once per transfer syntax.
            response = PreEncoded(found)
            responses.append(response)
            yield response
        if key is not None and len(responses) <= _RESPONSES_KEPT:
            kept = sum(len(r) for _, r in self._answers.values())
            if len(self._answers) >= _ANSWERS_KEPT or kept + len(responses) > _RESPONSES_KEPT:
                self._answers.clear()
            self._answers[key] = (rows, responses)

    def freshness(self) -> list[dict[str, Any]]:
        """Per source: last attempt, last success, last error, item count (blocking)."""
        return self.store.read(worklist_cache.freshness)

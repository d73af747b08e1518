"""Modality Performed Procedure Step, the SCP: what the modalities send us.

The modality tells us it started (N-CREATE, status IN PROGRESS) and finished
(N-SET, COMPLETED or DISCONTINUED) a procedure step.  Each request is checked against
PS3.4 F.7.2 and against the step as it stands, inside the store's writer transaction
(so two associations cannot both create the same instance), and answered only after
it committed durably: the step's current state, the message in the outbox
(gateway/mpps/outbox.py), and the MPPS status of the worklist item(s) it refers to
(gateway/worklist/cache.py).  The forwarder (gateway/mpps/forwarder.py) sends the
outbox on to the RIS.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from io import BytesIO
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from ..clock import utcnow
from ..config import is_valid_uid
from ..dicom.dimse_status import (
    DUPLICATE_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    INVALID_INSTANCE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_INSTANCE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
    Refused,
)
from ..store import Store, WriteFn
from ..worklist import cache as worklist_cache
from ..worklist.cache import StepRef
from . import outbox as mpps_outbox

log = logging.getLogger(__name__)

T = TypeVar("T")

MPPS_SOP_CLASS = str(ModalityPerformedProcedureStep)

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
FINAL = frozenset({COMPLETED, DISCONTINUED})
STEP_STATUSES = frozenset({IN_PROGRESS, COMPLETED, DISCONTINUED})

CREATE = "create"
SET = "set"

#: How long a handler waits for its commit before answering failure.
COMMIT_TIMEOUT_S = 60.0


# -- the rules (pure) -------------------------------------------------------------------


def check_create(status: str | None) -> None:
    """PS3.4 F.7.2.1.3: an N-CREATE is accepted only with status IN PROGRESS."""
    if status is None:
        raise Refused(MISSING_ATTRIBUTE, "Performed Procedure Step Status is missing")
    if status == "":
        raise Refused(MISSING_ATTRIBUTE_VALUE, "Performed Procedure Step Status is empty")
    if status != IN_PROGRESS:
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"N-CREATE status must be IN PROGRESS: {status!r}")


def check_set(current: str | None, new: str | None) -> str:
    """The status after an N-SET from *current* setting *new* (None: not set).

    PS3.4 F.7.2.2.3: a step that is COMPLETED or DISCONTINUED may no longer be
    updated (0x0110); from IN PROGRESS it may go to IN PROGRESS, COMPLETED or
    DISCONTINUED.  *current* None is an instance we do not know (0x0112).
    """
    if current is None:
        raise Refused(NO_SUCH_INSTANCE, "no such Performed Procedure Step")
    if current in FINAL:
        raise Refused(PROCESSING_FAILURE, f"step is {current}: it may no longer be updated")
    if new is None:
        return current
    if new not in STEP_STATUSES:
        raise Refused(INVALID_ATTRIBUTE_VALUE, f"not a Performed Procedure Step Status: {new!r}")
    return new


def _status_of(ds: Dataset) -> str | None:
    if "PerformedProcedureStepStatus" not in ds:
        return None
    value = ds.PerformedProcedureStepStatus
    return str(value).strip() if value is not None else ""


# -- data set bytes -------------------------------------------------------------------
# Stored and forwarded as Explicit VR Little Endian, whatever syntax the modality used.


def to_bytes(ds: Dataset) -> bytes:
    data = encode(ds, False, True)
    if data is None:
        raise ValueError("data set cannot be encoded")
    return data


def _encoded(ds: Dataset) -> bytes:
    try:
        return to_bytes(ds)
    except Exception as exc:  # pydicom raises a wide range on values it cannot write
        raise Refused(PROCESSING_FAILURE, f"data set cannot be encoded: {exc!r}") from exc


def from_bytes(data: bytes) -> Dataset:
    return decode(BytesIO(data), False, True)


def _parse_fully(ds: Dataset) -> None:
    """pydicom parses lazily: touch every value now, so bad data is refused here and
    not met later by the forwarder."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _parse_fully(item)
        else:
            _ = elem.value


# -- worklist references ---------------------------------------------------------------


def step_refs(ds: Dataset) -> list[StepRef]:
    refs = []
    for item in ds.get("ScheduledStepAttributesSequence") or []:
        ref = StepRef(
            str(item.get("StudyInstanceUID", "") or ""),
            str(item.get("AccessionNumber", "") or ""),
            str(item.get("RequestedProcedureID", "") or ""),
            str(item.get("ScheduledProcedureStepID", "") or ""),
        )
        if ref.accession_number or ref.scheduled_procedure_step_id or ref.study_instance_uid:
            refs.append(ref)  # an unscheduled step (all empty) refers to nothing
    return refs


# -- database writes (run in the store's writer thread) ---------------------------------


def record_create(uid: str, attributes: Dataset, calling_ae: str) -> WriteFn[int]:
    """Accept an N-CREATE: the step, its outbox row, the worklist mark.  Raises
    :class:`Refused` (nothing written) for a duplicate or a wrong status."""
    check_create(_status_of(attributes))
    data = _encoded(attributes)
    refs = step_refs(attributes)

    def write(conn: sqlite3.Connection) -> int:
        now = utcnow()
        if mpps_outbox.has_step(conn, uid):
            raise Refused(DUPLICATE_INSTANCE, "this Performed Procedure Step already exists")
        mpps_outbox.create_step(conn, uid, IN_PROGRESS, data, calling_ae, now)
        worklist_cache.mark_mpps(conn, uid, refs, IN_PROGRESS, now)
        return mpps_outbox.enqueue(conn, uid, CREATE, data, False, now)

    return write


def record_set(uid: str, modifications: Dataset) -> WriteFn[str]:
    """Accept an N-SET: merge it into the step, queue it, follow the worklist mark.
    The future gives the step's new status; raises :class:`Refused` otherwise."""
    new = _status_of(modifications)
    data = _encoded(modifications)

    def write(conn: sqlite3.Connection) -> str:
        now = utcnow()
        step = mpps_outbox.step(conn, uid)
        status = check_set(step.status if step is not None else None, new)
        assert step is not None  # check_set refuses an unknown step
        current = from_bytes(step.dataset)
        for elem in modifications:
            current[elem.tag] = elem  # a sequence is replaced whole (PS3.4 F.7.2.2.2)
        mpps_outbox.update_step(conn, uid, status, _encoded(current), now)
        worklist_cache.follow_mpps(conn, uid, status, now)
        mpps_outbox.enqueue(conn, uid, SET, data, status in FINAL, now)
        return status

    return write


# -- the SCP handlers (called from the receiver's association threads) -------------------


class MppsScp:
    """N-CREATE / N-SET of the MPPS SOP Class: validate, commit durably, then answer."""

    def __init__(self, store: Store, on_accepted: Callable[[], None] | None = None) -> None:
        self.store = store
        self.on_accepted = on_accepted

    def n_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        req = event.request
        assert isinstance(req, N_CREATE)
        requestor = event.assoc.requestor
        uid = str(req.AffectedSOPInstanceUID or "")
        generated = not uid
        if generated:
            # PS3.7 10.1.5.1.2: the SCP assigns the UID and returns it.
            uid = generate_uid()
        where = f"from {requestor.ae_title!r} at {requestor.address} sop={uid}"
        try:
            if not generated and not is_valid_uid(uid):
                raise Refused(INVALID_INSTANCE, "Affected SOP Instance UID is not a valid UID")
            attributes = self._decoded(lambda: event.attribute_list)
            seq = self._commit(record_create(uid, attributes, requestor.ae_title))
        except Refused as exc:
            log.warning("MPPS N-CREATE %s refused 0x%04X: %s", where, exc.status, exc)
            return exc.as_status(), None
        log.info("MPPS N-CREATE %s accepted: IN PROGRESS (outbox #%d)", where, seq)
        self._accepted()
        if generated:
            reply = Dataset()
            reply.AffectedSOPInstanceUID = uid
            return SUCCESS, reply
        return SUCCESS, None

    def n_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        req = event.request
        assert isinstance(req, N_SET)
        requestor = event.assoc.requestor
        uid = str(req.RequestedSOPInstanceUID or "")
        where = f"from {requestor.ae_title!r} at {requestor.address} sop={uid}"
        try:
            if not is_valid_uid(uid):
                raise Refused(INVALID_INSTANCE, "Requested SOP Instance UID is not a valid UID")
            modifications = self._decoded(lambda: event.modification_list)
            status = self._commit(record_set(uid, modifications))
        except Refused as exc:
            log.warning("MPPS N-SET %s refused 0x%04X: %s", where, exc.status, exc)
            return exc.as_status(), None
        log.info("MPPS N-SET %s accepted: %s", where, status)
        self._accepted()
        return SUCCESS, None

    @staticmethod
    def _decoded(get: Callable[[], Dataset]) -> Dataset:
        try:
            ds = get()
            _parse_fully(ds)
        except Exception as exc:  # pydicom raises a wide range on malformed input
            raise Refused(PROCESSING_FAILURE, f"data set cannot be decoded: {exc!r}") from exc
        return ds

    def _commit(self, fn: WriteFn[T]) -> T:
        try:
            return self.store.submit(fn).result(timeout=COMMIT_TIMEOUT_S)
        except Refused:
            raise
        except Exception as exc:  # StoreClosed, a timeout, any database error
            log.error("MPPS commit failed: %r", exc)
            raise Refused(RESOURCE_LIMITATION, "gateway cannot store it now, send again") from exc

    def _accepted(self) -> None:
        if self.on_accepted is not None:
            self.on_accepted()

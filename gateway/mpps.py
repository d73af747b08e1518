"""Modality Performed Procedure Step: SCP for the modalities, store-and-forward upstream.

The modality tells us it started (N-CREATE, status IN PROGRESS) and finished
(N-SET, COMPLETED or DISCONTINUED) a procedure step.  Each request is checked against
PS3.4 F.7.2 and against the step as it stands, inside the store's writer transaction
(so two associations cannot both create the same instance), and answered only after
it committed durably: the step's current state, the message in the outbox, and the
MPPS status of the worklist item(s) it refers to.

The :class:`Forwarder` sends the outbox to the upstream MPPS SCP (``[mpps]``) as an
SCU, in the order received, one association per round:

* strictly in order per MPPS instance: a message is sent only once every earlier
  message of its instance was accepted upstream (in practice the whole outbox goes
  out in one global FIFO order);
* the upstream unreachable, the association refused, no answer, or a status that
  says "not now" (0x0213 resource limitation, 0x0124 not authorised, 0xA7xx): the
  message stays queued and the whole forwarder backs off (exponential, with jitter),
  since every later message would meet the same upstream;
* a final refusal (any other failure status) marks the message ``failed`` with the
  upstream's status and comment; later messages of the *same* instance are marked
  ``failed`` too (an N-SET of a step the upstream never created cannot succeed),
  and messages of other instances go on.
* a re-send after we crashed or lost the answer mid-send: 0x0111 (duplicate) to an
  N-CREATE, or 0x0110 to an N-SET that ends the step, means the upstream already
  has it; both count as delivered and are logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from io import BytesIO
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from . import negotiation, patches
from .aio import wait_event
from .config import Config, is_valid_uid
from .store import Store, WriteFn, utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")

MPPS_SOP_CLASS = str(ModalityPerformedProcedureStep)

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
FINAL = frozenset({COMPLETED, DISCONTINUED})
STEP_STATUSES = frozenset({IN_PROGRESS, COMPLETED, DISCONTINUED})

# DIMSE statuses (PS3.7 C, PS3.4 F.7.2).
SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110  # also "may no longer be updated" (F.7.2.2.3)
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
INVALID_INSTANCE = 0x0117  # the SOP Instance UID breaks the UID rules
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
RESOURCE_LIMITATION = 0x0213  # shutting down, or the database cannot take the write

#: Upstream statuses that say nothing is wrong with the message: try again later.
_UPSTREAM_NOT_NOW = {0x0124, 0x0213}

# Outbox states.
PENDING = "pending"
SENDING = "sending"  # a crash leaves it here: re-sent, and it may have arrived
SENT = "sent"
FAILED = "failed"

CREATE = "create"
SET = "set"

#: How long a handler waits for its commit before answering failure.
COMMIT_TIMEOUT_S = 60.0
_IDLE_POLL_S = 5.0
_BATCH = 50
#: Delivered outbox rows and finished steps are kept this long, then pruned.
_KEEP_DAYS = 30
_PRUNE_INTERVAL_S = 3600.0


class Refused(Exception):
    """An MPPS request refused with *status*; ``str()`` is the Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment

    def as_status(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]  # LO
        return ds


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


@dataclass(frozen=True)
class StepRef:
    """What an MPPS says about the worklist item it performs."""

    study_instance_uid: str
    accession_number: str
    requested_procedure_id: str
    scheduled_procedure_step_id: str


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


def _mark_worklist(
    conn: sqlite3.Connection, uid: str, refs: list[StepRef], status: str, now: str
) -> int:
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
        [(item_id, uid, status, now) for item_id in marked],
    )
    return len(marked)


# -- database writes (run in the store's writer thread) ---------------------------------


def _enqueue(
    conn: sqlite3.Connection, uid: str, kind: str, data: bytes, final: bool, now: str
) -> int:
    row = conn.execute(
        "INSERT INTO mpps_outbox (sop_instance_uid, kind, dataset, final, received_at, state,"
        " next_attempt_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        (uid, kind, data, int(final), now, PENDING, now, now),
    ).fetchone()
    return int(row["seq"])


def record_create(uid: str, attributes: Dataset, calling_ae: str) -> WriteFn[int]:
    """Accept an N-CREATE: the step, its outbox row, the worklist mark.  Raises
    :class:`Refused` (nothing written) for a duplicate or a wrong status."""
    check_create(_status_of(attributes))
    data = _encoded(attributes)
    refs = step_refs(attributes)

    def write(conn: sqlite3.Connection) -> int:
        now = utcnow()
        if conn.execute("SELECT 1 FROM mpps WHERE sop_instance_uid = ?", (uid,)).fetchone():
            raise Refused(DUPLICATE_INSTANCE, "this Performed Procedure Step already exists")
        conn.execute(
            "INSERT INTO mpps (sop_instance_uid, status, dataset, calling_ae, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (uid, IN_PROGRESS, data, calling_ae, now, now),
        )
        _mark_worklist(conn, uid, refs, IN_PROGRESS, now)
        return _enqueue(conn, uid, CREATE, data, False, now)

    return write


def record_set(uid: str, modifications: Dataset) -> WriteFn[str]:
    """Accept an N-SET: merge it into the step, queue it, follow the worklist mark.
    The future gives the step's new status; raises :class:`Refused` otherwise."""
    new = _status_of(modifications)
    data = _encoded(modifications)

    def write(conn: sqlite3.Connection) -> str:
        now = utcnow()
        row = conn.execute(
            "SELECT status, dataset FROM mpps WHERE sop_instance_uid = ?", (uid,)
        ).fetchone()
        status = check_set(row["status"] if row else None, new)
        current = from_bytes(row["dataset"])
        for elem in modifications:
            current[elem.tag] = elem  # a sequence is replaced whole (PS3.4 F.7.2.2.2)
        conn.execute(
            "UPDATE mpps SET status = ?, dataset = ?, updated_at = ? WHERE sop_instance_uid = ?",
            (status, _encoded(current), now, uid),
        )
        conn.execute(
            "UPDATE worklist_mpps SET mpps_status = ?, updated_at = ? WHERE mpps_instance_uid = ?",
            (status, now, uid),
        )
        _enqueue(conn, uid, SET, data, status in FINAL, now)
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


# -- the forwarder --------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    seq: int
    sop_instance_uid: str
    kind: str
    dataset: bytes
    final: bool
    maybe_delivered: bool


class Outcome(Enum):
    DELIVERED = "delivered"
    REFUSED = "refused"  # final: the message is marked failed
    RETRY = "retry"  # the upstream cannot take it now: keep it, back off


@dataclass(frozen=True)
class Delivery:
    outcome: Outcome
    reason: str = ""
    maybe_delivered: bool = False  # the request may have reached the upstream


class UpstreamUnavailable(Exception):
    """The upstream cannot take *message* now (nor, presumably, any other)."""

    def __init__(self, reason: str, message: Message, maybe_delivered: bool = False) -> None:
        super().__init__(reason)
        self.message = message
        self.maybe_delivered = maybe_delivered


class _NoAssociation(Exception):
    pass


def classify(message: Message, status: Dataset) -> Delivery:
    """What an upstream answer (or its absence) means for *message*."""
    if "Status" not in status:
        return Delivery(Outcome.RETRY, "no answer from the upstream (timeout or abort)", True)
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "")
    said = f"0x{code:04X}" + (f" {comment}" if comment else "")
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return Delivery(Outcome.DELIVERED, "" if code == SUCCESS else f"warning {said}")
    if message.kind == CREATE and code == DUPLICATE_INSTANCE:
        return Delivery(Outcome.DELIVERED, f"upstream already has it ({said})")
    # Re-sent after a crash or a lost answer: the upstream already has the step.
    resent_final_set = message.kind == SET and message.final and message.maybe_delivered
    if resent_final_set and code == PROCESSING_FAILURE:
        return Delivery(Outcome.DELIVERED, f"upstream already has it ({said})")
    if code in _UPSTREAM_NOT_NOW or 0xA700 <= code <= 0xA7FF:
        return Delivery(Outcome.RETRY, f"upstream answered {said}")
    return Delivery(Outcome.REFUSED, f"upstream refused it: {said}")


def _at(seconds_from_now: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).isoformat(
        timespec="microseconds"
    )


def _requeue_interrupted(conn: sqlite3.Connection) -> int:
    """At start: a message we were sending when we stopped may have arrived."""
    return conn.execute(
        "UPDATE mpps_outbox SET state = ?, maybe_delivered = 1, updated_at = ? WHERE state = ?",
        (PENDING, utcnow(), SENDING),
    ).rowcount


def _next_batch(limit: int) -> WriteFn[list[Message]]:
    def write(conn: sqlite3.Connection) -> list[Message]:
        now = utcnow()
        # Later messages of a step whose earlier message failed can never be delivered.
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, updated_at = ?,"
            " last_error = 'not sent: an earlier message of this step failed upstream'"
            " WHERE state = ? AND EXISTS (SELECT 1 FROM mpps_outbox e"
            "  WHERE e.sop_instance_uid = mpps_outbox.sop_instance_uid"
            "  AND e.seq < mpps_outbox.seq AND e.state = ?)",
            (FAILED, now, PENDING, FAILED),
        )
        rows = conn.execute(
            "SELECT seq, sop_instance_uid, kind, dataset, final, maybe_delivered"
            " FROM mpps_outbox WHERE state = ? ORDER BY seq LIMIT ?",
            (PENDING, limit),
        ).fetchall()
        return [_message(r) for r in rows]

    return write


def _message(r: sqlite3.Row) -> Message:
    return Message(
        seq=r["seq"],
        sop_instance_uid=r["sop_instance_uid"],
        kind=r["kind"],
        dataset=r["dataset"],
        final=bool(r["final"]),
        maybe_delivered=bool(r["maybe_delivered"]),
    )


def _mark_sending(seq: int) -> WriteFn[None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, updated_at = ? WHERE seq = ?",
            (SENDING, utcnow(), seq),
        )

    return write


def _finish(seq: int, delivery: Delivery) -> WriteFn[None]:
    def write(conn: sqlite3.Connection) -> None:
        now = utcnow()
        if delivery.outcome is Outcome.DELIVERED:
            conn.execute(
                "UPDATE mpps_outbox SET state = ?, attempts = attempts + 1, sent_at = ?,"
                " last_error = ?, updated_at = ? WHERE seq = ?",
                (SENT, now, delivery.reason or None, now, seq),
            )
        else:
            conn.execute(
                "UPDATE mpps_outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " updated_at = ? WHERE seq = ?",
                (FAILED, delivery.reason, now, seq),
            )

    return write


def _retry(failure: UpstreamUnavailable, retry_in: float) -> WriteFn[None]:
    """The message stays first in line; its row shows the error and the next try."""

    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE mpps_outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
            " next_attempt_at = ?, maybe_delivered = maybe_delivered | ?, updated_at = ?"
            " WHERE seq = ?",
            (PENDING, str(failure), _at(retry_in), int(failure.maybe_delivered), utcnow(),
             failure.message.seq),
        )  # fmt: skip

    return write


def retry_failed(conn: sqlite3.Connection, sop_instance_uids: list[str] | None) -> int:
    """Operator action: send the failed messages of these steps (all steps when None)
    again, in their original order; the upstream answers them afresh."""
    sql = (
        "UPDATE mpps_outbox SET state = ?, attempts = 0, next_attempt_at = NULL,"
        " updated_at = ? WHERE state = ?"
    )
    params: list[Any] = [PENDING, utcnow(), FAILED]
    if sop_instance_uids is not None:
        sql += f" AND sop_instance_uid IN ({','.join('?' * len(sop_instance_uids))})"
        params += sop_instance_uids
    return conn.execute(sql, params).rowcount


def _prune(conn: sqlite3.Connection) -> int:
    cutoff = _at(-_KEEP_DAYS * 86400)
    pruned = conn.execute(
        "DELETE FROM mpps_outbox WHERE state = ? AND sent_at < ?", (SENT, cutoff)
    ).rowcount
    pruned += conn.execute(
        "DELETE FROM mpps WHERE status IN (?, ?) AND updated_at < ? AND NOT EXISTS"
        " (SELECT 1 FROM mpps_outbox o WHERE o.sop_instance_uid = mpps.sop_instance_uid)",
        (COMPLETED, DISCONTINUED, cutoff),
    ).rowcount
    pruned += conn.execute(
        "DELETE FROM worklist_mpps WHERE updated_at < ? AND item_id NOT IN"
        " (SELECT item_id FROM worklist_items)",
        (cutoff,),
    ).rowcount
    return pruned


class Forwarder:
    """Sends the outbox to the upstream MPPS SCP; fed by the SCP through :meth:`wake`."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._failures = 0
        self._pruned_at = -_PRUNE_INTERVAL_S

    def wake(self) -> None:
        """Thread-safe: a message was accepted."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing: the next start sees it
                loop.call_soon_threadsafe(self._wake.set)

    async def _db(self, fn: WriteFn[T], durable: bool = False) -> T:
        # Outbox transitions are safe to lose: a lost "sent" means one re-send, which
        # the upstream answers as a duplicate (see classify).
        return await asyncio.wrap_future(self.store.submit(fn, durable=durable))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        requeued = await self._db(_requeue_interrupted)
        if requeued:
            log.warning("MPPS: %d messages were being sent when we stopped; sending again",
                        requeued)  # fmt: skip
        m = self.config.mpps
        if not m.upstream_host:
            log.warning("mpps.upstream_host is not set: MPPS messages are stored, not forwarded")
            return
        while True:
            if time.monotonic() - self._pruned_at >= _PRUNE_INTERVAL_S:
                self._pruned_at = time.monotonic()
                await self._db(_prune)
            batch = await self._db(_next_batch(_BATCH))
            if not batch:
                await wait_event(self._wake, _IDLE_POLL_S)
                continue
            try:
                await self._send_round(batch)
            except UpstreamUnavailable as exc:
                self._failures += 1
                delay = self._backoff()
                await self._db(_retry(exc, delay))
                log.error("MPPS upstream %s@%s:%d unavailable (#%d kept, retry in %.1f s): %s",
                          m.upstream_ae, m.upstream_host, m.upstream_port, exc.message.seq,
                          delay, exc)  # fmt: skip
                await asyncio.sleep(delay)
            else:
                self._failures = 0

    def _backoff(self) -> float:
        m = self.config.mpps
        # Imported here: the receiver processes import this module for the SCP, and
        # gateway.jobs brings the codecs and aiohttp (some 10 MiB each).
        from .jobs import backoff_seconds

        return backoff_seconds(self._failures, m.backoff_initial_seconds, m.backoff_max_seconds)

    async def _send_round(self, batch: list[Message]) -> None:
        ae = self._new_ae()
        try:
            assoc = await _in_daemon_thread(self._associate, ae)
        except _NoAssociation as exc:
            raise UpstreamUnavailable(str(exc), batch[0]) from None
        except asyncio.CancelledError:
            patches.stop_association_attempts(ae)
            raise
        released = False
        try:
            held: set[str] = set()  # instances whose earlier message did not go through
            for message in batch:
                if message.sop_instance_uid in held:
                    continue
                await self._db(_mark_sending(message.seq))
                delivery = await _in_daemon_thread(self._send, assoc, message)
                if delivery.outcome is Outcome.RETRY:
                    raise UpstreamUnavailable(delivery.reason, message, delivery.maybe_delivered)
                await self._db(_finish(message.seq, delivery))
                self._log(message, delivery)
                if delivery.outcome is Outcome.REFUSED:
                    held.add(message.sop_instance_uid)
            await _in_daemon_thread(assoc.release)
            released = True
        finally:
            if not released and assoc.is_established:
                # Cancelled (stopping) or failed mid-round: abort, do not wait for a
                # release answer.  A message cut off here is re-sent at the next round.
                assoc.abort()

    def _log(self, message: Message, delivery: Delivery) -> None:
        what = f"MPPS #{message.seq} N-{message.kind.upper()} sop={message.sop_instance_uid}"
        if delivery.outcome is Outcome.DELIVERED:
            if delivery.reason:
                log.warning("%s counted as delivered: %s", what, delivery.reason)
            else:
                log.info("%s delivered upstream", what)
        elif delivery.outcome is Outcome.REFUSED:
            log.error("%s failed permanently, not retried: %s", what, delivery.reason)

    def _new_ae(self) -> AE:
        # A plain AE, not the receiving server's: it advertises pynetdicom's default
        # maximum PDU and dimse.max_pdu_size does not apply (gateway/patches.py).
        ae = AE(ae_title=self.config.dimse.ae_title)
        timeout = self.config.mpps.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.add_requested_context(
            ModalityPerformedProcedureStep, list(negotiation.SCU_TRANSFER_SYNTAXES)
        )
        return ae

    def _associate(self, ae: AE) -> Association:
        m = self.config.mpps
        try:
            assoc = ae.associate(
                m.upstream_host, m.upstream_port, ae_title=m.upstream_ae,
                evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
            )  # fmt: skip
        except (OSError, RuntimeError) as exc:
            raise _NoAssociation(f"cannot connect: {exc}") from exc
        if not assoc.is_established:
            raise _NoAssociation("association refused, aborted or not answered")
        if not any(cx.abstract_syntax == MPPS_SOP_CLASS for cx in assoc.accepted_contexts):
            assoc.release()
            raise _NoAssociation("the upstream does not accept the MPPS SOP Class")
        return assoc

    @staticmethod
    def _send(assoc: Association, message: Message) -> Delivery:
        ds = from_bytes(message.dataset)
        try:
            if message.kind == CREATE:
                status, _ = assoc.send_n_create(ds, MPPS_SOP_CLASS, message.sop_instance_uid)
            else:
                status, _ = assoc.send_n_set(ds, MPPS_SOP_CLASS, message.sop_instance_uid)
        except (OSError, RuntimeError, ValueError) as exc:
            return Delivery(Outcome.RETRY, f"sending failed: {exc!r}", True)
        return classify(message, status)


def _no_delay(event: evt.Event) -> None:
    """DIMSE is request/response: without TCP_NODELAY, Nagle and the peer's delayed
    ACK add ~40 ms to every message (tests/bench/mpps.py: 19 messages/s without it,
    ~107 with it)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking upstream I/O in a daemon thread.  Not asyncio.to_thread: at exit,
    asyncio.run waits for the default executor, so an association waiting out its
    ACSE timeout on a silent upstream would hold up the stop for that long."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=work, name="mpps-upstream", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]

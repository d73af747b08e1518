"""Modality Performed Procedure Step: SCP for the modalities, store-and-forward upstream.

The modality tells us it started (N-CREATE, status IN PROGRESS) and finished
(N-SET, COMPLETED or DISCONTINUED) a procedure step.  Each request is checked against
PS3.4 F.7.2 and against the step as it stands, inside the store's writer transaction
(so two associations cannot both create the same instance), and answered only after
it committed durably: the step's current state, the message in the outbox
(gateway/mpps/outbox.py), and the MPPS status of the worklist item(s) it refers to
(gateway/worklist/cache.py).

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
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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

from ..aio import wait_event
from ..clock import utc_in, utcnow
from ..config import Config, is_valid_uid
from ..dicom import negotiation, patches
from ..dicom.dimse_status import (
    DUPLICATE_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    INVALID_INSTANCE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_INSTANCE,
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from ..store import Store, WriteFn
from ..worklist import cache as worklist_cache
from ..worklist.cache import StepRef
from . import outbox as mpps_outbox
from .outbox import Message

log = logging.getLogger(__name__)

T = TypeVar("T")

MPPS_SOP_CLASS = str(ModalityPerformedProcedureStep)

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
FINAL = frozenset({COMPLETED, DISCONTINUED})
STEP_STATUSES = frozenset({IN_PROGRESS, COMPLETED, DISCONTINUED})

#: Upstream statuses that say nothing is wrong with the message: try again later.
_UPSTREAM_NOT_NOW = {NOT_AUTHORIZED, RESOURCE_LIMITATION}

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


# -- the forwarder --------------------------------------------------------------------


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


def _prune(conn: sqlite3.Connection) -> int:
    cutoff = utc_in(-_KEEP_DAYS * 86400)
    return mpps_outbox.prune(conn, cutoff, FINAL) + worklist_cache.prune_mpps_marks(conn, cutoff)


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
        return await self.store.run(fn, durable)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        requeued = await self._db(mpps_outbox.requeue_interrupted)
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
            batch = await self._db(mpps_outbox.next_batch(_BATCH))
            if not batch:
                await wait_event(self._wake, _IDLE_POLL_S)
                continue
            try:
                await self._send_round(batch)
            except UpstreamUnavailable as exc:
                self._failures += 1
                delay = self._backoff()
                retry_at = utc_in(delay)
                await self._db(
                    mpps_outbox.retry_later(
                        exc.message.seq, str(exc), retry_at, exc.maybe_delivered
                    )
                )
                log.error("MPPS upstream %s@%s:%d unavailable (#%d kept, retry in %.1f s): %s",
                          m.upstream_ae, m.upstream_host, m.upstream_port, exc.message.seq,
                          delay, exc)  # fmt: skip
                await asyncio.sleep(delay)
            else:
                self._failures = 0

    def _backoff(self) -> float:
        m = self.config.mpps
        # Imported here: the receiver processes import this module for the SCP, and
        # gateway.pipeline.jobs brings the codecs and aiohttp (some 10 MiB each).
        from ..pipeline.jobs import backoff_seconds

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
                await self._db(mpps_outbox.mark_sending(message.seq))
                delivery = await _in_daemon_thread(self._send, assoc, message)
                if delivery.outcome is Outcome.RETRY:
                    raise UpstreamUnavailable(delivery.reason, message, delivery.maybe_delivered)
                await self._db(
                    mpps_outbox.finish(
                        message.seq, delivery.outcome is Outcome.DELIVERED, delivery.reason
                    )
                )
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
        # maximum PDU and dimse.max_pdu_size does not apply (gateway/dicom/patches.py).
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

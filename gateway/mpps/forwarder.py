"""Modality Performed Procedure Step, the forwarder: the outbox, sent on to the RIS.

The :class:`Forwarder` sends the outbox (gateway/mpps/outbox.py, filled by the SCP in
gateway/mpps/scp.py) to the upstream MPPS SCP (``[mpps]``) as an SCU, in the order
received, one association per round:

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
import logging
import sqlite3
import time
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]
from pynetdicom.status import code_to_category

from ..aio import in_daemon_thread, set_from_thread, wait_event
from ..backoff import backoff_seconds
from ..clock import utc_in
from ..config import Config
from ..dicom import negotiation, patches
from ..dicom.dimse_status import (
    DUPLICATE_INSTANCE,
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from ..dicom.tcp import NO_DELAY_HANDLERS
from ..store import Store, WriteFn
from ..worklist import cache as worklist_cache
from . import outbox as mpps_outbox
from .outbox import Message
from .scp import CREATE, FINAL, MPPS_SOP_CLASS, SET, from_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Upstream statuses that say nothing is wrong with the message: try again later.
_UPSTREAM_NOT_NOW = {NOT_AUTHORIZED, RESOURCE_LIMITATION}

_IDLE_POLL_S = 5.0
_BATCH = 50
#: Delivered outbox rows and finished steps are kept this long, then pruned.
_KEEP_DAYS = 30
_PRUNE_INTERVAL_S = 3600.0


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
        set_from_thread(self._loop, self._wake)

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
        return backoff_seconds(self._failures, m.backoff_initial_seconds, m.backoff_max_seconds)

    async def _send_round(self, batch: list[Message]) -> None:
        ae = self._new_ae()
        try:
            assoc = await in_daemon_thread("mpps-upstream", self._associate, ae)
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
                delivery = await in_daemon_thread("mpps-upstream", self._send, assoc, message)
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
            await in_daemon_thread("mpps-upstream", assoc.release)
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
                evt_handlers=NO_DELAY_HANDLERS,
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

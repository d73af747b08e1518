"""Storage Commitment Push Model SCP: the modality's N-ACTION, recorded before Success.

A modality asks (N-ACTION, Action Type ID 1, on the well-known SOP Instance
1.2.840.10008.1.20.1.1) whether the gateway takes responsibility for a list of SOP
instances, under a Transaction UID of its choosing (PS3.4 J.3.2).  The request is
checked, then recorded inside the store's writer transaction (its row and its items,
gateway/commitment/requests.py), and Success is answered only once that commit is
durable.  Whether each instance is committed is decided later (decide.py), and the
answer goes back in an N-EVENT-REPORT on an association of the gateway's own
(reporter.py): so a requester the gateway cannot reach, one not in
``[[dimse.remote]]``, is refused here, with a status that says so.

Refusals (each with an Error Comment, and a log line):

* 0x0124 not authorised: the calling AE is not in ``[[dimse.remote]]``;
* 0x0112 no such SOP instance: not the well-known instance;
* 0x0123 no such action: an Action Type ID other than 1;
* 0x0110 processing failure: the Action Information cannot be decoded;
* 0x0115 invalid argument value: no valid Transaction UID, no Referenced SOP Sequence
  or an item without valid SOP Class/Instance UIDs, or a Transaction UID already used
  by another request (the same request again is answered Success, recorded once);
* 0x0213 resource limitation: the gateway is stopping or cannot commit (nothing kept).

An item of a SOP class the gateway does not store (``dimse.storage_sop_classes``) is
accepted, and decided at once: failed, 0x0122.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_ACTION

from ..clock import utc_in, utcnow
from ..config import Config, is_valid_uid
from ..dicom import negotiation
from ..dicom.dimse_status import (
    FAILURE_SOP_CLASS_NOT_SUPPORTED,
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_INSTANCE,
    NOT_AUTHORIZED,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    SUCCESS,
    Refused,
)
from ..store import Store
from . import requests
from .requests import Recorded, RequestedItem

log = logging.getLogger(__name__)

#: Action Type ID of "Request Storage Commitment" (PS3.4 J.3.2.1).
REQUEST_STORAGE_COMMITMENT = 1
#: How long a handler waits for its commit before answering failure.
COMMIT_TIMEOUT_S = 60.0

#: Every N-ACTION status the SCP answers, and when (the Conformance Statement's table).
N_ACTION_STATUSES: tuple[tuple[int, str], ...] = (
    (SUCCESS, "the request (Transaction UID and every instance) is durable"),
    (NOT_AUTHORIZED, "the calling AE title is not in `[[dimse.remote]]` (no address to report to)"),
    (NO_SUCH_INSTANCE, "a Requested SOP Instance other than `1.2.840.10008.1.20.1.1`"),
    (NO_SUCH_ACTION, "an Action Type ID other than 1"),
    (PROCESSING_FAILURE, "the Action Information cannot be decoded"),
    (
        INVALID_ARGUMENT_VALUE,
        "no valid Transaction UID; no Referenced SOP Sequence, or an item without a valid"
        " Referenced SOP Class/Instance UID; a Transaction UID already used by another"
        " request",
    ),
    (RESOURCE_LIMITATION, "the gateway is stopping or cannot commit (send again)"),
)  # fmt: skip


@dataclass(frozen=True)
class CommitmentRequest:
    transaction_uid: str
    items: tuple[RequestedItem, ...]


# -- the rules (pure) -------------------------------------------------------------------


def parse_request(
    instance_uid: str, action_type: int | None, info: Dataset, storage_sop_classes: tuple[str, ...]
) -> CommitmentRequest:
    """The request in an N-ACTION's command and Action Information, or :class:`Refused`."""
    if instance_uid != negotiation.STORAGE_COMMITMENT_INSTANCE:
        raise Refused(NO_SUCH_INSTANCE, "not the Storage Commitment well-known SOP Instance")
    if action_type != REQUEST_STORAGE_COMMITMENT:
        raise Refused(NO_SUCH_ACTION, f"Action Type ID {action_type} is not 1")
    transaction_uid = str(info.get("TransactionUID", "") or "")
    if not is_valid_uid(transaction_uid):
        raise Refused(INVALID_ARGUMENT_VALUE, "Transaction UID missing or not a valid UID")
    sequence = info.get("ReferencedSOPSequence")
    if not sequence:
        raise Refused(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence missing or empty")
    items = []
    for n, item in enumerate(sequence, 1):
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            raise Refused(
                INVALID_ARGUMENT_VALUE, f"Referenced SOP Sequence item {n}: invalid SOP UIDs"
            )
        if negotiation.accepts_storage_class(sop_class, storage_sop_classes):
            items.append(RequestedItem(sop_class, sop_instance))
        else:
            items.append(
                RequestedItem(
                    sop_class, sop_instance, FAILURE_SOP_CLASS_NOT_SUPPORTED,
                    "the gateway does not store this SOP class (dimse.storage_sop_classes)",
                )
            )  # fmt: skip
    return CommitmentRequest(transaction_uid, tuple(items))


# -- the SCP handler (called from the receiver's association threads) -------------------


class CommitmentScp:
    """N-ACTION of the Storage Commitment Push Model SOP Class: check, commit durably,
    then answer."""

    def __init__(
        self, config: Config, store: Store, on_accepted: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.on_accepted = on_accepted

    def n_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        req = event.request
        assert isinstance(req, N_ACTION)
        requestor = event.assoc.requestor
        where = f"from {requestor.ae_title!r} at {requestor.address}"
        try:
            if self.config.dimse.remote_ae(requestor.ae_title) is None:
                raise Refused(
                    NOT_AUTHORIZED, f"calling AE {requestor.ae_title.strip()} not in dimse.remote"
                )
            request = self._parsed(event, req)
            recorded = self._commit(
                request, requestor.ae_title, f"{requestor.address}:{requestor.port}"
            )
        except Refused as exc:
            log.warning("Storage Commitment N-ACTION %s refused 0x%04X: %s", where, exc.status, exc)
            return exc.as_status(), None
        if recorded is Recorded.REPEAT:
            log.info(
                "Storage Commitment N-ACTION %s: transaction %s again (already recorded)",
                where, request.transaction_uid,
            )  # fmt: skip
        else:
            log.info(
                "Storage Commitment N-ACTION %s accepted: transaction %s, %d instances",
                where, request.transaction_uid, len(request.items),
            )  # fmt: skip
        if self.on_accepted is not None:
            self.on_accepted()
        return SUCCESS, None

    def _parsed(self, event: evt.Event, req: N_ACTION) -> CommitmentRequest:
        try:
            return parse_request(
                str(req.RequestedSOPInstanceUID or ""),
                req.ActionTypeID,
                event.action_information,
                self.config.dimse.storage_sop_classes,
            )
        except Refused:
            raise
        except Exception as exc:  # pydicom raises a wide range on malformed input
            raise Refused(
                PROCESSING_FAILURE, f"Action Information cannot be decoded: {exc!r}"
            ) from exc

    def _commit(self, request: CommitmentRequest, ae_title: str, peer: str) -> Recorded:
        deadline = utc_in(self.config.commitment.timeout_hours * 3600)
        write = requests.record_request(
            request.transaction_uid, ae_title.strip(), peer, request.items, utcnow(), deadline
        )
        try:
            recorded = self.store.submit(write).result(timeout=COMMIT_TIMEOUT_S)
        except Exception as exc:  # StoreClosed, a timeout, any database error
            log.error("Storage Commitment commit failed: %r", exc)
            raise Refused(RESOURCE_LIMITATION, "gateway cannot store it now, send again") from exc
        if recorded is Recorded.CONFLICT:
            raise Refused(
                INVALID_ARGUMENT_VALUE, "Transaction UID already used for another request"
            )
        return recorded

"""Whether each instance of a Storage Commitment request is committed: the rules.

An instance is committed only when the archive confirmed the copy the gateway holds:
its queue row is ``uploaded`` and ``confirmed_at`` is set (the STOW-RS success for
this copy, and with ``commitment.verify = "qido"`` a QIDO-RS search after it:
gateway/pipeline/confirm.py).  Receiving the instance again clears that, so only an
upload after the last receipt counts.  Failed, with the PS3.4 J.3 Failure Reason:

* 0x0119 class/instance conflict: the gateway holds it under another SOP class;
* 0x0110 processing failure: the archive refused it for good (the row is ``failed``),
  or it was received but still not confirmed at the request's deadline
  (``commitment.timeout_hours`` after the N-ACTION);
* 0x0112 no such object instance: never received by the deadline.

Anything else waits.  The reporter reads the items still undecided
(gateway/commitment/requests.py) and their rows (gateway/instances.py) on a reader
connection (:func:`evaluate`), then writes the decisions (:func:`record`).  A row that
changes in between (received again a moment after it was confirmed) does not undo a
decision: it was true when made.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from .. import instances
from ..clock import utcnow
from ..dicom.dimse_status import (
    FAILURE_CLASS_INSTANCE_CONFLICT,
    FAILURE_NO_SUCH_OBJECT_INSTANCE,
    FAILURE_PROCESSING,
)
from ..instances import Confirmation, QueueState
from . import requests
from .requests import Decision, ItemOutcome, Undecided


def decide(item: Undecided, row: Confirmation | None, now: str) -> Decision | None:
    """The decision on *item*, given its queue row (None: never received), or None to
    wait."""
    late = now >= item.deadline_at

    def failed(reason: int, detail: str) -> Decision:
        study = row.study_instance_uid if row is not None else None
        return Decision(
            item.transaction_uid, item.position, ItemOutcome.FAILED, reason, detail, study
        )

    if row is None:
        if late:
            return failed(FAILURE_NO_SUCH_OBJECT_INSTANCE, "never received")
        return None
    if row.sop_class_uid != item.sop_class_uid:
        return failed(FAILURE_CLASS_INSTANCE_CONFLICT, f"received as SOP class {row.sop_class_uid}")
    if row.confirmed:
        return Decision(
            item.transaction_uid, item.position, ItemOutcome.COMMITTED,
            study_instance_uid=row.study_instance_uid,
        )  # fmt: skip
    if row.state == QueueState.FAILED:
        return failed(FAILURE_PROCESSING, f"the archive did not take it: {row.last_error}")
    if late:
        return failed(
            FAILURE_PROCESSING,
            f"not confirmed by the archive within commitment.timeout_hours ({row.state})",
        )
    return None


def evaluate(conn: sqlite3.Connection) -> list[Decision]:
    """A read: the decisions that can be made now on the undecided items (on a reader
    connection, so the writer and the C-STOREs that wait for it are not held).

    It first asks, once per instance, whether an item naming it with the earliest
    deadline could be decided; only for those instances does it read the items.  That
    test is enough: an item with a later deadline is late only if that one is too,
    and nothing else in :func:`decide` depends on the item."""
    now = utcnow()
    instances_waited_on = requests.undecided_instances(conn)
    rows = instances.confirmations(conn, [i.sop_instance_uid for i in instances_waited_on])
    ready = [
        i.sop_instance_uid
        for i in instances_waited_on
        if decide(i, rows.get(i.sop_instance_uid), now) is not None
    ]
    items = requests.undecided_items(conn, list(dict.fromkeys(ready)))
    return [d for i in items if (d := decide(i, rows.get(i.sop_instance_uid), now)) is not None]


def record(decisions: list[Decision]) -> Callable[[sqlite3.Connection], list[str]]:
    """A write: *decisions* (of items still undecided); gives the requests whose report
    became due."""

    def write(conn: sqlite3.Connection) -> list[str]:
        return requests.record_decisions(conn, decisions, utcnow())

    return write

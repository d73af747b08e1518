"""Encode a repeated C-FIND answer once, not once per query.

A modality asks the same worklist query again and again (its own date, modality and
station), and the cache answers it with the same responses (gateway.worklist.service keeps
them while the stored items are unchanged).  pynetdicom encodes each response with
pydicom every time: the identifier once, and the command set three times (twice to
work out its group length, once to send it).  At about 1 ms per response that was
most of a 56-item answer (tests/bench/worklist.py).

Two things are kept, both encoded by pydicom exactly as pynetdicom would:

* :class:`PreEncoded` — a response identifier that remembers its encoding per
  transfer syntax.  gateway.worklist.service hands these out and never changes them.
* the command set of a *pending* C-FIND response.  Within one query every pending
  response has the same command set (message ID responded to, SOP class, status
  0xFF00/0xFF01, "data set present"), so each association keeps the last one, keyed
  on every field it is built from, and sends it again with the next identifier.

gateway/dicom/patches.py puts :func:`encode` where pynetdicom's C-FIND SCP and DIMSE message
encoder call ``encode``, and wraps ``DIMSEServiceProvider.send_msg`` with
:func:`reuse_pending_command_set`; any other message goes through pynetdicom
unchanged.  tests/test_find_encoding.py checks that the bytes on the wire are the
same as pynetdicom's own, tests/test_patches.py that what is replaced is still there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pynetdicom.dsutils
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND

_PENDING = (0xFF00, 0xFF01)
_pydicom_encode = pynetdicom.dsutils.encode


class PreEncoded(Dataset):
    """A dataset that is not changed after it is made, so its encoding can be kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encodings: dict[tuple[bool, bool, bool], bytes | None] = {}

    def encoded(self, implicit: bool, little: bool, deflated: bool = False) -> bytes | None:
        key = (implicit, little, deflated)
        if key not in self._encodings:
            self._encodings[key] = _pydicom_encode(self, implicit, little, deflated)
        return self._encodings[key]


def encode(
    ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False
) -> bytes | None:
    """``pynetdicom.dsutils.encode``, which keeps the encoding of a :class:`PreEncoded`."""
    if isinstance(ds, PreEncoded):
        return ds.encoded(is_implicit_vr, is_little_endian, deflated)
    return _pydicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


def _pending_key(primitive: Any, context_id: int) -> tuple[Any, ...] | None:
    """The fields a pending C-FIND response's command set is built from, or None."""
    if not isinstance(primitive, C_FIND) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status not in _PENDING or primitive.Identifier is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    return (
        context_id,
        primitive.MessageIDBeingRespondedTo,
        str(primitive.AffectedSOPClassUID),
        primitive.Status,
    )


SendMsg = Callable[[DIMSEServiceProvider, Any, int], None]


def reuse_pending_command_set(original: SendMsg) -> SendMsg:
    """Wraps ``DIMSEServiceProvider.send_msg``: a pending C-FIND response reuses the
    command set its association sent last, when built from the same fields."""

    def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        key = _pending_key(primitive, context_id)
        if key is None:
            original(self, primitive, context_id)
            return
        # Only the association's own thread sends its responses: no lock needed.
        kept: tuple[tuple[Any, ...], C_FIND_RSP] | None = getattr(self, "_gateway_find_rsp", None)
        if kept is None or kept[0] != key:
            message = C_FIND_RSP()
            message.primitive_to_message(primitive)
            message.command_set = PreEncoded(message.command_set)
            kept = (key, message)
            self._gateway_find_rsp = kept  # type: ignore[attr-defined]
        message = kept[1]
        message.data_set = primitive.Identifier
        message.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        for pdata in message.encode_msg(context_id, self.maximum_pdu_size):
            self.dul.send_pdu(pdata)

    return send_msg

"""Three guards pynetdicom's DICOM Upper Layer lacks (gateway/dicom/patches.py installs them).

* A PDU header announcing more bytes than we accept (``dimse.max_pdu_size`` for
  P-DATA, 1 MiB for association control PDUs) is answered with A-ABORT before its body
  is read: pynetdicom would otherwise read up to 4 GiB into memory.  Only the
  receiving server's associations are guarded (*limit_of* says which, and their
  limit); the gateway's own associations to its upstreams are not (see
  gateway/dicom/patches.py).
* An exception inside the DUL thread (pynetdicom raises on some malformed P-DATA,
  e.g. a C-STORE command without an Affected SOP Instance UID) kills that thread and
  leaves the connection hanging with its temp file open.  It is logged, the partial
  data set is discarded, the peer gets an A-ABORT and the socket is closed.
* When the peer has already hung up, ``AssociationSocket.close`` skips closing the
  socket (its ``shutdown()`` raises first); the descriptor then lingers until garbage
  collection.  It is closed.

Each function here takes the pynetdicom method it wraps and returns the wrapper;
tests/test_bad_input.py and tests/test_patches.py cover them, so a pynetdicom upgrade
that changes what they wrap fails loudly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

_MAX_CONTROL_PDU = 1024 * 1024  # no A-ASSOCIATE/A-RELEASE/A-ABORT PDU comes near this
_P_DATA_TF = 0x04
_INVALID_PDU_PARAMETER = 0x06

#: The P-DATA limit of a DUL's association (0: none), or None when it is not guarded.
LimitOf = Callable[[DULServiceProvider], "int | None"]
#: Discards the partial data set of a DUL's association, if it has one.
Discard = Callable[[DULServiceProvider], None]

DulMethod = Callable[[DULServiceProvider], None]
SocketMethod = Callable[[AssociationSocket], None]


def refuse_oversized(original: DulMethod, limit_of: LimitOf, discard: Discard) -> DulMethod:
    """Wraps ``DULServiceProvider._read_pdu_data``: an oversized PDU is not read."""

    def read_pdu_data(self: DULServiceProvider) -> None:
        limit = limit_of(self)
        if limit is not None and _refuse_oversized(self, limit, discard):
            return
        original(self)

    return read_pdu_data


def abort_on_exception(original: DulMethod, discard: Discard) -> DulMethod:
    """Wraps ``DULServiceProvider.run_reactor``: an exception aborts the association."""

    def run_reactor(self: DULServiceProvider) -> None:
        try:
            original(self)
        except Exception:
            log.exception("DICOM protocol error from a peer; association aborted")
            _abort(self, 0x00, discard)

    return run_reactor


def close_after_shutdown(original: SocketMethod) -> SocketMethod:
    """Wraps ``AssociationSocket._shutdown_socket``: the socket is closed even when
    ``shutdown()`` raised."""

    def shutdown_socket(self: AssociationSocket) -> None:
        sock = self.socket
        original(self)
        if sock is not None:
            sock.close()  # idempotent; pynetdicom skips it when shutdown() raised

    return shutdown_socket


def _refuse_oversized(dul: DULServiceProvider, max_pdu_size: int, discard: Discard) -> bool:
    raw = dul.socket.socket if dul.socket is not None else None
    if raw is None:
        return False
    try:
        head = raw.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
    except OSError:
        return False
    if len(head) != 6:
        return False
    pdu_type, _, length = struct.unpack(">BBL", head)
    limit = (max_pdu_size or 2**32) if pdu_type == _P_DATA_TF else _MAX_CONTROL_PDU
    if length <= limit:
        return False
    log.warning("PDU type 0x%02X of %d bytes exceeds %d: aborting", pdu_type, length, limit)
    _abort(dul, _INVALID_PDU_PARAMETER, discard)
    return True


def _abort(dul: DULServiceProvider, reason: int, discard: Discard) -> None:
    assoc: Any = dul.assoc
    discard(dul)
    sock = dul.socket
    if sock is not None and sock.socket is not None:
        pdu = A_ABORT_RQ()
        pdu.source = 0x02  # service provider
        pdu.reason_diagnostic = reason
        with contextlib.suppress(OSError):
            sock.socket.sendall(pdu.encode())
        sock.close()
    assoc.is_aborted = True
    assoc.is_established = False
    # pynetdicom's own flags that end the association's and the DUL's loops.
    assoc._kill = True
    dul._kill_thread = True

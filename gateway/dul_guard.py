"""Three guards pynetdicom's DICOM Upper Layer lacks, installed once per process.

* A PDU header announcing more bytes than we accept (``dimse.max_pdu_size`` for
  P-DATA, 1 MiB for association control PDUs) is answered with A-ABORT before its body
  is read: pynetdicom would otherwise read up to 4 GiB into memory.
* An exception inside the DUL thread (pynetdicom raises on some malformed P-DATA,
  e.g. a C-STORE command without an Affected SOP Instance UID) kills that thread and
  leaves the connection hanging with its temp file open.  It is logged, the partial
  data set is discarded, the peer gets an A-ABORT and the socket is closed.
* When the peer has already hung up, ``AssociationSocket.close`` skips closing the
  socket (its ``shutdown()`` raises first); the descriptor then lingers until garbage
  collection.  It is closed.

The first two wrap private methods of ``DULServiceProvider``, the third one of
``AssociationSocket``; tests/test_bad_input.py covers them, so a pynetdicom upgrade
that changes them fails loudly.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from typing import Any

from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

from .spool import SpoolTempFile

log = logging.getLogger(__name__)

_MAX_CONTROL_PDU = 1024 * 1024  # no A-ASSOCIATE/A-RELEASE/A-ABORT PDU comes near this
_P_DATA_TF = 0x04
_INVALID_PDU_PARAMETER = 0x06

_installed = False
_max_pdu_size = 0
_lock = threading.Lock()


def install(max_pdu_size: int) -> None:
    """Wrap the DUL methods (idempotent); *max_pdu_size* 0 means no P-DATA limit."""
    global _installed, _max_pdu_size
    with _lock:
        _max_pdu_size = max_pdu_size
        if _installed:
            return
        _installed = True
        original_read = DULServiceProvider._read_pdu_data
        original_run = DULServiceProvider.run_reactor

        def read_pdu_data(self: DULServiceProvider) -> None:
            if _refuse_oversized(self):
                return
            original_read(self)

        def run_reactor(self: DULServiceProvider) -> None:
            try:
                original_run(self)
            except Exception:
                log.exception("DICOM protocol error from a peer; association aborted")
                _abort(self, reason=0x00)

        original_shutdown = AssociationSocket._shutdown_socket

        def shutdown_socket(self: AssociationSocket) -> None:
            sock = self.socket
            original_shutdown(self)
            if sock is not None:
                sock.close()  # idempotent; pynetdicom skips it when shutdown() raised

        DULServiceProvider._read_pdu_data = read_pdu_data  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]
        AssociationSocket._shutdown_socket = shutdown_socket  # type: ignore[method-assign]


def _refuse_oversized(dul: DULServiceProvider) -> bool:
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
    limit = (_max_pdu_size or 2**32) if pdu_type == _P_DATA_TF else _MAX_CONTROL_PDU
    if length <= limit:
        return False
    log.warning("PDU type 0x%02X of %d bytes exceeds %d: aborting", pdu_type, length, limit)
    _abort(dul, reason=_INVALID_PDU_PARAMETER)
    return True


def _abort(dul: DULServiceProvider, reason: int) -> None:
    assoc: Any = dul.assoc
    partial = getattr(assoc.dimse.message, "_data_set_file", None)
    if isinstance(partial, SpoolTempFile) and not partial.closed:
        partial.discard()
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
    assoc._kill = True
    dul._kill_thread = True

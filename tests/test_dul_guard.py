"""gateway.dicom.dul_guard's socket guard, on real TCP sockets (installed by gateway.dicom.patches).

(Its PDU-size and protocol-error guards are exercised through the gateway by
tests/test_bad_input.py.)
"""

from __future__ import annotations

import queue
import socket
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom.transport import AssociationSocket

from gateway.dicom import patches


def _reset_connection() -> socket.socket:
    """Our end of a TCP connection the peer has reset (RST, as a killed peer may)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # linger 0: RST instead of FIN
    with pytest.raises(ConnectionResetError):
        ours.recv(1)
    return ours


def test_a_reset_connection_is_closed_not_left_for_the_garbage_collector() -> None:
    ours = _reset_connection()
    with pytest.raises(OSError):  # why pynetdicom never reaches its close()
        ours.shutdown(socket.SHUT_RDWR)
    patches.install()
    assoc: Any = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))
    wrapper = AssociationSocket(assoc, client_socket=ours, address=None)
    wrapper.close()
    assert ours.fileno() == -1  # closed now, not when the object is collected
    assert wrapper.socket is None
    events = [assoc.dul.event_queue.get_nowait() for _ in range(assoc.dul.event_queue.qsize())]
    assert events == ["Evt5", "Evt17"]  # connection open, then closed, as pynetdicom says

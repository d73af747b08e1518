"""TCP_NODELAY for DIMSE: it is request/response, so Nagle and the peer's delayed ACK
otherwise add ~40 ms to every small PDU (tests/bench/mpps.py: 19 messages/s without
it, ~107 with it).  The receiver sets it on every accepted socket; the gateway's own
associations (the MPPS forwarder, the Storage Commitment reports) pass
:data:`NO_DELAY_HANDLERS` to ``AE.associate``."""

from __future__ import annotations

import contextlib
import socket

from pynetdicom import evt


def no_delay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_connection_open(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            no_delay(sock)


#: ``evt_handlers`` for an outgoing association.
NO_DELAY_HANDLERS: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, _on_connection_open)]

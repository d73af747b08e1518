"""What a heartbeat must pass before it is stored: who sent it (the client
certificate), what it says (gateway/heartbeat_body.py), and when (not too far from
the receiver's clock; the replay check against the stored ``sent_at`` is made by the
writer, gateway/fleet/boxes.py).  Pure functions: the server hands in the TLS
facts, the body and the time.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

from .. import heartbeat_body
from ..heartbeat_body import BadHeartbeat
from .boxes import Arrival

#: Every ``result`` label of ``dicom_gateway_fleet_heartbeats_total``.
RESULTS = (
    "accepted",
    "no_identity",
    "unsupported_media_type",
    "too_large",
    "bad_body",
    "clock_skew",
    "replayed",
)


class Refused(Exception):
    """A heartbeat answered with a 4xx and not stored; ``str()`` is the one-line reason
    the box gets back (and its log shows)."""

    def __init__(self, status: int, result: str, message: str) -> None:
        assert result in RESULTS
        self.status = status
        self.result = result
        super().__init__(message)


@dataclass(frozen=True)
class Identity:
    """The box, from the client certificate the TLS handshake verified."""

    box: str
    fingerprint: str  # SHA-256 of the certificate (DER), hex
    not_after: float | None


def identify(peercert: dict[str, Any] | None, der: bytes | None) -> Identity:
    """The box that presented *peercert* (``SSLSocket.getpeercert()``, which is only
    filled in for a verified certificate) and its DER bytes *der*."""
    if not peercert or not der:
        raise Refused(403, "no_identity", "no verified client certificate")
    names = [
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    if len(names) != 1 or not names[0].strip():
        raise Refused(
            403, "no_identity", "the client certificate's subject needs exactly one CN (the box)"
        )
    not_after = peercert.get("notAfter")
    return Identity(
        box=names[0],
        fingerprint=hashlib.sha256(der).hexdigest(),
        not_after=ssl.cert_time_to_seconds(not_after) if not_after else None,
    )


def check(body: bytes, who: Identity, peer: str, now: float, max_skew: float) -> Arrival:
    """*body* as the heartbeat of *who*, or :class:`Refused`."""
    try:
        beat = heartbeat_body.decode(body)
    except BadHeartbeat as exc:
        raise Refused(400, "bad_body", str(exc)) from None
    sent_at = heartbeat_body.timestamp(beat["sent_at"])
    skew = sent_at - now
    if abs(skew) > max_skew:
        raise Refused(
            400,
            "clock_skew",
            f"sent_at {beat['sent_at']} is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'}"
            f" the receiver's clock (at most {max_skew:.0f} s): check the box's time (NTP)",
        )
    return Arrival(
        box=who.box,
        fingerprint=who.fingerprint,
        cert_not_after=who.not_after,
        peer=peer,
        sent_at=sent_at,
        seen_at=now,
        heartbeat=beat,
    )

"""The heartbeat's JSON body: what a box POSTs to ``heartbeat.url``
(gateway/web/heartbeat.py builds it) and what the fleet receiver accepts
(gateway/fleet/ reads it).  One definition for both ends, so a renamed field is a
mypy error on the sending side and a refused heartbeat in the receiver's tests, not a
silently empty column on the fleet page.

:func:`decode` is strict: the types, the enumerations and the bounds below are
checked by msgspec (a well-kept validating decoder; the receiver hand-parses
nothing).  Fields it does not know are ignored, so a newer box can add some; the
``NotRequired`` ones came later (issue 16; ``commitment`` after issue 17), so a box
of an earlier release that lacks them is still heard.  Only facts about the box's
queue and health travel: no patient data, no secrets.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, NotRequired, TypedDict

import msgspec

#: At most so many health reasons, each cut to so many characters, travel.
REASONS_MAX = 5
REASON_CHARS = 300
#: At most so many worklist sources travel (a box has three kinds).
WORKLIST_SOURCES_MAX = 16
#: At most so many requesting AEs with Storage Commitment reports due travel; the
#: status document lists as many (gateway/web/status.py ``COMMITMENT_AES_SHOWN``).
COMMITMENT_AES_MAX = 50

Count = Annotated[int, msgspec.Meta(ge=0)]
#: An ISO 8601 time with its UTC offset (``datetime.isoformat``).
Instant = Annotated[str, msgspec.Meta(min_length=10, max_length=40)]
Short = Annotated[str, msgspec.Meta(max_length=64)]
Reason = Annotated[str, msgspec.Meta(max_length=REASON_CHARS)]
#: A DICOM AE title has at most so many characters.
AE_TITLE_CHARS = 16
AeTitle = Annotated[str, msgspec.Meta(min_length=1, max_length=AE_TITLE_CHARS)]

#: The box's view of its archive (gateway/web/status_doc.py ``ArchiveState``).
ArchiveState = Literal["not configured", "unreachable", "reachable", "unknown"]
#: gateway/web/status_doc.py ``HealthState``.
HealthState = Literal["ok", "degraded", "failing"]


class HeartbeatQueue(TypedDict):
    pending: Count
    uploading: Count
    failed: Count
    done: Count
    done_today: Count
    oldest_pending_at: Instant | None
    #: Instances by queue state (gateway/instances.py's states), as ``/api/status``.
    by_state: NotRequired[Annotated[dict[Short, Count], msgspec.Meta(max_length=32)]]


class HeartbeatArchive(TypedDict):
    state: ArchiveState
    last_success_at: Instant | None


class HeartbeatDisk(TypedDict):
    free_bytes: Count | None
    min_free_bytes: Count
    spool_bytes: Count


class HeartbeatWorklistSource(TypedDict):
    source: Short
    last_success_at: Instant | None
    #: Seconds between two reads of the source, when the box's status knows it.
    refresh_interval_seconds: NotRequired[Annotated[float, msgspec.Meta(gt=0)]]


class HeartbeatMpps(TypedDict):
    """The MPPS outbox: messages not yet delivered to the RIS."""

    pending: Count
    sending: Count
    failed: Count
    oldest_pending_at: Instant | None


class HeartbeatCommitmentRequester(TypedDict):
    """A requesting AE whose Storage Commitment reports are due, not yet delivered."""

    requesting_ae: AeTitle
    reports_due: Count
    #: When the oldest of its reports became due.
    due_since_at: Instant


class HeartbeatCommitment(TypedDict):
    """Storage Commitment requests by state (the keys are gateway/commitment/requests.py's
    ``RequestState`` values), the oldest not yet reported, and the requesting AEs
    waiting for reports, the longest waiting first."""

    waiting: Count
    due: Count
    reporting: Count
    reported: Count
    oldest_unreported_at: Instant | None
    undelivered: Annotated[
        list[HeartbeatCommitmentRequester], msgspec.Meta(max_length=COMMITMENT_AES_MAX)
    ]


class Heartbeat(TypedDict):
    """The body POSTed to ``heartbeat.url`` (JSON): a few facts, no patient data.

    ``ae_title`` is what the box calls itself; the fleet receiver shows it but knows
    the box by its client certificate only.  ``sent_at`` (milliseconds) must grow from
    one heartbeat to the next: the receiver refuses one not newer than the last it
    accepted from that box (a replay)."""

    ae_title: AeTitle
    version: Short
    boot_id: Short
    sent_at: Instant
    uptime_seconds: Annotated[float, msgspec.Meta(ge=0)]
    health: HealthState
    reasons: Annotated[list[Reason], msgspec.Meta(max_length=REASONS_MAX)]
    queue: HeartbeatQueue
    archive: HeartbeatArchive
    uploads_paused: bool
    disk: HeartbeatDisk
    certificate_days_left: int | None
    #: False while every upload window is closed (gateway/pipeline/bandwidth.py).
    uploads_window_open: NotRequired[bool]
    worklist: NotRequired[
        Annotated[list[HeartbeatWorklistSource], msgspec.Meta(max_length=WORKLIST_SOURCES_MAX)]
    ]
    mpps: NotRequired[HeartbeatMpps]
    commitment: NotRequired[HeartbeatCommitment]


class BadHeartbeat(ValueError):
    """A body that is not a heartbeat; ``str()`` says what is wrong, in one line."""


_decoder = msgspec.json.Decoder(Heartbeat)
_encoder = msgspec.json.Encoder()


def decode(body: bytes) -> Heartbeat:
    """The heartbeat in *body*, checked; raises :class:`BadHeartbeat`."""
    try:
        beat = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadHeartbeat(f"not a heartbeat: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadHeartbeat(f"not JSON: {exc}") from None
    times = [
        ("sent_at", beat["sent_at"]),
        ("queue.oldest_pending_at", beat["queue"]["oldest_pending_at"]),
        ("archive.last_success_at", beat["archive"]["last_success_at"]),
        *(("worklist[].last_success_at", w["last_success_at"]) for w in beat.get("worklist", [])),
    ]
    if "mpps" in beat:
        times.append(("mpps.oldest_pending_at", beat["mpps"]["oldest_pending_at"]))
    if "commitment" in beat:
        c = beat["commitment"]
        times.append(("commitment.oldest_unreported_at", c["oldest_unreported_at"]))
        times += [
            ("commitment.undelivered[].due_since_at", u["due_since_at"]) for u in c["undelivered"]
        ]
    for key, text in times:
        if text is not None:
            timestamp(text, key)
    return beat


def encode(beat: Heartbeat) -> bytes:
    return _encoder.encode(beat)


def timestamp(text: str, key: str = "sent_at") -> float:
    """*text* (ISO 8601 with a UTC offset) as a Unix timestamp; raises BadHeartbeat."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadHeartbeat(f"not a heartbeat: {key}: not an ISO 8601 time: {text!r}") from None
    if when.tzinfo is None:
        raise BadHeartbeat(f"not a heartbeat: {key}: no UTC offset in {text!r}")
    return when.timestamp()

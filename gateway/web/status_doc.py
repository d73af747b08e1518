"""The status document: what :mod:`gateway.web.status` builds, and what the page,
``/api/status``, ``/metrics`` and the heartbeat read.

A tree of frozen dataclasses, so a renamed or removed field is a mypy error in every
reader instead of a ``KeyError`` on a live page.  :func:`status_json` turns a document
into plain JSON values and :func:`status_body` into the bytes ``/api/status`` returns
(the same JSON, encoded by msgspec, which reads dataclasses natively): field names
are its keys and field order its key order (``tests/test_status.py`` holds that key
tree, so renaming a field here also renames an API key only on purpose).

Times come in pairs: ``..._at`` is an ISO 8601 text for people, ``..._ts`` the same
instant as a Unix timestamp for machines (``None``: never).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from ..studies import StudyProgress

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: What :func:`status_json` produces: plain JSON values.
JSON = str | int | float | bool | None | list["JSON"] | dict[str, "JSON"]

ArchiveState = Literal["not configured", "unreachable", "reachable", "unknown"]
HealthState = Literal["ok", "degraded", "failing"]


@dataclass(frozen=True)
class QueueStatus:
    """Instances in the queue; ``pending`` is received + compressing + pending upload."""

    pending: int
    received: int
    compressing: int
    pending_upload: int
    uploading: int
    failed: int
    done: int
    done_today: int
    by_state: Mapping[str, int]
    oldest_pending_at: str | None
    oldest_pending_ts: float | None
    oldest_pending_age_seconds: float | None


@dataclass(frozen=True)
class ArchiveStatus:
    url: str
    state: ArchiveState
    reachable: bool
    last_success_at: str | None
    last_success_ts: float | None
    #: Only while the archive is unreachable.
    last_error: str | None
    last_error_at: str | None


@dataclass(frozen=True)
class UploadsStatus:
    """Paused by an operator, and the bandwidth settings (gateway.pipeline.bandwidth)."""

    paused: bool
    limit_bytes_per_second: int
    window_open: bool
    windows: tuple[str, ...]
    window_changes_at: str | None
    priority_aets: tuple[str, ...]


@dataclass(frozen=True)
class ThroughputMinute:
    minute: str
    received: int
    received_bytes: int
    uploaded: int
    uploaded_bytes: int


@dataclass(frozen=True)
class Modality:
    calling_ae: str
    last_24h: int
    last_seen: str | None
    last_seen_ts: float | None


@dataclass(frozen=True)
class FailedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str | None
    attempts: int
    received_at: str
    updated_at: str
    last_error: str | None


@dataclass(frozen=True)
class RetryingInstance:
    sop_instance_uid: str
    attempts: int
    next_attempt_at: str | None
    last_error: str | None


@dataclass(frozen=True)
class WarnedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str | None
    uploaded_at: str | None
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class WarningsStatus:
    """Instances stored, but the archive said something about them (upload.archive)."""

    count: int
    recent: tuple[WarnedInstance, ...]


@dataclass(frozen=True)
class RecentError:
    at: str
    level: str
    source: str
    message: str
    #: The same message logged again in a row is counted, not repeated.
    count: int


@dataclass(frozen=True)
class DiskStatus:
    #: None: not measured yet (before the first snapshot).
    free_bytes: int | None
    total_bytes: int | None
    spool_bytes: int
    min_free_bytes: int
    below_watermark: bool


@dataclass(frozen=True)
class SpoolStatus:
    dir: str
    #: As of the monitor's last look (every second): no disk access to build it.
    problem: str | None


@dataclass(frozen=True)
class CertificateStatus:
    """``upload.client_cert``'s notAfter (all None: none configured)."""

    path: str | None
    not_after: str | None
    not_after_ts: float | None
    days_left: int | None
    warning: bool
    error: str | None


@dataclass(frozen=True)
class WorklistSource:
    """One row of the worklist's freshness (gateway.worklist.service), plus a timestamp."""

    source: str
    last_attempt_at: str | None
    last_success_at: str | None
    last_error: str | None
    item_count: int | None
    last_success_ts: float | None
    #: How often the source is read (``worklist.refresh_seconds``, or
    #: ``drop_scan_seconds`` for the drop folder); None: no longer configured.
    refresh_interval_seconds: float | None


@dataclass(frozen=True)
class MppsFailedMessage:
    seq: int
    sop_instance_uid: str
    kind: str
    received_at: str
    last_error: str | None


@dataclass(frozen=True)
class MppsStatus:
    """The MPPS outbox: messages not yet delivered to the RIS, by state."""

    pending: int
    sending: int
    failed: int
    oldest_pending_at: str | None
    failed_messages: tuple[MppsFailedMessage, ...]
    forwarding_to: str | None
    oldest_pending_ts: float | None


@dataclass(frozen=True)
class CommitmentRequester:
    """A requesting AE with Storage Commitment reports due but not yet delivered."""

    requesting_ae: str
    #: Its ``[[dimse.remote]]`` host:port (None: no entry, the reports wait for one).
    address: str | None
    reports_due: int
    #: When the oldest of its reports became due.
    due_since_at: str
    due_since_ts: float
    attempts: int
    #: Why the latest try failed (None: not tried yet).
    last_error: str | None
    last_error_at: str | None
    #: None: a report is being sent now.
    next_attempt_at: str | None
    next_attempt_ts: float | None


@dataclass(frozen=True)
class CommitmentStatus:
    """Storage Commitment requests by state (gateway.commitment.requests): waiting for
    the archive, report due, being sent, reported (kept 30 days)."""

    waiting: int
    due: int
    reporting: int
    reported: int
    #: Requests whose report says some instance failed (refused by the archive,
    #: never received, not confirmed within commitment.timeout_hours).
    some_failed: int
    oldest_unreported_at: str | None
    oldest_unreported_ts: float | None
    oldest_unreported_age_seconds: float | None
    #: The AEs whose reports wait, the one waiting longest first.
    undelivered: tuple[CommitmentRequester, ...]


@dataclass(frozen=True)
class ConfigSummary:
    """What the page may show of the config: no password hashes, tokens or key
    contents (paths and method names only)."""

    source: str
    ae_title: str
    dimse: str
    allowed_aets: tuple[str, ...]
    #: ``[[dimse.remote]]`` as AE@host:port.
    remote_aes: tuple[str, ...]
    spool_dir: str
    min_free_bytes: int
    database: str
    dicomweb_url: str
    client_cert: str
    client_key: str
    upload_auth: str
    compression: str
    concurrent_requests: int
    retention_keep_bytes: int
    worklist_upstream: str
    web: str
    web_auth: tuple[str, ...]
    heartbeat_url: str


@dataclass(frozen=True)
class ComponentRestart:
    """A component that crashed and is restarted by the gateway's supervisor."""

    error: str
    at: str
    ts: float
    count: int
    restart_in_seconds: float


@dataclass(frozen=True)
class Health:
    """OK / degraded / failing, and why (gateway.web.status.health)."""

    state: HealthState
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class StatusDoc:
    version: str
    boot_id: str
    started_at: str
    uptime_seconds: float
    #: None: no snapshot of the database yet.
    snapshot_age_seconds: float | None
    queue: QueueStatus
    archive: ArchiveStatus
    uploads: UploadsStatus
    associations_active: int
    throughput: tuple[ThroughputMinute, ...]
    modalities: tuple[Modality, ...]
    failed: tuple[FailedInstance, ...]
    retrying: tuple[RetryingInstance, ...]
    warnings: WarningsStatus
    recent_errors: tuple[RecentError, ...]
    disk: DiskStatus
    spool: SpoolStatus
    certificate: CertificateStatus
    worklist: tuple[WorklistSource, ...]
    mpps: MppsStatus
    commitment: CommitmentStatus
    #: The studies received most recently, newest first, with their proof of delivery.
    studies: tuple[StudyProgress, ...]
    config: ConfigSummary
    snapshot_error: str | None
    #: Components restarted lately, by name.
    components: Mapping[str, ComponentRestart]
    health: Health


def status_json(doc: StatusDoc) -> dict[str, JSON]:
    """The JSON object of ``/api/status``."""
    return _object(doc)


def status_body(doc: StatusDoc) -> bytes:
    """The body of ``/api/status``: :func:`status_json` encoded, in one pass and about
    seven times faster than building the plain values and ``json.dumps``.  The page
    is asked for every few seconds by every open browser."""
    return _ENCODER.encode(doc)


def _unknown(value: object) -> object:
    """msgspec's hook for a type it does not know, as :func:`_plain` does."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return str(value)  # never a 500


_ENCODER = msgspec.json.Encoder(enc_hook=_unknown)


def _object(value: DataclassInstance) -> dict[str, JSON]:
    return {name: _plain(getattr(value, name)) for name in _names(type(value))}


@functools.cache
def _names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain(value: object) -> JSON:
    if type(value) in _SCALARS:  # by exact type first: the common case, a cheap test
        return typing.cast(JSON, value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _object(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float):  # a str or int enum, say
        return value
    return str(value)  # as the API's json.dumps(default=str) did: never a 500

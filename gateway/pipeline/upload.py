"""DICOMweb STOW-RS client: one aiohttp session over verified, mutual TLS.

There is no plaintext or unverified mode.  The archive is checked against
``upload.ca_file`` (or the system CAs when that is empty) with hostname verification;
this box authenticates with ``upload.client_cert``/``client_key``, and with the
credentials of ``[upload.auth]`` when a token method is set (gateway.auth): each
request carries their headers, and an HTTP 401 gets fresh ones and one more try.
An archive's 401/403 is never read as a STOW-RS answer: it is a :class:`RequestFailed`
whose hint names ``upload.auth`` (or the certificate, for ``mtls``).

A request stores one batch of instances of one study as
``multipart/related; type="application/dicom"``, streamed from the spool files.  The
answer is read per instance (PS3.18 10.5.3), as the archive's profile
(``upload.archive``, gateway/pipeline/archives.py) says: ReferencedSOPSequence items are stored,
with their WarningReason and FailedAttributesSequence kept as warnings;
FailedSOPSequence items carry the archive's FailureReason, which is a verdict, a busy
moment, or "already stored" (a ``duplicate`` outcome, stored only once the pipeline
has checked the archive's copy with :meth:`StowClient.instance_metadata`).  A failure
item that names no instance (an archive that could not read a part) cannot be matched:
a request of one instance fails with it, a larger one is ``ambiguous`` and the
pipeline sends those instances again in smaller requests.  What went wrong with the
request as a whole (connection, TLS, HTTP 5xx/429) is a :class:`RequestFailed`, and
the whole batch is retried later; a timeout or HTTP 413 is a :class:`RequestTooBig`,
and the pipeline splits the batch.  An answer that cannot be read (not JSON, not an
object, items of the wrong kind) never raises: each instance is retried, with a
reason that says what was wrong with the answer.

Timeouts: connecting gets ``upload.request_timeout_seconds``; the request as a whole
gets that plus the body size at ``upload.min_bytes_per_second``, so a big instance
can finish on a slow line.  With ``upload.max_bytes_per_second`` set, a paced request
is given the time its body takes at its share of the cap when that is slower.

Pacing (gateway.pipeline.bandwidth): with a cap, each spool file goes out as a payload that
reads it in chunks and pays for each chunk in the shared token bucket before handing
it on; the files are never read into memory as a whole.  A priority-lane request is
not paced, but its bytes are charged to the bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote

import aiohttp
import aiohttp.payload
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from .. import auth as auth_module
from ..auth import Authenticator, AuthError
from ..config import UploadConfig
from ..https import http_hint, ssl_context
from . import archives
from .archives import ArchiveProfile
from .bandwidth import CHUNK, TokenBucket

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger(__name__)

#: Warnings kept per instance, and the length of each (an archive's ErrorComment).
_MAX_WARNINGS = 10
_MAX_WARNING_CHARS = 200


class RequestFailed(Exception):
    """The request as a whole failed; nothing in it is known to be stored."""


class RequestTooBig(RequestFailed):
    """The request timed out or the archive refused its size (HTTP 413): a smaller
    batch may get through, so the batch is split before it is retried."""

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        #: True for HTTP 413 (the archive's verdict), False for a timeout.
        self.refused = refused


@dataclass(frozen=True)
class Item:
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class InstanceOutcome:
    stored: bool
    retryable: bool = False
    reason: str = ""
    #: The archive says it already holds an instance with this UID.  As parsed, not
    #: yet stored (and retryable, should nobody check); stored once the archive's copy
    #: was verified to be ours (gateway/pipeline/jobs.py).
    duplicate: bool = False
    #: What the archive said about a stored instance, each starting with its code
    #: (``"0xB000 coercion of data elements"``; see :func:`warning_code`).
    warnings: tuple[str, ...] = ()
    #: Refused by a failure item that named no instance: which one of the request's
    #: instances it was is unknown, so they are sent again in smaller requests.
    ambiguous: bool = False


def warning_code(warning: str) -> str:
    """The code a warning text starts with (``"0xB000"``, ``"attributes"``)."""
    return warning.split(" ", 1)[0]


def describe_failure(code: int | None, profile: ArchiveProfile = archives.GENERIC) -> str:
    if code is None:
        return "archive gave no failure reason"
    return f"archive refused: {profile.failure_name(code)} (0x{code:04X})"


def parse_response(
    status: int,
    body: bytes,
    items: Sequence[Item],
    profile: ArchiveProfile = archives.GENERIC,
) -> dict[str, InstanceOutcome]:
    """Map the archive's STOW-RS answer (PS3.18 10.5.3) to an outcome for each item,
    as *profile* reads the codes.

    Never raises: an answer that cannot be read says nothing about the instances, so
    each gets a retryable outcome naming what was wrong with it."""
    try:
        value: Any = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        return _all_retry(items, f"HTTP {status} with an unparsable STOW-RS answer: {exc}")
    if not isinstance(value, dict):
        text = " ".join(body[:80].decode("utf-8", "replace").split())
        return _all_retry(items, f"HTTP {status} with a STOW-RS answer that is not a JSON "
                                 f"object: {text}")  # fmt: skip
    try:
        outcomes, nameless = _outcomes(_read_answer(value), profile)
    except Exception as exc:  # from_json raises anything on odd JSON
        return _all_retry(items, f"HTTP {status} with an unreadable STOW-RS answer: {exc!r}")
    result: dict[str, InstanceOutcome] = {}
    unmatched = [item for item in items if item.sop_instance_uid not in outcomes]
    for item in items:
        outcome = outcomes.get(item.sop_instance_uid)
        if outcome is None and nameless:
            outcome = _nameless_failure(status, nameless, len(unmatched), profile)
        if outcome is None:
            # Neither stored nor refused: no proof it arrived, so send it again.
            outcome = InstanceOutcome(
                stored=False, retryable=True, reason=f"HTTP {status}: archive did not confirm it"
            )
        result[item.sop_instance_uid] = outcome
    return result


def _nameless_failure(
    status: int, codes: list[int | None], unmatched: int, profile: ArchiveProfile
) -> InstanceOutcome:
    """The outcome of an instance the answer does not name, when it has failure items
    that name no instance either (an archive that could not read a part: Azure)."""
    code = codes[0]
    if unmatched == 1 and len(codes) == 1:
        # The one instance not confirmed is the one it could not read.  A general
        # failure (or none given) is about this content: retrying would not change it.
        verdict = profile.verdict(code)
        retryable = verdict == "retry" and code not in (None, 0x0110)
        return InstanceOutcome(
            stored=False, retryable=retryable,
            reason=f"HTTP {status}: archive could not read it: {describe_failure(code, profile)}",
        )  # fmt: skip
    return InstanceOutcome(
        stored=False, retryable=True, ambiguous=True,
        reason=(
            f"HTTP {status}: archive refused {len(codes)} of {unmatched} unconfirmed instances"
            f" without naming them ({describe_failure(code, profile)}); sent again in smaller"
            " requests"
        ),
    )  # fmt: skip


def _all_retry(items: Sequence[Item], reason: str) -> dict[str, InstanceOutcome]:
    outcome = InstanceOutcome(stored=False, retryable=True, reason=reason)
    return {item.sop_instance_uid: outcome for item in items}


# Attributes of the Store Instances Response (PS3.18 Table 10.5.3-1) read by tag.
_FAILED_ATTRIBUTES_SEQUENCE = 0x00741048
_ERROR_COMMENT = 0x00000902
#: Google's private FailureDetail, as issue reports show it (gateway/pipeline/archives.py).
_GOOGLE_FAILURE_DETAIL = 0x00090097


def _read_answer(value: dict[str, Any]) -> Dataset:
    """The answer as a data set, read by pydicom.  Its VR checks only warn: an
    archive's free text (an ErrorComment longer than its VR allows, as dcm4chee and
    Azure send) must not make the verdicts next to it unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Dataset.from_json(value)


def _values(ds: Dataset, tag: int | str) -> list[Any] | None:
    """The values of attribute *tag* (None: absent or empty)."""
    element = ds.get(Tag(tag))  # by Tag: by keyword, get() gives the value
    if not isinstance(element, DataElement) or element.VR == "SQ" or element.is_empty:
        return None
    value = element.value
    return list(value) if isinstance(value, MultiValue) else [value]


def _items(ds: Dataset, tag: int | str) -> list[Dataset]:
    """The items of sequence *tag*: none when it is absent or not a sequence."""
    element = ds.get(Tag(tag))
    if not isinstance(element, DataElement) or element.VR != "SQ":
        return []
    return [item for item in element.value if isinstance(item, Dataset)]


def _uid(item: Dataset) -> str | None:
    values = _values(item, "ReferencedSOPInstanceUID")
    if values and len(values) == 1 and isinstance(values[0], str) and values[0]:
        return values[0]
    return None


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _texts(ds: Dataset, tag: int | str) -> list[str]:
    return [_clip(v) for v in _values(ds, tag) or () if isinstance(v, str) and v.strip()]


def _outcomes(
    answer: Dataset, profile: ArchiveProfile
) -> tuple[dict[str, InstanceOutcome], list[int | None]]:
    """The outcome of each instance the answer names, and the FailureReasons of
    failure items that name none."""
    outcomes: dict[str, InstanceOutcome] = {}
    nameless: list[int | None] = []
    for ref in _items(answer, "ReferencedSOPSequence"):
        if (uid := _uid(ref)) is not None:
            outcomes[uid] = InstanceOutcome(stored=True, warnings=_warnings(ref, profile))
    failures = _items(answer, "FailedSOPSequence")
    # dcm4chee puts the message of a failure in the response's ErrorComment.
    overall = _texts(answer, _ERROR_COMMENT) if len(failures) == 1 else []
    for failed in failures:
        values = _values(failed, "FailureReason") or [None]
        code = _number(values[0]) if len(values) == 1 else None
        if len(values) != 1 or (code is None and values[0] is not None):
            # Multi-valued or not a number: not a verdict we can act on.
            if (uid := _uid(failed)) is not None:
                shown = values[0] if len(values) == 1 else values
                outcomes[uid] = InstanceOutcome(
                    stored=False, retryable=True,
                    reason=f"archive refused with an unreadable FailureReason {shown!r:.60}",
                )  # fmt: skip
            continue
        if (uid := _uid(failed)) is None:
            nameless.append(code)
            continue
        reason = describe_failure(code, profile)
        detail = _texts(failed, _GOOGLE_FAILURE_DETAIL) + _comments(failed)[:2] + overall
        if detail:
            reason += ": " + "; ".join(detail)
        verdict = profile.verdict(code)
        outcomes[uid] = InstanceOutcome(
            stored=False, retryable=verdict in ("retry", "duplicate"),
            duplicate=verdict == "duplicate", reason=reason,
        )  # fmt: skip
    return outcomes, nameless


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_WARNING_CHARS else text[: _MAX_WARNING_CHARS - 1] + "…"


def _comments(item: Dataset) -> list[str]:
    """The ErrorComments of an item's FailedAttributesSequence (Azure v2)."""
    comments = []
    for attr in _items(item, _FAILED_ATTRIBUTES_SEQUENCE):
        comments += _texts(attr, _ERROR_COMMENT)
    return comments


def _warnings(item: Dataset, profile: ArchiveProfile) -> tuple[str, ...]:
    """An item's WarningReason(s) and FailedAttributesSequence as warning texts."""
    warnings = [
        f"0x{code:04X} {profile.warning_name(code)}"
        for value in _values(item, "WarningReason") or ()
        if (code := _number(value)) is not None
    ]
    warnings += [f"attributes {comment}" for comment in _comments(item)]
    return tuple(warnings[:_MAX_WARNINGS])


async def _paced_chunks(f: BinaryIO, bucket: TokenBucket | None) -> AsyncIterator[bytes]:
    # Read in a thread: a slow disk must not stall the loop (the receiver's acks).
    while chunk := await asyncio.to_thread(f.read, CHUNK):
        if bucket is not None:
            await bucket.take(len(chunk))
        yield chunk


class PacedFile(aiohttp.payload.AsyncIterablePayload):
    """One spool file as a multipart part whose chunks are paid for in *bucket* before
    they are sent.  Its size is known, so the request keeps its Content-Length (no
    chunked transfer encoding, which some archives' proxies refuse).  Without a
    bucket it is not paced (SigV4 hashes the body this way before sending it)."""

    def __init__(self, f: BinaryIO, size: int, bucket: TokenBucket | None) -> None:
        self._file_size = size
        super().__init__(_paced_chunks(f, bucket), content_type="application/dicom")

    @property
    def size(self) -> int:
        return self._file_size


class StowClient:
    def __init__(
        self,
        config: UploadConfig,
        metrics: Metrics | None = None,
        bucket: TokenBucket | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        #: Request credentials (``upload.auth``), shared with the worklist and heartbeat.
        self.auth = auth if auth is not None else auth_module.shared(config)
        #: Shared by every request of this client (None or rate 0: not paced).
        self.bucket = bucket
        #: How the archive's answers read (upload.archive).
        self.profile = archives.profile(config.archive)
        self.url = config.dicomweb_url.rstrip("/") + "/studies"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StowClient:
        connector = aiohttp.TCPConnector(ssl=ssl_context(self.config), limit=16)
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    def timeout_for(self, body_bytes: int, paced: bool = False) -> aiohttp.ClientTimeout:
        """request_timeout_seconds for connecting, and for the request as a whole
        that plus the time the body takes at the slowest uplink we allow for, so a
        large instance can finish on a slow line.  A paced request may be slower
        still: the cap is shared by every request in flight, so its share is the cap
        over ``concurrent_requests``.  (No sock_read: aiohttp may arm it while a TLS
        body is still being written, which cuts a slow upload short.)"""
        c = self.config
        rate: float = c.min_bytes_per_second
        if paced and c.max_bytes_per_second > 0:
            rate = min(rate, c.max_bytes_per_second / c.concurrent_requests)
        return aiohttp.ClientTimeout(
            total=c.request_timeout_seconds + body_bytes / rate,
            sock_connect=c.request_timeout_seconds,
        )

    def _paced(self, priority: bool) -> TokenBucket | None:
        bucket = self.bucket
        return bucket if bucket is not None and bucket.rate > 0 and not priority else None

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def store(
        self, items: Sequence[Item], priority: bool = False
    ) -> dict[str, InstanceOutcome]:
        """One request for *items*: paced by the bucket, unless *priority* (then its
        bytes are only charged to the bucket)."""
        assert self._session is not None, "use StowClient as an async context manager"
        bucket = self._paced(priority)
        files: list[BinaryIO] = []
        # One boundary for every build of this request's body: the bytes SigV4 hashed
        # are the bytes sent, and sent again after a refusal.
        boundary = uuid.uuid4().hex

        def body(pacing: TokenBucket | None = bucket) -> aiohttp.MultipartWriter:
            # A fresh build each time: aiohttp closes a sent body's files.
            with aiohttp.MultipartWriter('related; type="application/dicom"', boundary) as w:
                for item in items:
                    f = open(item.path, "rb")  # noqa: SIM115 - closed in finally
                    files.append(f)
                    if bucket is None:
                        w.append(f, {"Content-Type": "application/dicom"})
                    else:
                        w.append_payload(PacedFile(f, os.fstat(f.fileno()).st_size, pacing))
            return w

        try:
            size = sum(os.stat(item.path).st_size for item in items)
            digest = None
            if self.auth.signs_payload:
                digest = await _payload_sha256(body(None))
            if priority and self.bucket is not None:
                self.bucket.charge(size)
            return await self._post(body, digest, items, self.timeout_for(size, bucket is not None))
        finally:
            for f in files:
                f.close()

    async def _post(
        self,
        body: auth_module.Body,
        digest: str | None,
        items: Sequence[Item],
        timeout: aiohttp.ClientTimeout,
    ) -> dict[str, InstanceOutcome]:
        assert self._session is not None
        headers = {"Accept": "application/dicom+json"}
        started = time.monotonic()
        code = "error"
        try:
            reply = await self.auth.send(
                self._session, "POST", self.url, headers=headers, body=body,
                payload_sha256=digest, timeout=timeout,
            )  # fmt: skip
            code = str(reply.status)
            payload, status = reply.body, reply.status
        except AuthError as exc:
            raise RequestFailed(f"{exc} (fix: {exc.fix})") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise RequestFailed(
                f"TLS: the archive's certificate is not trusted ({exc.certificate_error}); "
                "check upload.ca_file"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise RequestFailed(f"TLS handshake with the archive failed: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise RequestFailed(f"cannot connect to the archive: {exc.os_error}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise RequestFailed(f"cannot connect to the archive: {exc!r}") from exc
        except TimeoutError as exc:
            raise RequestTooBig(
                f"request to the archive timed out after {time.monotonic() - started:.0f} s"
                f" ({len(items)} instances)",
                refused=False,
            ) from exc
        except aiohttp.ClientError as exc:
            raise RequestFailed(f"request to the archive failed: {exc!r}") from exc
        finally:
            if self.metrics is not None:
                self.metrics.stow_requests.labels(code).inc()
                self.metrics.stow_duration.observe(time.monotonic() - started)
        if status == 413:
            raise RequestTooBig("archive refuses the size (HTTP 413)", refused=True)
        if status in (401, 403):
            # A refusal of this box (its token or certificate), whatever the body
            # looks like: nothing about the instances.
            raise RequestFailed(
                http_hint("archive", status, payload, self.auth,
                          reply.headers.get("WWW-Authenticate", ""), reply.reason)
            )  # fmt: skip
        if status in (200, 202, 409) or (400 <= status < 500 and _is_dicom_json(payload)):
            return parse_response(status, payload, items, self.profile)
        # Anything else (5xx, 429, a proxy's error page, a refused client certificate)
        # says nothing about the instances: the batch is retried with backoff.
        raise RequestFailed(http_hint("archive", status, payload))

    async def instance_metadata(self, study: str, series: str, sop: str) -> dict[str, Any] | None:
        """WADO-RS ``GET {dicomweb_url}/studies/{study}/series/{series}/instances/{sop}
        /metadata`` (PS3.18 10.4): the archive's copy of this instance as one DICOM JSON
        object (PS3.18 Annex F).

        None when the archive has no such instance (HTTP 404).  Raises
        :class:`RequestFailed` for anything else that is not a readable answer (no
        connection, 5xx, an odd body): the copy could not be checked."""
        path = "/".join(
            quote(part, safe="") for part in (study, "series", series, "instances", sop)
        )
        url = f"{self.url}/{path}/metadata"
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_seconds)
        headers = {"Accept": "application/dicom+json"}
        assert self._session is not None, "use StowClient as an async context manager"
        try:
            # With the upload's credentials (and one refresh after a 401), as the POST.
            reply = await self.auth.send(
                self._session, "GET", url, headers=headers, timeout=timeout
            )
        except AuthError as exc:
            raise RequestFailed(f"verification: {exc} (fix: {exc.fix})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RequestFailed(f"verification request failed: {exc!r}") from exc
        status, payload = reply.status, reply.body
        if status == 404:
            return None
        if status != 200:
            raise RequestFailed(
                "verification: "
                + http_hint("archive", status, payload, self.auth,
                            reply.headers.get("WWW-Authenticate", ""), reply.reason)
            )  # fmt: skip
        try:
            value: Any = json.loads(payload)
        except ValueError as exc:
            raise RequestFailed(f"verification: unparsable instance metadata: {exc}") from exc
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, dict):
            raise RequestFailed("verification: instance metadata is not one DICOM JSON object")
        return value

    async def study_instances(self, study: str, page: int = 1000) -> set[str]:
        """QIDO-RS ``GET {dicomweb_url}/studies/{study}/instances`` (PS3.18 10.6): the
        SOP Instance UIDs the archive finds in *study* (paged with ``limit``/``offset``;
        an empty answer or HTTP 204 is none).  Raises :class:`RequestFailed` when the
        search cannot be made or its answer read."""
        assert self._session is not None, "use StowClient as an async context manager"
        url = f"{self.url}/{quote(study, safe='')}/instances"
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_seconds)
        headers = {"Accept": "application/dicom+json"}
        found: set[str] = set()
        offset = 0
        while True:
            query = f"?includefield=00080018&limit={page}&offset={offset}"
            try:
                reply = await self.auth.send(
                    self._session, "GET", url + query, headers=headers, timeout=timeout
                )
            except AuthError as exc:
                raise RequestFailed(f"QIDO-RS: {exc} (fix: {exc.fix})") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RequestFailed(f"QIDO-RS request failed: {exc!r}") from exc
            if reply.status == 204 or (reply.status == 404 and not offset):
                return found
            if reply.status != 200:
                raise RequestFailed(
                    "QIDO-RS: "
                    + http_hint("archive", reply.status, reply.body, self.auth,
                                reply.headers.get("WWW-Authenticate", ""), reply.reason)
                )  # fmt: skip
            try:
                matches: Any = json.loads(reply.body) if reply.body.strip() else []
            except ValueError as exc:
                raise RequestFailed(f"QIDO-RS: unparsable answer: {exc}") from exc
            if not isinstance(matches, list):
                raise RequestFailed("QIDO-RS: the answer is not a JSON array")
            for match in matches:
                value = match.get("00080018", {}).get("Value") if isinstance(match, dict) else None
                if isinstance(value, list) and value and isinstance(value[0], str):
                    found.add(value[0])
            if len(matches) < page:
                return found
            offset += len(matches)


class _Sha256Sink:
    """A stand-in for aiohttp's stream writer that hashes what a payload writes."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)


async def _payload_sha256(body: aiohttp.MultipartWriter) -> str:
    """SHA-256 of the bytes aiohttp sends for *body*: it writes itself into a
    hashing sink, reading its files in chunks (never whole into memory)."""
    sink = _Sha256Sink()
    await body.write(sink)  # type: ignore[arg-type]
    return sink.hash.hexdigest()


def _is_dicom_json(payload: bytes) -> bool:
    try:
        value: Any = json.loads(payload)
    except ValueError:
        return False
    return isinstance(value, dict) and bool(value)

"""DICOMweb STOW-RS client: one aiohttp session over verified, mutual TLS.

There is no plaintext or unverified mode.  The archive is checked against
``upload.ca_file`` (or the system CAs when that is empty) with hostname verification;
this box authenticates with ``upload.client_cert``/``client_key``.

A request stores one batch of instances of one study as
``multipart/related; type="application/dicom"``, streamed from the spool files.  The
answer is read per instance (PS3.18 10.5.3): ReferencedSOPSequence items are stored;
FailedSOPSequence items carry the archive's FailureReason.  What went wrong with the
request as a whole (connection, TLS, HTTP 5xx/429) is a :class:`RequestFailed`, and
the whole batch is retried later; a timeout or HTTP 413 is a :class:`RequestTooBig`,
and the pipeline splits the batch.  An answer that cannot be read (not JSON, not an
object, items of the wrong kind) never raises: each instance is retried, with a
reason that says what was wrong with the answer.

Timeouts: connecting gets ``upload.request_timeout_seconds``; the request as a whole
gets that plus the body size at ``upload.min_bytes_per_second``, so a big instance
can finish on a slow line.  With ``upload.max_bytes_per_second`` set, a paced request
is given the time its body takes at its share of the cap when that is slower.

Pacing (gateway.bandwidth): with a cap, each spool file goes out as a payload that
reads it in chunks and pays for each chunk in the shared token bucket before handing
it on; the files are never read into memory as a whole.  A priority-lane request is
not paced, but its bytes are charged to the bucket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import aiohttp
import aiohttp.payload
from pydicom.dataset import Dataset

from .bandwidth import CHUNK, TokenBucket
from .config import UploadConfig

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

# PS3.18 / PS3.4 failure reasons worth retrying: the archive was short of resources
# or failed to process, not a verdict on the instance itself.
_RETRYABLE_REASONS = {0x0110, 0x0212, 0x0213} | set(range(0xA700, 0xA800))


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


def ssl_context(config: UploadConfig) -> ssl.SSLContext:
    """Verified TLS >= 1.2 with our client certificate.  Raises on unreadable files."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(config.ca_file) if config.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # create_default_context already sets these; stated so no edit can loosen them.
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if config.client_cert is not None and config.client_key is not None:
        ctx.load_cert_chain(str(config.client_cert), str(config.client_key))
    return ctx


def describe_failure(code: int | None) -> str:
    names = {
        0x0110: "processing failure",
        0x0122: "SOP class not supported",
        0x0124: "not authorized",
        0xA700: "out of resources",
        0xA900: "data set does not match SOP class",
        0xC000: "cannot understand",
        0xC122: "referenced transfer syntax not supported",
    }
    if code is None:
        return "archive gave no failure reason"
    name = names.get(code) or ("out of resources" if 0xA700 <= code <= 0xA7FF else "failure")
    return f"archive refused: {name} (0x{code:04X})"


def parse_response(status: int, body: bytes, items: Sequence[Item]) -> dict[str, InstanceOutcome]:
    """Map the archive's STOW-RS answer (PS3.18 10.5.3) to an outcome for each item.

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
        ds = Dataset.from_json(value)
        outcomes = _outcomes(ds)
    except Exception as exc:  # from_json raises anything on odd JSON
        return _all_retry(items, f"HTTP {status} with an unreadable STOW-RS answer: {exc!r}")
    result: dict[str, InstanceOutcome] = {}
    for item in items:
        outcome = outcomes.get(item.sop_instance_uid)
        if outcome is None:
            # Neither stored nor refused: no proof it arrived, so send it again.
            outcome = InstanceOutcome(
                stored=False, retryable=True, reason=f"HTTP {status}: archive did not confirm it"
            )
        result[item.sop_instance_uid] = outcome
    return result


def _all_retry(items: Sequence[Item], reason: str) -> dict[str, InstanceOutcome]:
    outcome = InstanceOutcome(stored=False, retryable=True, reason=reason)
    return {item.sop_instance_uid: outcome for item in items}


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    """The items of a sequence, or none when the element is something else."""
    value = ds.get(keyword)
    if value is None or isinstance(value, (str, bytes)):
        return []
    try:
        return [item for item in value if isinstance(item, Dataset)]
    except TypeError:  # a single non-sequence value
        return []


def _uid(item: Dataset) -> str | None:
    value = item.get("ReferencedSOPInstanceUID")
    return value if isinstance(value, str) and value else None


def _outcomes(ds: Dataset) -> dict[str, InstanceOutcome]:
    outcomes: dict[str, InstanceOutcome] = {}
    for ref in _items(ds, "ReferencedSOPSequence"):
        if (uid := _uid(ref)) is not None:
            outcomes[uid] = InstanceOutcome(stored=True)
    for failed in _items(ds, "FailedSOPSequence"):
        if (uid := _uid(failed)) is None:
            continue
        code = failed.get("FailureReason")
        if code is None or isinstance(code, int):
            outcomes[uid] = InstanceOutcome(
                stored=False, retryable=code is None or code in _RETRYABLE_REASONS,
                reason=describe_failure(code),
            )  # fmt: skip
        else:  # multi-valued or not a number: not a verdict we can act on
            outcomes[uid] = InstanceOutcome(
                stored=False, retryable=True,
                reason=f"archive refused with an unreadable FailureReason {code!r}",
            )  # fmt: skip
    return outcomes


def http_hint(peer: str, status: int, body: bytes) -> str:
    """One line for an HTTP error from *peer* (the archive, the UPS-RS server) over our mTLS."""
    text = " ".join(body[:300].decode("utf-8", "replace").split())
    if status == 400 and "SSL certificate" in text:
        return (
            f"{peer} refused our client certificate (HTTP 400 'SSL certificate error'): "
            f"check upload.client_cert: {peer} does not trust the CA that signed it"
        )
    if status in (401, 403):
        return f"{peer} refused access (HTTP {status}): check this box's certificate/enrolment"
    return f"{peer} answered HTTP {status}: {text[:160]}"


async def _paced_chunks(f: BinaryIO, bucket: TokenBucket) -> AsyncIterator[bytes]:
    # Read in a thread: a slow disk must not stall the loop (the receiver's acks).
    while chunk := await asyncio.to_thread(f.read, CHUNK):
        await bucket.take(len(chunk))
        yield chunk


class PacedFile(aiohttp.payload.AsyncIterablePayload):
    """One spool file as a multipart part whose chunks are paid for in *bucket* before
    they are sent.  Its size is known, so the request keeps its Content-Length (no
    chunked transfer encoding, which some archives' proxies refuse)."""

    def __init__(self, f: BinaryIO, size: int, bucket: TokenBucket) -> None:
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
    ) -> None:
        self.config = config
        self.metrics = metrics
        #: Shared by every request of this client (None or rate 0: not paced).
        self.bucket = bucket
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
        files = []
        try:
            size = 0
            with aiohttp.MultipartWriter('related; type="application/dicom"') as body:
                for item in items:
                    f = open(item.path, "rb")  # noqa: SIM115 - closed in finally
                    files.append(f)
                    file_size = os.fstat(f.fileno()).st_size
                    size += file_size
                    if bucket is None:
                        body.append(f, {"Content-Type": "application/dicom"})
                    else:
                        body.append_payload(PacedFile(f, file_size, bucket))
            if priority and self.bucket is not None:
                self.bucket.charge(size)
            return await self._post(body, items, self.timeout_for(size, bucket is not None))
        finally:
            for f in files:
                f.close()

    async def _post(
        self, body: aiohttp.MultipartWriter, items: Sequence[Item], timeout: aiohttp.ClientTimeout
    ) -> dict[str, InstanceOutcome]:
        assert self._session is not None
        headers = {"Accept": "application/dicom+json"}
        started = time.monotonic()
        code = "error"
        try:
            async with self._session.post(
                self.url, data=body, headers=headers, timeout=timeout
            ) as resp:
                code = str(resp.status)
                payload = await resp.read()
                status = resp.status
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
        if status in (200, 202, 409) or (400 <= status < 500 and _is_dicom_json(payload)):
            return parse_response(status, payload, items)
        # Anything else (5xx, 429, a proxy's error page, a refused client certificate)
        # says nothing about the instances: the batch is retried with backoff.
        raise RequestFailed(http_hint("archive", status, payload))


def _is_dicom_json(payload: bytes) -> bool:
    try:
        value: Any = json.loads(payload)
    except ValueError:
        return False
    return isinstance(value, dict) and bool(value)

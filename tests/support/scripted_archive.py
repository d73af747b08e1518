"""A scripted STOW-RS archive over mutual TLS, for answers Orthanc cannot be made to give.

This is a hand-written test double, not a real archive: it exists because no real
server answers a STOW-RS request with ``[]``, stalls on purpose, or resets a
connection on cue.  Everything a real archive can be made to do is tested against
Orthanc behind nginx (tests/support/archive.py).

Written from DICOM PS3.18 section 10.5 (Store Transaction):

* 10.5.1: the request is ``POST {base}/studies`` with a
  ``multipart/related; type="application/dicom"`` body, one instance per part;
* 10.5.3: a response body is a Store Instances Response Module (PS3.18 Table
  10.5.3-1) as ``application/dicom+json``: Referenced SOP Sequence (0008,1199) lists
  what was stored, Failed SOP Sequence (0008,1198) what was not, each item with
  Referenced SOP Class/Instance UID (0008,1150/1155) and, when failed, Failure
  Reason (0008,1197);
* 10.5.3 status codes: 200 all stored, 202 some stored or with warnings, 409 none
  stored, 413 payload too large, 503 busy, 400/401/403 as usual for HTTP.

It also holds what it stored (:attr:`ScriptedArchive.held`) and serves WADO-RS
instance metadata for it (PS3.18 10.4: ``GET {base}/studies/{study}/series/{series}
/instances/{sop}/metadata``, a JSON array of one DICOM JSON object, 404 for an instance
it does not hold), which is how the gateway checks an "already stored" answer.

Vendor answers: no cloud archive is reachable from this machine, and dcm4chee-arc-light
(a WildFly application with its LDAP and database) is not installable from its
package sources, so each one's STOW-RS behaviour is reproduced here from its public
documentation and open-source code, cited at each answer function
(:func:`google_answer`, :func:`azure_answer`, :func:`dcm4chee_answer`,
:func:`aws_answer`, :func:`duplicate_0111_answer`).  They
decide per instance from what the archive holds, so "a duplicate after a crash" is an
instance already held with the same content (:func:`stored_then_dropped` stores and
then drops the connection, as a crash or a timeout after the archive had it looks to
the gateway), and "a conflicting duplicate" is one held under the same UIDs with other
content (:meth:`ScriptedArchive.hold` with changed attributes).

The server speaks TLS 1.2+ and requires a client certificate signed by its trustme CA
(as nginx's ``ssl_verify_client on`` does in the real lab).  It is a
:class:`~tests.support.tls_site.TlsSite`: it runs its own event loop in a thread, so
both a gateway child process and a pipeline running in the test's own loop can use
it.  By default every request is answered correctly (every instance
stored, status 200); :meth:`ScriptedArchive.script` queues other answers, one per
request, in order.  The multipart body is read with aiohttp's reader, each instance
with pydicom.

Request credentials (issue 14): with :attr:`ScriptedArchive.require_auth` set, every
request (STOW-RS, WADO-RS metadata, the QIDO-RS probe ``GET /dicom-web/studies``, the UPS-RS search
``GET /ups/workitems``, the heartbeat ``POST /heartbeat``) is read in full and
checked by it first; a refusal is HTTP 401 with a JSON error body and, for bearer
tokens, ``WWW-Authenticate: Bearer error="invalid_token", error_description=...``
(RFC 6750 section 3, https://www.rfc-editor.org/rfc/rfc6750#section-3), or what
:attr:`ScriptedArchive.refusal` makes.  :meth:`ScriptedArchive.revoke` refuses one
bearer token from then on, which makes the gateway refresh and send again.  With
``client_cert_required=False`` no client certificate is asked (the clouds take a
token alone).
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pydicom
import pytest
from aiohttp import web
from pydicom.dataset import Dataset

from .tls_site import TlsSite

#: One scripted answer: given the exchange, the HTTP response (or an exception that
#: aborts the connection).
Answer = Callable[["Exchange"], Awaitable[web.StreamResponse]]


#: VRs a metadata answer leaves out (as Azure's does; bulk data is not metadata).
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


@dataclass
class Held:
    """An instance as the archive holds it."""

    data: bytes
    dataset: Dataset  # without pixel data

    @property
    def study(self) -> str:
        return str(self.dataset.StudyInstanceUID)

    @property
    def series(self) -> str:
        return str(self.dataset.SeriesInstanceUID)

    def metadata(self) -> dict[str, Any]:
        ds = Dataset()
        for element in self.dataset:
            if element.VR not in _BINARY_VRS:
                ds.add(element)
        return ds.to_json_dict()


def _parse(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


@dataclass
class Exchange:
    """One request as the archive sees it."""

    request: web.Request
    archive: ScriptedArchive
    uids: list[str] = field(default_factory=list)
    read: bool = False
    #: Each instance of the request by SOP Instance UID: its bytes and attributes.
    parts: dict[str, Held] = field(default_factory=dict)
    #: The body, when it was read in full to check the request's credentials.
    content: aiohttp.StreamReader | None = None

    async def read_instances(self, bytes_per_second: float | None = None) -> list[str]:
        """Read the multipart body (throttled to *bytes_per_second* if given); the
        SOP Instance UIDs in it, in order."""
        if self.read:
            return self.uids
        self.read = True
        if self.content is not None:
            reader = aiohttp.MultipartReader(self.request.headers, self.content)
        else:
            reader = await self.request.multipart()
        while (part := await reader.next()) is not None:
            assert not isinstance(part, type(reader)), "nested multipart"
            chunks = []
            while chunk := await part.read_chunk(64 * 1024):
                chunks.append(chunk)
                self.archive.chunks.append((time.monotonic(), len(chunk)))
                if bytes_per_second:
                    await asyncio.sleep(len(chunk) / bytes_per_second)
            data = b"".join(chunks)
            ds = _parse(data)
            uid = str(ds.SOPInstanceUID)
            self.uids.append(uid)
            self.parts[uid] = Held(data, ds)
            self.archive.received[uid] = data
        self.archive.requests.append(list(self.uids))
        self.archive.request_sizes.append(self.request.content_length or 0)
        return self.uids

    def keep(self, uid: str) -> None:
        """Store this request's instance *uid* (the archive now holds it)."""
        with self.archive._lock:
            self.archive.held[uid] = self.parts[uid]
            self.archive.stored.add(uid)


# -- answers ----------------------------------------------------------------------------


def _ref(
    uid: str, code: int | None = None, sop_class: str = "1.2.840.10008.5.1.4.1.1.7"
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [sop_class]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if code is not None:
        item["00081197"] = {"vr": "US", "Value": [code]}
    return item


def dicom_json(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/dicom+json"
    )


def store_all(status: int = 200) -> Answer:
    """The correct answer: every instance stored (10.5.3, status 200)."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        uids = await ex.read_instances()
        for uid in uids:
            ex.keep(uid)
        return dicom_json(status, {"00081199": {"vr": "SQ", "Value": [_ref(u) for u in uids]}})

    return answer


def raw(status: int, body: bytes, content_type: str = "application/dicom+json") -> Answer:
    """Read the request, store nothing, answer *body* as it is (``[]``, ``null``...)."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        await ex.read_instances()
        return web.Response(status=status, body=body, content_type=content_type)

    return answer


def json_answer(status: int, make: Callable[[list[str]], Any]) -> Answer:
    """Read the request, store nothing, answer ``make(uids)`` as DICOM JSON."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        return dicom_json(status, make(await ex.read_instances()))

    return answer


def failed_all(status: int, code_value: list[Any], vr: str = "US") -> Answer:
    """Every instance in Failed SOP Sequence with Failure Reason *code_value*."""

    def make(uids: list[str]) -> Any:
        items = [{**_ref(u), "00081197": {"vr": vr, "Value": code_value}} for u in uids]
        return {"00081198": {"vr": "SQ", "Value": items}}

    return json_answer(status, make)


def too_large(limit: int = 1) -> Answer:
    """HTTP 413 for a request of more than *limit* instances; else stored."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        uids = await ex.read_instances()
        if len(uids) > limit:
            return web.Response(status=413, text="<html><body>413 Request Entity Too Large")
        return await store_all()(ex)

    return answer


def stall(seconds: float) -> Answer:
    """Read the request, then answer nothing for *seconds* (then store it)."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        await ex.read_instances()
        await asyncio.sleep(seconds)
        return await store_all()(ex)

    return answer


def throttled(bytes_per_second: float) -> Answer:
    """A slow line: the body is read at *bytes_per_second*, then stored."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        await ex.read_instances(bytes_per_second)
        return await store_all()(ex)

    return answer


def reset() -> Answer:
    """The connection is dropped mid-request, with no HTTP answer."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        transport = ex.request.transport
        assert transport is not None
        transport.abort()
        raise ConnectionResetError("scripted reset")

    return answer


def html_error(status: int) -> Answer:
    """A proxy's error page (503, 429, 502...)."""
    return raw(status, f"<html><body><h1>{status}</h1>proxy error</body></html>".encode(),
               content_type="text/html")  # fmt: skip


# -- vendor answers ------------------------------------------------------------------------


@dataclass
class _Answer:
    """A Store Instances Response (PS3.18 Table 10.5.3-1) being built."""

    stored: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    warned: bool = False

    def ok(self, held: Held, warning: int | None = None, comments: tuple[str, ...] = ()) -> None:
        item = _ref(str(held.dataset.SOPInstanceUID), sop_class=str(held.dataset.SOPClassUID))
        if warning is not None:
            item["00081196"] = {"vr": "US", "Value": [warning]}
            self.warned = True
        if comments:
            item["00741048"] = {"vr": "SQ", "Value": [
                {"00000902": {"vr": "LO", "Value": [c]}} for c in comments
            ]}  # fmt: skip
        self.stored.append(item)

    def fail(self, held: Held | None, code: int, **extra: dict[str, Any]) -> None:
        item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [code]}}
        if held is not None:  # None: a part the archive could not read names nothing
            item.update(_ref(str(held.dataset.SOPInstanceUID),
                             sop_class=str(held.dataset.SOPClassUID)))  # fmt: skip
        item.update(extra)
        self.failed.append(item)

    def response(self, **top: dict[str, Any]) -> web.Response:
        """PS3.18 10.5.3: 200 all stored, 202 some (or with warnings), 409 none."""
        body: dict[str, Any] = dict(top)
        if self.stored:
            body["00081199"] = {"vr": "SQ", "Value": self.stored}
        if self.failed:
            body["00081198"] = {"vr": "SQ", "Value": self.failed}
        status = 409 if not self.stored else 202 if self.failed or self.warned else 200
        return dicom_json(status, body)


def _same(a: Held, b: Held) -> bool:
    return a.data == b.data


#: Google's private FailureDetail text for other bytes under a stored UID, as reported
#: in GoogleCloudPlatform/nodejs-docs-samples#3502.
GOOGLE_CONFLICT = (
    "An instance already exists in this DICOM Store with the same Study/Series/SOPInstance"
    " UID, but the DICOM files differ (checksum mismatch)."
)


def google_answer(*, warnings: dict[str, int] | None = None) -> Answer:
    """Google Cloud Healthcare API's Store transaction, as far as it is public:

    * https://cloud.google.com/healthcare-api/docs/dicom (Store transaction);
    * an identical re-upload is stored without error, other bytes under stored UIDs get
      HTTP 409: https://github.com/GoogleCloudPlatform/healthcare-api-dicom-fuse/issues/20;
    * the 409 item has FailureReason 272 (0x0110) and a private FailureDetail
      (0009,0097), https://github.com/dcmjs-org/dcmjs/issues/249, with the text of
      https://github.com/GoogleCloudPlatform/nodejs-docs-samples/issues/3502.

    *warnings*: a PS3.18 WarningReason (Table 10.5.3-1) for these instances, which the
    standard lets any archive send with a stored instance; Google documents none of
    its own, so these are the standard's codes.
    """
    warned = warnings or {}

    async def answer(ex: Exchange) -> web.StreamResponse:
        out = _Answer()
        for uid in await ex.read_instances():
            part, held = ex.parts[uid], ex.archive.held.get(uid)
            if held is not None and not _same(part, held):
                out.fail(part, 0x0110, **{"00090097": {"vr": "LT", "Value": [GOOGLE_CONFLICT]}})
                continue
            ex.keep(uid)
            out.ok(part, warning=warned.get(uid))
        return out.response()

    return answer


def azure_answer(
    *,
    pending: set[str] | None = None,
    unreadable: set[str] | None = None,
    warnings: dict[str, tuple[int, tuple[str, ...]]] | None = None,
) -> Answer:
    """The Azure DICOM service's Store (STOW-RS), v2:

    * https://learn.microsoft.com/azure/healthcare-apis/dicom/dicom-services-conformance-statement-v2
      (status codes; failure codes 272, 43264, 43265, 45070, 45071; warnings 45063 and 1
      with a FailedAttributesSequence of ErrorComments);
    * microsoft/dicom-server src/Microsoft.Health.Dicom.Core/Features/Store/
      StoreService.cs (45070 when the instance exists, 45071 while one is pending),
      StoreResponseBuilder.cs (a failure item without UIDs when the part could not be
      read; 202 when some failed or, in v2, when stored ones carry warnings).

    *pending*: UIDs answered 45071 once (an earlier attempt not cleaned up yet);
    *unreadable*: UIDs whose part it "cannot read" (failure 272, no UIDs in the item);
    *warnings*: UID -> (WarningReason, ErrorComments) for instances stored with them.
    """
    pending = pending if pending is not None else set()
    unreadable = unreadable or set()
    warnings = warnings or {}

    async def answer(ex: Exchange) -> web.StreamResponse:
        out = _Answer()
        for uid in await ex.read_instances():
            part = ex.parts[uid]
            if uid in unreadable:
                out.fail(None, 272)
            elif uid in pending:
                pending.discard(uid)
                out.fail(part, 45071)
            elif uid in ex.archive.held:
                out.fail(part, 45070)  # same identifiers: already stored, whatever the bytes
            else:
                ex.keep(uid)
                code, comments = warnings.get(uid, (None, ()))
                out.ok(part, code, comments)
        return out.response()

    return answer


def dcm4chee_answer(*, rejected: set[str] | None = None) -> Answer:
    """dcm4chee-arc-light's STOW-RS (StowRS.java) over its StoreService:

    * https://github.com/dcm4che/dcm4chee-arc-light/blob/master/dcm4chee-arc-store/src/main/java/org/dcm4chee/arc/store/StoreService.java
      (A771 subsequent occurrence of a rejected object, A778 conflicting Patient ID);
    * .../store/impl/StoreServiceEJB.java updateDB: a duplicate is ignored under the
      default overwrite policy NEVER ("Ignore received Instance") without an exception,
      so StowRS.java lists it in ReferencedSOPSequence as stored and keeps the old copy;
    * StowRS.java: a DicomServiceException's status becomes the item's FailureReason and
      its message the response's ErrorComment; 409 when nothing was stored.

    *rejected*: UIDs of instances rejected earlier (A771).
    """
    rejected = rejected or set()

    async def answer(ex: Exchange) -> web.StreamResponse:
        out = _Answer()
        comment = ""
        for uid in await ex.read_instances():
            part = ex.parts[uid]
            if uid in rejected:
                out.fail(part, 0xA771)
                comment = f"Subsequent occurrence of rejected Object [uid={uid}, rejection=113001]"
                continue
            if uid in ex.archive.held:
                out.ok(part)  # ignored duplicate: answered as stored, the old copy stays
                continue
            others = [h for h in ex.archive.held.values() if h.study == part.study]
            theirs = {str(h.dataset.get("PatientID", "")) for h in others}
            ours = str(part.dataset.get("PatientID", ""))
            if theirs and ours not in theirs:
                out.fail(part, 0xA778)
                comment = (f"Patient ID {ours} differs from Patient ID {theirs.pop()} in previous"
                           f" received object of Study[uid={part.study}].")  # fmt: skip
                continue
            ex.keep(uid)
            out.ok(part)
        top = {"00000902": {"vr": "LO", "Value": [comment]}} if comment else {}
        return out.response(**top)

    return answer


def aws_answer(
    *, max_request_bytes: int = 1_000_000_000, warnings: dict[str, int] | None = None
) -> Answer:
    """AWS HealthImaging StoreDICOM:

    * https://docs.aws.amazon.com/healthimaging/latest/devguide/dicomweb-storing.html:
      up to 1 GB of DICOM data per request; data whose metadata conflicts with an
      existing primary image set goes to a non-primary image set (stored, no error);
    * https://docs.aws.amazon.com/healthimaging/latest/devguide/dicomweb-retrieve-instance-metadata.html:
      instance metadata comes from primary image sets (here: :attr:`held`).

    How a request over the limit is refused is not documented: this double answers
    HTTP 413 (and counts it in :attr:`ScriptedArchive.refusals`).

    *warnings*: a WarningReason for these instances, such as HealthImaging's own 0xB100
    (pixel data kept as a blob,
    https://docs.aws.amazon.com/healthimaging/latest/devguide/reference-warning-codes.html).
    """
    warned = warnings or {}

    async def answer(ex: Exchange) -> web.StreamResponse:
        uids = await ex.read_instances()
        if (ex.request.content_length or 0) > max_request_bytes:
            ex.archive.refusals += 1
            return web.json_response({"message": "Request size exceeded"}, status=413)
        out = _Answer()
        for uid in uids:
            part, held = ex.parts[uid], ex.archive.held.get(uid)
            if held is not None and not _same(part, held):
                ex.archive.non_primary[uid] = part  # the primary image set keeps its copy
                ex.archive.stored.add(uid)
            else:
                ex.keep(uid)
            out.ok(part, warning=warned.get(uid))
        return out.response()

    return answer


def duplicate_0111_answer() -> Answer:
    """A PS3.18 archive that answers an instance it already holds with FailureReason
    0x0111 (Duplicate SOP Instance, PS3.7 Annex C:
    https://dicom.nema.org/medical/dicom/current/output/chtml/part07/chapter_C.html)."""

    async def answer(ex: Exchange) -> web.StreamResponse:
        out = _Answer()
        for uid in await ex.read_instances():
            if uid in ex.archive.held:
                out.fail(ex.parts[uid], 0x0111)
            else:
                ex.keep(uid)
                out.ok(ex.parts[uid])
        return out.response()

    return answer


def stored_then_dropped(answer: Answer) -> Answer:
    """*answer* decides and stores, then the connection drops before the gateway reads
    the answer: a crash or a timeout after the archive had the instances."""

    async def dropped(ex: Exchange) -> web.StreamResponse:
        await answer(ex)
        transport = ex.request.transport
        assert transport is not None
        transport.abort()
        raise ConnectionResetError("scripted drop after storing")

    return dropped


# -- the server ---------------------------------------------------------------------------


def bearer_refusal(description: str = "The access token is invalid or has expired") -> web.Response:
    """RFC 6750 3.1 ``invalid_token``, with a JSON body saying the same."""
    challenge = (
        f'Bearer realm="scripted-archive", error="invalid_token", error_description="{description}"'
    )
    return web.json_response(
        {"error": "invalid_token", "error_description": description},
        status=401,
        headers={"WWW-Authenticate": challenge},
    )


#: Checks a request's credentials: (request, body) -> allowed.
AuthCheck = Callable[[web.Request, bytes], bool]


class ScriptedArchive(TlsSite):
    def __init__(self, workdir: Path, client_cert_required: bool = True) -> None:
        super().__init__(workdir, "archive", client_max_size=1024**3, handler_cancellation=True)
        client = self.ca.issue_cert("gateway-box")
        self.client_cert = workdir / "client.pem"
        self.client_key = workdir / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        ctx = self.server_context
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert_required else ssl.CERT_NONE
        self.ca.configure_trust(ctx)
        self.client_cert_required = client_cert_required
        self.app.router.add_post("/dicom-web/studies", self._handle)
        self.app.router.add_get(
            "/dicom-web/studies/{study}/series/{series}/instances/{sop}/metadata", self._metadata
        )
        self.app.router.add_get("/dicom-web/studies", self._other)
        self.app.router.add_get("/ups/workitems", self._other)
        self.app.router.add_post("/heartbeat", self._other)
        self._script: list[Answer] = []
        self.default: Answer = store_all()
        #: Every request's SOP Instance UIDs, in arrival order (read requests only).
        self.requests: list[list[str]] = []
        #: Each instance's bytes as last received, and the UIDs answered as stored.
        self.received: dict[str, bytes] = {}
        self.stored: set[str] = set()
        #: What the archive holds (serves WADO-RS metadata of), by SOP Instance UID;
        #: AWS files a conflicting re-send in a non-primary image set instead.
        self.held: dict[str, Held] = {}
        self.non_primary: dict[str, Held] = {}
        #: The body size (Content-Length) of every request read, in order.
        self.request_sizes: list[int] = []
        #: Requests refused for their size.
        self.refusals = 0
        #: SOP Instance UIDs of the WADO-RS metadata requests, in order.
        self.metadata_requests: list[str] = []
        #: HTTP statuses for the next metadata requests (then: served from held).
        self.metadata_script: list[int] = []
        #: (time.monotonic(), bytes) of each body chunk read, for throughput tests.
        self.chunks: list[tuple[float, int]] = []
        #: How many requests were answered (scripted or default).
        self.answered = 0
        #: Credentials check of every request (None: none asked); see the module docstring.
        self.require_auth: AuthCheck | None = None
        #: The answer to a request whose credentials are refused.
        self.refusal: Callable[[], web.Response] = bearer_refusal
        #: Authorization headers of every request, and how many were refused.
        self.authorizations: list[str] = []
        self.refused = 0
        self.revoked: set[str] = set()
        #: (method, path with query) of the GET/heartbeat requests, and heartbeat bodies.
        self.other_requests: list[tuple[str, str]] = []
        self.heartbeats: list[bytes] = []
        #: The headers of each heartbeat, as received.
        self.heartbeat_headers: list[dict[str, str]] = []

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def upload_config(self, **overrides: Any) -> dict[str, Any]:
        """``[upload]`` keys that point a gateway at this archive (with the client
        certificate when this archive asks for one)."""
        keys: dict[str, Any] = {"dicomweb_url": self.dicomweb_url, "ca_file": str(self.ca_file)}
        if self.client_cert_required:
            keys |= {"client_cert": str(self.client_cert), "client_key": str(self.client_key)}
        return keys | overrides

    def hold(self, path: Path, **changes: Any) -> Held:
        """Hold the instance in *path* as if stored earlier, with *changes* to its
        attributes (e.g. another PatientID: a conflicting copy under the same UIDs)."""
        if changes:
            ds = pydicom.dcmread(path)
            for keyword, value in changes.items():
                setattr(ds, keyword, value)
            buffer = io.BytesIO()
            ds.save_as(buffer)
            data = buffer.getvalue()
        else:
            data = path.read_bytes()
        held = Held(data, _parse(data))
        with self._lock:
            self.held[str(held.dataset.SOPInstanceUID)] = held
        return held

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with *answers*, in order; then the default."""
        with self._lock:
            self._script.extend(answers)

    @property
    def pending_script(self) -> int:
        with self._lock:
            return len(self._script)

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        """WADO-RS instance metadata (PS3.18 10.4.1.1.2) of what the archive holds."""
        if self.require_auth is not None:
            refusal, _ = await self._refused(request)
            if refusal is not None:
                return refusal
        sop = request.match_info["sop"]
        with self._lock:
            self.metadata_requests.append(sop)
            scripted = self.metadata_script.pop(0) if self.metadata_script else None
            held = self.held.get(sop)
        if scripted is not None:
            return web.Response(status=scripted, text=f"scripted {scripted}")
        if (
            held is None
            or held.study != request.match_info["study"]
            or held.series != request.match_info["series"]
        ):
            return web.Response(status=404, text="no such instance")
        return dicom_json(200, [held.metadata()])

    def revoke(self, authorization: str) -> None:
        """Refuse the bearer token of *authorization* from now on."""
        with self._lock:
            self.revoked.add(authorization.partition(" ")[2].strip())

    async def _refused(self, request: web.Request) -> tuple[web.Response | None, bytes]:
        """Read the body and check the credentials: a refusal, or None and the body."""
        body = await request.read()
        authorization = request.headers.get("Authorization", "")
        with self._lock:
            self.authorizations.append(authorization)
            revoked = authorization.partition(" ")[2].strip() in self.revoked
        check = self.require_auth
        if check is None or (not revoked and check(request, body)):
            return None, body
        with self._lock:
            self.refused += 1
        return self.refusal(), body

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        content = None
        if self.require_auth is not None:
            refusal, body = await self._refused(request)
            if refusal is not None:
                return refusal
            content = aiohttp.StreamReader(
                request.protocol, len(body) + 1, loop=asyncio.get_running_loop()
            )
            content.feed_data(body)
            content.feed_eof()
        with self._lock:
            answer = self._script.pop(0) if self._script else self.default
            self.answered += 1
        return await answer(Exchange(request, self, content=content))

    async def _other(self, request: web.Request) -> web.StreamResponse:
        """QIDO-RS ``/studies``, UPS-RS ``/workitems`` (nothing found) and the heartbeat."""
        refusal, body = await self._refused(request)
        if refusal is not None:
            return refusal
        with self._lock:
            self.other_requests.append((request.method, request.raw_path))
            if request.path == "/heartbeat":
                self.heartbeats.append(body)
                self.heartbeat_headers.append(dict(request.headers))
        if request.path == "/heartbeat":
            return web.Response(status=204)
        return dicom_json(200, [])


@pytest.fixture
def scripted_archive(tmp_path: Path) -> Iterator[ScriptedArchive]:
    archive = ScriptedArchive(tmp_path / "scripted-archive").start()
    try:
        yield archive
    finally:
        archive.stop()

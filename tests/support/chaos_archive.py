"""A fault injector in front of a REAL archive, for the chaos soak (tests/support/chaos_soak.py).

What it is: an aiohttp reverse proxy over TLS that requires a client certificate (as
the nginx front of tests/support/archive.py does, ``ssl_verify_client on``, certificates from
the same kind of trustme test CA), forwarding to a real Orthanc + orthanc-dicomweb on
its plain HTTP port on loopback.  It is not a double of the archive: every answer
that claims something was stored comes from Orthanc.  Only the faults are made up,
and their answer formats are written from PS3.18 §10.5 (STOW-RS): the response is a
DICOM JSON object (PS3.18 F.2) holding ReferencedSOPSequence (0008,1199) for stored
instances and FailedSOPSequence (0008,1198) with FailureReason (0008,1197) for the
others; 200 is all stored, 202 some failed, 409 all failed (§10.5.3.1, Table
10.5.3-1); 413 and 503 carry no per-instance information, nor does 429 (RFC 6585, with
Retry-After).

For each STOW-RS request (``POST .../studies[/{study}]``) one :class:`Fault` is drawn
from a seeded random generator (the seed is printed by the soak) unless chaos is off:

* ``forward``: passed to Orthanc, its answer passed back.
* ``unavailable-503``, ``too-many-429`` (Retry-After), ``too-large-413``,
  ``html-502`` (a "proxy" error page): answered without forwarding.
* ``conflict-409``: answered without forwarding, every instance in FailedSOPSequence
  with FailureReason 0xA700 (out of resources) or 0x0110 (processing failure), both
  retryable; consistent, since Orthanc never saw the request.
* ``malformed-200`` (truncated JSON) and ``non-object-200`` (``[]``, ``null``, a JSON
  string, a ReferencedSOPSequence that is not a sequence): forwarded first, so Orthanc
  did store the instances, and only the answer is broken.  ``odd-failure-200``: not
  forwarded, a FailedSOPSequence item whose FailureReason has two values.
* ``stall``: the body is read, then (half of the time after forwarding it) nothing is
  answered for :attr:`ChaosArchive.stall_seconds`, longer than the gateway's request
  timeout.  It is never forwarded after the stall: a late delivery of old content
  would be a fault of the network, not of the gateway.
* ``reset``: the connection is closed mid-request (after at most one part was read).
* ``leave-out``: forwarded; a random non-empty subset of Orthanc's
  ReferencedSOPSequence items is removed from the answer (those instances ARE stored,
  the answer just does not say so).

Orthanc being down (see :meth:`ChaosArchive.restart_orthanc`) turns a forward into a
``html-502`` counted as ``orthanc-down-502``.  :meth:`ChaosArchive.pause_listening`
closes the listening socket for a while (connections refused).

The proxy runs on its own event loop in a daemon thread, so a synchronous driver can
use it.  Debian packages: orthanc, orthanc-dicomweb (as tests/support/archive.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pydicom
from aiohttp import web
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .archive import ArchiveLab
from .peers import free_port

T = TypeVar("T")

_STOW_PATHS = ("/dicom-web/studies", "/dicom-web/studies/")
_DICOM_JSON = "application/dicom+json"


class Fault(StrEnum):
    FORWARD = "forward"
    UNAVAILABLE_503 = "unavailable-503"
    TOO_MANY_429 = "too-many-429"
    CONFLICT_409 = "conflict-409"
    TOO_LARGE_413 = "too-large-413"
    MALFORMED_200 = "malformed-200"
    NON_OBJECT_200 = "non-object-200"
    ODD_FAILURE_200 = "odd-failure-200"
    HTML_502 = "html-502"
    STALL = "stall"
    RESET = "reset"
    LEAVE_OUT = "leave-out"


#: Relative weights of the faults while chaos is on: about a third of the requests
#: are forwarded untouched, so the queue still makes progress.
DEFAULT_WEIGHTS: dict[Fault, float] = {
    Fault.FORWARD: 10.0,
    Fault.UNAVAILABLE_503: 2.0,
    Fault.TOO_MANY_429: 2.0,
    Fault.CONFLICT_409: 2.0,
    Fault.TOO_LARGE_413: 1.0,
    Fault.MALFORMED_200: 1.5,
    Fault.NON_OBJECT_200: 2.0,
    Fault.ODD_FAILURE_200: 1.0,
    Fault.HTML_502: 1.5,
    Fault.STALL: 1.0,
    Fault.RESET: 1.5,
    Fault.LEAVE_OUT: 2.5,
}

_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


@dataclass
class Decision:
    """What the proxy did with one STOW-RS request (for the soak's failure reports)."""

    at: float  # time.monotonic()
    fault: str
    uids: list[str]
    detail: str = ""


@dataclass
class ArchiveCounts:
    answers: Counter[str] = field(default_factory=Counter)
    listening_pauses: int = 0
    orthanc_restarts: int = 0


class _Orthanc(ArchiveLab):
    """tests/support/archive.py's Orthanc (same config, certificates, storage dir) without its
    nginx front: the chaos proxy is the front."""

    def start_nginx(self) -> None:
        pass

    def stop_nginx(self) -> None:
        pass

    def restart(self) -> None:
        """Kill Orthanc and start it again on the same storage (which persists)."""
        self.stop()
        self.start()


class ChaosArchive:
    def __init__(
        self,
        workdir: Path,
        seed: int,
        *,
        stall_seconds: float = 8.0,
        weights: dict[Fault, float] | None = None,
    ) -> None:
        self.orthanc = _Orthanc(workdir)
        self.port = free_port()
        self.dicomweb_url = f"https://localhost:{self.port}/dicom-web"
        self.ca_file = self.orthanc.ca_file
        self.client_cert = self.orthanc.client_cert
        self.client_key = self.orthanc.client_key
        self.stall_seconds = stall_seconds
        self.chaos = False
        self.counts = ArchiveCounts()
        self.decisions: list[Decision] = []
        self._weights = weights or DEFAULT_WEIGHTS
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-archive")
        self._thread.daemon = True
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._client: aiohttp.ClientSession | None = None
        self._orthanc_up = False

    # -- lifecycle (called from the driver's threads) ------------------------------------
    def start(self) -> ChaosArchive:
        self.orthanc.start()
        self._orthanc_up = True
        self._thread.start()
        self._call(self._async_start())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._async_stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
        if not self._loop.is_running():
            self._loop.close()
        self.orthanc.stop()

    def set_chaos(self, on: bool) -> None:
        self.chaos = on

    def pause_listening(self, seconds: float) -> None:
        """Close the listening socket (connections refused) for *seconds*, then reopen."""
        self._call(self._stop_site())
        with self._lock:
            self.counts.listening_pauses += 1
        time.sleep(seconds)
        self._call(self._start_site())

    def restart_orthanc(self) -> None:
        """Kill the real archive and start it again; forwards meanwhile get a 502."""
        self._orthanc_up = False
        try:
            self.orthanc.restart()
        finally:
            self._orthanc_up = True
        with self._lock:
            self.counts.orthanc_restarts += 1

    def decisions_for(self, uid: str) -> list[Decision]:
        with self._lock:
            return [d for d in self.decisions if uid in d.uids]

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- on the proxy's loop ------------------------------------------------------------
    async def _async_start(self) -> None:
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
        await self._runner.setup()
        await self._start_site()

    async def _async_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    def _tls(self) -> ssl.SSLContext:
        # As the lab's nginx: TLS 1.2+, our test CA's server certificate, and a client
        # certificate signed by that CA required (ssl_verify_client on).
        w = self.orthanc.work
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(w / "server.pem"), str(w / "server.key"))
        ctx.load_verify_locations(str(w / "ca.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def _start_site(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(
            self._runner, "127.0.0.1", self.port, ssl_context=self._tls(), reuse_address=True
        )
        await self._site.start()

    async def _stop_site(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    def _draw(self) -> Fault:
        if not self.chaos:
            return Fault.FORWARD
        faults = list(self._weights)
        with self._lock:
            return self._rng.choices(faults, [self._weights[f] for f in faults])[0]

    def _record(self, fault: str, uids: list[str], detail: str = "") -> None:
        with self._lock:
            self.counts.answers[str(fault)] += 1
            self.decisions.append(Decision(time.monotonic(), str(fault), uids, detail))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST" or not _is_stow_path(request.path):
            return await self._forward_other(request)
        fault = self._draw()
        if fault is Fault.RESET:
            # Mid-request: take at most one part of the body, then drop the connection.
            reader = await request.multipart()
            part = await reader.next()
            if isinstance(part, aiohttp.BodyPartReader):
                await part.read()
            self._record(fault, [])
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        try:
            parts = await _read_parts(request)
        except (ConnectionError, aiohttp.ClientPayloadError):
            # The gateway dropped the request mid-body (it timed out, or it is exiting).
            self._record("client-gone", [])
            return web.Response(status=400)
        uids = [_sop_uids(p)[1] for p in parts]
        with self._lock:
            rng_value = self._rng.random()
            pick = self._rng.randrange(1 << 30)
        if fault is Fault.UNAVAILABLE_503:
            self._record(fault, uids)
            return web.Response(status=503, text="archive is down for maintenance\n")
        if fault is Fault.TOO_MANY_429:
            self._record(fault, uids)
            return web.Response(
                status=429, text="slow down\n", headers={"Retry-After": str(1 + pick % 3)}
            )
        if fault is Fault.TOO_LARGE_413:
            self._record(fault, uids)
            return web.Response(status=413, text="request entity too large\n")
        if fault is Fault.HTML_502:
            self._record(fault, uids)
            return web.Response(status=502, body=_HTML_502, content_type="text/html")
        if fault is Fault.CONFLICT_409:
            reason = 0xA700 if rng_value < 0.5 else 0x0110
            self._record(fault, uids, f"FailureReason 0x{reason:04X}")
            return _dicom_json(409, _failed_answer(parts, [reason]))
        if fault is Fault.ODD_FAILURE_200:
            self._record(fault, uids, "FailureReason with two values")
            return _dicom_json(200, _failed_answer(parts, [0xA700, 0xC000]))
        if fault is Fault.STALL:
            forwarded = rng_value < 0.5
            if forwarded:
                answer = await self._forward(request, parts)
                if answer.status >= 500:  # Orthanc down: the stall is then plain
                    forwarded = False
            self._record(fault, uids, "after forwarding" if forwarded else "not forwarded")
            await asyncio.sleep(self.stall_seconds)
            return web.Response(status=504, text="stalled\n")
        answer = await self._forward(request, parts)
        if answer.status >= 500 and answer.content_type == "text/html":
            self._record("orthanc-down-502", uids, f"instead of {fault}")
            return answer
        if fault is Fault.FORWARD:
            self._record(fault, uids, f"HTTP {answer.status}")
            return answer
        if fault is Fault.MALFORMED_200:
            self._record(fault, uids, f"Orthanc said {answer.status}")
            return web.Response(
                status=200, body=b'{"00081199": {"vr": "SQ", "Value": [{"0008', **_JSON_CT
            )
        if fault is Fault.NON_OBJECT_200:
            bodies = [b"[]", b"null", b'"stored"', _referenced_not_a_sequence(uids)]
            body = bodies[pick % len(bodies)]
            self._record(fault, uids, f"Orthanc said {answer.status}; sent {body[:40]!r}")
            return web.Response(status=200, body=body, **_JSON_CT)
        assert fault is Fault.LEAVE_OUT
        return self._leave_out(answer, uids, pick)

    def _leave_out(self, answer: web.Response, uids: list[str], pick: int) -> web.Response:
        assert isinstance(answer.body, bytes)
        try:
            doc = json.loads(answer.body)
            refs = doc["00081199"]["Value"]
        except (ValueError, KeyError, TypeError):
            self._record(Fault.FORWARD, uids, f"HTTP {answer.status} (nothing to leave out)")
            return answer
        rng = random.Random(pick)
        n = rng.randint(1, len(refs)) if refs else 0
        dropped = rng.sample(range(len(refs)), n)
        left_out = [str(refs[i].get("00081155", {}).get("Value", ["?"])[0]) for i in dropped]
        doc["00081199"]["Value"] = [r for i, r in enumerate(refs) if i not in dropped]
        self._record(Fault.LEAVE_OUT, uids, f"left out {left_out}")
        return web.Response(status=answer.status, body=json.dumps(doc).encode(), **_JSON_CT)

    async def _forward(self, request: web.Request, parts: list[bytes]) -> web.Response:
        assert self._client is not None
        url = f"{self.orthanc.orthanc_url}{request.path}"
        with aiohttp.MultipartWriter('related; type="application/dicom"') as body:
            for p in parts:
                body.append(p, {"Content-Type": "application/dicom"})
        try:
            if not self._orthanc_up:
                raise aiohttp.ClientConnectionError("Orthanc is restarting")
            async with self._client.post(url, data=body, headers={"Accept": _DICOM_JSON}) as resp:
                payload = await resp.read()
                return web.Response(
                    status=resp.status, body=payload, content_type=resp.content_type
                )
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=502, body=_HTML_502, content_type="text/html")

    async def _forward_other(self, request: web.Request) -> web.Response:
        assert self._client is not None
        try:
            async with self._client.request(
                request.method,
                f"{self.orthanc.orthanc_url}{request.path_qs}",
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() == "accept"},
            ) as resp:
                return web.Response(
                    status=resp.status, body=await resp.read(), content_type=resp.content_type
                )
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=502, body=_HTML_502, content_type="text/html")


_JSON_CT: dict[str, Any] = {"content_type": _DICOM_JSON}


def _is_stow_path(path: str) -> bool:
    """``/dicom-web/studies`` or ``/dicom-web/studies/{StudyInstanceUID}``."""
    return path in _STOW_PATHS or (path.startswith("/dicom-web/studies/") and path.count("/") == 3)


async def _read_parts(request: web.Request) -> list[bytes]:
    """The instances of a multipart/related STOW-RS body (aiohttp's multipart reader)."""
    reader = await request.multipart()
    parts: list[bytes] = []
    while True:
        part = await reader.next()
        if part is None:
            return parts
        assert isinstance(part, aiohttp.BodyPartReader)
        parts.append(bytes(await part.read()))


def _sop_uids(part: bytes) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of one part; ``?`` where unreadable."""
    try:
        ds = pydicom.dcmread(BytesIO(part), stop_before_pixels=True, specific_tags=[])
        return str(ds.get("SOPClassUID", "?")), str(ds.get("SOPInstanceUID", "?"))
    except Exception:  # a part the gateway should never send; the soak sees it in counts
        return "?", "?"


def _failed_answer(parts: list[bytes], reasons: list[int]) -> dict[str, Any]:
    """PS3.18 §10.5.3: every instance in FailedSOPSequence with FailureReason *reasons*
    (one value is what the standard allows; two are the odd answer)."""
    items = []
    for p in parts:
        cls, uid = _sop_uids(p)
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reasons if len(reasons) > 1 else reasons[0]
        items.append(item)
    ds = Dataset()
    ds.FailedSOPSequence = Sequence(items)
    return ds.to_json_dict()


def _referenced_not_a_sequence(uids: list[str]) -> bytes:
    doc = {"00081199": {"vr": "UI", "Value": uids or ["1.2.3"]}}
    return json.dumps(doc).encode()


def _dicom_json(status: int, doc: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(), **_JSON_CT)

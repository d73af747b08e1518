"""A scripted STOW-RS archive over mutual TLS, for answers Orthanc cannot be made to give.

This is a hand-written test double, not a real archive: it exists because no real
server answers a STOW-RS request with ``[]``, stalls on purpose, or resets a
connection on cue.  Everything a real archive can be made to do is tested against
Orthanc behind nginx (tests/archive.py).

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

The server speaks TLS 1.2+ and requires a client certificate signed by its trustme CA
(as nginx's ``ssl_verify_client on`` does in the real lab).  It runs its own event loop
in a thread, so both a gateway child process and a pipeline running in the test's own
loop can use it.  By default every request is answered correctly (every instance
stored, status 200); :meth:`ScriptedArchive.script` queues other answers, one per
request, in order.  The multipart body is read with aiohttp's reader, each instance
with pydicom.
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trustme
from aiohttp import web

#: One scripted answer: given the exchange, the HTTP response (or an exception that
#: aborts the connection).
Answer = Callable[["Exchange"], Awaitable[web.StreamResponse]]


@dataclass
class Exchange:
    """One request as the archive sees it."""

    request: web.Request
    archive: ScriptedArchive
    uids: list[str] = field(default_factory=list)
    read: bool = False

    async def read_instances(self, bytes_per_second: float | None = None) -> list[str]:
        """Read the multipart body (throttled to *bytes_per_second* if given); the
        SOP Instance UIDs in it, in order."""
        if self.read:
            return self.uids
        self.read = True
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
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            self.uids.append(uid)
            self.archive.received[uid] = data
        self.archive.requests.append(list(self.uids))
        return self.uids


# -- answers ----------------------------------------------------------------------------


def _ref(uid: str, code: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
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
        ex.archive.stored.update(uids)
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


# -- the server ---------------------------------------------------------------------------


class ScriptedArchive:
    def __init__(self, workdir: Path) -> None:
        self.work = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        self.ca_file = workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        client = ca.issue_cert("gateway-box")
        self.client_cert = workdir / "client.pem"
        self.client_key = workdir / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server_ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(self._server_ctx)
        ca.issue_cert("localhost").configure_cert(self._server_ctx)
        self._script: list[Answer] = []
        self._lock = threading.Lock()
        self.default: Answer = store_all()
        #: Every request's SOP Instance UIDs, in arrival order (read requests only).
        self.requests: list[list[str]] = []
        #: Each instance's bytes as last received, and the UIDs answered as stored.
        self.received: dict[str, bytes] = {}
        self.stored: set[str] = set()
        #: (time.monotonic(), bytes) of each body chunk read, for throughput tests.
        self.chunks: list[tuple[float, int]] = []
        #: How many requests were answered (scripted or default).
        self.answered = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"https://localhost:{self.port}/dicom-web"

    def upload_config(self, **overrides: Any) -> dict[str, Any]:
        """``[upload]`` keys that point a gateway at this archive."""
        return {
            "dicomweb_url": self.dicomweb_url,
            "ca_file": str(self.ca_file),
            "client_cert": str(self.client_cert),
            "client_key": str(self.client_key),
            **overrides,
        }

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with *answers*, in order; then the default."""
        with self._lock:
            self._script.extend(answers)

    @property
    def pending_script(self) -> int:
        with self._lock:
            return len(self._script)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            answer = self._script.pop(0) if self._script else self.default
            self.answered += 1
        return await answer(Exchange(request, self))

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> ScriptedArchive:
        started: Future[None] = Future()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._start(started))
                loop.run_forever()
            except BaseException as exc:  # reported to start()
                if not started.done():
                    started.set_exception(exc)
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="scripted-archive", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    async def _start(self, started: Future[None]) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/dicom-web/studies", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._server_ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]
        started.set_result(None)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None


@pytest.fixture
def scripted_archive(tmp_path: Path) -> Iterator[ScriptedArchive]:
    archive = ScriptedArchive(tmp_path / "scripted-archive").start()
    try:
        yield archive
    finally:
        archive.stop()

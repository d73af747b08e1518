"""`dicom-gateway fleet serve`: the receiver's two listeners and its lifecycle.

* ``[receiver]``: ``POST /heartbeat`` over HTTPS with mutual TLS.  The handshake
  refuses any client without a certificate from ``receiver.client_ca_file``, so a box
  of another CA never reaches a handler.  A heartbeat is answered 204 once stored;
  anything else gets a 4xx with a one-line reason and is not stored (gateway/fleet/
  intake.py says which).  Each answer carries ``Server-Timing: handle;dur=<ms>``,
  the time from request to answer, also in the duration histogram.
* ``[view]``: the fleet page (``/``), ``/api/boxes``, ``/metrics`` and ``/livez``,
  loopback by default, client certificates (``view.client_ca_file``) beyond it.

Database reads and page rendering run in worker threads, writes in the database's
writer thread: the event loop only moves bytes.  The page and the boxes' metrics are
built at most once per change (each accepted heartbeat bumps :attr:`generation`), at
most every :data:`PAGE_EVERY_S` / :data:`METRICS_EVERY_S`, and served from the loop
(gateway/fleet/views.py): however many people and Prometheus servers look, the
thread building them holds the GIL a few percent of the time, not most of it.
SIGTERM or SIGINT stops it: the listeners close (requests in flight get 5 s), then
the database finishes its writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from . import boxes, page
from .boxes import Box
from .config import FleetConfig
from .database import DatabaseClosed, FleetDatabase
from .intake import Identity, Refused, check, identify
from .metrics import BoxGauges, FleetMetrics
from .views import Built, CachedView

log = logging.getLogger(__name__)

#: Requests in flight get this long once a stop begins.
STOP_S = 5.0
#: The page: its "... ago" texts and stale marks are at most this old.
PAGE_EVERY_S = 1.0
#: The boxes' metrics: rebuilt at most this often (Prometheus scrapes every 15-30 s,
#: boxes heartbeat every 30 s), and on a box turning stale.
METRICS_EVERY_S = 2.0
#: ... and at least this often: what the generation does not see (``fleet forget``
#: run by another process while the receiver runs).
METRICS_MAX_AGE_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def receiver_tls(config: FleetConfig) -> ssl.SSLContext:
    """HTTPS that requires a client certificate from ``receiver.client_ca_file``."""
    r = config.receiver
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(r.client_ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # stated so no edit can loosen it
    ctx.load_cert_chain(str(r.tls_cert), str(r.tls_key))
    return ctx


def view_tls(config: FleetConfig) -> ssl.SSLContext | None:
    v = config.view
    if v.tls_cert is None:
        return None
    ctx = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(v.client_ca_file) if v.client_ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(v.tls_cert), str(v.tls_key))
    ctx.verify_mode = ssl.CERT_REQUIRED if v.client_ca_file else ssl.CERT_NONE
    return ctx


class FleetServer:
    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.db = FleetDatabase(config.database.path)
        self.metrics = FleetMetrics()
        self._gauges = BoxGauges()
        #: The last listing, by box: rows unchanged since are not decoded again.
        self._known: dict[str, Box] = {}
        #: Bumped by each accepted heartbeat: the views built before it are out of date.
        self.generation = 0
        self.page_view = CachedView("page", self._page, lambda: self.generation,
                                    min_interval=PAGE_EVERY_S, max_age=PAGE_EVERY_S)  # fmt: skip
        self.metrics_view = CachedView(
            "metrics", self._metrics, lambda: self.generation,
            min_interval=METRICS_EVERY_S, max_age=METRICS_MAX_AGE_S,
        )  # fmt: skip
        self._stop = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        #: (box or peer, result) of the last refusal logged: one line per change.
        self._complaints: dict[str, str] = {}
        self.addresses: dict[str, tuple[str, int]] = {}

    # -- reads (worker threads) -----------------------------------------------------------
    def _boxes_now(self) -> tuple[float, float, list[Box]]:
        known = self._known
        rows = self.db.read(lambda conn: boxes.listing(conn, known))
        # Replaced whole, never changed in place: the threads reading it need no lock.
        self._known = {b.box: b for b in rows}
        return time.time(), self.config.boxes.stale_after_seconds, rows

    def _page(self) -> Built:
        self.metrics.view_builds.labels("page").inc()
        now, stale_after, rows = self._boxes_now()
        html = page.render(rows, now, stale_after, self.config.view.refresh_seconds)
        return Built(html.encode(), boxes.next_stale_change(rows, now, stale_after))

    def _metrics(self) -> Built:
        self.metrics.view_builds.labels("metrics").inc()
        now, stale_after, rows = self._boxes_now()
        text = self._gauges.exposition(now, stale_after, rows)
        return Built(text, boxes.next_stale_change(rows, now, stale_after))

    def _api(self) -> bytes:
        now, stale_after, rows = self._boxes_now()
        return json.dumps(
            [
                {
                    "box": b.box,
                    "fingerprint": b.fingerprint,
                    "peer": b.peer,
                    "seen_at": b.seen_at,
                    "sent_at": b.sent_at,
                    "first_seen_at": b.first_seen_at,
                    "heartbeats": b.heartbeats,
                    "stale": boxes.is_stale(b, now, stale_after),
                    "certificate_not_after": b.cert_not_after,
                    "heartbeat": b.heartbeat,
                }
                for b in rows
            ]
        ).encode()

    # -- the receiver ---------------------------------------------------------------------
    def receiver_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.receiver.max_body_bytes, middlewares=[self._timed]
        )
        app.router.add_post("/heartbeat", self.heartbeat)
        return app

    @web.middleware
    async def _timed(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        response = await handler(request)
        elapsed = time.perf_counter() - start
        self.metrics.duration.observe(elapsed)
        response.headers["Server-Timing"] = f"handle;dur={elapsed * 1000:.3f}"
        return response

    async def heartbeat(self, request: web.Request) -> web.StreamResponse:
        who: Identity | None = None
        try:
            ssl_object = (
                request.transport.get_extra_info("ssl_object") if request.transport else None
            )
            if ssl_object is None:
                raise Refused(403, "no_identity", "no TLS connection")
            who = identify(ssl_object.getpeercert(), ssl_object.getpeercert(binary_form=True))
            if request.content_type != "application/json":
                raise Refused(415, "unsupported_media_type", "send Content-Type: application/json")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise Refused(
                    413, "too_large",
                    f"body over receiver.max_body_bytes ({self.config.receiver.max_body_bytes})",
                ) from None  # fmt: skip
            arrival = check(
                body, who, request.remote or "?", time.time(),
                self.config.receiver.max_clock_skew_seconds,
            )  # fmt: skip
            try:
                last = await self.db.run(boxes.record(arrival))
            except DatabaseClosed:
                return web.json_response({"error": "the receiver is stopping"}, status=503)
            if last is not None:
                raise Refused(
                    409, "replayed",
                    f"sent_at {arrival.heartbeat['sent_at']} is not newer than the last"
                    f" heartbeat accepted from {who.box} (a replay, or the box's clock went back)",
                )  # fmt: skip
        except Refused as refusal:
            self._refused(who, request.remote or "?", refusal)
            return web.json_response({"error": str(refusal)}, status=refusal.status)
        self.generation += 1
        self.metrics.heartbeats.labels("accepted").inc()
        if self._complaints.pop(who.box, None) is not None:
            log.info("box %s: heartbeat accepted again", who.box)
        return web.Response(status=204)

    def _refused(self, who: Identity | None, peer: str, refusal: Refused) -> None:
        self.metrics.heartbeats.labels(refusal.result).inc()
        key = who.box if who is not None else f"peer {peer}"
        if self._complaints.get(key) != refusal.result:
            self._complaints[key] = refusal.result
            sender = f"box {who.box} ({peer})" if who is not None else peer
            log.warning("heartbeat from %s refused (%d): %s", sender, refusal.status, refusal)

    # -- the view -------------------------------------------------------------------------
    def view_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/api/boxes", self.api_boxes)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/livez", self.livez)
        return app

    async def page(self, request: web.Request) -> web.StreamResponse:
        body = await self.page_view.get()
        return web.Response(body=body, content_type="text/html", charset="utf-8",
                            headers=_NO_STORE)  # fmt: skip

    async def api_boxes(self, request: web.Request) -> web.StreamResponse:
        body = await asyncio.to_thread(self._api)
        return web.Response(body=body, content_type="application/json", headers=_NO_STORE)

    async def metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        boxes_text = await self.metrics_view.get()
        # The receiver's own counters: a few dozen samples, read as they are now.
        response = web.Response(body=generate_latest(self.metrics.registry) + boxes_text)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def livez(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "alive"})

    # -- lifecycle ------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("stopping: %s", reason)
            self._stop.set()

    async def _listen(self, name: str, app: web.Application, bind: str, port: int,
                      tls: ssl.SSLContext | None) -> None:  # fmt: skip
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=STOP_S)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, bind, port, ssl_context=tls).start()
        host, real_port = runner.addresses[0][:2]
        self.addresses[name] = (host, real_port)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        c = self.config
        try:
            await asyncio.to_thread(self.db.open)
            await self._listen("receiver", self.receiver_app(), c.receiver.bind, c.receiver.port,
                               receiver_tls(c))  # fmt: skip
            await self._listen("view", self.view_app(), c.view.bind, c.view.port, view_tls(c))
            rh, rp = self.addresses["receiver"]
            vh, vp = self.addresses["view"]
            scheme = "https" if c.view.tls_cert else "http"
            log.info(
                "dicom-gateway fleet receiver %s ready: heartbeats on https://%s:%d/heartbeat,"
                " page and /metrics on %s://%s:%d/, database %s",
                __version__, rh, rp, scheme, vh, vp, c.database.path,
            )  # fmt: skip
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for runner in reversed(self._runners):
                await runner.cleanup()
            for view in (self.page_view, self.metrics_view):
                await view.close()
            await asyncio.to_thread(self.db.close)
        log.info("fleet receiver stopped")
        return 0


_NO_STORE: dict[str, Any] = {"Cache-Control": "no-store"}

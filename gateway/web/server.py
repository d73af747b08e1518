"""Status page, JSON API, ``/metrics``, ``/livez`` and ``/readyz`` (aiohttp).

Served by the gateway's own event loop.  Nothing here touches SQLite on the loop:
the status comes from :class:`~gateway.web.status.StatusService` snapshots taken in a
worker thread, queue listings run in ``asyncio.to_thread``, and actions are writes
through the store's writer.

Access control (see README "Status page"):

* bound to loopback and no credentials configured: anyone on the box may look and
  act; requests must name a loopback host (defeats DNS rebinding);
* with ``web.password_hash``: a login form (or HTTP Basic for reads) and a session;
* with ``web.token_sha256``: ``Authorization: Bearer <token>`` (scripts, Prometheus);
* with ``web.client_ca_file``: HTTPS that requires a client certificate.

Actions are POST only.  Unless they carry a bearer token (which a browser never adds
on its own) they need the session's CSRF token and, when the browser sends one, an
``Origin`` equal to ours.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import instances, studies
from ..config import Config, is_loopback, is_valid_uid
from ..instances import QueueState
from ..store import Store
from .auth import Session, Sessions, verify_password, verify_token
from .gauges import SnapshotCollector
from .page import render_login, render_page
from .status_doc import status_body

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..pipeline.jobs import Pipeline
    from ..spool import Spool
    from .status import StatusService

log = logging.getLogger(__name__)

#: Upper bound of the page's part of a stop (gateway.app.stop_budget_seconds).
WEB_STOP_S = 5.0

COOKIE = "gw_session"
_PUBLIC = {"/livez", "/readyz", "/login"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
QUEUE_LIMIT_MAX = 1000
_BASIC_CACHE_S = 300.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


class WebServer:
    def __init__(
        self,
        config: Config,
        status: StatusService,
        pipeline: Pipeline,
        store: Store,
        spool: Spool,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.status = status
        self.pipeline = pipeline
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.sessions = Sessions()
        self._basic_verified: dict[bytes, float] = {}
        w = config.web
        self.auth_required = bool(w.password_hash or w.token_sha256 or w.client_ca_file)
        self.loopback_only = is_loopback(w.bind)
        self.tls = w.tls_cert is not None
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] = ("", 0)
        metrics.registry.register(SnapshotCollector(lambda: status.last))

    # -- lifecycle --------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=1024 * 1024)
        app.router.add_get("/", self.page)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/session", self.api_session)
        app.router.add_get("/api/queue", self.api_queue)
        app.router.add_get("/api/studies", self.api_studies)
        app.router.add_get("/api/studies/{uid}", self.api_study)
        app.router.add_post("/api/queue/retry", self.api_retry)
        app.router.add_post("/api/uploads/pause", self.api_pause)
        app.router.add_post("/api/uploads/resume", self.api_resume)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/readyz", self.readyz)
        return app

    def _ssl_context(self) -> ssl.SSLContext | None:
        w = self.config.web
        if w.tls_cert is None or w.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(w.tls_cert), str(w.tls_key))
        if w.client_ca_file is not None:
            ctx.load_verify_locations(cafile=str(w.client_ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def start(self) -> tuple[str, int]:
        w = self.config.web
        # A stop waits this long for requests in flight (all short), not aiohttp's 60 s.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=WEB_STOP_S
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, w.bind, w.port, ssl_context=self._ssl_context())
        await site.start()
        addresses = self._runner.addresses
        host, port = addresses[0][:2] if addresses else (w.bind, w.port)
        self.address = (str(host), int(port))
        scheme = "https" if self.tls else "http"
        log.info("status page on %s://%s:%d/", scheme, host, port)
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- access control -----------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.loopback_only and request.url.host not in _LOOPBACK_HOSTS:
            # A name that resolves to 127.0.0.1 (DNS rebinding) is not our origin.
            return _json({"error": "requests must name a loopback host"}, 421)
        response: web.StreamResponse
        if request.path in _PUBLIC:
            response = await handler(request)
        else:
            user, via = await self._authenticate(request)
            if user is None:
                response = self._unauthenticated(request)
            else:
                request["user"], request["via"] = user, via
                if request.method == "POST" and (problem := await self._csrf_problem(request)):
                    log.warning("refused %s %s: %s", request.method, request.path, problem)
                    response = _json({"error": problem}, 403)
                else:
                    response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        # same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on
        # the page's own form posts, which the CSRF check must refuse.
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    async def _authenticate(self, request: web.Request) -> tuple[str | None, str]:
        w = self.config.web
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            ok = verify_token(value.strip(), w.token_sha256)
            return ("token", "token") if ok else (None, "")
        if scheme.lower() == "basic" and w.password_hash:
            ok = await self._basic_ok(value.strip())
            return ("operator", "basic") if ok else (None, "")
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            request["session"] = session
            return session.user, "session"
        if w.client_ca_file is not None:
            # The TLS handshake required and verified a client certificate.
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            if peer:
                return "client-certificate", "client-certificate"
        if not self.auth_required:
            return "local", "loopback"
        return None, ""

    async def _basic_ok(self, credentials: str) -> bool:
        # A poller sending Basic on every request would cost an scrypt each time:
        # remember credentials that verified (by their hash) for a few minutes.
        key = hashlib.sha256(credentials.encode()).digest()
        now = time.monotonic()
        if self._basic_verified.get(key, 0.0) > now:
            return True
        try:
            _, _, password = base64.b64decode(credentials).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        ok = await asyncio.to_thread(verify_password, password, self.config.web.password_hash)
        if ok:
            if len(self._basic_verified) >= 100:
                self._basic_verified.clear()
            self._basic_verified[key] = now + _BASIC_CACHE_S
        return ok

    def _unauthenticated(self, request: web.Request) -> web.StreamResponse:
        if _wants_html(request) and self.config.web.password_hash:
            raise web.HTTPSeeOther("/login")
        challenges = []
        if self.config.web.token_sha256:
            challenges.append('Bearer realm="dicom-gateway"')
        if self.config.web.password_hash:
            challenges.append('Basic realm="dicom-gateway"')
        response = _json({"error": "authentication required"}, 401)
        if challenges:
            response.headers["WWW-Authenticate"] = ", ".join(challenges)
        return response

    def _origin_problem(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return f"cross-origin request from {origin} refused"
        return None

    async def _csrf_problem(self, request: web.Request) -> str | None:
        if request["via"] == "token":
            return None  # a browser never attaches a bearer token by itself
        if problem := self._origin_problem(request):
            return problem
        session: Session | None = request.get("session")
        if session is None:
            return "actions need a session: load the page (or GET /api/session) first"
        sent = request.headers.get("X-CSRF-Token")
        if sent is None and request.content_type == "application/x-www-form-urlencoded":
            form = await request.post()
            value = form.get("csrf")
            sent = value if isinstance(value, str) else None
        if not sent or not hmac.compare_digest(sent, session.csrf):
            return "missing or wrong CSRF token"
        return None

    def _session_for(self, request: web.Request, response: web.StreamResponse) -> Session | None:
        """The caller's session, made now for an authenticated browser without one."""
        session: Session | None = request.get("session")
        if session is None and request["via"] != "token":
            session_id, session = self.sessions.create(request["user"])
            response.set_cookie(
                COOKIE, session_id, httponly=True, samesite="Strict", secure=self.tls, path="/"
            )
        return session

    # -- login ----------------------------------------------------------------------------
    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.config.web.password_hash:
            raise web.HTTPSeeOther("/")
        return web.Response(text=render_login(None), content_type="text/html")

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.config.web.password_hash:
            raise web.HTTPNotFound()
        if problem := self._origin_problem(request):
            return _json({"error": problem}, 403)
        form = await request.post()
        password = form.get("password")
        ok = isinstance(password, str) and await asyncio.to_thread(
            verify_password, password, self.config.web.password_hash
        )
        if not ok:
            log.warning("status page: failed login from %s", request.remote)
            await asyncio.sleep(1.0)  # slows guessing; scrypt already costs the guesser
            return web.Response(
                text=render_login("wrong password"), content_type="text/html", status=401
            )
        session_id, _ = self.sessions.create("operator")
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, session_id, httponly=True, samesite="Strict", secure=self.tls, path="/"
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.drop(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther("/login" if self.config.web.password_hash else "/")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- page and API ---------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.StreamResponse:
        doc = await self.status.status()
        response = web.Response(content_type="text/html")
        session = self._session_for(request, response)
        response.text = render_page(
            doc,
            csrf=session.csrf if session else None,
            user=request["user"],
            refresh_seconds=self.config.web.refresh_seconds,
            can_logout=bool(self.config.web.password_hash) and session is not None,
        )
        return response

    async def api_status(self, request: web.Request) -> web.StreamResponse:
        doc = await self.status.status(fresh=request.query.get("fresh") == "1")
        return web.Response(body=status_body(doc), content_type="application/json")

    async def api_session(self, request: web.Request) -> web.StreamResponse:
        response = _json({})
        session = self._session_for(request, response)
        response.text = json.dumps(
            {"user": request["user"], "csrf": session.csrf if session else None}
        )
        return response

    async def api_queue(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state") or None
        if state is not None and state not in tuple(QueueState):
            return _json({"error": f"state must be one of {', '.join(QueueState)}"}, 400)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _json({"error": "limit must be an integer"}, 400)
        if not 1 <= limit <= QUEUE_LIMIT_MAX:
            return _json({"error": f"limit must be between 1 and {QUEUE_LIMIT_MAX}"}, 400)
        items = await asyncio.to_thread(
            self.store.read, lambda conn: instances.listing(conn, state, limit)
        )
        return _json({"state": state, "limit": limit, "items": items})

    async def api_studies(self, request: web.Request) -> web.StreamResponse:
        """The studies received most recently, newest first, with their stages."""
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return _json({"error": "limit must be an integer"}, 400)
        if not 1 <= limit <= QUEUE_LIMIT_MAX:
            return _json({"error": f"limit must be between 1 and {QUEUE_LIMIT_MAX}"}, 400)
        quiet = self.config.study.quiet_seconds
        found = await asyncio.to_thread(
            self.store.read, lambda conn: studies.recent(conn, limit, quiet)
        )
        return _json({"limit": limit, "studies": [dataclasses.asdict(p) for p in found]})

    async def api_study(self, request: web.Request) -> web.StreamResponse:
        uid = request.match_info["uid"]
        if not is_valid_uid(uid):
            return _json({"error": "not a valid Study Instance UID"}, 400)
        quiet = self.config.study.quiet_seconds
        found = await asyncio.to_thread(self.store.read, lambda conn: studies.one(conn, uid, quiet))
        if found is None:
            return _json({"error": f"no instance of study {uid} is known"}, 404)
        return _json(dataclasses.asdict(found))

    async def _action_done(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await self.status.refresh(wait=True)
        if request.content_type == "application/x-www-form-urlencoded":
            raise web.HTTPSeeOther("/")
        return _json(body)

    async def api_retry(self, request: web.Request) -> web.StreamResponse:
        uids: list[str] | None
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                return _json({"error": "body is not JSON"}, 400)
            if not isinstance(body, dict):
                return _json({"error": "body must be a JSON object"}, 400)
            raw = body.get("sop_instance_uids")
            every = body.get("all") is True
        else:
            form = await request.post()
            raw = [v for v in form.getall("sop_instance_uid", []) if isinstance(v, str)]
            every = form.get("all") == "1"
        if every:
            uids = None
        elif isinstance(raw, list) and raw and all(isinstance(u, str) for u in raw):
            uids = list(raw)[:QUEUE_LIMIT_MAX]
        else:
            return _json({"error": 'give "sop_instance_uids": [...] or "all": true'}, 400)
        count = await self.store.run(lambda c: instances.retry_failed(c, uids))
        log.info("status page: %d failed instance(s) queued again by %s", count, request["user"])
        self.pipeline.kick()
        return await self._action_done(request, {"retried": count})

    async def api_pause(self, request: web.Request) -> web.StreamResponse:
        self.pipeline.pause()
        log.warning("uploads paused from the status page by %s", request["user"])
        return await self._action_done(request, {"paused": True})

    async def api_resume(self, request: web.Request) -> web.StreamResponse:
        self.pipeline.resume()
        log.info("uploads resumed from the status page by %s", request["user"])
        return await self._action_done(request, {"paused": False})

    async def metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        await self.status.status(fresh=True)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- health ---------------------------------------------------------------------------
    async def livez(self, request: web.Request) -> web.StreamResponse:
        # Answering at all proves the loop is alive.
        return _json({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        problems = await asyncio.to_thread(self._readiness_problems)
        # An unreachable archive is not here on purpose: images keep coming in.
        if problems:
            return _json({"status": "not ready", "problems": problems}, 503)
        return _json({"status": "ready"})

    def _readiness_problems(self) -> list[str]:
        problems: list[str] = []
        missing = self.spool.check()
        if missing is not None:
            # Nothing else about the spool is worth asking, and the database may live
            # in it: opening it by path could create a file in the new directory.
            return [missing]
        try:
            self.spool.probe_write()
        except OSError as exc:
            problems.append(f"spool not writable: {exc.strerror or exc}")
        try:
            free = self.spool.free_bytes()
            if free < self.spool.min_free_bytes:
                problems.append(
                    f"spool free space {free} bytes is below min_free_bytes"
                    f" {self.spool.min_free_bytes}"
                )
        except OSError as exc:
            problems.append(f"spool free space unknown: {exc.strerror or exc}")
        if not self.store.alive:
            problems.append("queue database writer is not running")
        try:
            self.store.rows("SELECT 1")
        except Exception as exc:  # any sqlite3 or OS error: not ready, say which
            problems.append(f"queue database: {exc}")
        return problems

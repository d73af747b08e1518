"""An aiohttp application over TLS on its own event loop in a thread: what the HTTPS
doubles share (the clouds' token endpoints in cloud_auth.py, the scripted archive in
scripted_archive.py).

The site has a trustme CA of its own (:attr:`TlsSite.ca`, written to
:attr:`TlsSite.ca_file` for the gateway's ``ca_file`` keys) and a server certificate
from it for ``localhost`` and ``127.0.0.1``, TLS 1.2 or later, never an unverified
connection.  Running its own loop in a thread, it serves a gateway child process and
a pipeline in the test's own loop alike.  A subclass adds its routes to
:attr:`TlsSite.app` before :meth:`TlsSite.start`, and may ask for a client
certificate through :attr:`TlsSite.server_context`.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Self

import trustme
from aiohttp import web


class TlsSite:
    """An aiohttp application over TLS (a trustme CA of its own, no client
    certificate asked unless a subclass asks), on its own event loop in a thread.

    *client_max_size* is aiohttp's limit on a request body; *handler_cancellation*
    cancels a handler whose client went away (aiohttp's ``AppRunner`` option)."""

    def __init__(
        self,
        work: Path,
        name: str,
        *,
        client_max_size: int = 1024**2,
        handler_cancellation: bool = False,
    ) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = work / f"{name}-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.server_context)
        self.app = web.Application(client_max_size=client_max_size)
        self.port = 0
        self._handler_cancellation = handler_cancellation
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> Self:
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

        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    async def _start(self, started: Future[None]) -> None:
        self._runner = web.AppRunner(
            self.app, shutdown_timeout=1.0, handler_cancellation=self._handler_cancellation
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.server_context)
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

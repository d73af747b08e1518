"""The Gateway: start order, the main wait, and a two-phase stop.

Start:  spool directories -> queue database -> reconcile -> DIMSE listener and its
receiver processes (gateway/dicom/receivers.py) -> status page, then the compress/upload
pipeline, the worklist refresh, the MPPS forwarder, the Storage Commitment reporter
(and the heartbeat, when configured);
systemd hears READY=1 once the listener and the page are up, WATCHDOG=1 from the loop
itself (gateway.notify), and STOPPING=1 when the stop begins.
What stops the gateway (and what does not): the receiver must keep answering, so a
component that crashes -- the pipeline, the worklist refresh, the MPPS forwarder, the
Storage Commitment reporter, the heartbeat -- is logged with its traceback, counted in
``dicom_gateway_component_restarts_total{component}``, shown as a degraded health
state, and restarted in-process with backoff (:data:`_RESTART_INITIAL_S` doubling to
:data:`_RESTART_MAX_S`).  The process exits (status 70, systemd restarts it) only for
what a restart in-process cannot mend: a corrupt queue database (SQLite
"database disk image is malformed" / "file is not a database"), the database
writer thread dying, or the thread that restarts dead receiver processes dying (a
receiver process that dies is started again, and counted like a component).

Stop (SIGTERM/SIGINT): close the listener and refuse new C-STOREs, let in-flight
C-STOREs and MPPS requests finish for at most ``dimse.drain_seconds`` (they get their
true answer), abort what is left; only then cancel the pipeline, the MPPS forwarder and
the other tasks (an interrupted upload or MPPS message is re-sent after restart) and
close the status page; the database closes last, once every submitted write has
committed: its writer outlives every caller.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import __version__
from .commitment.reporter import Reporter
from .config import Config
from .dicom.receive import COMMIT_TIMEOUT_S
from .dicom.receivers import RECEIVER_EXIT_S, ReceiverPool
from .metrics import Metrics
from .mpps.forwarder import Forwarder
from .notify import Notifier
from .pipeline.jobs import Pipeline
from .pipeline.reconcile import reconcile
from .spool import Spool
from .store import CLOSE_TIMEOUT_S, Store
from .studies import StudyTracker
from .upgrade import adopt_legacy_database
from .web.heartbeat import run_heartbeat
from .web.server import WEB_STOP_S, WebServer
from .web.status import STATUS_CLOSE_S, StatusService
from .worklist.service import Worklist

log = logging.getLogger(__name__)

#: Exit status when the gateway cannot go on (systemd restarts the service).
EXIT_COMPONENT_FAILED = 70
#: A crashed component is restarted after this, doubling up to _RESTART_MAX_S.
_RESTART_INITIAL_S = 1.0
_RESTART_MAX_S = 300.0
_MONITOR_INTERVAL_S = 1.0
_SWEEP_INTERVAL_S = 60.0

# Upper bounds of the stop phases (see _shutdown), for stop_budget_seconds.
_LISTENER_JOIN_S = 10.0  # ReceiverPool.stop_accepting waits this long for the receivers
_POOL_STOP_S = 15.0  # the J2K pool's workers are killed and joined (an encode is redone)
_STORE_CLOSE_S = CLOSE_TIMEOUT_S  # the last queued writes; SQLite's busy_timeout bounds each
# A start waits this long for the receivers of a killed gateway to drain and exit.
_INSTANCE_LOCK_WAIT_S = 60.0


def stop_budget_seconds(config: Config) -> float:
    """How long a stop may take at most; the unit's TimeoutStopSec must be longer
    (tests/test_systemd_unit.py checks it against the defaults)."""
    return (
        WEB_STOP_S
        + STATUS_CLOSE_S
        + _LISTENER_JOIN_S
        + config.dimse.drain_seconds
        + RECEIVER_EXIT_S
        + _POOL_STOP_S
        + _STORE_CLOSE_S
    )


def _describe(exc: BaseException) -> str:
    """One line for the log: the errors inside a TaskGroup's group, not the group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside *exc*'s (nested) exception groups; *exc* if it is none.
    A component's TaskGroup wraps what one of its tasks raised."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def is_corrupt_database(exc: BaseException) -> bool:
    """SQLite says the database file itself is damaged (not busy, locked or full)."""
    return any(
        isinstance(e, sqlite3.DatabaseError)
        and not isinstance(e, sqlite3.OperationalError)
        and ("malformed" in str(e).lower() or "not a database" in str(e).lower())
        for e in _leaves(exc)
    )


def describe_crash(exc: BaseException) -> str:
    return "; ".join(repr(e) for e in _leaves(exc))


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool.dir, config.spool.min_free_bytes)
        self.store = Store(config.database_path, remove_file=self.spool.remove_unpinned)
        self.metrics = Metrics()
        self.pipeline = Pipeline(config, self.spool, self.store, self.metrics)
        self.worklist = Worklist(config, self.store)
        self.mpps_forwarder = Forwarder(config, self.store)
        self.commitment_reporter = Reporter(config, self.store, self.metrics)
        self.pipeline.on_confirmed = self.commitment_reporter.wake
        self.commitment_reporter.on_reported = self.pipeline.wake_retention
        self.study_tracker = StudyTracker(
            self.store, config.study.quiet_seconds, self.metrics.study_confirmation.observe
        )
        # C-STORE, MWL and MPPS are answered in processes of their own.
        self.receiver = ReceiverPool(
            config,
            spool_identity=self.spool.identity,
            database=lambda: self.store.path,
            on_stored=lambda: self._on_stored(None),
            on_mpps=self.mpps_forwarder.wake,
            metrics=self.metrics,
            on_log_record=lambda record: self.status.errors.handle(record),
            instance_lock=lambda: self._instance_lock,
            on_commitment=self.commitment_reporter.wake,
        )
        self._instance_lock = -1
        self.notifier = Notifier()
        self.started_at = time.time()
        self.status = StatusService(
            config, self.store, self.spool, self.pipeline, self.receiver, self.worklist,
            self.started_at,
        )  # fmt: skip
        self.web = WebServer(
            config, self.status, self.pipeline, self.store, self.spool, self.metrics
        )
        self._stop = asyncio.Event()
        self._failure: str | None = None
        self._state = "starting: checking the spool against the queue"
        self._stored = 0
        self._stored_lock = threading.Lock()
        self._drained = False
        self._drain_lock = threading.Lock()
        self._stop_started = time.monotonic()

    def _on_stored(self, _instance: object) -> None:
        with self._stored_lock:
            self._stored += 1
        self.pipeline.wake()

    def status_line(self) -> str:
        """One line for systemd's STATUS= (``systemctl status dicom-gateway``)."""
        if self._state != "running":
            return self._state
        host, port = self.receiver.address
        return (
            f"AE {self.config.dimse.ae_title} on {host}:{port}; "
            f"{self._stored} instances stored since start"
        )

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            log.info("stopping: %s", reason)
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        logging.getLogger("gateway").addHandler(self.status.errors)
        # Pings start before the (threaded) start-up: reconciling a large spool may take
        # longer than the watchdog period, and the loop is free meanwhile.
        watchdog = asyncio.create_task(self.notifier.heartbeat(self.status_line))
        try:
            await asyncio.to_thread(self._start)
            await self.web.start()
            self._state = "running"
            self.notifier.ready(self.status_line())
            host, port = self.receiver.address
            log.info(
                "dicom-gateway %s ready: AE %r listening on %s:%d, spool %s",
                __version__,
                self.config.dimse.ae_title,
                host,
                port,
                self.spool.root,
            )
            try:
                await self._run_tasks()
            except Exception as exc:  # a bug in a task of ours: stop, and say so
                log.critical("gateway task failed", exc_info=True)
                self._failure = _describe(exc)
        except BaseException as exc:
            # Whatever ends the run from here on is not a clean stop.
            if self._failure is None:
                self._failure = _describe(exc)
            raise
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if not self._drained:
                self._state = "stopping: draining C-STOREs in progress"
                self.notifier.stopping(self._state)
            try:
                # The page goes first: it reads the database that _shutdown closes.
                await self.web.stop()
                await self.status.close()
                logging.getLogger("gateway").removeHandler(self.status.errors)
                await asyncio.to_thread(self._shutdown)
            finally:
                watchdog.cancel()
        if self._failure:
            log.critical("exiting after component failure: %s", self._failure)
            return EXIT_COMPONENT_FAILED
        return 0

    async def _run_tasks(self) -> None:
        """The background tasks, until a stop is requested."""
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._monitor(), name="monitor"),
                tg.create_task(self._sweep_tmp(), name="sweep-tmp"),
                tg.create_task(self._supervise("pipeline", self.pipeline.run)),
                tg.create_task(self._supervise("worklist", self.worklist.run)),
                tg.create_task(self._supervise("mpps", self.mpps_forwarder.run)),
                tg.create_task(self._supervise("commitment", self.commitment_reporter.run)),
                tg.create_task(self._supervise("studies", self.study_tracker.run)),
            ]
            if self.config.heartbeat.url:
                beat = functools.partial(run_heartbeat, self.config, self.status)
                tasks.append(tg.create_task(self._supervise("heartbeat", beat)))
            await self._stop.wait()
            # In-flight DIMSE requests finish while the pipeline still runs.
            self._state = "stopping: draining C-STOREs in progress"
            self.notifier.stopping(self._state)
            await asyncio.to_thread(self._drain_dimse)
            for task in tasks:
                task.cancel()

    def _start(self) -> None:
        self.spool.prepare()
        self._instance_lock = self.spool.take_instance_lock(_INSTANCE_LOCK_WAIT_S)
        self.store.path = adopt_legacy_database(self.config)
        self.store.open()
        reconcile(self.spool, self.store)
        self.receiver.start()

    async def _supervise(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one component and restart it, with backoff, each time it crashes: the
        receiver goes on meanwhile, and the page says the component is degraded.  Only
        a corrupt database stops the gateway (see the module docstring)."""
        delay = _RESTART_INITIAL_S
        while True:
            started = time.monotonic()
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_corrupt_database(exc):
                    log.critical("%s: the queue database is corrupt", name, exc_info=True)
                    self._failure = f"queue database corrupt: {describe_crash(exc)}"
                    self.request_stop(self._failure)
                    return
                if time.monotonic() - started > _RESTART_MAX_S:
                    delay = _RESTART_INITIAL_S  # it ran well for a while: start over
                log.error("%s crashed; restarting it in %.0f s", name, delay, exc_info=True)
                self.metrics.component_restarts.labels(name).inc()
                self.status.component_crashed(name, describe_crash(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX_S)

    async def _monitor(self) -> None:
        """Turn a dead thread into a logged, visible failure instead of a silent hang,
        and notice a spool directory that vanished or was replaced (Spool.check logs
        it, and the receiver and /readyz refuse until it is back)."""
        while True:
            await asyncio.sleep(_MONITOR_INTERVAL_S)
            if self._stop.is_set():
                return  # the stop closes the listener first, on purpose
            await asyncio.to_thread(self.spool.check)
            if self._stop.is_set():
                # Asked while the check ran: the stop may already have ended the threads.
                # (From here to the end of the loop body nothing yields, and the stop
                # ends them only after it set the event, on this loop.)
                return
            for name, alive in (
                ("DIMSE receiver supervisor", self.receiver.alive),
                ("queue database writer", self.store.alive),
            ):
                if not alive:
                    self._failure = f"{name} thread died"
                    log.critical("%s thread is no longer running", name)
                    self.request_stop(self._failure)
                    return

    async def _sweep_tmp(self) -> None:
        # A live C-STORE writes at least every network_timeout, and then waits at most
        # COMMIT_TIMEOUT_S in its handler: a temp file older than that is debris.
        c = self.config.dimse
        stale_after = c.network_timeout + c.dimse_timeout + COMMIT_TIMEOUT_S + 60
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            try:
                removed = await asyncio.to_thread(self.spool.sweep_tmp, stale_after)
            except OSError as exc:  # the spool's trouble is reported by the monitor
                log.error("sweeping the spool's tmp/ failed: %s", exc)
                continue
            if removed:
                log.warning("removed %d abandoned temp files from the spool", removed)

    def _drain_dimse(self) -> None:
        """Stop accepting and let in-flight C-STOREs / MPPS requests finish (once)."""
        with self._drain_lock:  # a second caller waits for the first to finish
            if self._drained:
                return
            self._drained = True
            self._stop_started = time.monotonic()
            self.receiver.stop_accepting()
            drained = self.receiver.drain(self.config.dimse.drain_seconds)
        if not drained:
            log.warning(
                "in-flight C-STOREs did not finish within %.0f s; their associations "
                "were aborted (not acknowledged, so the modality will resend)",
                self.config.dimse.drain_seconds,
            )

    def _shutdown(self) -> None:
        # Normally drained already, before the pipeline was cancelled; not if the
        # start-up or the task group failed.
        self._drain_dimse()
        # Last: every caller (handlers, pipeline, forwarder, page) is gone by now.
        self.store.close(timeout=_STORE_CLOSE_S)
        self.spool.close()
        if self._instance_lock >= 0:
            os.close(self._instance_lock)  # the receivers have exited: the spool is free
            self._instance_lock = -1
        took = time.monotonic() - self._stop_started
        if self._failure is None:
            log.info("stopped cleanly in %.1f s", took)
        else:
            log.error("stopped after an error (%s) in %.1f s", self._failure, took)

"""The DIMSE receivers, in processes of their own.

The modality comes first: receiving must not wait for the interpreter lock that the
uploader, the compress stage's bookkeeping and the status page hold in the main
process, and several modalities sending at once should use every core.  So the
gateway binds the DIMSE port once and starts ``dimse.receiver_processes`` worker
processes (``python -m gateway.dicom.receivers``) that all accept from that one listening
socket: whichever worker is free takes the next association (the kernel wakes them
all; the others find nothing and go back to waiting).

Each worker has what a C-STORE, C-FIND, MPPS or Storage Commitment request needs and
nothing else: the spool (attached to the directories the gateway prepared, with the
same identity check), its own queue writer (SQLite in WAL mode is safe across
processes; each writer's ``BEGIN IMMEDIATE`` waits its turn), the worklist cache
reader, the MPPS SCP and the Storage Commitment SCP.  Spool pins work across processes
(gateway/spool.py), so a file a worker has renamed but not yet recorded is safe from
the main process's writer, and the other way round.

The worker talks to the gateway over a socket pair (:class:`multiprocessing.connection.Connection`):

* gateway -> worker: its setup first (:class:`WorkerSetup`), then ``("stop",)``;
* worker -> gateway: ``("ready",)``, ``("stored",)``, ``("mpps",)`` and
  ``("commitment",)`` (wake the pipeline, the MPPS forwarder or the Storage Commitment
  reporter), ``("metric", ...)`` (counted in the gateway's
  ``/metrics``), ``("active", n)`` (its open associations), ``("log", record)`` (its
  warnings and errors, for the status page's recent errors: the worker writes its
  log itself, to the same journal stream or stderr, before it answers the request
  the line is about), ``("stopped",)`` and ``("drained", ok)``.

A worker that dies is started again with backoff and counted in
``dicom_gateway_component_restarts_total{component="receiver"}``; its associations
in progress were not acknowledged, so the modality sends again, and the other
workers go on accepting meanwhile.  A worker whose gateway is gone (the socket pair
reads EOF) stops accepting, drains and exits.  At stop, every worker stops accepting,
then drains for ``dimse.drain_seconds``, closes its writer and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..config import Config

log = logging.getLogger(__name__)

#: A worker must say it is ready within this.
_READY_TIMEOUT_S = 60.0
#: A dead worker is started again after this, doubling up to _RESTART_MAX_S.
_RESTART_INITIAL_S = 0.5
_RESTART_MAX_S = 60.0
#: How long stop_accepting waits for each worker to close its listener.
_STOP_TIMEOUT_S = 10.0
#: A drained worker closes its queue writer within this (its C-STOREs' rows are
#: committed by then: what is left is small) ...
_WORKER_STORE_CLOSE_S = 10.0
#: ... and exits within this (gateway.app.stop_budget_seconds counts it).
RECEIVER_EXIT_S = _WORKER_STORE_CLOSE_S + 2.0
#: A worker's exit status when a thread it depends on died.
EXIT_WORKER_FAILED = 70
_MONITOR_INTERVAL_S = 0.25
#: The rest of the gateway (uploads, the compress stage's bookkeeping, the page) runs at
#: this niceness once the receivers are up: the modality comes first.
GATEWAY_NICENESS = 5
#: Extra log record attributes a worker forwards (journal fields, gateway.notify).
_FORWARDED_EXTRAS = ("SOP_INSTANCE_UID", "CALLING_AE")


def receiver_processes(config: Config) -> int:
    """How many receiver processes: the configured number, or one per usable core."""
    if config.dimse.receiver_processes > 0:
        return config.dimse.receiver_processes
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class WorkerSetup:
    config: Config
    database: Path
    spool_identity: dict[str, tuple[int, int]]
    index: int


class _Worker:
    """The gateway's handle on one receiver process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.reader: threading.Thread | None = None
        self.active = 0
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.drained: bool | None = None
        self.drained_event = threading.Event()
        self.failure: str | None = None
        self.started_at = 0.0


class ReceiverPool:
    """Binds the DIMSE port and runs the receiver processes that serve it.

    The same face to the rest of the gateway as one in-process
    :class:`gateway.dicom.receive.Receiver`: :attr:`address`, :attr:`alive`,
    :attr:`active_associations`, :meth:`start`, :meth:`stop_accepting`, :meth:`drain`.
    """

    def __init__(
        self,
        config: Config,
        spool_identity: Callable[[], dict[str, tuple[int, int]]],
        database: Callable[[], Path],
        on_stored: Callable[[], None],
        on_mpps: Callable[[], None],
        metrics: Any = None,
        on_log_record: Callable[[logging.LogRecord], object] | None = None,
        instance_lock: Callable[[], int] | None = None,
        on_commitment: Callable[[], None] | None = None,
    ) -> None:
        """*instance_lock* gives the descriptor of the spool's instance lock, which
        each receiver process inherits (gateway.spool.Spool.take_instance_lock)."""
        self.config = config
        self._spool_identity = spool_identity
        self._database = database
        self._on_stored = on_stored
        self._on_mpps = on_mpps
        self._on_commitment = on_commitment
        self.metrics = metrics
        self._on_log_record = on_log_record
        self._instance_lock = instance_lock
        self.address: tuple[str, int] = ("", 0)
        self._socket: socket.socket | None = None
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._supervisor_tid = 0

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        c = self.config.dimse
        family = socket.AF_INET6 if ":" in c.bind else socket.AF_INET
        sock = socket.create_server((c.bind, c.port), family=family, backlog=128)
        # Non-blocking accept: every worker waits on it, one gets each connection.
        sock.setblocking(False)
        self._socket = sock
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))
        self._workers = [_Worker(i) for i in range(receiver_processes(self.config))]
        try:
            for w in self._workers:
                self._spawn(w)
            for w in self._workers:
                self._wait_ready(w)
        except BaseException:
            self._stopping.set()
            self._kill_all()
            sock.close()
            raise
        started = threading.Event()
        self._supervisor = threading.Thread(
            target=self._supervise, args=(started,), name="receiver-supervisor", daemon=True
        )
        self._supervisor.start()
        started.wait()
        self._lower_own_priority(keep=self._supervisor_tid)
        log.info(
            "%d DIMSE receiver processes serve %s:%d (pids %s)",
            len(self._workers),
            *self.address,
            ", ".join(str(w.proc.pid) for w in self._workers if w.proc is not None),
        )
        return self.address

    @property
    def alive(self) -> bool:
        """The supervisor runs (it starts dead workers again)."""
        return self._supervisor is not None and self._supervisor.is_alive()

    @property
    def active_associations(self) -> int:
        return sum(w.active for w in self._workers)

    def stop_accepting(self) -> None:
        """Every worker closes its listener; then the port closes."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            self._send(w, ("stop",))
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for w in workers:
            if not w.stopped.wait(max(0.0, deadline - time.monotonic())) and self._running(w):
                log.warning("receiver process %d did not stop accepting in time", w.index)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)

    def drain(self, timeout: float) -> bool:
        """Wait for every worker to drain (each waits up to *timeout*) and exit."""
        deadline = time.monotonic() + timeout + RECEIVER_EXIT_S
        drained = True
        for w in self._workers:
            if w.proc is None:
                continue
            left = max(0.0, deadline - time.monotonic())
            if not w.drained_event.wait(left) or w.drained is False:
                drained = False
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("receiver process %d (pid %d) did not exit; killed", w.index,
                          w.proc.pid)  # fmt: skip
                w.proc.kill()
                w.proc.wait()
                drained = False
        for w in self._workers:
            if w.reader is not None:
                w.reader.join(timeout=5)
        return drained

    # -- workers --------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        assert self._socket is not None
        ours, theirs = socket.socketpair()
        listen_fd = self._socket.fileno()
        keep = [theirs.fileno(), listen_fd]
        if self._instance_lock is not None:
            keep.append(self._instance_lock())  # held open, never used, by the worker
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.dicom.receivers",
                    str(theirs.fileno()),
                    str(listen_fd),
                ],
                pass_fds=keep,
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        w.proc, w.conn = proc, conn
        w.active = 0
        w.ready.clear()
        w.stopped.clear()
        w.drained_event.clear()
        w.drained = None
        w.failure = None
        w.started_at = time.monotonic()
        setup = WorkerSetup(self.config, self._database(), self._spool_identity(), w.index)
        try:
            conn.send(setup)
        except OSError as exc:
            w.failure = f"could not send the setup: {exc}"
        w.reader = threading.Thread(
            target=self._read, args=(w, conn), name=f"receiver-{w.index}-events", daemon=True
        )
        w.reader.start()

    def _wait_ready(self, w: _Worker) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not w.ready.wait(0.1):
            if w.failure is not None or not self._running(w) or time.monotonic() > deadline:
                why = w.failure or (
                    f"exited with status {w.proc.returncode}"
                    if w.proc is not None and w.proc.poll() is not None
                    else "not ready in time"
                )
                raise OSError(f"DIMSE receiver process {w.index} did not start: {why}")

    @staticmethod
    def _running(w: _Worker) -> bool:
        return w.proc is not None and w.proc.poll() is None

    def _send(self, w: _Worker, message: tuple[Any, ...]) -> None:
        if w.conn is None:
            return
        # If it is gone, the supervisor sees to it, or the stop does not wait for it.
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(message)

    def _read(self, w: _Worker, conn: Connection) -> None:
        """The worker's events, until it closes its end (it exited)."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(w, message)
            except Exception:  # a bad message must not end the reading
                log.exception("receiver process %d: event %r", w.index, message[:1])
        w.active = 0
        w.stopped.set()
        if w.drained is None:
            w.drained = False
        w.drained_event.set()
        conn.close()

    def _handle(self, w: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stored":
            self._on_stored()
        elif kind == "log":
            if self._on_log_record is not None:
                self._on_log_record(logging.makeLogRecord(message[1]))
        elif kind == "metric":
            self._count(message[1:])
        elif kind == "active":
            w.active = int(message[1])
        elif kind == "mpps":
            self._on_mpps()
        elif kind == "commitment":
            if self._on_commitment is not None:
                self._on_commitment()
        elif kind == "ready":
            w.ready.set()
        elif kind == "failed":
            w.failure = str(message[1])
        elif kind == "stopped":
            w.stopped.set()
        elif kind == "drained":
            w.drained = bool(message[1])
            w.drained_event.set()

    def _count(self, what: tuple[Any, ...]) -> None:
        m = self.metrics
        if m is None:
            return
        if what[0] == "answered":
            m.store_answered(int(what[1]))
        elif what[0] == "accepted":
            m.associations_accepted.inc()
        elif what[0] == "rejected":
            m.associations_rejected.labels(str(what[1])).inc()

    @staticmethod
    def _lower_own_priority(keep: int) -> None:
        """Every thread of this process but *keep* (the supervisor, which starts
        receiver processes again: they inherit its niceness) to GATEWAY_NICENESS;
        threads started later inherit it from their creators."""
        for tid in os.listdir("/proc/self/task"):
            if int(tid) == keep:
                continue
            try:
                if os.getpriority(os.PRIO_PROCESS, int(tid)) < GATEWAY_NICENESS:
                    os.setpriority(os.PRIO_PROCESS, int(tid), GATEWAY_NICENESS)
            except OSError:
                pass  # a thread that just ended

    def _supervise(self, started: threading.Event) -> None:
        """Start a worker that died again, with backoff; the others go on meanwhile."""
        self._supervisor_tid = threading.get_native_id()
        started.set()
        delay: dict[int, float] = {}
        next_try: dict[int, float] = {}
        while not self._stopping.wait(_MONITOR_INTERVAL_S):
            for w in self._workers:
                if self._running(w) or self._stopping.is_set():
                    continue
                now = time.monotonic()
                if w.index not in next_try:
                    code = w.proc.returncode if w.proc is not None else None
                    if now - w.started_at > _RESTART_MAX_S:
                        delay[w.index] = _RESTART_INITIAL_S  # it ran well for a while
                    d = delay.get(w.index, _RESTART_INITIAL_S)
                    log.error(
                        "DIMSE receiver process %d exited (status %s); its associations in "
                        "progress were not acknowledged; starting it again in %.1f s",
                        w.index, code, d,
                    )  # fmt: skip
                    if self.metrics is not None:
                        self.metrics.component_restarts.labels("receiver").inc()
                    next_try[w.index] = now + d
                    delay[w.index] = min(d * 2, _RESTART_MAX_S)
                if now < next_try[w.index]:
                    continue
                del next_try[w.index]
                with self._lock:
                    if self._stopping.is_set() or self._socket is None:
                        return
                    if w.reader is not None:
                        w.reader.join(timeout=5)
                    try:
                        self._spawn(w)
                    except OSError as exc:
                        log.error("could not start DIMSE receiver process %d: %s", w.index, exc)

    def _kill_all(self) -> None:
        for w in self._workers:
            if self._running(w):
                assert w.proc is not None
                w.proc.kill()
                w.proc.wait()


# -- the worker process ------------------------------------------------------------------


class _Events:
    """The worker's end of the socket pair, shared by its threads."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, *message: Any) -> None:
        try:
            with self._lock:
                self.conn.send(message)
        except (OSError, ValueError):
            pass  # the gateway is gone: the main loop sees EOF and stops


class _Counter:
    def __init__(self, events: _Events, *what: Any) -> None:
        self._events = events
        self._what = what

    def inc(self) -> None:
        self._events.send("metric", *self._what)

    def labels(self, label: str) -> _Counter:
        return _Counter(self._events, *self._what, label)


class _MetricsProxy:
    """What :class:`gateway.dicom.receive.Receiver` counts, sent to the gateway's metrics."""

    def __init__(self, events: _Events) -> None:
        self._events = events
        self.associations_accepted = _Counter(events, "accepted")
        self.associations_rejected = _Counter(events, "rejected")

    def store_answered(self, status: int) -> None:
        self._events.send("metric", "answered", status)


class _LogForwarder(logging.Handler):
    """Warnings and errors to the gateway (its status page lists the recent ones)."""

    def __init__(self, events: _Events) -> None:
        super().__init__(logging.WARNING)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data: dict[str, Any] = {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": record.getMessage(),
                "created": record.created,
                "msecs": record.msecs,
                "threadName": f"receiver-{os.getpid()}/{record.threadName}",
                "process": record.process,
            }
            if record.exc_info:
                data["exc_text"] = logging.Formatter().formatException(record.exc_info)
            elif record.exc_text:
                data["exc_text"] = record.exc_text
            for key in _FORWARDED_EXTRAS:
                if hasattr(record, key):
                    data[key] = getattr(record, key)
            self._events.send("log", data)
        except Exception:
            self.handleError(record)


def _worker_main(conn_fd: int, listen_fd: int) -> int:
    # The gateway orders the stop (stop accepting, drain, exit): a SIGTERM from
    # systemd or a Ctrl-C reaching the whole process group must not cut it short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(conn_fd)
    events = _Events(conn)
    setup: WorkerSetup = conn.recv()
    config = setup.config
    from ..notify import setup_logging

    setup_logging(config.logging.level)
    logging.getLogger("gateway").addHandler(_LogForwarder(events))
    try:
        receiver, store, spool = _start_worker(setup, listen_fd, events)
    except Exception as exc:
        log.critical("DIMSE receiver process %d cannot start: %s", setup.index, exc,
                     exc_info=True)  # fmt: skip
        events.send("failed", f"{type(exc).__name__}: {exc}")
        return EXIT_WORKER_FAILED
    events.send("ready")
    active = 0
    command: tuple[Any, ...] = ()
    while True:
        try:
            if conn.poll(_MONITOR_INTERVAL_S):
                command = conn.recv()
        except (EOFError, OSError):
            log.error("DIMSE receiver process %d: the gateway is gone; stopping", setup.index)
            command = ("stop",)
        if command[:1] == ("stop",):
            break
        now_active = receiver.active_associations
        if now_active != active:
            active = now_active
            events.send("active", active)
        for what, alive in (("acceptor", receiver.alive), ("queue writer", store.alive)):
            if not alive:
                log.critical("DIMSE receiver process %d: its %s thread died", setup.index, what)
                return EXIT_WORKER_FAILED
    receiver.stop_accepting()
    events.send("stopped")
    drained = receiver.drain(config.dimse.drain_seconds)
    store.close(timeout=_WORKER_STORE_CLOSE_S)
    spool.close()
    events.send("drained", drained)
    return 0


def _start_worker(setup: WorkerSetup, listen_fd: int, events: _Events) -> tuple[Any, Any, Any]:
    # Imported here: the gateway's own process imports this module for ReceiverPool
    # and needs none of them.
    from ..commitment.scp import CommitmentScp
    from ..mpps.scp import MppsScp
    from ..spool import Spool
    from ..store import Store
    from ..worklist.service import Worklist
    from . import patches
    from .receive import Receiver

    # Every change to pynetdicom, before anything of it runs in this process.
    patches.install()
    config = setup.config
    spool = Spool(config.spool.dir, config.spool.min_free_bytes)
    spool.attach(setup.spool_identity)
    store = Store(setup.database, remove_file=spool.remove_unpinned)
    store.open()
    worklist = Worklist(config, store)
    receiver = Receiver(
        config.dimse,
        spool,
        store,
        on_stored=lambda _instance: events.send("stored"),
        worklist=worklist.answer,
        mpps_scp=MppsScp(store, on_accepted=lambda: events.send("mpps")),
        metrics=_MetricsProxy(events),  # type: ignore[arg-type]
        listen_socket=socket.socket(fileno=listen_fd),
        commitment_scp=CommitmentScp(config, store, on_accepted=lambda: events.send("commitment")),
    )
    receiver.start()
    return receiver, store, spool


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m gateway.dicom.receivers CONN_FD LISTEN_FD (started by the gateway)",
              file=sys.stderr)  # fmt: skip
        return 2
    return _worker_main(int(args[0]), int(args[1]))


if __name__ == "__main__":
    raise SystemExit(main())

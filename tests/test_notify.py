"""sd_notify and journal logging with the real systemd-python module.

The "systemd" here is a Unix datagram socket owned by the test, passed to the real
gateway process as ``NOTIFY_SOCKET``: a stand-in for PID 1's notify socket, which is
a plain datagram socket receiving ``KEY=value`` lines, so nothing is faked on the
gateway's side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import notify
from gateway.notify import Notifier, journal_handler, watchdog_interval

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import write_config
from .support.peers import free_port, storescu

WATCHDOG_USEC = 400_000  # pings every 0.2 s


class NotifySocket:
    """The receiving end of ``NOTIFY_SOCKET``, read as systemd reads it: at once, by a
    thread of its own (the kernel queues only net.unix.max_dgram_qlen datagrams, often
    10, for a socket nobody reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                self._queue.put(self.sock.recv(65536).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def pending(self) -> list[str]:
        """Every datagram received and not yet taken, without waiting."""
        got = []
        while True:
            try:
                got.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.messages += got
        return got

    def wait_for(self, line: str, timeout: float = 30.0) -> str:
        """The first datagram (from now on) that contains *line*."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self._queue.get(timeout=left)
            except queue.Empty:
                break
            self.messages.append(message)
            if line in message.splitlines():
                return message
        raise AssertionError(f"no {line!r} within {timeout} s; got {self.messages[-5:]}")

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def _wait_stopped(pid: int) -> None:
    """Until the kernel shows *pid* stopped (state T): kill() returns before that."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "process did not stop"
        time.sleep(0.01)


def _lines(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines())


def test_real_gateway_ready_watchdog_status_stopping(
    gateway_factory: GatewayFactory, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    gw = gateway_factory(start=False)
    gw.start(env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})

    ready = _lines(notify_socket.wait_for("READY=1"))
    assert f":{gw.port}" in ready["STATUS"] and "AE DICOMGW" in ready["STATUS"]
    for _ in range(3):
        notify_socket.wait_for("WATCHDOG=1", timeout=5)

    ct = tmp_path / "ct.dcm"
    corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
    assert storescu(gw.port, [ct]).statuses == ["Success"]
    # The ping already on its way may carry the line from before the store; a later
    # one has to count it.
    statuses = [_lines(notify_socket.wait_for("WATCHDOG=1", timeout=5))["STATUS"]]
    while "1 instances stored since start" not in statuses[-1]:
        assert len(statuses) < 3, statuses
        statuses.append(_lines(notify_socket.wait_for("WATCHDOG=1", timeout=5))["STATUS"])

    # SIGSTOP freezes the process, its loop with it: no more pings while it stands
    # still (2.5 watchdog periods), and they resume when it runs again.
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGSTOP)
    try:
        _wait_stopped(gw.proc.pid)
        time.sleep(0.3)  # what was sent before the stop took effect reaches the reader
        notify_socket.pending()
        time.sleep(2.5 * WATCHDOG_USEC / 1e6)
        assert notify_socket.pending() == []
    finally:
        gw.proc.send_signal(signal.SIGCONT)
    notify_socket.wait_for("WATCHDOG=1", timeout=5)

    gw.proc.send_signal(signal.SIGTERM)
    stopping = _lines(notify_socket.wait_for("STOPPING=1"))
    assert stopping["STATUS"].startswith("stopping")
    assert gw.proc.wait(timeout=30) == 0


@pytest.mark.asyncio
async def test_stalled_loop_stops_the_pings(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pings come from the asyncio loop: a blocking call on the loop (the failure
    the watchdog is for) stops them while the rest of the process runs on."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.enabled and notifier.watchdog_interval == 0.05
    task = asyncio.create_task(notifier.heartbeat(lambda: "fine"))
    try:
        await asyncio.sleep(0.3)
        assert "WATCHDOG=1\nSTATUS=fine" in notify_socket.pending()
        # The stall: twenty watchdog periods with the loop blocked.  What was sent
        # before it is read within the first half; nothing comes in the second.
        time.sleep(0.5)
        notify_socket.pending()
        time.sleep(0.5)
        assert notify_socket.pending() == []
        await asyncio.sleep(0.3)
        assert "WATCHDOG=1\nSTATUS=fine" in notify_socket.pending()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.stopping("x")
    await asyncio.wait_for(notifier.heartbeat(lambda: "x"), 5)  # returns at once


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_journal_only_when_stderr_is_the_journal() -> None:
    st = os.fstat(sys.stderr.fileno())
    assert journal_handler({}) is None
    assert journal_handler({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) is None
    assert journal_handler({"JOURNAL_STREAM": "garbage"}) is None
    handler = journal_handler({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert handler is not None and type(handler).__name__ == "JournalHandler"


def test_journal_entries_carry_the_structured_fields() -> None:
    """The real JournalHandler, with its sender swapped for a recorder (there is no
    journald in the test machine): the fields receive.py passes arrive as fields."""
    st = os.fstat(sys.stderr.fileno())
    handler = journal_handler({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert handler is not None
    sent: list[dict[str, object]] = []

    def record(message: str, /, **fields: object) -> None:
        sent.append({"MESSAGE": message, **fields})

    handler.send = record  # type: ignore[attr-defined]
    logger = logging.getLogger("gateway.test-journal")
    logger.addHandler(handler)
    try:
        logger.warning(
            "stored sop=%s",
            "1.2.3",
            extra={notify.SOP_INSTANCE_UID: "1.2.3", notify.CALLING_AE: "CT_ROOM1"},
        )
    finally:
        logger.removeHandler(handler)
    (entry,) = sent
    assert entry["MESSAGE"] == "stored sop=1.2.3"
    assert entry["SOP_INSTANCE_UID"] == "1.2.3"
    assert entry["CALLING_AE"] == "CT_ROOM1"
    assert entry["SYSLOG_IDENTIFIER"] == "dicom-gateway"
    assert entry["PRIORITY"] == "4"


def test_real_gateway_logs_to_the_journal_with_fields(tmp_path: Path) -> None:
    """The real gateway under a stand-in journald (tests/support/journal_sink.py: a datagram
    socket at /run/systemd/journal/socket in a private mount namespace, stderr named
    by JOURNAL_STREAM): C-STORE lines carry SOP_INSTANCE_UID and CALLING_AE."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    root = tmp_path / "gw"
    root.mkdir()
    port = free_port()
    config = write_config(root / "gateway.toml", root, port)
    out = tmp_path / "journal.bin"
    script = (
        'mount -t tmpfs tmpfs /run/systemd && exec "$0" -m tests.support.journal_sink "$1" "$2"'
    )
    sink = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
         sys.executable, str(out), str(config)],
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b" ready: " not in (out.read_bytes() if out.exists() else b""):
            assert sink.poll() is None, "sink/gateway exited early"
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.05)
        ct = tmp_path / "ct.dcm"
        ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
        assert storescu(port, [ct], calling="CT_ROOM1").statuses == ["Success"]
        deadline = time.monotonic() + 10
        while b"stored sop=" not in out.read_bytes():
            assert time.monotonic() < deadline, "no stored line in the journal"
            time.sleep(0.05)
    finally:
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=60) == 0
    entries = [e for e in out.read_bytes().split(b"\n\0\n") if b"stored sop=" in e]
    (entry,) = entries
    fields = dict(line.split(b"=", 1) for line in entry.splitlines() if b"=" in line)
    assert fields[b"SOP_INSTANCE_UID"] == str(ds.SOPInstanceUID).encode()
    assert fields[b"CALLING_AE"] == b"CT_ROOM1"
    assert fields[b"SYSLOG_IDENTIFIER"] == b"dicom-gateway"
    assert fields[b"PRIORITY"] == b"6"
    assert (tmp_path / "journal.bin.stderr").read_bytes() == b""  # nothing went to stderr


def test_a_full_notify_socket_never_blocks_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody reads the socket: pings are dropped (logged once), READY=1 waits a bounded
    time with the interpreter lock released, so the other threads keep running.
    (systemd-python's notify() blocked holding the lock, and froze every thread.)"""
    path = tmp_path / "full.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.bind(str(path))
    try:
        monkeypatch.setattr(notify, "_MUST_SEND_S", 0.5)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        for _ in range(2000):  # far more than the socket holds
            notifier.status("x" * 200)
        assert caplog.text.count("systemd notification not sent") == 1

        ticks = 0
        done = threading.Event()

        def count() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1

        counter = threading.Thread(target=count)
        counter.start()
        before = ticks
        notifier.ready("up")  # waits for room, which never comes
        after = ticks
        done.set()
        counter.join()
        assert after > before, "another thread ran while READY=1 waited"
    finally:
        reader.close()

"""systemd glue: service notifications (sd_notify) and logging to the journal.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET``; the gateway reports ``READY=1``
once its DIMSE port is open, a one-line ``STATUS=``, ``STOPPING=1`` when the stop
begins, and, with ``WatchdogSec=`` (``WATCHDOG_USEC``), ``WATCHDOG=1`` every half
period.  The pings are sent by a task on the asyncio loop itself, so a loop that is
stuck (a blocking call, a deadlock) stops them and systemd restarts the service.

The notifications are sent here, over the ``NOTIFY_SOCKET`` datagram socket, not with
systemd-python's ``notify()``: that call blocks while the socket is full and holds the
interpreter lock meanwhile, which froze every thread of the gateway when the reader of
the socket fell behind.  A WATCHDOG=1 or STATUS= that finds the socket full is dropped
(logged once; systemd not reading is no reason to stall the loop); READY=1 and
STOPPING=1 wait up to :data:`_MUST_SEND_S` with the lock released.  Outside systemd
everything here is a no-op.  The journal handler needs systemd-python (the ``systemd``
extra); without it logs go to stderr as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping

try:  # the `systemd` extra; absent on a developer machine without libsystemd
    import systemd.journal as _sd_journal
except ImportError:  # pragma: no cover - the test venv has it
    _sd_journal = None

log = logging.getLogger(__name__)

#: Journal field names (upper case, as journald requires) that log calls pass through
#: ``extra=``; shown by ``journalctl -o verbose`` and searchable, e.g.
#: ``journalctl -u dicom-gateway SOP_INSTANCE_UID=1.2.3``.
SOP_INSTANCE_UID = "SOP_INSTANCE_UID"
CALLING_AE = "CALLING_AE"

#: How often STATUS= is refreshed when there is no watchdog to pace it.
_STATUS_INTERVAL_S = 30.0
#: How long READY=1 and STOPPING=1 may wait for room on a full notify socket.
_MUST_SEND_S = 5.0


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The ``NOTIFY_SOCKET`` address (a path, or ``@name`` in the abstract namespace),
    or None when there is none this process can use."""
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    return path if path.startswith("/") else None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``WATCHDOG_USEC``, or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    raw = environ.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(raw) / 2 / 1_000_000


class Notifier:
    """Send service state to systemd; does nothing when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = notify_address(env)
        self.enabled = self._address is not None
        self.watchdog_interval = watchdog_interval(env) if self.enabled else None
        self._dropping = False

    def _send(self, *assignments: str, must: bool = False) -> None:
        if self._address is None:
            return
        data = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                if must:
                    s.settimeout(_MUST_SEND_S)  # waits with the interpreter lock released
                    s.sendto(data, self._address)
                else:
                    s.sendto(data, socket.MSG_DONTWAIT, self._address)
        except OSError as exc:  # full (BlockingIOError, TimeoutError) or gone
            if not self._dropping:
                log.warning("systemd notification not sent (%s): %s", assignments[0], exc)
            self._dropping = True
            return
        if self._dropping:
            log.info("systemd notifications are sent again")
        self._dropping = False

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}", must=True)

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send("STOPPING=1", f"STATUS={status}", must=True)

    async def heartbeat(self, status: Callable[[], str]) -> None:
        """Ping the watchdog (and refresh STATUS=) from the loop until cancelled.

        Run as a task on the gateway's loop: if the loop stalls, so do the pings.
        """
        if not self.enabled:
            return
        interval = self.watchdog_interval
        while True:
            if interval is not None:
                self._send("WATCHDOG=1", f"STATUS={status()}")
            else:
                self.status(status())
            await asyncio.sleep(interval if interval is not None else _STATUS_INTERVAL_S)


def journal_handler(environ: Mapping[str, str] | None = None) -> logging.Handler | None:
    """A handler writing structured entries to the journal when stderr is connected to
    it (``JOURNAL_STREAM`` names stderr's device and inode), else None: stderr then."""
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    if _sd_journal is None or not stream:
        return None
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return None
    if (st.st_dev, st.st_ino) != (dev, ino):
        return None  # stderr was redirected: the caller wants it there
    handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="dicom-gateway")
    return handler


def setup_logging(level: str) -> None:
    """Logging for the gateway's processes, at *level* (``logging.level``)."""
    # Under systemd stderr is the journal: log there with structured fields (SOP
    # Instance UID, calling AE) and let journald add the time; else plain stderr.
    journal = journal_handler()
    if journal is not None:
        journal.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.basicConfig(level=level.upper(), handlers=[journal])
    else:
        logging.basicConfig(
            level=level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    # pynetdicom narrates every PDU at INFO; the gateway logs what matters itself.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

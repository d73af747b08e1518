"""systemd glue: service notifications (sd_notify) and logging to the journal.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET``; the gateway reports ``READY=1``
once its DIMSE port is open, a one-line ``STATUS=``, ``STOPPING=1`` when the stop
begins, and, with ``WatchdogSec=`` (``WATCHDOG_USEC``), ``WATCHDOG=1`` every half
period.  The pings are sent by a task on the asyncio loop itself, so a loop that is
stuck (a blocking call, a deadlock) stops them and systemd restarts the service.

Both parts need systemd-python (the ``systemd`` extra); without it, or outside
systemd, everything here is a no-op and logs go to stderr as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping

try:  # the `systemd` extra; absent on a developer machine without libsystemd
    import systemd.daemon as _sd_daemon
    import systemd.journal as _sd_journal
except ImportError:  # pragma: no cover - the test venv has it
    _sd_daemon = None
    _sd_journal = None

#: Journal field names (upper case, as journald requires) that log calls pass through
#: ``extra=``; shown by ``journalctl -o verbose`` and searchable, e.g.
#: ``journalctl -u dicom-gateway SOP_INSTANCE_UID=1.2.3``.
SOP_INSTANCE_UID = "SOP_INSTANCE_UID"
CALLING_AE = "CALLING_AE"

#: How often STATUS= is refreshed when there is no watchdog to pace it.
_STATUS_INTERVAL_S = 30.0


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
        self.enabled = _sd_daemon is not None and bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(env) if self.enabled else None

    def _send(self, *assignments: str) -> None:
        if self.enabled and _sd_daemon is not None:
            _sd_daemon.notify("\n".join(assignments))

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send("STOPPING=1", f"STATUS={status}")

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

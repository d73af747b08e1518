"""Bandwidth control for the upload: a byte-rate cap, upload windows, a priority lane.

* :class:`TokenBucket` paces the body bytes of every STOW-RS request of this gateway
  to ``upload.max_bytes_per_second`` (0: unlimited), however many requests run at
  once: each chunk of a spool file is paid for before it is handed to the socket.
* :class:`Windows` are the weekly times when uploading is allowed
  (``upload.windows``, the box's local time).  Outside them nothing new is sent;
  requests in flight finish, and receiving and compressing go on.
* Instances received from ``upload.priority_aets`` (a STAT modality, the ED) are
  claimed first, are sent whether a window is open or not, and are not held by the
  bucket.  Their bytes are still charged to it, so the other uploads give way and the
  cap holds on average unless the priority lane alone exceeds it.

Window syntax, one string per window: ``DAYS HH:MM-HH:MM``.  DAYS is a day
(``mon`` .. ``sun``), a range (``mon-fri``, ``fri-mon`` wraps), a comma-separated list
of those, or ``daily``.  The end may be ``24:00``; an end at or before the start
crosses midnight, and the window then belongs to the day it starts on
(``mon-fri 19:00-07:00`` runs from Monday 19:00 to Saturday 07:00 with gaps during
the day).  This module imports nothing of the gateway, so gateway.config can use
:func:`parse_window` to validate.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MINUTES_PER_DAY = 24 * 60
_TIME_RE = re.compile(r"([01]?[0-9]|2[0-4]):([0-5][0-9])")


class WindowError(ValueError):
    """A window string that cannot be read; ``str()`` says why, in one line."""


@dataclass(frozen=True)
class Window:
    #: Weekdays the window starts on (0 = Monday, as datetime.weekday()).
    days: frozenset[int]
    #: Minutes after midnight; ``end <= start`` means it ends the next day.
    start: int
    end: int
    text: str

    def contains(self, when: datetime) -> bool:
        day, minute = when.weekday(), when.hour * 60 + when.minute
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Crosses midnight: the evening of a listed day, or the morning after it.
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


def _parse_days(text: str) -> frozenset[int]:
    if text == "daily":
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise WindowError(f"unknown day {part!r} (use mon..sun, a range such as mon-fri,"
                              " a list such as sat,sun, or daily)")  # fmt: skip
        a = DAYS.index(first)
        b = DAYS.index(last) if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _parse_time(text: str, *, end: bool) -> int:
    m = _TIME_RE.fullmatch(text)
    if m is None:
        raise WindowError(f"{text!r} is not a time HH:MM")
    minutes = int(m[1]) * 60 + int(m[2])
    if minutes > _MINUTES_PER_DAY or (minutes == _MINUTES_PER_DAY and not end):
        raise WindowError(f"{text!r} is past 24:00" if minutes > _MINUTES_PER_DAY
                          else "a window cannot start at 24:00")  # fmt: skip
    return minutes


def parse_window(text: str) -> Window:
    """``"mon-fri 19:00-07:00"`` -> :class:`Window`; raises :class:`WindowError`."""
    parts = text.lower().split()
    if len(parts) != 2 or parts[1].count("-") != 1:
        raise WindowError('not DAYS HH:MM-HH:MM (e.g. "mon-fri 19:00-07:00")')
    days = _parse_days(parts[0])
    start_text, end_text = parts[1].split("-")
    start, end = _parse_time(start_text, end=False), _parse_time(end_text, end=True)
    if start == end:
        raise WindowError("starts and ends at the same time (a whole day is 00:00-24:00)")
    return Window(days, start, end, text)


class Windows:
    """The upload windows; no window at all means always open."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.windows = [parse_window(t) for t in texts]

    def is_open(self, when: datetime) -> bool:
        return not self.windows or any(w.contains(when) for w in self.windows)

    def next_change(self, when: datetime) -> datetime | None:
        """The next minute at which :meth:`is_open` changes (None: never)."""
        if not self.windows:
            return None
        now_open = self.is_open(when)
        base = when.replace(hour=0, minute=0, second=0, microsecond=0)
        candidates = sorted(
            base + timedelta(days=d, minutes=m)
            for d in range(9)
            for w in self.windows
            for m in (w.start, w.end)
        )
        for at in candidates:
            if at > when and self.is_open(at) != now_open:
                return at
        return None  # the windows cover the whole week


class TokenBucket:
    """A token bucket that may go into debt: :meth:`take` charges its bytes at once and
    then waits until the bucket is out of debt, so concurrent takers are served in
    order and a chunk larger than the burst still passes (after its time).  Over any
    interval the bytes passed stay within ``rate * interval + burst``.

    *clock* and *sleep* are injectable for tests.  A rate of 0 means unlimited."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst
        self._last = clock()

    def charge(self, n: int) -> float:
        """Take *n* tokens without waiting; returns the seconds until the bucket is
        out of debt again (0 when it is not in debt)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        return max(0.0, -self._tokens / self.rate)

    async def take(self, n: int) -> None:
        wait = self.charge(n)
        if wait > 0:
            await self._sleep(wait)


class Bandwidth:
    """What the uploader asks before and while it sends: the cap, the window, the lane.

    *now* gives the local wall-clock time the windows are read against (injectable
    for tests); the bucket paces by the monotonic clock."""

    def __init__(
        self,
        max_bytes_per_second: int,
        windows: Sequence[str],
        priority_aets: Sequence[str],
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.max_bytes_per_second = max_bytes_per_second
        self.windows = Windows(windows)
        # pynetdicom hands over the calling AE without its padding.
        self.priority_aets = tuple(a.strip() for a in priority_aets)
        self.now = now
        # A burst of a quarter second (at least one read chunk): short enough that the
        # per-second rate stays near the cap, long enough to keep the socket busy.
        self.bucket = TokenBucket(max_bytes_per_second, max(CHUNK, max_bytes_per_second / 4))

    @property
    def limited(self) -> bool:
        return self.max_bytes_per_second > 0

    def window_open(self) -> bool:
        return self.windows.is_open(self.now())

    def state(self) -> BandwidthState:
        """For the status document (and /metrics)."""
        now = self.now()
        change = self.windows.next_change(now)
        return BandwidthState(
            limit_bytes_per_second=self.max_bytes_per_second,
            window_open=self.windows.is_open(now),
            windows=tuple(w.text for w in self.windows.windows),
            window_changes_at=change.isoformat(timespec="minutes") if change else None,
            priority_aets=self.priority_aets,
        )


@dataclass(frozen=True)
class BandwidthState:
    """The cap, the window and the lane as of one moment (:meth:`Bandwidth.state`)."""

    limit_bytes_per_second: int
    window_open: bool
    windows: tuple[str, ...]
    #: When the window next opens or closes (local time, to the minute); None: never.
    window_changes_at: str | None
    priority_aets: tuple[str, ...]


#: Bytes read from a spool file, and paid for, at a time.
CHUNK = 64 * 1024

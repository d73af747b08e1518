"""The fleet page and the boxes' part of ``/metrics``, built in a worker thread at most
once per change of the data and served from the event loop as bytes.

Either takes tens of milliseconds of Python for 1,000 boxes, in a worker thread but
holding the GIL that the loop handling heartbeats needs too.  Built per request, a
page reloading itself and a Prometheus scraping would keep a thread busy most of the
time and the loop waiting at every switch.  So a :class:`CachedView` keeps its last
build and serves it while it is younger than ``min_interval`` (at most one build so
often, however many ask) or while nothing it shows has changed:

* the server's generation, bumped by every accepted heartbeat, is the one it was
  built at;
* no box has crossed the stale threshold since (the build says when the next one
  will: :attr:`Built.valid_until`);
* it is younger than ``max_age``: what the generation does not see (``fleet forget``
  run by another process) and, for the page, its "... ago" texts.

Requests that arrive while a build runs wait for that one build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger(__name__)


class Built(NamedTuple):
    body: bytes
    #: Wall-clock time after which the body is wrong even with no new heartbeat (a
    #: box turns stale then); ``math.inf``: none.
    valid_until: float = math.inf


class CachedView:
    """*build* (blocking: run in a worker thread) behind a cache; see the module."""

    def __init__(
        self,
        name: str,
        build: Callable[[], Built],
        generation: Callable[[], int],
        *,
        min_interval: float,
        max_age: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert 0 < min_interval <= max_age
        self.name = name
        self._build = build
        self._generation = generation
        self._min_interval = min_interval
        self._max_age = max_age
        self._clock = clock
        self._body: bytes | None = None
        self._built_generation = -1
        self._built_at = 0.0
        self._valid_until = 0.0
        self._building: asyncio.Future[bytes] | None = None
        #: Builds finished since start (tests and the builds counter read it).
        self.builds = 0

    def _fresh(self, now: float) -> bool:
        age = now - self._built_at
        if age < 0:  # the wall clock went back: no age to trust
            return False
        if age < self._min_interval:
            return True
        return self._generation() == self._built_generation and now < self._valid_until

    async def get(self) -> bytes:
        """The view's bytes: the cached ones, or those of one build shared by everyone
        asking while it runs."""
        if self._body is not None and self._fresh(self._clock()):
            return self._body
        if self._building is None:
            self._building = asyncio.ensure_future(self._rebuild())
            # Its failure is logged once (below) and is each waiter's answer.
            self._building.add_done_callback(_retrieve)
        # A request that goes away does not cancel the build the others wait for.
        return await asyncio.shield(self._building)

    async def _rebuild(self) -> bytes:
        try:
            # Read before the rows are: a heartbeat stored meanwhile makes the next
            # request build again, never one that goes unseen.
            generation = self._generation()
            started = self._clock()
            try:
                built = await asyncio.to_thread(self._build)
            except Exception:
                log.exception("building the fleet %s failed", self.name)
                raise
            self.builds += 1
            self._body = built.body
            self._built_generation = generation
            self._built_at = started
            self._valid_until = min(started + self._max_age, built.valid_until)
            return built.body
        finally:
            self._building = None

    async def close(self) -> None:
        """Wait for a build still running (its thread cannot be stopped anyway)."""
        if self._building is not None:
            with contextlib.suppress(Exception):  # already its requests' answer
                await asyncio.shield(self._building)


def _retrieve(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()

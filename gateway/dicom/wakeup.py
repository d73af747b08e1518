"""Wake pynetdicom's reactor threads when there is work, instead of on their next poll.

Each association has two threads that loop "check for work, else ``time.sleep(0.001)``":
the DUL reactor (socket <-> PDUs) and the association reactor (DIMSE messages ->
handlers).  A message crosses both, and each hop waits out what is left of a sleep.
With many small messages that adds up: a Modality Worklist answer of 56 items spent
about 1.2 ms per response in those sleeps (tests/bench/worklist.py), and every C-STORE
pays a few of them.

The patch keeps pynetdicom's loops as they are and only lets their sleep end
early.  Inside the two reactor threads, ``time.sleep(d)`` becomes "wait at most *d* for
a wake-up":

* the DUL reactor wakes when a PDU is queued for sending (``to_provider_queue.put``) or
  its socket becomes readable (``poll`` on the socket and an eventfd);
* the association reactor wakes when a DIMSE message is complete (``msg_queue.put``)
  or the DUL has something for the user (``to_user_queue.put``: release, abort).

A sleep never lasts longer than pynetdicom asked, so the worst case is pynetdicom's
own behaviour.  Sleeps in any other thread are untouched.  gateway/dicom/patches.py installs
the two reactor wrappers and :class:`Time` (in place of the module-level ``time`` of
``pynetdicom.dul`` and ``pynetdicom.association``); tests/test_wakeup.py and
tests/test_patches.py check that what they replace is still there and that wake-ups
happen, so an upgrade that changes them fails loudly.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

_local = threading.local()
_lock = threading.Lock()


class _EventWaker:
    """For the association reactor: a plain event, set by the queues that feed it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.woken = 0  # wake-ups that ended a sleep early (tests read it)

    def set(self) -> None:
        self._event.set()

    def wait(self, seconds: float) -> None:
        if self._event.wait(seconds):
            self.woken += 1
        self._event.clear()

    def close(self) -> None:
        pass


class _PollWaker:
    """For the DUL reactor: poll() on an eventfd (set by the send queue) and the socket."""

    def __init__(self, dul: DULServiceProvider) -> None:
        self._dul = dul
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._sock_fd = -1
        self._closed = False
        self._guard = threading.Lock()  # set() may race close(): never write a stale fd
        self.woken = 0

    def set(self) -> None:
        with self._guard:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._fd, 1)

    def _watch_socket(self) -> None:
        wrapper = self._dul.socket
        raw = getattr(wrapper, "socket", None) if wrapper is not None else None
        fd = raw.fileno() if raw is not None else -1
        if fd == self._sock_fd:
            return
        if self._sock_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(self._sock_fd)
        self._sock_fd = fd
        if fd >= 0:
            self._poll.register(fd, select.POLLIN)

    def wait(self, seconds: float) -> None:
        self._watch_socket()
        events = self._poll.poll(seconds * 1000)
        for fd, mask in events:
            if fd == self._fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._fd)
            elif mask & (select.POLLNVAL | select.POLLERR | select.POLLHUP):
                # Closed under us: stop watching it (the reactor notices on its own) so a
                # dead descriptor cannot turn the loop into a busy one.
                with contextlib.suppress(KeyError, ValueError):
                    self._poll.unregister(fd)
                self._sock_fd = -2
        if events:
            self.woken += 1

    def close(self) -> None:
        with self._guard:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


class Time:
    """Stands in for the ``time`` module inside pynetdicom.dul and .association."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        waker = getattr(_local, "waker", None)
        if waker is None or seconds <= 0:
            time.sleep(seconds)
        else:
            waker.wait(seconds)


def _wake_on_put(q: queue.Queue[Any], waker: _EventWaker | _PollWaker) -> None:
    """Make ``q.put`` (and so ``put_nowait``) also wake *waker*; contents untouched."""
    original = q.put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        original(item, block, timeout)
        waker.set()

    q.put = put  # type: ignore[method-assign]


def _assoc_waker(assoc: Any) -> _EventWaker:
    waker = getattr(assoc, "_gateway_waker", None)
    if waker is None:
        with _lock:
            waker = getattr(assoc, "_gateway_waker", None)
            if waker is None:
                waker = _EventWaker()
                _wake_on_put(assoc.dimse.msg_queue, waker)
                _wake_on_put(assoc.dul.to_user_queue, waker)
                assoc._gateway_waker = waker
    return waker


def wake_dul_reactor(
    original: Callable[[DULServiceProvider], None],
) -> Callable[[DULServiceProvider], None]:
    """Wraps ``DULServiceProvider.run_reactor``: its sleeps end on a queued PDU or a
    readable socket."""

    def run_reactor(self: DULServiceProvider) -> None:
        waker = _PollWaker(self)
        _wake_on_put(self.to_provider_queue, waker)
        self._gateway_waker = waker  # type: ignore[attr-defined]
        _local.waker = waker
        try:
            original(self)
        finally:
            _local.waker = None
            waker.close()

    return run_reactor


def wake_association_reactor(
    original: Callable[[Association], None],
) -> Callable[[Association], None]:
    """Wraps ``Association._run_reactor``: its sleeps end on a complete DIMSE message or
    an event from the DUL.  Only for the associations this process accepts: a
    requestor's ``send_*()`` pauses its reactor with a flag read without a lock, and a
    reactor woken by every message took a response off the queue before ``send_*()``
    could ("Received unexpected N-CREATE service message", then a DIMSE timeout).  An
    acceptor answers through its handlers and never pauses its reactor."""

    def run_reactor(self: Association) -> None:
        if not self.is_acceptor:
            original(self)
            return
        _local.waker = _assoc_waker(self)
        try:
            original(self)
        finally:
            _local.waker = None

    return run_reactor

"""gateway.dicom.wakeup: pynetdicom's reactor threads woken by work instead of by their polls.

The gateway runs every DIMSE test with the patch installed, so the suite as a whole
checks nothing breaks; these tests check the patch still finds pynetdicom's private
parts and that wake-ups really end the reactors' sleeps.  The SCP here is pynetdicom
in this process (gateway.dicom.patches installs it per process, and the test reads the
association's wakers), the SCU is DCMTK findscu.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynetdicom.association
import pynetdicom.dul
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from gateway.dicom import patches, wakeup

from .support.peers import free_port
from .test_worklist import findscu

RESPONSES = 300


def test_the_private_parts_it_patches_are_still_there() -> None:
    # What install() replaces or wraps; a pynetdicom release without them must fail here.
    for module in (pynetdicom.dul, pynetdicom.association):
        assert hasattr(module.time, "sleep")
    assert callable(DULServiceProvider.run_reactor)
    assert callable(Association._run_reactor)
    dul = DULServiceProvider(SimpleNamespace())  # type: ignore[arg-type]
    assert isinstance(dul.to_provider_queue, queue.Queue)
    assert isinstance(dul.to_user_queue, queue.Queue)
    assert "msg_queue" in vars(DIMSEServiceProvider(SimpleNamespace()))  # type: ignore[arg-type]


def test_a_long_worklist_answer_is_driven_by_wake_ups(tmp_path: Path) -> None:
    patches.install()
    assert isinstance(pynetdicom.dul.time, wakeup.Time)
    seen: list[Association] = []

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        seen.append(event.assoc)
        for i in range(RESPONSES):
            item = Dataset()
            item.SpecificCharacterSet = "ISO_IR 192"
            item.PatientName = f"Dvořák^Item{i:03d}"
            item.PatientID = f"ID{i:03d}"
            yield 0xFF00, item

    ae = AE(ae_title="WAKEUP")
    ae.add_supported_context(ModalityWorklistInformationFind)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    try:
        answers = findscu(port, "WAKEUP", ["PatientName", "PatientID"], tmp_path / "out")
    finally:
        server.shutdown()
    assert [a.PatientID for a in answers] == [f"ID{i:03d}" for i in range(RESPONSES)]
    assert answers[7].PatientName == "Dvořák^Item007"
    (assoc,) = seen
    # Each response is queued by the association thread and sent by the DUL thread;
    # whenever the DUL thread had caught up and gone to sleep, the next one woke it
    # (without the patch there is no waker at all; how often depends on the timing).
    assert assoc.dul._gateway_waker.woken >= 1  # type: ignore[attr-defined]


def test_a_queued_message_ends_the_association_reactors_sleep() -> None:
    q: queue.Queue[int] = queue.Queue()
    waker = wakeup._EventWaker()
    wakeup._wake_on_put(q, waker)
    threading.Timer(0.05, q.put_nowait, (1,)).start()
    waker.wait(60.0)  # would sleep a minute without the wake-up
    assert waker.woken == 1
    assert q.get_nowait() == 1
    waker.wait(0.001)  # cleared after waking: the next wait is a plain timeout
    assert waker.woken == 1


def test_a_closed_socket_does_not_make_the_reactor_spin() -> None:
    a, b = socket.socketpair()
    dul: Any = SimpleNamespace(socket=SimpleNamespace(socket=a))
    waker = wakeup._PollWaker(dul)
    try:
        b.send(b"x")
        waker.wait(5.0)  # readable: returns at once
        assert waker.woken == 1
        a.recv(1)
        b.close()  # the peer hangs up: POLLHUP/readable EOF once
        waker.wait(5.0)
        dul.socket = None  # pynetdicom drops its socket when the connection ends
        a.close()
        before = waker.woken
        for _ in range(3):
            waker.wait(0.01)  # nothing to watch but the eventfd: plain timeouts
        assert waker.woken == before
    finally:
        waker.close()


def test_a_wake_up_after_the_reactor_ended_writes_nowhere() -> None:
    waker = wakeup._PollWaker(SimpleNamespace(socket=None))  # type: ignore[arg-type]
    fd = waker._fd
    waker.close()
    r, w = os.pipe()  # likely to reuse the eventfd's number
    try:
        waker.set()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 8)
        assert fd >= 0
    finally:
        os.close(r)
        os.close(w)


def test_sleep_outside_a_reactor_thread_is_a_plain_sleep() -> None:
    patches.install()
    done = threading.Event()

    def other() -> None:
        pynetdicom.dul.time.sleep(0.001)  # no waker in this thread
        done.set()

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert done.is_set()


def test_only_accepted_associations_are_woken() -> None:
    """A requestor's reactor keeps pynetdicom's own sleeps: woken early, it raced
    ``send_n_create()`` for the response (seen once in CI as an unexpected N-CREATE)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    patches.install()
    ae = AE(ae_title="ACCEPTOR")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        scu = AE(ae_title="REQUESTOR")
        scu.add_requested_context(Verification)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="ACCEPTOR")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        (accepted,) = server.active_associations
        assert hasattr(accepted, "_gateway_waker")
        assert not hasattr(assoc, "_gateway_waker")
        assoc.release()
    finally:
        server.shutdown()

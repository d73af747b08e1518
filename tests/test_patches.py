"""gateway.dicom.patches: every change to pynetdicom, each checked against pynetdicom itself.

* Every name the gateway replaces is still in pynetdicom with the shape its patch was
  written for, and every private name it reads is still there: a pynetdicom upgrade
  that changes one fails here, by name.
* The two wrappers of the DUL reactor (gateway.dicom.dul_guard's and gateway.dicom.wakeup's) work
  together: a too-large PDU is still aborted, and wake-ups still happen.
* What is scoped to the receiving server stays with it: its temp files, its PDU-size
  guard, its association limit.  The gateway's own associations to its upstreams, the
  worklist C-FIND to DCMTK ``wlmscpfs`` and the MPPS forwarder to the MPPS SCP double of
  tests/test_mpps.py (no MPPS SCP is packaged; see there), still work with a small
  ``dimse.max_pdu_size`` in a process whose receiving server has it, and through a
  real gateway.

The receiving servers here run in this process: the patches are per process, and the
tests read what they did to pynetdicom's objects.
"""

from __future__ import annotations

import inspect
import queue
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynetdicom.acse
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
import pynetdicom.service_class
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom._globals import APPLICATION_CONTEXT_NAME
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityWorklistInformationFind,
    Verification,
)
from pynetdicom.transport import AssociationServer, ThreadedAssociationServer

from gateway import config as gw_config
from gateway.dicom import patches, wakeup
from gateway.mpps.forwarder import Forwarder, Outcome
from gateway.mpps.outbox import Message
from gateway.mpps.scp import COMPLETED, CREATE, SET, to_bytes
from gateway.store import Store
from gateway.worklist import service as worklist

from .conftest import GatewayFactory
from .test_bad_input import (
    GATEWAY_AET,
    P_DATA_TF,
    RELEASE_RQ,
    associated,
    await_refusal,
    pdu_header,
)
from .test_mpps import UpstreamMpps, progress, send, started, wait_for
from .test_worklist import Ris, _item, _write_wl, findscu

#: A small dimse.max_pdu_size: below pynetdicom's default 16382 and DCMTK's 16384.
SMALL_PDU = 4096
#: An answer from an upstream this large goes in PDUs as large as the gateway's
#: association allows (16382 bytes), far more than SMALL_PDU.
LARGE = 3 * 16382

# -- pynetdicom still has what the patches replace -----------------------------------------

#: Each patch's target -> the shape of pynetdicom's original (gateway.dicom.patches.shape).
EXPECTED_SHAPES: dict[str, str] = {
    "pynetdicom._config.STORE_RECV_CHUNKED_DATASET": "bool",
    "pynetdicom.dimse_messages.NamedTemporaryFile": patches.shape(tempfile.NamedTemporaryFile),
    "pynetdicom._config.LOG_REQUEST_IDENTIFIERS": "bool",
    "pynetdicom._config.LOG_RESPONSE_IDENTIFIERS": "bool",
    "pynetdicom._config.UNRESTRICTED_STORAGE_SERVICE": "bool",
    "pynetdicom.acse.negotiate_unrestricted": "(rq_contexts, ac_contexts, roles)",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data": "(self)",
    "pynetdicom.dul.DULServiceProvider.run_reactor": "(self)",
    "pynetdicom.transport.AssociationSocket._shutdown_socket": "(self)",
    "pynetdicom.association.Association._run_reactor": "(self)",
    "pynetdicom.dul.time": "module time",
    "pynetdicom.association.time": "module time",
    "pynetdicom.service_class.encode": "(ds, is_implicit_vr, is_little_endian, deflated)",
    "pynetdicom.dimse_messages.encode": "(ds, is_implicit_vr, is_little_endian, deflated)",
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg": "(self, primitive, context_id)",
}

#: Module globals that pynetdicom calls by name: the call must still be in its source.
CALLED_AS: dict[str, str] = {
    "pynetdicom.dimse_messages.NamedTemporaryFile": (
        'NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")'
    ),
    "pynetdicom.acse.negotiate_unrestricted": "negotiate_unrestricted(",
    "pynetdicom.dul.time": "time.sleep(",
    "pynetdicom.association.time": "time.sleep(",
    "pynetdicom.service_class.encode": " encode(",
    "pynetdicom.dimse_messages.encode": " encode(",
}


def test_every_patch_is_listed_with_one_line_of_reason() -> None:
    assert {p.target for p in patches.PATCHES} == set(EXPECTED_SHAPES)
    for p in patches.PATCHES:
        assert p.why and "\n" not in p.why and len(p.why) <= 90, p.target


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.target)
def test_what_a_patch_replaces_is_still_in_pynetdicom(patch: patches.Patch) -> None:
    original = patches.original(patch)
    assert patches.shape(original) == EXPECTED_SHAPES[patch.target], (
        f"pynetdicom changed {patch.target}: revisit this patch ({patch.why})"
    )
    if patch.target in CALLED_AS:
        source = inspect.getsource(patch.owner)
        assert CALLED_AS[patch.target] in source, f"pynetdicom no longer calls {patch.target}"


def test_install_is_idempotent_and_keeps_the_order_of_the_reactor_wrappers() -> None:
    patches.install()
    run_reactor = DULServiceProvider.run_reactor
    patches.install()
    assert DULServiceProvider.run_reactor is run_reactor  # not wrapped twice more
    # dul_guard's wrapper is made first, wakeup's around it (gateway/dicom/patches.py).
    (guard, wake) = [p for p in patches.PATCHES if p.target.endswith(".run_reactor")]
    assert wake.replace is wakeup.wake_dul_reactor
    assert patches.PATCHES.index(guard) < patches.PATCHES.index(wake)
    assert patches.original(guard).__module__ == "pynetdicom.dul"  # pynetdicom's own


# -- pynetdicom still has what the gateway reads -------------------------------------------


def _servers() -> None:
    assert isinstance(AE()._servers, list)
    assert "_servers.remove(" in inspect.getsource(AssociationServer.shutdown)


def _dataset_file() -> None:
    assert C_STORE()._dataset_file is None
    source = inspect.getsource(pynetdicom.dimse_messages)
    assert "primitive._dataset_file = self._data_set_file" in source


def _data_set_file() -> None:
    assert "_data_set_file" in vars(DIMSEMessage())


def _kill() -> None:
    assert "_kill" in vars(Association(AE(), "requestor"))


def _kill_thread() -> None:
    assert "_kill_thread" in vars(DULServiceProvider(SimpleNamespace()))  # type: ignore[arg-type]


def _kill_dul() -> None:
    assert issubclass(DULServiceProvider, threading.Thread)
    assert patches.shape(DULServiceProvider.kill_dul) == "(self)"


def _maximum_associations() -> None:
    source = inspect.getsource(ACSE._negotiate_as_acceptor)
    assert "self.assoc.ae.maximum_associations" in source


def _application_context_name() -> None:
    assert APPLICATION_CONTEXT_NAME == "1.2.840.10008.3.1.1.1"


def _own_attributes() -> None:
    names = {"_gateway_waker", "_gateway_find_rsp", "_gateway_slot"}
    objects: list[object] = [
        Association(AE(), "acceptor"),
        DULServiceProvider(SimpleNamespace()),  # type: ignore[arg-type]
        DIMSEServiceProvider(SimpleNamespace()),  # type: ignore[arg-type]
    ]
    for obj in objects:
        assert not names & (set(vars(obj)) | set(dir(type(obj)))), type(obj)


READ_CHECKS: dict[str, Callable[[], None]] = {
    "pynetdicom.ae.ApplicationEntity._servers": _servers,
    "pynetdicom.dimse_primitives.C_STORE._dataset_file": _dataset_file,
    "pynetdicom.dimse_messages.DIMSEMessage._data_set_file": _data_set_file,
    "pynetdicom.association.Association._kill": _kill,
    "pynetdicom.dul.DULServiceProvider._kill_thread": _kill_thread,
    "pynetdicom.dul.DULServiceProvider.kill_dul": _kill_dul,
    "pynetdicom.acse.ACSE._negotiate_as_acceptor": _maximum_associations,
    "pynetdicom._globals.APPLICATION_CONTEXT_NAME": _application_context_name,
    "gateway: _gateway_waker, _gateway_find_rsp, _gateway_slot": _own_attributes,
}


def test_every_read_is_checked() -> None:
    assert [r.target for r in patches.READS] == list(READ_CHECKS)


@pytest.mark.parametrize("read", patches.READS, ids=lambda r: r.target)
def test_what_the_gateway_reads_is_still_in_pynetdicom(read: patches.Read) -> None:
    READ_CHECKS[read.target]()


# -- a receiving server in this process ----------------------------------------------------


@dataclass
class Receiving:
    """A ReceivingAE serving C-ECHO, C-STORE and a 300-item C-FIND, as the gateway's."""

    spool: Path
    refuse: bool = False
    port: int = 0
    associations: list[Association] = field(default_factory=list)
    stored: list[tuple[Path, object]] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)

    def start(self) -> Receiving:
        patches.install()
        ae = patches.ReceivingAE(GATEWAY_AET, SMALL_PDU, self._temp_file)
        ae.add_supported_context(Verification, ExplicitVRLittleEndian)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(ModalityWorklistInformationFind, ExplicitVRLittleEndian)
        handlers: list[Any] = [
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
        ]
        server = ae.make_server(
            ("127.0.0.1", 0), evt_handlers=handlers, server_class=ThreadedAssociationServer
        )
        ae.serve(server)
        self._server = server
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()  # finds itself in the AE's servers (ReceivingAE.serve)

    def _temp_file(self, *args: Any, **kwargs: Any) -> Any:
        f = tempfile.NamedTemporaryFile(*args, dir=self.spool, **kwargs)  # noqa: SIM115
        self.temp_files.append(Path(f.name))
        return f

    def _on_acse_recv(self, event: evt.Event) -> None:
        if event.assoc not in self.associations:
            self.associations.append(event.assoc)
            patches.ReceivingAE.refuse(self.refuse)

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append((Path(event.dataset_path), patches.received_file(event.request)))
        return 0x0000

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        for i in range(300):
            item = Dataset()
            item.PatientName = f"Item^{i:03d}"
            item.PatientID = f"ID{i:03d}"
            yield 0xFF00, item
        yield 0x0000, None


@pytest.fixture
def receiving(tmp_path: Path) -> Iterator[Receiving]:
    (tmp_path / "spool").mkdir()
    r = Receiving(tmp_path / "spool").start()
    yield r
    r.stop()


def _ended(dul: DULServiceProvider) -> bool:
    dul.join(10)
    return not dul.is_alive()


def test_the_size_guard_and_the_wake_ups_work_together(
    receiving: Receiving, tmp_path: Path
) -> None:
    # A long answer: its PDUs are queued by the association thread and sent by the DUL
    # thread, each wake-up ending the DUL reactor's sleep.
    answers = findscu(receiving.port, GATEWAY_AET, ["PatientName", "PatientID"], tmp_path / "a")
    assert [a.PatientID for a in answers] == [f"ID{i:03d}" for i in range(300)]
    (find,) = receiving.associations
    assert find.dul._gateway_waker.woken >= 1  # type: ignore[attr-defined]

    # A P-DATA-TF one byte over the limit the server advertised: aborted unread.
    with associated(receiving.port) as sock:
        length = SMALL_PDU + 1
        sock.sendall(pdu_header(P_DATA_TF, length) + struct.pack(">LBB", length - 4, 1, 0x03))
        assert await_refusal(sock, "P-DATA-TF over the receiving server's limit") == "A-ABORT"
    aborted = receiving.associations[-1]
    assert aborted is not find
    assert _ended(aborted.dul)
    assert aborted.is_aborted
    # The reactor ran under both wrappers: its waker (the outer one) was made and closed.
    assert aborted.dul._gateway_waker._closed  # type: ignore[attr-defined]

    # A P-DATA-TF of exactly the limit is read: the first fragment of a command, so
    # nothing is answered until the release.
    with associated(receiving.port) as sock:
        item = struct.pack(">LBB", SMALL_PDU - 4, 1, 0x01) + bytes(SMALL_PDU - 6)
        sock.sendall(pdu_header(P_DATA_TF, SMALL_PDU) + item + RELEASE_RQ)
        outcome = await_refusal(sock, "P-DATA-TF at the limit", after_release=True)
        assert outcome == "A-RELEASE-RP"


def _ct(uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Temp"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _store(port: int, ds: Dataset, called: str) -> int:
    scu = AE(ae_title="STORESCU")
    scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_only_the_receiving_server_streams_into_its_temp_files(receiving: Receiving) -> None:
    patches.install()
    assert _store(receiving.port, _ct(uid := generate_uid()), GATEWAY_AET) == 0
    ((path, received),) = receiving.stored
    assert path.parent == receiving.spool and receiving.temp_files == [path]
    assert received is not None and Path(received.name) == path  # type: ignore[attr-defined]

    # Another acceptor in the same process keeps pynetdicom's own temp file.
    other: list[Path] = []
    ae = AE(ae_title="OTHER")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)

    def on_store(event: evt.Event) -> int:
        other.append(Path(event.dataset_path))
        return 0

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        assert _store(int(server.server_address[1]), _ct(uid), "OTHER") == 0
    finally:
        server.shutdown()
    assert len(other) == 1 and other[0].parent == Path(tempfile.gettempdir())
    assert receiving.temp_files == [path]


def test_a_refused_association_is_rejected_as_over_the_limit(receiving: Receiving) -> None:
    scu = AE(ae_title="ECHOSCU")
    scu.add_requested_context(Verification, ExplicitVRLittleEndian)
    receiving.refuse = True
    assoc = scu.associate("127.0.0.1", receiving.port, ae_title=GATEWAY_AET)
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # local limit
    receiving.refuse = False
    assoc = scu.associate("127.0.0.1", receiving.port, ae_title=GATEWAY_AET)
    assert assoc.is_established  # the refusal was that association's thread only
    assoc.release()


# -- the gateway's own associations with a small dimse.max_pdu_size ---------------------------


def _big_worklist_item(n: int) -> Dataset:
    """An item of tests/test_worklist.py whose Requested Procedure Description has 1000
    values (wlmscpfs serves one step per item): a C-FIND response of more than LARGE
    bytes."""
    ds = _item(f"BIG{n:03d}", f"Dvořák^Item{n}", "ISO_IR 192", f"P{n}", "CT", "CT_ROOM1", 0,
               "080000")  # fmt: skip
    ds.RequestedProcedureDescription = [f"part {i:04d} " + "x" * 50 for i in range(1000)]
    return ds


@pytest.fixture
def big_ris(tmp_path: Path) -> Iterator[Ris]:
    ris = Ris(tmp_path / "wlroot")
    for n in range(3):
        _write_wl(ris.files, _big_worklist_item(n))
    ris.start()
    yield ris
    ris.stop()


class EchoingUpstream(UpstreamMpps):
    """The MPPS SCP double of tests/test_mpps.py, answering each N-CREATE with the
    attribute list it was sent (as an SCP may): large answers."""

    def _on_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        status, _ = super()._on_create(event)
        return status, event.attribute_list


def _big_create() -> Dataset:
    ds = started()
    ds.PerformedSeriesSequence = progress(series=200).PerformedSeriesSequence
    return ds


def _config(ris: Ris, upstream: UpstreamMpps) -> gw_config.Config:
    return gw_config.from_dict({
        "dimse": {"max_pdu_size": SMALL_PDU},
        "worklist": {"upstream_host": "127.0.0.1", "upstream_port": ris.port,
                     "upstream_ae": "RIS"},
        "mpps": {"upstream_host": "127.0.0.1", "upstream_port": upstream.port,
                 "upstream_ae": "RIS_MPPS", "timeout_seconds": 10},
    })  # fmt: skip


def test_the_gateways_own_associations_are_not_held_to_the_receiving_limit(
    receiving: Receiving, big_ris: Ris, tmp_path: Path
) -> None:
    """In a process whose receiving server allows SMALL_PDU, the upstream answers come in
    PDUs of up to 16382 bytes, the size the gateway's own associations advertise."""
    upstream = EchoingUpstream().start()
    try:
        config = _config(big_ris, upstream)
        assert config.dimse.max_pdu_size == SMALL_PDU

        items = worklist.query_upstream(config)
        assert sorted(str(i.AccessionNumber) for i in items) == ["BIG000", "BIG001", "BIG002"]
        for item in items:
            assert len(item.RequestedProcedureDescription) == 1000
            assert len(encode(item, False, True) or b"") > LARGE

        forwarder = Forwarder(config, Store(tmp_path / "unused.sqlite3"))
        ae = forwarder._new_ae()
        assoc = forwarder._associate(ae)
        uid = generate_uid()
        attributes = to_bytes(_big_create())
        assert len(attributes) > LARGE  # and so is the upstream's answer, which echoes it
        try:
            delivery = forwarder._send(assoc, Message(1, uid, CREATE, attributes, False, False))
        finally:
            assoc.release()
        assert delivery.outcome is Outcome.DELIVERED, delivery.reason
        assert upstream.accepted() == [(CREATE, uid)]
    finally:
        upstream.stop()


def test_a_gateway_with_a_small_max_pdu_size_forwards_and_refreshes(
    gateway_factory: GatewayFactory, big_ris: Ris, tmp_path: Path
) -> None:
    """The same through a real gateway, whose modalities keep to SMALL_PDU too."""
    upstream = EchoingUpstream().start()
    try:
        gw = gateway_factory(
            dimse={"max_pdu_size": SMALL_PDU},
            worklist={"upstream_host": "127.0.0.1", "upstream_port": big_ris.port,
                      "upstream_ae": "RIS", "refresh_seconds": 1},
            mpps={"upstream_host": "127.0.0.1", "upstream_port": upstream.port,
                  "upstream_ae": "RIS_MPPS", "backoff_initial_seconds": 0.2,
                  "backoff_max_seconds": 1.0, "timeout_seconds": 10},
        )  # fmt: skip
        wait_for(lambda: "worklist refreshed from upstream" in gw.log, "the first refresh")
        keys = ["AccessionNumber", "RequestedProcedureDescription"]
        answers = findscu(gw.port, GATEWAY_AET, keys, tmp_path / "f")
        assert sorted(str(a.AccessionNumber) for a in answers) == ["BIG000", "BIG001", "BIG002"]
        assert all(len(a.RequestedProcedureDescription) == 1000 for a in answers)

        uid = generate_uid()
        sent = [(CREATE, uid, _big_create()), (SET, uid, progress(COMPLETED, series=200))]
        assert send(gw.port, *sent) == [0, 0]
        wait_for(lambda: len(upstream.accepted()) == 2, "both messages upstream")
        assert upstream.accepted() == [(CREATE, uid), (SET, uid)]
        assert "aborting" not in gw.log, gw.log
        assert gw.stop() == 0
    finally:
        upstream.stop()


def test_the_queues_it_wakes_on_are_plain_queues() -> None:
    # wakeup wraps put() of these three; a pynetdicom that replaced them would not wake.
    dul = DULServiceProvider(SimpleNamespace())  # type: ignore[arg-type]
    assert isinstance(dul.to_provider_queue, queue.Queue)
    assert isinstance(dul.to_user_queue, queue.Queue)
    assert "msg_queue" in vars(DIMSEServiceProvider(SimpleNamespace()))  # type: ignore[arg-type]

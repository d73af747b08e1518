"""Bad input: each gets a refusal or a failure status, nothing is stored, and the port
still answers C-ECHO afterwards.

Covered: random bytes, a truncated A-ASSOCIATE-RQ, oversized PDU lengths, a wrong called
AE, a calling AE that is not allowed, too many associations, path-like and otherwise
invalid SOP Instance UIDs, and malformed data sets.  Raw PDUs are built with pynetdicom's
own encoder and then cut or corrupted; C-STOREs with exact (bad) bytes are sent as a
hand-built C-STORE-RQ whose command and data set go over the wire exactly as given.

"Refused" means one of: an A-ASSOCIATE-RJ or A-ABORT PDU, the connection closed by the
gateway, or a C-STORE failure status.  A connection the gateway keeps open without
answering, longer than its own timeouts allow, is a failure of the test.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)

from gateway.dicom.receive import SLOTS_FILE
from gateway.spool import INSTANCE_FILE, PINS_FILE

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import GatewayProcess
from .support.peers import echoscu, storescu, tool

# -- the gateway under test ------------------------------------------------------------

GATEWAY_AET = "DICOMGW"
RAW_AET = "RAWPEER"  # the calling AE of every hand-made association
ALLOWED_AETS = ["ECHOSCU", "STORESCU", RAW_AET]
#: Short ACSE/network timeouts, so that "the gateway gives up on a silent peer" is quick.
GATEWAY_TIMEOUT_S = 2
#: Its own max PDU size, so that a P-DATA longer than that is a protocol violation.
MAX_PDU = 65536
DIMSE = {
    # A peer that sends a few bytes and closes holds its association slot until the
    # ACSE timeout (pynetdicom waits that long for the A-ASSOCIATE-RQ).  The random-byte
    # tests open such connections faster than one per GATEWAY_TIMEOUT_S / 16 now that
    # accepting a connection no longer copies every storage context (~200 ms before),
    # so the default 16 slots would run out: test_too_many_associations tests the limit.
    "max_associations": 64,
    "allowed_aets": ALLOWED_AETS,
    "acse_timeout": GATEWAY_TIMEOUT_S,
    "network_timeout": GATEWAY_TIMEOUT_S,
    "max_pdu_size": MAX_PDU,
}
#: How long a misbehaving connection may stay open without an answer: the gateway's
#: timeouts plus generous slack for a loaded 2-core machine.
HANG_BOUND_S = 12.0
#: An oversized PDU must be refused before this much of it has been accepted.
STREAM_LIMIT = 32 * 1024 * 1024


def _stream_until_refused(sock: socket.socket) -> int:
    """Send zeros until the gateway stops taking them (or STREAM_LIMIT); return bytes sent."""
    chunk = bytes(64 * 1024)
    accepted = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
        while accepted < STREAM_LIMIT:
            sock.sendall(chunk)
            accepted += len(chunk)
    return accepted


# C-STORE failure statuses of gateway/dicom/receive.py that bad input must get.  (0xC001,
# "I/O error writing the spool", is not one of them: it sends an operator to the disk.)
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNDECODABLE = 0xC210
#: The association was aborted or closed without a C-STORE response: also a refusal.
NO_RESPONSE = None

A_ASSOCIATE_RJ = 0x03
A_ABORT = 0x07
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
RELEASE_RQ = struct.pack(">BBL", A_RELEASE_RQ, 0, 4) + bytes(4)


@pytest.fixture(scope="module")
def bad_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("bad-input"), dimse=DIMSE)
    gw.start()
    yield gw
    assert gw.proc is not None and gw.proc.poll() is None, f"gateway died:\n{gw.log}"
    assert gw.stop() == 0, gw.log


# -- what must hold after every bad input ----------------------------------------------

_OBJECT_PATH = re.compile(r"spool/objects/([0-9a-f]{2})/\1[0-9a-f]{62}\.dcm")
_STATE_FILES = {"gateway.toml", "gateway.log", "gateway.sqlite3"}
_STATE_FILES |= {f"gateway.sqlite3{s}" for s in ("-wal", "-shm", "-journal")}
# The queue writers' turn (gateway/store.py _WriterTurn): a lock file, no data.
_STATE_FILES.add("gateway.sqlite3-writers")
# The lock files of the cross-process spool pins and association slots (no data).
_STATE_FILES |= {f"spool/{PINS_FILE}", f"spool/{SLOTS_FILE}", f"spool/{INSTANCE_FILE}"}


@dataclass(frozen=True)
class Snapshot:
    rows: frozenset[str]
    objects: frozenset[Path]
    temps: frozenset[Path]
    log_offset: int

    @classmethod
    def of(cls, gw: GatewayProcess) -> Snapshot:
        return cls(
            rows=frozenset(r["sop_instance_uid"] for r in gw.rows()),
            objects=frozenset(gw.spool_files()),
            temps=frozenset(gw.temp_files()),
            log_offset=len(gw.log),
        )

    def new_log(self, gw: GatewayProcess) -> str:
        return gw.log[self.log_offset :]


def assert_stray_free(gw: GatewayProcess) -> None:
    """Every file under the gateway's root is its own state or a content-named object."""
    for path in gw.root.rglob("*"):
        if path.is_dir():
            continue
        rel = path.relative_to(gw.root).as_posix()
        ok = (
            rel in _STATE_FILES
            or _OBJECT_PATH.fullmatch(rel) is not None
            or (rel.startswith("spool/tmp/") and "/" not in rel[len("spool/tmp/") :])
        )
        assert ok, f"unexpected file {rel} in the gateway's state directory"


def assert_still_serving(gw: GatewayProcess, before: Snapshot, what: str) -> None:
    """Nothing new stored, no temp file left behind, the process alive, C-ECHO works."""
    assert gw.proc is not None and gw.proc.poll() is None, f"{what}: gateway exited:\n{gw.log}"
    assert echoscu(gw.port), f"{what}: C-ECHO fails afterwards:\n{before.new_log(gw)[-3000:]}"
    after = Snapshot.of(gw)
    assert after.rows == before.rows, f"{what}: queue rows added: {after.rows - before.rows}"
    assert after.objects == before.objects, (
        f"{what}: files stored: {after.objects - before.objects}"
    )
    # A refused C-STORE's temp file is removed as the response is sent, an aborted one's
    # when the connection closes: give the association thread a moment to finish.
    deadline = time.monotonic() + 5
    while set(gw.temp_files()) - before.temps and time.monotonic() < deadline:
        time.sleep(0.05)
    left = set(gw.temp_files()) - before.temps
    assert not left, f"{what}: temp files left in the spool: {sorted(p.name for p in left)}"
    assert_stray_free(gw)


# -- raw PDUs --------------------------------------------------------------------------


def associate_rq(calling: str = RAW_AET, called: str = GATEWAY_AET) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU (Verification and CT Image Storage), encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for context_id, abstract in ((1, Verification), (3, CTImageStorage)):
        cx = build_context(abstract, [ExplicitVRLittleEndian])
        cx.context_id = context_id
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.9"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def p_data_tf(context_id: int, control: int, payload: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV."""
    item = struct.pack(">LBB", 2 + len(payload), context_id, control) + payload
    return pdu_header(P_DATA_TF, len(item)) + item


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None when the gateway closed the connection."""
    try:
        header = recv_exact(sock, 6)
        if len(header) < 6:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, recv_exact(sock, length)
    except ConnectionResetError:
        return None


def associated(port: int) -> socket.socket:
    """A raw connection with an established association (contexts 1: echo, 3: CT)."""
    sock = connect(port)
    sock.sendall(associate_rq())
    reply = read_pdu(sock)
    assert reply is not None and reply[0] == 0x02, f"association not accepted: {reply!r}"
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send *data*; False if the gateway already closed the connection."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def await_refusal(sock: socket.socket, what: str, after_release: bool = False) -> str:
    """Wait for an A-ABORT / A-ASSOCIATE-RJ or a closed connection; fail on a hang.

    The socket stays open from our side the whole time: a gateway that waits for the
    rest of a PDU that never comes must give up by itself.  With *after_release* (an
    A-RELEASE-RQ was sent after the bad input) DIMSE responses may come first and an
    A-RELEASE-RP ends the exchange too.
    """
    deadline = time.monotonic() + HANG_BOUND_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            reply = read_pdu(sock)
        except TimeoutError:
            break
        if reply is None:
            return "closed"
        if reply[0] == A_ASSOCIATE_RJ:
            return "A-ASSOCIATE-RJ"
        if reply[0] == A_ABORT:
            return "A-ABORT"
        if after_release and reply[0] == A_RELEASE_RP:
            return "A-RELEASE-RP"
        assert after_release and reply[0] == P_DATA_TF, (
            f"{what}: unexpected answer PDU type {reply[0]:#04x}"
        )
    raise AssertionError(
        f"{what}: the gateway neither answered nor closed the connection within "
        f"{HANG_BOUND_S} s (its network/ACSE timeouts are {GATEWAY_TIMEOUT_S} s): the "
        "connection and its association slot are held indefinitely"
    )


def raw_case(gw: GatewayProcess, data: bytes, what: str, then_eof: bool = False) -> str:
    """Send *data* on a new connection; expect a refusal, then a gateway still serving.

    With *then_eof* our side of the connection is shut down after the data, so that a
    gateway waiting for the rest of a PDU sees the end at once instead of after its
    network timeout."""
    before = Snapshot.of(gw)
    with connect(gw.port) as sock:
        outcome = "closed"
        if send_quietly(sock, data):
            if then_eof:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            outcome = await_refusal(sock, what)
    assert_still_serving(gw, before, what)
    return outcome


# -- raw bytes, truncated and oversized PDUs ------------------------------------------


def test_valid_association_request_is_accepted(bad_gw: GatewayProcess) -> None:
    # The control: the bytes the corrupt cases start from are a request the gateway takes.
    with associated(bad_gw.port) as sock:
        sock.sendall(RELEASE_RQ)
        reply = read_pdu(sock)
        assert reply is not None and reply[0] == A_RELEASE_RP, reply


@pytest.mark.parametrize(
    "name",
    ["header only", "first 3 bytes", "half", "all but the last byte"],
)
def test_truncated_associate_rq(bad_gw: GatewayProcess, name: str) -> None:
    rq = associate_rq()
    cut = {"header only": 6, "first 3 bytes": 3, "half": len(rq) // 2}.get(name, len(rq) - 1)
    raw_case(bad_gw, rq[:cut], f"A-ASSOCIATE-RQ cut to {cut} of {len(rq)} bytes")


def test_associate_rq_with_corrupt_body(bad_gw: GatewayProcess) -> None:
    rq = bytearray(associate_rq())
    rq[10:26] = b"\xab" * 16  # the called AE title: not ASCII
    outcome = raw_case(bad_gw, bytes(rq), "A-ASSOCIATE-RQ with a binary called AE title")
    assert outcome in ("A-ABORT", "A-ASSOCIATE-RJ", "closed")


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF])
def test_oversized_associate_rq_length(bad_gw: GatewayProcess, length: int) -> None:
    rq = associate_rq()
    data = pdu_header(0x01, length) + rq[6:]
    raw_case(bad_gw, data, f"A-ASSOCIATE-RQ claiming {length:#x} bytes")


def test_oversized_associate_rq_is_not_buffered(bad_gw: GatewayProcess) -> None:
    """An A-ASSOCIATE-RQ claiming 4 GiB must be refused, not read into memory."""
    before = Snapshot.of(bad_gw)
    with connect(bad_gw.port) as sock:
        sock.sendall(pdu_header(0x01, 0xFFFFFFF0) + associate_rq()[6:])
        accepted = _stream_until_refused(sock)
        assert accepted < STREAM_LIMIT, (
            f"the gateway read {STREAM_LIMIT} bytes of an A-ASSOCIATE-RQ that claims "
            "0xFFFFFFF0 bytes instead of refusing it: a peer can make it buffer 4 GiB per "
            "connection"
        )
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await_refusal(sock, "oversized A-ASSOCIATE-RQ being streamed")
    assert_still_serving(bad_gw, before, "oversized A-ASSOCIATE-RQ being streamed")


@pytest.mark.parametrize("length", [0xFFFFFFF0, MAX_PDU + 1024])
def test_oversized_p_data_length(bad_gw: GatewayProcess, length: int) -> None:
    what = f"P-DATA-TF claiming {length:#x} bytes (max PDU {MAX_PDU:#x})"
    before = Snapshot.of(bad_gw)
    with associated(bad_gw.port) as sock:
        item = struct.pack(">LBB", length - 4, 1, 0x03) + b"\0" * 64
        if send_quietly(sock, pdu_header(P_DATA_TF, length) + item):
            await_refusal(sock, what)
    assert_still_serving(bad_gw, before, what)


def test_oversized_p_data_is_not_buffered(bad_gw: GatewayProcess) -> None:
    """A P-DATA-TF beyond the max PDU size the gateway announced is a protocol violation."""
    before = Snapshot.of(bad_gw)
    with associated(bad_gw.port) as sock:
        sock.sendall(pdu_header(P_DATA_TF, 0xFFFFFFF0) + struct.pack(">LBB", 0xFFFFFFEC, 3, 0))
        accepted = _stream_until_refused(sock)
        assert accepted < STREAM_LIMIT, (
            f"the gateway read {STREAM_LIMIT} bytes of a P-DATA-TF PDU claiming 0xFFFFFFF0 "
            f"bytes though it announced a maximum PDU length of {MAX_PDU}"
        )
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await_refusal(sock, "oversized P-DATA-TF being streamed")
    assert_still_serving(bad_gw, before, "oversized P-DATA-TF being streamed")


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each try may take seconds
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.binary(min_size=1, max_size=600))
@example(data=b"\xff" * 100)
@example(data=b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
@example(data=b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32))  # TLS hello
@example(data=b"\x01\x00\x00\x00\x00\x10" + b"\xab" * 16)
@example(data=b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT before anything
def test_random_bytes(bad_gw: GatewayProcess, data: bytes) -> None:
    # Random bytes usually declare a PDU longer than what follows: a peer that then goes
    # quiet is test_truncated_associate_rq's business, so end the stream here and let
    # every example exercise the decoder instead of the network timeout.
    what = f"{len(data)} random bytes starting {data[:8].hex()}"
    raw_case(bad_gw, data, what, then_eof=True)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    context_id=st.sampled_from([1, 3, 5, 255]),
    control=st.integers(min_value=0, max_value=3),
    payload=st.binary(max_size=400),
)
@example(context_id=1, control=0x03, payload=b"")
@example(context_id=3, control=0x03, payload=bytes(200))
@example(context_id=3, control=0x02, payload=b"\x08\x00\x18\x00UI\x02\x00x\0")
def test_random_p_data(
    bad_gw: GatewayProcess, context_id: int, control: int, payload: bytes
) -> None:
    """Random DIMSE content in a well-formed P-DATA-TF on an established association,
    then an A-RELEASE-RQ (so that a fragment the gateway waits to see completed does not
    cost a network timeout per example)."""
    what = f"P-DATA PDV (context {context_id}, control {control:#x}) {payload[:8].hex()}"
    before = Snapshot.of(bad_gw)
    with associated(bad_gw.port) as sock:
        if send_quietly(sock, p_data_tf(context_id, control, payload) + RELEASE_RQ):
            await_refusal(sock, what, after_release=True)
    assert_still_serving(bad_gw, before, what)


# -- AE titles and association limits --------------------------------------------------


def run_dcmtk(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("called", "calling", "reason"),
    [
        ("WRONG", "ECHOSCU", "Called AE Title Not Recognized"),
        (GATEWAY_AET, "INTRUDER", "Calling AE Title Not Recognized"),
    ],
    ids=["wrong called AE", "calling AE not allowed"],
)
def test_ae_title_refused(
    bad_gw: GatewayProcess, tmp_path: Path, called: str, calling: str, reason: str
) -> None:
    before = Snapshot.of(bad_gw)
    echo = run_dcmtk(
        [tool("echoscu"), "-aec", called, "-aet", calling, "127.0.0.1", str(bad_gw.port)]
    )
    assert echo.returncode != 0
    assert "Association Rejected" in echo.stderr + echo.stdout
    assert reason in echo.stderr + echo.stdout

    ct = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
    store = storescu(bad_gw.port, [ct], called=called, calling=calling)
    assert store.returncode != 0
    assert "Association Rejected" in store.output, store.output
    assert reason in store.output, store.output
    assert store.statuses == []
    assert ds.SOPInstanceUID not in {r["sop_instance_uid"] for r in bad_gw.rows()}
    assert_still_serving(bad_gw, before, f"association {calling} -> {called}")

    # The operator can tell from the log who was turned away and why.
    rejections = [
        line for line in before.new_log(bad_gw).splitlines() if "rejected" in line.lower()
    ]
    assert len(rejections) >= 2, before.new_log(bad_gw)
    for line in rejections:
        assert repr(calling) in line, line
        assert repr(called) in line, f"the log does not name the called AE {called!r}: {line}"


def test_too_many_associations(gateway_factory: GatewayFactory) -> None:
    # Long timeouts here: the two held associations sit idle while the third is tried.
    gw = gateway_factory(
        dimse={**DIMSE, "max_associations": 2, "network_timeout": 60, "acse_timeout": 60}
    )
    held = [associated(gw.port) for _ in range(2)]
    try:
        extra = run_dcmtk(
            [tool("echoscu"), "-aec", GATEWAY_AET, "-aet", "ECHOSCU", "127.0.0.1", str(gw.port)]
        )
        assert extra.returncode != 0
        assert "Association Rejected" in extra.stderr + extra.stdout
        assert "Local Limit Exceeded" in extra.stderr + extra.stdout
    finally:
        for sock in held:
            sock.close()
    _assert_echo_within(gw, HANG_BOUND_S, "after the held associations were closed")
    assert "rejected" in gw.log


def test_silent_peers_do_not_hold_the_association_slots(gateway_factory: GatewayFactory) -> None:
    """Peers that send half a PDU and go quiet must not lock everyone else out."""
    gw = gateway_factory(dimse={**DIMSE, "max_associations": 2})
    rq = associate_rq()
    silent = [connect(gw.port) for _ in range(2)]
    try:
        for sock in silent:
            sock.sendall(rq[:40])
        _assert_echo_within(gw, HANG_BOUND_S, "while two peers sit on half an A-ASSOCIATE-RQ")
    finally:
        for sock in silent:
            sock.close()


def _assert_echo_within(gw: GatewayProcess, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not echoscu(gw.port):
        assert time.monotonic() < deadline, f"no C-ECHO possible {what} ({seconds} s):\n{gw.log}"
        time.sleep(0.5)


# -- C-STORE with bad UIDs and malformed data sets -------------------------------------


@dataclass(frozen=True)
class StoreReply:
    status: int | None  # None: the association was aborted or closed without a response
    comment: str


@pytest.fixture
def lax_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pydicom encode the invalid values a broken modality would send, silently."""
    settings_ = pydicom_config.settings
    monkeypatch.setattr(settings_, "reading_validation_mode", pydicom_config.IGNORE)
    monkeypatch.setattr(settings_, "writing_validation_mode", pydicom_config.IGNORE)


def ct_dataset(sop_instance_uid: str | None = None) -> Dataset:
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ds.SOPInstanceUID = sop_instance_uid if sop_instance_uid is not None else generate_uid()
    return ds


def explicit_le(ds: Dataset) -> bytes:
    return bytes(encode(ds, False, True))


def element_start(body: bytes, marker: bytes) -> int:
    """Offset of the one top-level element whose tag+VR bytes are *marker*."""
    assert body.count(marker) == 1, marker
    return body.index(marker)


def c_store_rq(sop_instance_uid: str | None, sop_class: str = CTImageStorage) -> bytes:
    """A C-STORE-RQ command set (always Implicit VR Little Endian), UID as given."""
    cs = Dataset()
    cs.AffectedSOPClassUID = sop_class
    cs.CommandField = 0x0001
    cs.MessageID = 1
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    if sop_instance_uid is not None:
        cs.AffectedSOPInstanceUID = sop_instance_uid
    group = Dataset()
    group.CommandGroupLength = len(encode(cs, True, True))
    group.update(cs)
    return bytes(encode(group, True, True))


CT_CONTEXT = 3  # CT Image Storage, Explicit VR Little Endian, in associate_rq()
_FRAGMENT = MAX_PDU - 6  # one PDV per P-DATA-TF, within the gateway's max PDU


def send_c_store(port: int, command_uid: str | None, body: bytes) -> StoreReply:
    """C-STORE *body* as the data set with *command_uid* in the command, byte for byte."""
    with associated(port) as sock:
        messages = [p_data_tf(CT_CONTEXT, 0x03, c_store_rq(command_uid))]
        chunks = [body[i : i + _FRAGMENT] for i in range(0, len(body), _FRAGMENT)] or [b""]
        for n, chunk in enumerate(chunks):
            messages.append(p_data_tf(CT_CONTEXT, 0x02 if n == len(chunks) - 1 else 0x00, chunk))
        if not send_quietly(sock, b"".join(messages)):
            return StoreReply(NO_RESPONSE, "")
        command = b""
        while True:
            try:
                reply = read_pdu(sock)
            except TimeoutError:
                raise AssertionError(
                    f"no C-STORE response and no abort within {HANG_BOUND_S} s"
                ) from None
            if reply is None or reply[0] != P_DATA_TF:
                return StoreReply(NO_RESPONSE, "")  # closed, A-ABORT or something odd
            items = reply[1]
            while items:
                (length,) = struct.unpack(">L", items[:4])
                control, data = items[5], items[6 : 4 + length]
                items = items[4 + length :]
                if control & 0x01:
                    command += data
                    if control & 0x02:
                        rsp = decode(BytesIO(command), True, True)
                        if send_quietly(sock, RELEASE_RQ):
                            read_pdu(sock)
                        return StoreReply(int(rsp.Status), str(rsp.get("ErrorComment", "")))


def store_case(
    gw: GatewayProcess,
    command_uid: str | None,
    body: bytes,
    expected: set[int | None],
    what: str,
    peer_values: list[str],
) -> StoreReply:
    before = Snapshot.of(gw)
    victims = _naive_join_targets(gw, peer_values)
    reply = send_c_store(gw.port, command_uid, body)
    shown = "no response" if reply.status is None else f"{reply.status:#06x}"
    assert reply.status in expected, (
        f"{what}: answered {shown} {reply.comment!r}, expected one of "
        f"{[s if s is None else hex(s) for s in expected]}\n{before.new_log(gw)[-3000:]}"
    )
    if reply.status is not None:
        assert reply.comment, f"{what}: failure status {shown} without an error comment"
        assert "refused" in before.new_log(gw), f"{what}: nothing in the gateway log"
    assert_still_serving(gw, before, what)
    for target in victims:
        assert not target.exists(), f"{what}: {target} was created from a peer value"
    return reply


def _naive_join_targets(gw: GatewayProcess, values: list[str]) -> list[Path]:
    """Where a value would land if it were (wrongly) joined onto one of the gateway's
    directories; only places that do not exist yet are returned."""
    bases = [gw.spool / "objects" / "00", gw.spool / "objects", gw.spool / "tmp", gw.spool]
    bases += [gw.root, Path.cwd()]
    targets = []
    for value in values:
        if not value or "\0" in value:
            continue
        for base in bases:
            for name in (value, f"{value}.dcm"):
                target = Path(os.path.normpath(base / name))
                if not target.exists():
                    targets.append(target)
    return targets


PATH_LIKE_UIDS = [
    "../../x",
    "1.2.3/../../etc",
    "..\\..\\x",
    "/tmp/x",
    "1.2.3/x",
]
INVALID_UIDS = [
    "1.02.3",  # leading zero in a component
    "1.2.3.",  # empty component
    "1.2.3a",
    "1." + "2" * 63,  # 65 characters
    "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.255",  # 66
    "",  # present, empty
    None,  # missing from the command
]


@pytest.mark.parametrize("uid", PATH_LIKE_UIDS + INVALID_UIDS, ids=repr)
def test_bad_sop_instance_uid(bad_gw: GatewayProcess, lax_pydicom: None, uid: str | None) -> None:
    # Command and data set agree, so nothing but the UID itself is wrong.
    body = explicit_le(ct_dataset(uid or generate_uid()))
    expected: set[int | None] = {CANNOT_UNDERSTAND}
    if not uid or len(uid) > 64 or "\\" in uid:
        # pynetdicom cannot turn such a command into a request (too long, a multi-valued
        # UI, none at all) and aborts the association before the gateway's handler
        # runs: a refusal too.
        expected.add(NO_RESPONSE)
    store_case(bad_gw, uid, body, expected, f"SOP Instance UID {uid!r}", [uid or ""])


@pytest.mark.parametrize("uid", [*PATH_LIKE_UIDS[:2], "1.02.3", "1." + "2" * 63])
def test_bad_uid_only_in_the_data_set(bad_gw: GatewayProcess, lax_pydicom: None, uid: str) -> None:
    body = explicit_le(ct_dataset(uid))
    what = f"data set SOP Instance UID {uid!r}"
    store_case(bad_gw, generate_uid(), body, {DATASET_MISMATCH}, what, [uid])


def _truncated_in_value(ds: Dataset) -> bytes:
    body = explicit_le(ds)
    return body[: element_start(body, b"\x10\x00\x10\x00PN") + 8 + 2]


def _truncated_in_pixel_data(ds: Dataset) -> bytes:
    body = explicit_le(ds)
    return body[: element_start(body, b"\xe0\x7f\x10\x00OW") + 12 + 100]


def _truncated_in_element_header(ds: Dataset) -> bytes:
    body = explicit_le(ds)
    return body[: element_start(body, b"\xe0\x7f\x10\x00OW") + 5]


def _length_past_end(ds: Dataset) -> bytes:
    body = bytearray(explicit_le(ds))
    at = element_start(body, b"\x10\x00\x10\x00PN")
    body[at + 6 : at + 8] = struct.pack("<H", 0xFFF0)
    return bytes(body)


def _pixel_length_past_end(ds: Dataset) -> bytes:
    body = bytearray(explicit_le(ds))
    at = element_start(body, b"\xe0\x7f\x10\x00OW")
    body[at + 8 : at + 12] = struct.pack("<L", 0x7FFFFFF0)
    return bytes(body)


def _bad_vr(ds: Dataset) -> bytes:
    body = bytearray(explicit_le(ds))
    at = element_start(body, b"\x10\x00\x10\x00PN")
    body[at + 4 : at + 6] = b"\x01\x02"
    return bytes(body)


def _unterminated_sequence(ds: Dataset) -> bytes:
    # (0008,1115) Referenced Series Sequence, undefined length, one item, no delimiters.
    body = explicit_le(ds)
    sq = b"\x08\x00\x15\x11SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    return body + sq + b"\x10\x00\x10\x00PN\x04\x00ABCD"


def _implicit_vr(ds: Dataset) -> bytes:
    # Implicit VR bytes on an Explicit VR Little Endian presentation context.
    return bytes(encode(ds, True, True))


def _garbage(ds: Dataset) -> bytes:
    return random.Random(1234).randbytes(4096)


def _all_ff(ds: Dataset) -> bytes:
    return b"\xff" * 4096


def _empty(ds: Dataset) -> bytes:
    return b""


def _other_sop_instance(ds: Dataset) -> bytes:
    other = ct_dataset()
    return explicit_le(other)


def _other_sop_class(ds: Dataset) -> bytes:
    ds.SOPClassUID = MRImageStorage
    return explicit_le(ds)


def _bad_study_uid(ds: Dataset) -> bytes:
    ds.StudyInstanceUID = "../../x"
    return explicit_le(ds)


def _no_study_uid(ds: Dataset) -> bytes:
    del ds.StudyInstanceUID
    return explicit_le(ds)


def _no_series_uid(ds: Dataset) -> bytes:
    del ds.SeriesInstanceUID
    return explicit_le(ds)


def _empty_series_uid(ds: Dataset) -> bytes:
    ds.SeriesInstanceUID = ""
    return explicit_le(ds)


MALFORMED: dict[str, tuple[Callable[[Dataset], bytes], set[int | None]]] = {
    "truncated inside a value": (_truncated_in_value, {UNDECODABLE}),
    "truncated inside pixel data": (_truncated_in_pixel_data, {UNDECODABLE}),
    "truncated inside an element header": (_truncated_in_element_header, {UNDECODABLE}),
    "length runs past the end": (_length_past_end, {UNDECODABLE}),
    "pixel data length runs past the end": (_pixel_length_past_end, {UNDECODABLE}),
    "invalid VR": (_bad_vr, {UNDECODABLE}),
    "unterminated sequence": (_unterminated_sequence, {UNDECODABLE}),
    "implicit VR on an explicit VR context": (_implicit_vr, {UNDECODABLE, DATASET_MISMATCH}),
    "random bytes": (_garbage, {UNDECODABLE, DATASET_MISMATCH}),
    "all 0xFF": (_all_ff, {UNDECODABLE, DATASET_MISMATCH}),
    "empty data set": (_empty, {UNDECODABLE, DATASET_MISMATCH}),
    "SOP Instance UID differs from the command": (_other_sop_instance, {DATASET_MISMATCH}),
    "SOP Class UID differs from the command": (_other_sop_class, {DATASET_MISMATCH}),
    "Study Instance UID ../../x": (_bad_study_uid, {DATASET_MISMATCH}),
    # No archive stores an instance without them: refused, never acknowledged.
    "no Study Instance UID": (_no_study_uid, {DATASET_MISMATCH}),
    "no Series Instance UID": (_no_series_uid, {DATASET_MISMATCH}),
    "empty Series Instance UID": (_empty_series_uid, {DATASET_MISMATCH}),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_data_set(bad_gw: GatewayProcess, lax_pydicom: None, name: str) -> None:
    make, expected = MALFORMED[name]
    ds = ct_dataset()
    body = make(ds)
    uid = str(ds.SOPInstanceUID)
    store_case(bad_gw, uid, body, expected, name, [uid, "../../x"])


def test_good_instance_after_bad_input(bad_gw: GatewayProcess, tmp_path: Path) -> None:
    # The control, run last: the same gateway still stores a good instance.
    ct = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
    assert storescu(bad_gw.port, [ct]).statuses == ["Success"]
    rows = bad_gw.rows("SELECT * FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,))
    assert len(rows) == 1
    assert_stray_free(bad_gw)

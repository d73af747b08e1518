"""C-STORE ingest with DCMTK storescu as the modality.

What lands in the spool must be byte for byte the data set that went over the wire.
The reference for "what went over the wire" is DCMTK storescp in bit-preserving mode
(+B) receiving the same file sent the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import GatewayProcess
from .support.peers import Storescp, dataset_bytes, echoscu, store_one, storescu, transfer_syntax_of

TS_CASES = [(ts, name) for ts, names in corpus.BY_TRANSFER_SYNTAX.items() for name in names]


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> GatewayProcess:
    # Compression off: these tests look at what the receive stage alone leaves behind.
    gw = GatewayProcess(tmp_path_factory.mktemp("ingest"), upload={"compression": "none"})
    gw.start()
    yield gw  # type: ignore[misc]
    assert gw.stop() == 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Storescp:
    scp = Storescp(tmp_path_factory.mktemp("storescp"))
    yield scp  # type: ignore[misc]
    scp.stop()


def _row(gw: GatewayProcess, sop_uid: str) -> dict[str, object]:
    rows = gw.rows("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    assert len(rows) == 1, f"expected one queue row for {sop_uid}, found {len(rows)}"
    return dict(rows[0])


def _assert_same_as_sent(
    gw: GatewayProcess, reference: Storescp, path: Path, tmp_path: Path
) -> dict[str, object]:
    """Send *path* to the gateway and to storescp; compare what each stored."""
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    result = store_one(gw.port, path)
    assert result.statuses == ["Success"], result.output
    row = _row(gw, sop_uid)
    stored = gw.spool / str(row["path"])
    assert row["transfer_syntax"] == transfer_syntax_of(path), "storescu converted the data"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
    assert stored.stat().st_size == row["size"]

    ref = store_one(reference.port, path)
    assert ref.statuses == ["Success"], ref.output
    (ref_file,) = [
        p for p in reference.directory.iterdir() if sop_uid in p.name or _sop_of(p) == sop_uid
    ]
    assert dataset_bytes(stored) == dataset_bytes(ref_file)
    ref_file.unlink()
    return row


def _sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_echo(shared_gateway: GatewayProcess) -> None:
    assert echoscu(shared_gateway.port)


@pytest.mark.parametrize(("ts", "name"), TS_CASES, ids=[f"{n}" for _, n in TS_CASES])
def test_every_transfer_syntax_stored_as_sent(
    shared_gateway: GatewayProcess, reference: Storescp, tmp_path: Path, ts: str, name: str
) -> None:
    path = corpus.testdata(name)
    assert transfer_syntax_of(path) == ts
    original = pydicom.dcmread(path, stop_before_pixels=True)
    if "SeriesInstanceUID" not in original or "StudyInstanceUID" not in original:
        # No archive stores an instance without them: refused at once, never
        # acknowledged (the queue has no row).  A copy with them goes through.
        refused = store_one(shared_gateway.port, path)
        assert refused.statuses == ["Error: DataSetDoesNotMatchSOPClass"], refused.output
        assert not shared_gateway.rows(
            "SELECT * FROM instances WHERE sop_instance_uid = ?", (original.SOPInstanceUID,)
        )
        path = tmp_path / name
        corpus.with_new_uids(corpus.testdata(name), path)
        assert transfer_syntax_of(path) == ts
    _assert_same_as_sent(shared_gateway, reference, path, tmp_path)


@pytest.mark.parametrize("name", corpus.MULTI_FRAME)
def test_multi_frame(
    shared_gateway: GatewayProcess, reference: Storescp, tmp_path: Path, name: str
) -> None:
    path = corpus.testdata(name)
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) > 1
    _assert_same_as_sent(shared_gateway, reference, path, tmp_path)


@pytest.mark.parametrize("name", corpus.CHARSET_FILES)
def test_non_ascii_character_sets(
    shared_gateway: GatewayProcess, reference: Storescp, tmp_path: Path, name: str
) -> None:
    path = corpus.charset_file(name)
    row = _assert_same_as_sent(shared_gateway, reference, path, tmp_path)
    sent = pydicom.dcmread(path)
    stored = pydicom.dcmread(shared_gateway.spool / str(row["path"]))
    assert stored.SpecificCharacterSet == sent.SpecificCharacterSet
    assert stored["PatientName"].value == sent["PatientName"].value


def test_private_tags(shared_gateway: GatewayProcess, reference: Storescp, tmp_path: Path) -> None:
    for name in corpus.VENDOR_PRIVATE:
        _assert_same_as_sent(shared_gateway, reference, corpus.testdata(name), tmp_path)
    path = tmp_path / "private.dcm"
    sent = corpus.with_private_tags(corpus.testdata("CT_small.dcm"), path)
    row = _assert_same_as_sent(shared_gateway, reference, path, tmp_path)
    stored = pydicom.dcmread(shared_gateway.spool / str(row["path"]))
    block = stored.private_block(0x0029, "GATEWAY TEST")
    assert block[0x01].value == "private text"
    assert block[0x02].value == bytes(range(256))
    nested = block[0x03].value[0].private_block(0x0031, "GATEWAY NESTED")
    assert nested[0x10].value == 0xDEADBEEF
    assert sent.SOPInstanceUID == row["sop_instance_uid"]


def test_queue_row_records_the_receipt(shared_gateway: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    assert storescu(shared_gateway.port, [path], calling="CT_SCANNER_1").statuses == ["Success"]
    row = _row(shared_gateway, ds.SOPInstanceUID)
    assert row["sop_class_uid"] == ds.SOPClassUID
    assert row["study_instance_uid"] == ds.StudyInstanceUID
    assert row["series_instance_uid"] == ds.SeriesInstanceUID
    assert row["calling_ae"] == "CT_SCANNER_1"
    assert str(row["peer_address"]).startswith("127.0.0.1:")
    # The pipeline may already hold it ("compressing", a lease) or be done with it
    # ("compressed": ready to upload).
    assert row["state"] in ("received", "compressing", "compressed")
    assert row["attempts"] == 0
    assert row["last_error"] is None
    assert row["received_at"] and row["next_attempt_at"]
    # The file name is the content hash, never a value the peer sent.
    assert Path(str(row["path"])).name == f"{row['sha256']}.dcm"
    assert ds.SOPInstanceUID not in str(row["path"])


def test_resend_is_idempotent(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gw = gateway_factory(upload={"compression": "none"})
    path = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    for _ in range(3):
        assert storescu(gw.port, [path]).statuses == ["Success"]
    (row,) = gw.rows()
    assert len(gw.spool_files()) == 1

    # Same SOP Instance UID, different content: the new copy replaces the old one.
    ds.PatientComments = "corrected by the technologist"
    ds.save_as(path)
    assert storescu(gw.port, [path]).statuses == ["Success"]
    (new_row,) = gw.rows()
    assert new_row["sha256"] != row["sha256"]
    (only_file,) = gw.spool_files()
    assert only_file.name == f"{new_row['sha256']}.dcm"
    assert pydicom.dcmread(only_file).PatientComments == "corrected by the technologist"
    assert gw.stop() == 0


@pytest.mark.parametrize("missing", ["SeriesInstanceUID", "StudyInstanceUID"])
def test_instance_no_archive_would_store_is_refused(
    gateway: GatewayProcess, tmp_path: Path, missing: str
) -> None:
    """Without a Series (or Study) Instance UID no archive can store the instance: the
    modality is told at once (0xA900 with an Error Comment), nothing is acknowledged,
    queued or left in the spool."""
    path = tmp_path / "no-uid.dcm"
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    delattr(ds, missing)
    ds.save_as(path, enforce_file_format=True)
    result = storescu(gateway.port, [path], extra=["-d"])
    assert "DIMSE Status                  : 0xa900" in result.output, result.output
    assert result.returncode != 0, "storescu reports the failure"
    name = {"SeriesInstanceUID": "Series", "StudyInstanceUID": "Study"}[missing]
    comment = f"no {name} Instance UID in the data set"
    assert comment in result.output, "the Error Comment reaches the modality"
    assert gateway.rows() == []
    assert gateway.spool_files() == [] and gateway.temp_files() == []
    assert f"sop={ds.SOPInstanceUID} refused: {comment}" in gateway.log

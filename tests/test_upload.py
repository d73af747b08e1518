"""End to end: DCMTK storescu -> gateway -> nginx (mutual TLS) -> Orthanc + DICOMweb.

Every peer is real: storescu is the modality, nginx with ``ssl_verify_client on`` and
Orthanc with its DICOMweb plugin are the cloud archive (tests/support/archive.py).
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, UncompressedTransferSyntaxes

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.gateway_proc import GatewayProcess
from .support.peers import storescu


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def _upload_config(lab: ArchiveLab, **overrides: Any) -> dict[str, Any]:
    upload = {
        "dicomweb_url": lab.dicomweb_url,
        "ca_file": str(lab.ca_file),
        "client_cert": str(lab.client_cert),
        "client_key": str(lab.client_key),
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1.0,
    }
    upload.update(overrides)
    return upload


def _gateway(factory: GatewayFactory, lab: ArchiveLab, **upload: Any) -> GatewayProcess:
    return factory(upload=_upload_config(lab, **upload))


def _states(gw: GatewayProcess) -> dict[str, int]:
    rows = gw.rows("SELECT state, count(*) AS n FROM instances GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


def _all_uploaded(gw: GatewayProcess, count: int) -> Callable[[], bool]:
    return lambda: _states(gw).get("uploaded", 0) == count


def _study(tmp_path: Path, names: list[str]) -> tuple[list[Path], list[pydicom.Dataset]]:
    study_uid = pydicom.uid.generate_uid()
    paths, datasets = [], []
    for i, name in enumerate(names):
        path = tmp_path / f"{i:03d}-{name}"
        datasets.append(corpus.with_new_uids(corpus.testdata(name), path, study=study_uid))
        paths.append(path)
    return paths, datasets


MIXED = [
    "CT_small.dcm",  # 16-bit signed, ISO_IR 100
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "SC_rgb.dcm",  # RGB -> YBR_RCT
    "emri_small.dcm",  # 10 frames
    "SC_rgb_jpeg_dcmtk.dcm",  # lossy JPEG: passed through
    "MR_small_RLE.dcm",  # already lossless-compressed: passed through
    "rtplan.dcm",  # no pixel data
]


def test_everything_reaches_the_archive_intact(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, archive_lab)
    paths, sent = _study(tmp_path, MIXED)
    charset = tmp_path / "charset.dcm"
    sent.append(corpus.with_new_uids(corpus.charset_file("chrX1.dcm"), charset))
    private = tmp_path / "private.dcm"
    sent.append(corpus.with_private_tags(corpus.testdata("CT_small.dcm"), private))
    paths += [charset, private]

    for path in paths:  # each as it is stored, compressed syntaxes proposed as such
        from .support.peers import store_one

        assert store_one(gw.port, path).statuses == ["Success"]
    wait_until("all uploaded", _all_uploaded(gw, len(paths)))

    assert archive_lab.sop_instance_uids() == {str(ds.SOPInstanceUID) for ds in sent}
    for original in sent:
        stored = pydicom.dcmread(io.BytesIO(archive_lab.instance_file(original.SOPInstanceUID)))
        ts = original.file_meta.TransferSyntaxUID
        if "PixelData" in original:
            if ts in UncompressedTransferSyntaxes:
                assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
                _assert_same_pixels(original, stored)
            else:  # already compressed: passed through untouched
                assert stored.file_meta.TransferSyntaxUID == ts, "compressed data re-encoded"
                assert stored.PixelData == original.PixelData
        # Everything but pixel encoding is as the modality sent it.
        assert stored["PatientName"].value == original["PatientName"].value
        assert stored.get("SpecificCharacterSet") == original.get("SpecificCharacterSet")
        assert stored.SOPInstanceUID == original.SOPInstanceUID
        assert stored.StudyInstanceUID == original.StudyInstanceUID
    stored_private = pydicom.dcmread(io.BytesIO(archive_lab.instance_file(sent[-1].SOPInstanceUID)))
    block = stored_private.private_block(0x0029, "GATEWAY TEST")
    assert block[0x02].value == bytes(range(256))
    assert stored_private.private_block(0x0029, "GATEWAY TEST")[0x01].value == "private text"

    rows = gw.rows("SELECT * FROM instances")
    outcomes = {r["sop_instance_uid"]: r["transcode_outcome"] for r in rows}
    assert outcomes[sent[0].SOPInstanceUID] == "compressed"
    assert outcomes[sent[5].SOPInstanceUID] == "passthrough"  # lossy JPEG
    # Confirmed instances leave the spool (no cache configured).
    wait_until("spool emptied", lambda: gw.spool_files() == [], timeout=90)
    assert gw.stop() == 0


def _assert_same_pixels(original: pydicom.Dataset, stored: pydicom.Dataset) -> None:
    a = original.pixel_array
    b = stored.pixel_array
    if stored.PhotometricInterpretation == "YBR_RCT" or original.PhotometricInterpretation != (
        stored.PhotometricInterpretation
    ):
        # pydicom returns RGB for YBR_RCT (the transform is part of J2K decoding).
        assert original.PhotometricInterpretation == "RGB"
    assert a.shape == b.shape
    # Same kind and width; byte order may differ (big-endian originals).
    assert (a.dtype.kind, a.dtype.itemsize) == (b.dtype.kind, b.dtype.itemsize)
    assert np.array_equal(a, b)


def test_archive_outage_loses_nothing_and_duplicates_nothing(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, archive_lab)
    archive_lab.stop_nginx()
    paths, sent = _study(tmp_path, ["CT_small.dcm"] * 12 + ["MR_small.dcm"] * 8)
    result = storescu(gw.port, paths)
    assert result.acknowledged == len(paths), result.output  # modality unaffected
    wait_until(
        "upload attempts fail and are recorded",
        lambda: any(r["last_error"] for r in gw.rows()),
    )
    assert archive_lab.instance_count() == 0
    assert "cannot connect to the archive" in gw.log

    archive_lab.start_nginx()
    wait_until("queue drained", _all_uploaded(gw, len(paths)))
    assert archive_lab.sop_instance_uids() == {str(ds.SOPInstanceUID) for ds in sent}
    assert archive_lab.instance_count() == len(paths)
    assert gw.stop() == 0


def test_archive_answering_503_is_retried(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, archive_lab)
    archive_lab.set_unavailable(True)
    paths, _ = _study(tmp_path, ["CT_small.dcm"] * 3)
    assert storescu(gw.port, paths).acknowledged == 3
    wait_until("503 recorded", lambda: any("503" in (r["last_error"] or "") for r in gw.rows()))
    attempts = max(r["attempts"] for r in gw.rows())
    assert attempts >= 1
    archive_lab.set_unavailable(False)
    wait_until("queue drained", _all_uploaded(gw, 3))
    assert archive_lab.instance_count() == 3
    assert gw.stop() == 0


def test_kill_during_uploads_everything_arrives_once(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    # Small batches, and the upload paced to 1 MB/s: the whole study takes many
    # seconds to send, so kills land mid-upload however fast the codec and the box are
    # (unpaced, a restarted gateway could send all that was left before the next kill).
    gw = _gateway(
        gateway_factory, archive_lab, batch_max_instances=3, max_bytes_per_second=1_000_000
    )
    paths, sent = _study(tmp_path, ["MR2_UNCR.dcm"] * 10 + ["CT_small.dcm"] * 20)
    assert storescu(gw.port, paths).acknowledged == len(paths)
    rng = random.Random(7)
    kills_mid_upload = 0
    for _ in range(4):
        # Kill right after an upload completes, at a random small delay: the next
        # batch is then usually in flight.
        before = _states(gw).get("uploaded", 0)
        wait_until(
            "an upload",
            lambda before=before: before < _states(gw).get("uploaded", 0) or before == len(paths),
            timeout=60,
        )
        time.sleep(rng.uniform(0, 0.05))
        states = _states(gw)
        gw.kill()
        if states.get("uploaded", 0) < len(paths):
            kills_mid_upload += 1
        gw.start()
    assert kills_mid_upload >= 3, "the kills did not land while uploads were under way"
    wait_until("queue drained after kills", _all_uploaded(gw, len(paths)), timeout=120)
    assert archive_lab.sop_instance_uids() == {str(ds.SOPInstanceUID) for ds in sent}
    assert archive_lab.instance_count() == len(paths)
    assert gw.stop() == 0


def test_untrusted_client_certificate(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = _gateway(
        gateway_factory,
        archive_lab,
        client_cert=str(archive_lab.untrusted_client_cert),
        client_key=str(archive_lab.untrusted_client_key),
    )
    paths, _ = _study(tmp_path, ["CT_small.dcm"])
    assert storescu(gw.port, paths).acknowledged == 1
    wait_until("error recorded", lambda: bool(gw.rows()[0]["last_error"]))
    (row,) = gw.rows()
    assert row["state"] == "compressed"  # kept for retry, not failed, not uploaded
    assert "client certificate" in row["last_error"]
    assert "client certificate" in gw.log
    assert archive_lab.instance_count() == 0
    assert gw.stop() == 0


def test_untrusted_archive_certificate(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, archive_lab, ca_file=str(archive_lab.untrusted_ca_file))
    paths, _ = _study(tmp_path, ["CT_small.dcm"])
    assert storescu(gw.port, paths).acknowledged == 1
    wait_until("error recorded", lambda: bool(gw.rows()[0]["last_error"]))
    (row,) = gw.rows()
    assert row["state"] == "compressed"
    assert "not trusted" in row["last_error"] and "upload.ca_file" in row["last_error"]
    assert "certificate" in gw.log
    # The handshake failed, so not a single HTTP request reached the archive.
    assert "POST" not in archive_lab.nginx_access_log()
    assert archive_lab.instance_count() == 0
    assert gw.stop() == 0


def test_rejected_instance_fails_without_blocking_the_rest(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    paths, sent = _study(tmp_path, ["CT_small.dcm"] * 4)
    # This archive refuses an instance without Series Instance UID (FailedSOPSequence,
    # 0xC000).  The gateway's own C-STORE check refuses such an instance, so it is
    # queued directly, before the gateway starts.
    bad = pydicom.dcmread(paths[1])
    del bad.SeriesInstanceUID
    bad.save_as(paths[1])
    gw = gateway_factory(start=False, upload=_upload_config(archive_lab))
    gw.enqueue_unchecked(paths[1])
    gw.start()
    assert storescu(gw.port, paths[:1] + paths[2:]).acknowledged == 3
    wait_until(
        "three uploaded, one failed",
        lambda: _states(gw) == {"uploaded": 3, "failed": 1},
    )
    (failed,) = gw.rows("SELECT * FROM instances WHERE state = 'failed'")
    assert failed["sop_instance_uid"] == sent[1].SOPInstanceUID
    assert failed["last_error"].startswith("archive refused")
    assert archive_lab.sop_instance_uids() == {
        str(ds.SOPInstanceUID) for i, ds in enumerate(sent) if i != 1
    }
    # An operator can list and retry it; it fails again for the same reason, and the
    # file is still there (a failed instance is never deleted).
    from .test_config import _cli

    listing = _cli("queue", "ls", "--config", str(gw.config_path), "--state", "failed")
    assert sent[1].SOPInstanceUID in listing.stdout and "archive refused" in listing.stdout
    retried = _cli("queue", "retry", "--config", str(gw.config_path), "--all")
    assert retried.returncode == 0 and "1 failed" in retried.stdout
    wait_until(
        "retried and failed again",
        lambda: (
            gw.log.count("failed permanently") == 2 and _states(gw) == {"uploaded": 3, "failed": 1}
        ),
    )
    assert (gw.spool / failed["path"]).exists()
    assert gw.stop() == 0


HTJ2K_SET = [
    "CT_small.dcm",  # 16-bit signed
    "MR2_UNCR.dcm",  # 12 of 16 bits
    "MR_small_bigendian.dcm",
    "SC_rgb.dcm",  # RGB -> YBR_RCT
    "emri_small.dcm",  # 10 frames
    "6154",  # under 32 pixels a side
]


@pytest.mark.parametrize(
    ("codec", "ts"),
    [
        ("htj2k-lossless", "1.2.840.10008.1.2.4.201"),
        ("htj2k-lossless-rpcl", "1.2.840.10008.1.2.4.202"),
    ],
)
def test_htj2k_is_stored_and_handed_back_byte_identical(
    codec: str, ts: str, gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    # Orthanc stores what STOW-RS gave it whatever the transfer syntax; this shows it
    # does for 1.2.840.10008.1.2.4.201 too, and hands the same bytes back.  The cache
    # keeps the uploaded files to compare with.
    gw = gateway_factory(
        upload=_upload_config(archive_lab, compression=codec),
        retention={"keep_bytes": 1 << 30},
    )
    paths, sent = _study(tmp_path, HTJ2K_SET)
    assert storescu(gw.port, paths).acknowledged == len(paths)
    wait_until("all uploaded", _all_uploaded(gw, len(paths)))

    rows = {r["sop_instance_uid"]: r for r in gw.rows()}
    for original in sent:
        row = rows[original.SOPInstanceUID]
        assert row["transcode_outcome"] == "compressed", row["transcode_reason"]
        assert row["upload_transfer_syntax"] == ts
        uploaded = (gw.spool / row["upload_path"]).read_bytes()
        in_archive = archive_lab.instance_file(original.SOPInstanceUID)
        assert in_archive == uploaded, f"{original.SOPInstanceUID} changed in the archive"
        stored = pydicom.dcmread(io.BytesIO(in_archive))
        assert stored.file_meta.TransferSyntaxUID == ts
        _assert_same_pixels(original, stored)
    assert gw.stop() == 0

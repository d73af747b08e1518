"""The archive lab itself (tests/support/archive.py), driven by real STOW-RS requests.

aiohttp talks to nginx with the lab's certificates exactly as the gateway's uploader
does; what arrived is checked straight in Orthanc.  The answers asserted here are the
observed behaviour of Orthanc 1.10.1 + DICOMweb 1.7 that the upload tests rely on.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pydicom
import pytest
from pydicom.data import get_testdata_file

from .support.archive import ArchiveLab

FAILURE_REASON = "00081197"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
PROCESSING_FAILURE_CANNOT_UNDERSTAND = 0xC000


def _instance(name: str, **changes: Any) -> pydicom.Dataset:
    """A pydicom test file with a fresh SOP Instance UID (and optional other changes)."""
    path = get_testdata_file(name)
    assert path is not None, f"{name} not in pydicom's test data"
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def _encode(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _ssl(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def _trusted(lab: ArchiveLab) -> ssl.SSLContext:
    return _ssl(lab.ca_file, lab.client_cert, lab.client_key)


async def _stow(
    lab: ArchiveLab, parts: list[bytes], ctx: ssl.SSLContext, url: str | None = None
) -> tuple[int, bytes]:
    """POST one multipart/related STOW-RS request; the HTTP status and the raw body."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    body += f"--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url or lab.dicomweb_url + "/studies", data=io.BytesIO(body), headers=headers, ssl=ctx
        ) as resp,
    ):
        return resp.status, await resp.read()


async def _logged(lab: ArchiveLab, line: str) -> None:
    # From a thread: blocking the event loop would keep aiohttp from closing the
    # connection, and nginx would log the request only after its lingering_timeout (5 s).
    await asyncio.to_thread(lab.nginx_access_log, wait_for=line)


def _referenced(answer: dict[str, Any]) -> list[str]:
    items = answer[REFERENCED_SOP_SEQUENCE].get("Value", [])
    return [item[REFERENCED_SOP_INSTANCE_UID]["Value"][0] for item in items]


def _failed(answer: dict[str, Any]) -> dict[str, int]:
    items = answer[FAILED_SOP_SEQUENCE].get("Value", [])
    return {
        item[REFERENCED_SOP_INSTANCE_UID]["Value"][0]: item[FAILURE_REASON]["Value"][0]
        for item in items
    }


def test_certificates_and_config_files(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    assert lab.dicomweb_url.startswith("https://localhost:")
    assert lab.dicomweb_url.endswith("/dicom-web")
    assert lab.orthanc_url.startswith("http://127.0.0.1:")
    for key in (lab.client_key, lab.untrusted_client_key):
        assert key.stat().st_mode & 0o777 == 0o600
    for pem in (lab.ca_file, lab.client_cert, lab.untrusted_ca_file, lab.untrusted_client_cert):
        assert pem.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert lab.ca_file.read_text() != lab.untrusted_ca_file.read_text()
    assert "ssl_verify_client on;" in (lab.work / "nginx.conf").read_text()
    assert lab.instance_count() == 0
    assert lab.sop_instance_uids() == set()


@pytest.mark.asyncio
async def test_stow_over_mutual_tls_stores_the_instances(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    ct, mr = _instance("CT_small.dcm"), _instance("MR_small.dcm")
    status, body = await _stow(lab, [_encode(ct), _encode(mr)], _trusted(lab))
    assert status == 200, body
    answer = json.loads(body)
    assert _referenced(answer) == [ct.SOPInstanceUID, mr.SOPInstanceUID]
    assert _failed(answer) == {}
    assert lab.sop_instance_uids() == {ct.SOPInstanceUID, mr.SOPInstanceUID}
    assert lab.instance_count() == 2
    # Orthanc keeps the bytes it was sent.
    assert lab.instance_file(ct.SOPInstanceUID) == _encode(ct)
    assert '"POST /dicom-web/studies HTTP/1.1" 200' in lab.nginx_access_log()


@pytest.mark.asyncio
async def test_server_certificate_is_also_valid_for_127_0_0_1(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    url = lab.dicomweb_url.replace("localhost", "127.0.0.1") + "/studies"
    ds = _instance("CT_small.dcm")
    status, _ = await _stow(lab, [_encode(ds)], _trusted(lab), url=url)
    assert status == 200
    assert lab.sop_instance_uids() == {ds.SOPInstanceUID}


@pytest.mark.asyncio
async def test_large_request_body_streams_through_nginx(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    ds = _instance("CT_small.dcm")
    block = ds.private_block(0x0009, "GATEWAY TEST", create=True)
    block.add_new(0x10, "OB", bytes(12 * 1024 * 1024))  # well over nginx's 1 MB default
    status, body = await _stow(lab, [_encode(ds)], _trusted(lab))
    assert status == 200, body
    assert len(lab.instance_file(ds.SOPInstanceUID)) > 12 * 1024 * 1024


@pytest.mark.asyncio
async def test_resending_a_stored_instance_succeeds_and_keeps_one_copy(
    archive_lab: ArchiveLab,
) -> None:
    lab = archive_lab
    ds = _instance("CT_small.dcm")
    first = await _stow(lab, [_encode(ds)], _trusted(lab))
    second = await _stow(lab, [_encode(ds)], _trusted(lab))
    assert first[0] == second[0] == 200
    assert json.loads(first[1]) == json.loads(second[1])
    assert _referenced(json.loads(second[1])) == [ds.SOPInstanceUID]
    assert _failed(json.loads(second[1])) == {}
    assert lab.instance_count() == 1


@pytest.mark.asyncio
async def test_same_uid_with_other_content_replaces_the_stored_copy(
    archive_lab: ArchiveLab,
) -> None:
    lab = archive_lab
    original = _instance("CT_small.dcm")
    changed = _instance("CT_small.dcm", PatientName="Changed^Content")
    changed.SOPInstanceUID = changed.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    assert (await _stow(lab, [_encode(original)], _trusted(lab)))[0] == 200
    status, body = await _stow(lab, [_encode(changed)], _trusted(lab))
    assert status == 200, body
    assert _referenced(json.loads(body)) == [original.SOPInstanceUID]
    assert _failed(json.loads(body)) == {}
    assert lab.instance_count() == 1
    assert lab.instance_file(original.SOPInstanceUID) == _encode(changed)


@pytest.mark.asyncio
async def test_instance_without_series_uid_is_listed_in_failed_sop_sequence(
    archive_lab: ArchiveLab,
) -> None:
    lab = archive_lab
    good, bad, good2 = (_instance(n) for n in ("CT_small.dcm", "CT_small.dcm", "MR_small.dcm"))
    del bad.SeriesInstanceUID
    parts = [_encode(good), _encode(bad), _encode(good2)]
    status, body = await _stow(lab, parts, _trusted(lab))
    assert status == 400, body
    answer = json.loads(body)
    assert _failed(answer) == {bad.SOPInstanceUID: PROCESSING_FAILURE_CANNOT_UNDERSTAND}
    assert _referenced(answer) == [good.SOPInstanceUID, good2.SOPInstanceUID]
    assert lab.sop_instance_uids() == {good.SOPInstanceUID, good2.SOPInstanceUID}


@pytest.mark.asyncio
async def test_rejected_patient_id_is_not_stored_and_cuts_the_answer_short(
    archive_lab: ArchiveLab,
) -> None:
    lab = archive_lab
    before = _instance("CT_small.dcm")
    rejected = _instance("CT_small.dcm", PatientID=lab.rejected_patient_id)
    after = _instance("MR_small.dcm")
    parts = [_encode(before), _encode(rejected), _encode(after)]
    status, body = await _stow(lab, parts, _trusted(lab))
    # Not a FailedSOPSequence: the refused instance and everything after it in the
    # request are simply absent from the answer, and not stored.
    assert status == 200, body
    answer = json.loads(body)
    assert _referenced(answer) == [before.SOPInstanceUID]
    assert _failed(answer) == {}
    assert lab.sop_instance_uids() == {before.SOPInstanceUID}
    # Sent again without the refused one, the rest goes through.
    status, body = await _stow(lab, [_encode(after)], _trusted(lab))
    assert status == 200
    assert lab.sop_instance_uids() == {before.SOPInstanceUID, after.SOPInstanceUID}


@pytest.mark.asyncio
async def test_untrusted_client_certificate_is_refused(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    ctx = _ssl(lab.ca_file, lab.untrusted_client_cert, lab.untrusted_client_key)
    status, body = await _stow(lab, [_encode(_instance("CT_small.dcm"))], ctx)
    assert status == 400
    assert b"The SSL certificate error" in body
    await _logged(lab, '"POST /dicom-web/studies HTTP/1.1" 400')
    assert lab.instance_count() == 0


@pytest.mark.asyncio
async def test_missing_client_certificate_is_refused(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    status, body = await _stow(lab, [_encode(_instance("CT_small.dcm"))], _ssl(lab.ca_file))
    assert status == 400
    assert b"No required SSL certificate was sent" in body
    assert lab.instance_count() == 0


@pytest.mark.asyncio
async def test_client_trusting_another_ca_refuses_the_server(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    ctx = _ssl(lab.untrusted_ca_file, lab.client_cert, lab.client_key)
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as caught:
        await _stow(lab, [_encode(_instance("CT_small.dcm"))], ctx)
    error = caught.value.certificate_error
    assert isinstance(error, ssl.SSLCertVerificationError)
    assert error.verify_code == 20  # unable to get local issuer certificate
    assert "POST" not in lab.nginx_access_log()
    assert lab.instance_count() == 0


@pytest.mark.asyncio
async def test_nginx_down_refuses_connections_and_comes_back(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    ds = _instance("CT_small.dcm")
    lab.stop_nginx()
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _stow(lab, [_encode(ds)], _trusted(lab))
    assert caught.value.os_error.errno == errno.ECONNREFUSED
    assert lab.instance_count() == 0
    lab.start_nginx()
    assert (await _stow(lab, [_encode(ds)], _trusted(lab)))[0] == 200
    assert lab.sop_instance_uids() == {ds.SOPInstanceUID}


@pytest.mark.asyncio
async def test_unavailable_answers_503_until_switched_back(archive_lab: ArchiveLab) -> None:
    lab = archive_lab
    ds = _instance("CT_small.dcm")
    lab.set_unavailable(True)
    status, _ = await _stow(lab, [_encode(ds)], _trusted(lab))
    assert status == 503
    await _logged(lab, '"POST /dicom-web/studies HTTP/1.1" 503')
    assert lab.instance_count() == 0
    lab.set_unavailable(False)
    assert (await _stow(lab, [_encode(ds)], _trusted(lab)))[0] == 200
    assert lab.instance_count() == 1


def test_start_is_quick_and_stop_leaves_no_process(tmp_path: Path) -> None:
    lab = ArchiveLab(tmp_path / "archive")
    began = time.monotonic()
    try:
        lab.start()
        started_in = time.monotonic() - began
        assert lab._orthanc is not None and lab._nginx is not None
        nginx = psutil.Process(lab._nginx.pid)
        procs = [psutil.Process(lab._orthanc.pid), nginx, *nginx.children(recursive=True)]
        assert len(procs) >= 3  # Orthanc, nginx master, at least one worker
    finally:
        lab.stop()
    lab.stop()  # idempotent
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert alive == []
    # Generous: a shared two-core machine; it takes well under a second when idle.
    assert started_in < 10

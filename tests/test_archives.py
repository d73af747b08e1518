"""Archive profiles (issue 14): what each archive's STOW-RS answers mean to the queue.

No cloud archive is reachable from this machine: Google, Azure, AWS HealthImaging and
dcm4chee are played by the scripted archive (tests/support/scripted_archive.py, a hand-written
double over mutual TLS whose vendor answers cite the documents and source they follow).
The pipeline is the real one, on a real spool and database (tests/test_isolation.py's
Bench).  Orthanc is the real one behind nginx (tests/support/archive.py): the last tests show
what it answers to a re-sent instance and how the gateway checks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from gateway.config import ConfigError, from_dict
from gateway.instances import QueueState
from gateway.metrics import Metrics
from gateway.pipeline import archives
from gateway.pipeline.upload import Item, parse_response

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.peers import storescu
from .support.scripted_archive import (
    GOOGLE_CONFLICT,
    Answer,
    ScriptedArchive,
    aws_answer,
    azure_answer,
    dcm4chee_answer,
    duplicate_0111_answer,
    failed_all,
    google_answer,
    scripted_archive,
    stored_then_dropped,
)
from .support.web_client import WebClient, web_port
from .test_isolation import Bench, _all

__all__ = ["scripted_archive"]

# -- reading answers (pure) ------------------------------------------------------------------


def _item(uid: str | None, code: int | None = None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}
    if uid is not None:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    if code is not None:
        item["00081197"] = {"vr": "US", "Value": [code]}
    item.update(extra)
    return item


def _body(stored: Sequence[dict[str, Any]] = (), failed: Sequence[dict[str, Any]] = ()) -> bytes:
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": list(stored)}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": list(failed)}
    return json.dumps(body).encode()


def _one(code: int, profile: str) -> Any:
    return parse_response(
        409,
        _body(failed=[_item("1.1", code)]),
        [Item("1.1", Path("/x"))],
        archives.profile(profile),
    )["1.1"]


@pytest.mark.parametrize("profile", list(archives.PROFILES))
def test_mistyped_argument_is_permanent_everywhere(profile: str) -> None:
    out = _one(0x0212, profile)
    assert not out.stored and not out.retryable and not out.duplicate
    assert out.reason == "archive refused: mistyped argument (0x0212)"


@pytest.mark.parametrize(
    ("profile", "code", "verdict", "name"),
    [
        ("generic", 0x0111, "duplicate", "duplicate SOP instance"),
        ("generic", 0x0110, "retry", "processing failure"),
        ("generic", 0xA778, "retry", "out of resources"),  # a standard archive: busy
        ("dcm4chee", 0xA778, "fail", "conflicting Patient ID"),
        ("dcm4chee", 0xA771, "fail", "subsequent occurrence of a rejected object"),
        ("dcm4chee", 0xA770, "duplicate", "rejection note already received"),
        ("dcm4chee", 0xA700, "retry", "out of resources"),
        ("google", 0x0110, "duplicate", "other bytes stored under this UID"),
        ("azure", 45070, "duplicate", "already stored (Azure 45070)"),
        ("azure", 45071, "retry", "(Azure 45071)"),
        ("azure", 43264, "fail", "failed validation (Azure 43264)"),
        ("azure", 43265, "fail", "(Azure 43265)"),
        ("azure", 0x0110, "retry", "processing failure (Azure 272)"),
        ("aws", 0xA700, "retry", "out of resources"),
    ],
)
def test_each_profile_reads_its_codes(profile: str, code: int, verdict: str, name: str) -> None:
    out = _one(code, profile)
    assert not out.stored
    assert out.duplicate == (verdict == "duplicate")
    # An unchecked duplicate is sent again rather than counted: verification decides.
    assert out.retryable == (verdict in ("retry", "duplicate"))
    assert name in out.reason and f"(0x{code:04X})" in out.reason


def test_warnings_are_read_with_their_codes() -> None:
    comments = {"00741048": {"vr": "SQ", "Value": [
        {"00000902": {"vr": "LO", "Value": ["DICOM100: (0008,0020) - Content \"x\" is not a DA"]}},
    ]}}  # fmt: skip
    answer = _body(stored=[
        _item("1.1", **{"00081196": {"vr": "US", "Value": [45063]}}, **comments),
        _item("1.2", **{"00081196": {"vr": "US", "Value": [0xB000]}}),
        _item("1.3"),
    ])  # fmt: skip
    items = [Item(u, Path("/x")) for u in ("1.1", "1.2", "1.3")]
    out = parse_response(202, answer, items, archives.AZURE)
    assert all(o.stored for o in out.values())
    assert out["1.1"].warnings == (
        "0xB007 data set does not match SOP class (Azure 45063)",
        'attributes DICOM100: (0008,0020) - Content "x" is not a DA',
    )
    assert out["1.2"].warnings == ("0xB000 coercion of data elements",)
    assert out["1.3"].warnings == ()


def test_a_failure_item_without_uid_fails_a_lone_instance() -> None:
    out = parse_response(409, _body(failed=[_item(None, 272)]), [Item("1.1", Path("/x"))],
                         archives.AZURE)["1.1"]  # fmt: skip
    assert not out.stored and not out.retryable and not out.ambiguous
    assert "archive could not read it" in out.reason and "(0x0110)" in out.reason


def test_failure_items_without_uid_make_a_larger_batch_ambiguous() -> None:
    items = [Item(u, Path("/x")) for u in ("1.1", "1.2", "1.3")]
    answer = _body(stored=[_item("1.1")], failed=[_item(None, 272), _item(None, 272)])
    out = parse_response(202, answer, items, archives.AZURE)
    assert out["1.1"].stored
    for uid in ("1.2", "1.3"):
        assert out[uid].ambiguous and out[uid].retryable and not out[uid].stored
        assert "without naming them" in out[uid].reason
    # One unconfirmed instance and one nameless failure: that is the one.
    answer = _body(stored=[_item("1.1"), _item("1.2")], failed=[_item(None, 272)])
    out = parse_response(202, answer, items, archives.AZURE)
    assert not out["1.3"].retryable and "could not read it" in out["1.3"].reason


def _ds(**values: Any) -> Dataset:
    ds = Dataset()
    base = {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "StudyInstanceUID": "1.2",
            "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4", "PatientID": "P1",
            "InstanceNumber": "7", "Rows": 512, "Columns": 512}  # fmt: skip
    for keyword, value in {**base, **values}.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def test_identity_differences_name_what_differs() -> None:
    def same(ours: Dataset, theirs: Dataset) -> list[str]:
        as_json = archives.identity_of_json(theirs.to_json_dict())
        assert as_json == archives.identity_of_dataset(theirs)  # both readings agree
        return archives.identity_differences(archives.identity_of_dataset(ours), as_json)

    assert same(_ds(), _ds()) == []
    # Absent Number of Frames is one frame; IS "7" and 7 are the same number.
    assert same(_ds(), _ds(NumberOfFrames=1, InstanceNumber=7)) == []
    assert same(_ds(), _ds(PatientID="OTHER")) == ["PatientID archive 'OTHER' vs ours 'P1'"]
    assert len(same(_ds(), _ds(Rows=256, SOPClassUID="1.2.3"))) == 2
    assert same(_ds(), _ds(PatientID=None)) == ["PatientID archive '' vs ours 'P1'"]


def test_size_limits_of_a_profile() -> None:
    aws = archives.AWS
    assert aws.request_budget(64 * 2**20, 50) == 64 * 2**20  # batch_max_bytes is lower
    assert aws.request_budget(2 * 10**9, 50) == 10**9 - 50 * archives.MULTIPART_PART_OVERHEAD
    # Google: no size limit, 30 minutes a transaction: at 125 kB/s, 90 % of that.
    google = archives.profile("google")
    assert google.request_budget(2 * 10**9, 50) == 2 * 10**9  # no line speed assumed
    assert google.request_budget(2 * 10**9, 50, 125_000) == int(0.9 * 1800 * 125_000)
    assert google.request_budget(64 * 2**20, 50, 125_000) == 64 * 2**20
    assert google.too_large(10**10) is None  # a large instance still goes, alone
    assert aws.too_large(10**9) is not None and aws.too_large(10**8) is None
    assert "1000000000 bytes" in (aws.too_large(10**9) or "")
    assert archives.GENERIC.too_large(10**12) is None


def test_upload_archive_is_validated() -> None:
    assert from_dict({}).upload.archive == "generic"
    assert from_dict({"upload": {"archive": "azure"}}).upload.archive == "azure"
    with pytest.raises(ConfigError, match=r"upload\.archive: must be one of 'generic'"):
        from_dict({"upload": {"archive": "gcp"}})


def test_every_profile_cites_its_sources() -> None:
    for profile in archives.PROFILES.values():
        assert profile.sources and all(
            s.startswith(("https://", "tests/")) for s in profile.sources
        ), profile.name


# -- the pipeline against the vendor doubles -------------------------------------------------

#: Each profile with its double's answer, and whether a crash re-send is checked by
#: WADO-RS metadata (Google stores an identical re-send: nothing to check).
VENDORS: dict[str, tuple[Callable[[], Answer], bool]] = {
    "generic": (duplicate_0111_answer, True),
    "dcm4chee": (dcm4chee_answer, True),
    "google": (google_answer, False),
    "azure": (azure_answer, True),
    "aws": (aws_answer, True),
}


def _bench(tmp_path: Path, archive: ScriptedArchive, profile: str, **upload: Any) -> Bench:
    bench = Bench(tmp_path, **archive.upload_config(archive=profile, **upload))
    bench.pipeline.metrics = Metrics()
    return bench


def _spool_file(bench: Bench, uid: str) -> Path:
    return bench.spool.path_of(bench.rows()[uid]["path"])


def _sent_before(bench: Bench, uid: str, times: int = 1) -> None:
    """The queue's record of earlier requests that carried *uid* (sends)."""
    bench.store.submit(
        lambda c: c.execute(
            "UPDATE instances SET sends = ? WHERE sop_instance_uid = ?", (times, uid)
        )
    ).result()


@pytest.mark.asyncio
@pytest.mark.parametrize("profile", list(VENDORS))
async def test_a_duplicate_after_a_crash_ends_uploaded(
    profile: str, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """The archive stores the batch, the connection drops before the answer (as a
    crash or timeout would have it): the re-send finds the instances there."""
    answer, checked = VENDORS[profile]
    scripted_archive.default = answer()
    scripted_archive.script(stored_then_dropped(answer()))
    bench = _bench(tmp_path, scripted_archive, profile)
    uids = [bench.add(), bench.add()]
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert [len(r) for r in scripted_archive.requests] == [2, 2]
    assert [rows[u]["attempts"] for u in uids] == [2, 2]
    assert [rows[u]["sends"] for u in uids] == [2, 2]
    assert set(scripted_archive.held) == set(uids)
    assert sorted(scripted_archive.metadata_requests) == (sorted(uids) if checked else [])
    m = bench.pipeline.metrics
    assert m is not None
    matches = m.registry.get_sample_value(
        "dicom_gateway_archive_verifications_total", {"result": "match"}
    )
    assert matches == (2 if checked else 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("profile", list(VENDORS))
async def test_a_conflicting_duplicate_fails_with_the_reason(
    profile: str, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """The archive holds another instance under our UIDs (another Patient ID), left by
    an earlier send: the instance fails with both values, and is not sent again."""
    scripted_archive.default = VENDORS[profile][0]()
    bench = _bench(tmp_path, scripted_archive, profile)
    uid = bench.add(patient_id="OURS")
    scripted_archive.hold(_spool_file(bench, uid), PatientID="THEIRS")
    _sent_before(bench, uid)
    async with bench.running() as task:
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    reason = rows[uid]["last_error"]
    assert reason.startswith(
        "archive holds a different instance under this UID: PatientID archive 'THEIRS' vs ours"
        " 'OURS'"
    ), reason
    assert rows[uid]["attempts"] == 1
    assert len(scripted_archive.requests) == 1
    assert scripted_archive.metadata_requests == [uid]
    if profile == "google":
        assert GOOGLE_CONFLICT in reason
    if profile == "azure":
        assert "(Azure 45070)" in reason


@pytest.mark.asyncio
async def test_a_failed_check_is_retried_never_counted(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.default = azure_answer()
    scripted_archive.metadata_script = [503]
    bench = _bench(tmp_path, scripted_archive, "azure")
    uid = bench.add()
    scripted_archive.hold(_spool_file(bench, uid))  # stored before a crash
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    # The first check answered 503: not counted, the instance sent and checked again.
    assert rows[uid]["attempts"] == 2
    assert scripted_archive.metadata_requests == [uid, uid]
    m = bench.pipeline.metrics
    assert m is not None
    name = "dicom_gateway_archive_verifications_total"
    results = {r: m.registry.get_sample_value(name, {"result": r}) for r in ("error", "match")}
    assert results == {"error": 1, "match": 1}


@pytest.mark.asyncio
async def test_google_0x0110_for_an_instance_it_does_not_hold_fails(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """Google answers 409/0x0110 for invalid DICOM too: not a duplicate when the store
    holds nothing under the UID, and not retried (it would be refused again)."""
    scripted_archive.default = failed_all(409, [0x0110])
    bench = _bench(tmp_path, scripted_archive, "google")
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    assert rows[uid]["attempts"] == 1
    assert rows[uid]["last_error"] == (
        "archive refused: processing failure, or other bytes stored under this UID (0x0110);"
        " but it serves no instance under these UIDs (WADO-RS metadata: 404): 0x0110 without"
        " a stored instance is a refusal of the content"
    )


@pytest.mark.asyncio
async def test_dcm4chee_conflicting_patient_id_fails_not_retried(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.default = dcm4chee_answer()
    bench = _bench(tmp_path, scripted_archive, "dcm4chee")
    earlier = bench.add(patient_id="FIRST")
    async with bench.running() as task:
        await bench.until("uploaded", task, _all(QueueState.UPLOADED))
        uid = bench.add(patient_id="SECOND")  # same study, another Patient ID
        bench.pipeline.wake()
        rows = await bench.until("failed", task, lambda r: r[uid]["state"] == QueueState.FAILED)
    assert rows[earlier]["state"] == QueueState.UPLOADED
    assert rows[uid]["attempts"] == 1
    assert rows[uid]["last_error"] == (
        "archive refused: conflicting Patient ID: differs from the study's earlier objects (0xA778)"
        ": Patient ID SECOND differs from Patient ID FIRST in previous received object of"
        f" Study[uid={bench.study}]."
    )


@pytest.mark.asyncio
async def test_dcm4chee_rejected_object_fails(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = _bench(tmp_path, scripted_archive, "dcm4chee")
    uid = bench.add()
    scripted_archive.default = dcm4chee_answer(rejected={uid})
    async with bench.running() as task:
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    assert rows[uid]["attempts"] == 1 and "(0xA771)" in rows[uid]["last_error"]


@pytest.mark.asyncio
@pytest.mark.parametrize("profile", list(archives.PROFILES))
async def test_mistyped_argument_fails_at_once(
    profile: str, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.default = failed_all(409, [0x0212])
    bench = _bench(tmp_path, scripted_archive, profile)
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    assert rows[uid]["attempts"] == 1 and len(scripted_archive.requests) == 1


@pytest.mark.asyncio
async def test_azure_45071_is_retried_then_stored(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = _bench(tmp_path, scripted_archive, "azure")
    uid = bench.add()
    scripted_archive.default = azure_answer(pending={uid})
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert rows[uid]["attempts"] == 2
    assert scripted_archive.metadata_requests == []  # stored the second time: nothing to check


@pytest.mark.asyncio
async def test_azure_warnings_are_recorded_while_stored(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = _bench(tmp_path, scripted_archive, "azure")
    warned, plain = bench.add(), bench.add()
    scripted_archive.default = azure_answer(
        warnings={warned: (45063, ('DICOM100: (0008,0020) - Content "20XX" does not validate',))}
    )
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert json.loads(rows[warned]["warnings"]) == [
        "0xB007 data set does not match SOP class (Azure 45063)",
        'attributes DICOM100: (0008,0020) - Content "20XX" does not validate',
    ]
    assert rows[plain]["warnings"] is None
    m = bench.pipeline.metrics
    assert m is not None
    for code in ("0xB007", "attributes"):
        assert m.registry.get_sample_value("dicom_gateway_stow_warnings_total", {"code": code}) == 1


@pytest.mark.asyncio
async def test_azure_parts_it_cannot_read_fail_alone(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """Failure items without UIDs: the unconfirmed instances go again in halves until
    each unreadable one is alone in its request, and then fail with the reason."""
    bench = _bench(tmp_path, scripted_archive, "azure", batch_max_instances=3)
    good, bad1, bad2 = bench.add(), bench.add(), bench.add()
    scripted_archive.default = azure_answer(unreadable={bad1, bad2})
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until(
            "settled", task, lambda r: {r[u]["state"] for u in (bad1, bad2)} == {QueueState.FAILED}
        )
    assert rows[good]["state"] == QueueState.UPLOADED
    assert [len(r) for r in scripted_archive.requests] == [3, 1, 1]
    for uid in (bad1, bad2):
        assert rows[uid]["attempts"] == 1
        assert rows[uid]["last_error"] == (
            "HTTP 409: archive could not read it: archive refused: processing failure"
            " (Azure 272) (0x0110)"
        )


@pytest.mark.asyncio
async def test_aws_request_limit_splits_batches_before_sending(
    scripted_archive: ScriptedArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 GB per request (here scaled down to 60 kB, on the profile and on the double):
    the batches are cut to fit before they are sent, and an instance larger than a
    request may be fails without being sent."""
    limit = 60_000
    monkeypatch.setitem(
        archives.PROFILES, "aws", dataclasses.replace(archives.AWS, max_request_bytes=limit)
    )
    scripted_archive.default = aws_answer(max_request_bytes=limit)
    bench = _bench(tmp_path, scripted_archive, "aws", batch_max_instances=4)
    small = [bench.add(), bench.add(), bench.add()]  # 39 kB each: one per request
    big = bench.add("OBXXXX1A.dcm")  # 486 kB
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until(
            "settled", task, lambda r: r[big]["state"] == QueueState.FAILED
            and all(r[u]["state"] == QueueState.UPLOADED for u in small),
        )  # fmt: skip
    assert scripted_archive.refusals == 0
    assert sorted(len(r) for r in scripted_archive.requests) == [1, 1, 1]
    assert all(size <= limit for size in scripted_archive.request_sizes)
    assert not any(big in r for r in scripted_archive.requests)
    assert rows[big]["last_error"].startswith(
        f"{rows[big]['upload_size']} bytes exceed the largest STOW-RS request AWS HealthImaging"
        f" takes ({limit} bytes, upload.archive = 'aws'); not sent"
    )


@pytest.mark.asyncio
async def test_aws_conflicting_resend_goes_to_a_non_primary_set_and_fails(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """AWS stores a conflicting re-send in a non-primary image set and says stored: the
    check of the re-send (the primary set's metadata) shows the conflict."""
    scripted_archive.default = aws_answer()
    bench = _bench(tmp_path, scripted_archive, "aws")
    uid = bench.add(patient_id="OURS")
    scripted_archive.hold(_spool_file(bench, uid), PatientID="THEIRS")
    _sent_before(bench, uid)
    async with bench.running() as task:
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    assert uid in scripted_archive.non_primary
    assert "PatientID archive 'THEIRS' vs ours 'OURS'" in rows[uid]["last_error"]


# -- warnings seen by the operator: the real gateway process -------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def test_warnings_are_shown_in_queue_ls_status_page_and_metrics(
    gateway_factory: GatewayFactory, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    src = tmp_path / "ct.dcm"
    sent = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), src)
    uid = str(sent.SOPInstanceUID)
    scripted_archive.default = azure_answer(warnings={uid: (45063, ("DICOM100: bad date",))})
    gw = gateway_factory(upload=scripted_archive.upload_config(archive="azure", compression="none"))
    assert storescu(gw.port, [src]).acknowledged == 1
    deadline = time.monotonic() + 60
    while {r["state"] for r in gw.rows()} != {QueueState.UPLOADED}:
        assert time.monotonic() < deadline, gw.log
        time.sleep(0.1)
    said = "0xB007 data set does not match SOP class (Azure 45063)"

    listing = _cli("queue", "ls", "--config", str(gw.config_path))
    assert listing.returncode == 0, listing.stderr
    assert f"warnings: {said}; attributes DICOM100: bad date" in listing.stdout
    as_json = json.loads(_cli("queue", "ls", "--config", str(gw.config_path), "--json").stdout)
    assert as_json[0]["warnings"] == [said, "attributes DICOM100: bad date"]

    web = WebClient(web_port(gw))
    status = web.get("/api/status?fresh=1").json()
    assert status["warnings"]["count"] == 1
    assert status["warnings"]["recent"][0]["sop_instance_uid"] == uid
    assert status["warnings"]["recent"][0]["warnings"][0] == said
    # Stored: a warning is no fault of the gateway's.
    assert not any("warning" in r for r in status["health"]["reasons"]), status["health"]
    page = web.get("/", headers={"Accept": "text/html"}).text
    assert 'Stored with warnings (<span id="warned-count">1</span>)' in page
    assert "DICOM100: bad date" in page
    metrics = web.get("/metrics").text
    assert 'dicom_gateway_stow_warnings_total{code="0xB007"} 1.0' in metrics
    assert gw.stop() == 0


# -- the real Orthanc behind nginx mTLS --------------------------------------------------


def _orthanc_post(lab: ArchiveLab, data: bytes) -> Any:
    req = urllib.request.Request(
        lab.orthanc_url + "/instances", data=data, headers={"Content-Type": "application/dicom"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _lab_upload(lab: ArchiveLab) -> dict[str, Any]:
    return {
        "dicomweb_url": lab.dicomweb_url,
        "ca_file": str(lab.ca_file),
        "client_cert": str(lab.client_cert),
        "client_key": str(lab.client_key),
        "archive": "orthanc",
    }


@pytest.mark.asyncio
async def test_orthanc_resend_of_an_instance_it_holds_is_checked_and_uploaded(
    archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    """Orthanc 1.10 answers a re-sent instance it holds with HTTP 200, listed as stored
    (tests/support/archive.py): the gateway checks its copy with WADO-RS metadata, through the
    same nginx with mutual TLS, before counting it."""
    bench = Bench(tmp_path, **_lab_upload(archive_lab))
    uid = bench.add()
    path = _spool_file(bench, uid)
    assert _orthanc_post(archive_lab, path.read_bytes())["Status"] == "Success"
    _sent_before(bench, uid)  # the gateway had sent it when it crashed
    row = bench.rows()[uid]
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert rows[uid]["attempts"] == 1
    log = await _access_log(archive_lab, "/metadata")
    wanted = (
        f"GET /dicom-web/studies/{bench.study}/series/{row['series_instance_uid']}"
        f'/instances/{uid}/metadata HTTP/1.1" 200'
    )
    assert wanted in log, log
    assert archive_lab.instance_count() == 1


@pytest.mark.asyncio
async def test_orthanc_conflicting_copies_fail_the_resend(tmp_path: Path) -> None:
    """With OverwriteInstances false (Orthanc's default) Orthanc keeps the copy it has
    and still lists the re-send as stored; the check shows the conflict.  The same UIDs
    under another Patient ID are a second instance to Orthanc, which WADO-RS then cannot
    find (404): that fails too, with what it means."""
    lab = ArchiveLab(tmp_path / "archive")
    config = json.loads((lab.work / "orthanc.json").read_text())
    config["OverwriteInstances"] = False
    (lab.work / "orthanc.json").write_text(json.dumps(config))
    lab.start()
    try:
        bench = Bench(tmp_path / "bench", **_lab_upload(lab))
        renumbered = bench.add(patient_id="OURS")
        repatiented = bench.add(patient_id="OURS")
        for uid, change in ((renumbered, {"InstanceNumber": 99}),
                            (repatiented, {"PatientID": "THEIRS"})):  # fmt: skip
            ds = pydicom.dcmread(_spool_file(bench, uid))
            for keyword, value in change.items():
                setattr(ds, keyword, value)
            buffer = tmp_path / f"{uid}.dcm"
            ds.save_as(buffer)
            assert _orthanc_post(lab, buffer.read_bytes())["Status"] == "Success"
            _sent_before(bench, uid)
        async with bench.running() as task:
            await bench.in_one_batch(task)
            rows = await bench.until("failed", task, _all(QueueState.FAILED))
        assert rows[renumbered]["last_error"] == (
            "archive holds a different instance under this UID: InstanceNumber archive '99' vs"
            " ours '1' (archive confirmed a re-send)"
        )
        assert rows[repatiented]["last_error"].startswith(
            "archive confirmed a re-send; but it serves no instance under these UIDs (WADO-RS"
            " metadata: 404): Orthanc keys instances by Patient ID too"
        )
        assert [rows[u]["attempts"] for u in (renumbered, repatiented)] == [1, 1]
        assert lab.instance_count() == 3  # ours was kept as a second instance
    finally:
        lab.stop()


async def _access_log(lab: ArchiveLab, wait_for: str) -> str:
    return await asyncio.to_thread(lab.nginx_access_log, wait_for)

"""Storage Commitment end to end, every peer real (issue 17).

The modality is Orthanc (tests/support/modality.py): it sends a study to the gateway
by C-STORE and requests Storage Commitment with its own SCU, and receives the
N-EVENT-REPORT on its DICOM port.  The archive is Orthanc + DICOMweb behind nginx
with mutual TLS (tests/support/archive.py); stopping nginx is the archive being
down, and its Lua filter refusing a PatientID is the archive refusing an instance.
The gateway runs as the real process (``python -m gateway run``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.gateway_proc import GatewayProcess, write_config
from .support.modality import OrthancModality, pairs_of
from .support.web_client import WebClient, web_port

#: PS3.4 J.3 Failure Reasons, as Orthanc lists them.
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


@dataclass
class Site:
    gw: GatewayProcess
    modality: OrthancModality
    archive: ArchiveLab

    def request_row(self, transaction_uid: str) -> Any:
        (row,) = self.gw.rows(
            "SELECT * FROM commitment_requests WHERE transaction_uid = ?", (transaction_uid,)
        )
        return row

    def report_status(self, transaction_uid: str) -> str | None:
        report = self.modality.report(transaction_uid)
        return None if report is None else str(report["Status"])


_modalities: list[OrthancModality] = []


@pytest.fixture(autouse=True)
def _kill_modalities() -> Iterator[None]:
    yield
    while _modalities:
        _modalities.pop().kill()


def site(
    factory: GatewayFactory, archive: ArchiveLab, tmp_path: Path, start: bool = True,
    **sections: dict[str, Any],
) -> Site:  # fmt: skip
    """A gateway uploading to *archive*, and an Orthanc modality both know."""
    gw = factory(start=False)
    modality = OrthancModality(tmp_path / "modality", gw.port)
    _modalities.append(modality)
    modality.start()
    config: dict[str, dict[str, Any]] = {
        "dimse": {"remote": [modality.remote]},
        "upload": {
            "dicomweb_url": archive.dicomweb_url,
            "ca_file": str(archive.ca_file),
            "client_cert": str(archive.client_cert),
            "client_key": str(archive.client_key),
            "compression": "none",
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 1.0,
        },
        "commitment": {"report_backoff_initial_seconds": 0.2, "report_backoff_max_seconds": 1.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    write_config(gw.config_path, gw.root, gw.port, **config)
    if start:
        gw.start()
    return Site(gw, modality, archive)


def study(tmp_path: Path, count: int, **attributes: str) -> list[Path]:
    """*count* CT instances of one new study, as files."""
    study_uid = generate_uid()
    paths = []
    for n in range(count):
        path = tmp_path / f"{study_uid[-8:]}-{n:03d}.dcm"
        corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path, study=study_uid)
        if attributes:
            ds = pydicom.dcmread(path)
            for keyword, value in attributes.items():
                setattr(ds, keyword, value)
            ds.save_as(path)
        paths.append(path)
    return paths


def send_and_request(s: Site, paths: list[Path], extra: list[tuple[str, str]] = ()) -> str:  # type: ignore[assignment]
    """The modality C-STOREs *paths* to the gateway, then requests commitment of them
    (and of *extra* pairs it never sent); the Transaction UID."""
    s.modality.send_to_gateway(s.modality.load(paths))
    return s.modality.request_commitment(pairs_of(paths) + list(extra))


def uids(paths: list[Path]) -> set[str]:
    return {uid for _, uid in pairs_of(paths)}


def successes(report: dict[str, Any]) -> set[str]:
    return {str(i["SOPInstanceUID"]) for i in report.get("Success", [])}


def failures(report: dict[str, Any]) -> dict[str, int]:
    return {str(i["SOPInstanceUID"]): int(i["FailureReason"]) for i in report.get("Failures", [])}


# -- Done when, line 1 ------------------------------------------------------------------


@pytest.mark.parametrize("verify", ["stow", "qido"])
def test_success_is_reported_only_once_every_instance_is_in_the_archive(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path, verify: str
) -> None:
    s = site(gateway_factory, archive_lab, tmp_path, commitment={"verify": verify})
    paths = study(tmp_path, 5)
    tx = send_and_request(s, paths)
    wait_until("the report", lambda: s.report_status(tx) not in (None, "Pending"))
    report = s.modality.report(tx)
    assert report is not None and report["Status"] == "Success", report
    assert successes(report) == uids(paths) and failures(report) == {}
    assert uids(paths) <= archive_lab.sop_instance_uids()
    # Every instance was confirmed by the archive before the report went.  The gateway
    # marks the request reported once the modality answered, so Orthanc can show the
    # report a moment before the row says so.
    wait_until("the request marked reported", lambda: s.request_row(tx)["reported_at"])
    row = s.request_row(tx)
    confirmed = s.gw.rows("SELECT confirmed_at FROM instances")
    assert len(confirmed) == 5
    assert all(r["confirmed_at"] is not None and r["confirmed_at"] <= row["reported_at"]
               for r in confirmed)  # fmt: skip
    assert (row["state"], row["event_type"]) == ("reported", 1)
    assert s.modality.reports_received(tx) == 1
    assert f"report of transaction {tx} delivered to MODALITY: event type 1" in s.gw.log
    if verify == "qido":
        # Confirmed by a search after the upload, not by the STOW-RS answer.
        assert "the archive's search found" in s.gw.log
        assert all(
            r["confirmed_at"] > r["uploaded_at"] for r in s.gw.rows("SELECT * FROM instances")
        )
        assert "GET /dicom-web/studies/" in archive_lab.nginx_access_log()
    assert s.gw.stop() == 0


def test_no_report_while_the_archive_is_down(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    archive_lab.stop_nginx()
    s = site(gateway_factory, archive_lab, tmp_path)
    paths = study(tmp_path, 4)
    tx = send_and_request(s, paths)
    wait_until(
        "upload attempts failing", lambda: s.gw.log.count("cannot connect to the archive") >= 3
    )
    time.sleep(2)  # more rounds of the reporter: still nothing to report
    assert s.report_status(tx) == "Pending"
    assert s.modality.reports_received(tx) == 0
    assert s.request_row(tx)["state"] == "waiting"
    archive_lab.start_nginx()
    wait_until("the report", lambda: s.report_status(tx) == "Success")
    report = s.modality.report(tx)
    assert report is not None and successes(report) == uids(paths)
    assert uids(paths) <= archive_lab.sop_instance_uids()
    assert s.gw.stop() == 0


def test_an_instance_the_archive_refuses_is_the_one_failure(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    # The archive's Lua filter refuses this PatientID; the gateway gives up on it
    # after two attempts (upload.max_attempts) and it becomes `failed`.
    s = site(gateway_factory, archive_lab, tmp_path, upload={"max_attempts": 2})
    good = study(tmp_path, 3)
    refused = study(tmp_path, 1, PatientID=archive_lab.rejected_patient_id)
    tx = send_and_request(s, good + refused)
    wait_until("the report", lambda: s.report_status(tx) not in (None, "Pending"))
    report = s.modality.report(tx)
    assert report is not None and report["Status"] == "Failure", report
    (refused_uid,) = uids(refused)
    assert failures(report) == {refused_uid: PROCESSING_FAILURE}
    assert successes(report) == uids(good)
    assert s.request_row(tx)["event_type"] == 2
    assert refused_uid not in archive_lab.sop_instance_uids()
    listing = subprocess.run(
        [sys.executable, "-m", "gateway", "commitment", "ls", "--config", str(s.gw.config_path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "reported  MODALITY" in listing and tx in listing
    assert f"failed {refused_uid} 0x0110 the archive did not take it" in listing
    assert s.gw.stop() == 0


def test_a_report_due_while_the_modality_is_down_arrives_when_it_is_back(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    archive_lab.stop_nginx()  # the report is not due before the modality is down
    s = site(gateway_factory, archive_lab, tmp_path)
    paths = study(tmp_path, 3)
    tx = send_and_request(s, paths)
    s.modality.kill()
    archive_lab.start_nginx()
    wait_until("report attempts failing", lambda: s.request_row(tx)["attempts"] >= 2)
    row = s.request_row(tx)
    assert row["state"] == "due" and row["last_error"]
    assert "Storage Commitment: modality MODALITY@127.0.0.1" in s.gw.log
    s.modality.start()  # its reports were in memory: it knows no such transaction now
    wait_until("the report", lambda: s.report_status(tx) == "Success")
    report = s.modality.report(tx)
    assert report is not None and successes(report) == uids(paths)
    time.sleep(1)
    assert s.modality.reports_received(tx) == 1
    assert s.request_row(tx)["state"] == "reported"
    assert s.gw.stop() == 0


def test_a_kill_between_the_request_and_the_report_still_reports_exactly_once(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    archive_lab.stop_nginx()
    s = site(gateway_factory, archive_lab, tmp_path)
    paths = study(tmp_path, 3)
    tx = send_and_request(s, paths)  # answered Success: durable
    s.gw.kill()  # SIGKILL
    archive_lab.start_nginx()
    s.gw.start()
    wait_until("the report", lambda: s.report_status(tx) == "Success")
    report = s.modality.report(tx)
    assert report is not None and successes(report) == uids(paths)
    time.sleep(2)  # a second report would have come by now
    assert s.modality.reports_received(tx) == 1
    assert s.request_row(tx)["state"] == "reported"
    assert s.gw.stop() == 0


# -- Done when, line 2 ------------------------------------------------------------------


def test_an_instance_never_received_fails_after_the_timeout(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    s = site(gateway_factory, archive_lab, tmp_path, commitment={"timeout_hours": 0.003})
    paths = study(tmp_path, 2)
    never = (pairs_of(paths)[0][0], generate_uid())
    tx = send_and_request(s, paths, [never])
    deadline = datetime.fromisoformat(s.request_row(tx)["deadline_at"])
    confirmed = "SELECT 1 FROM instances WHERE confirmed_at IS NOT NULL"
    wait_until("the two sent are confirmed", lambda: len(s.gw.rows(confirmed)) == 2)
    if (deadline - datetime.now(UTC)).total_seconds() > 1:
        assert s.report_status(tx) == "Pending", "reported before the timeout"
    wait_until("the report", lambda: s.report_status(tx) not in (None, "Pending"))
    assert datetime.now(UTC) >= deadline
    report = s.modality.report(tx)
    assert report is not None and report["Status"] == "Failure"
    assert failures(report) == {never[1]: NO_SUCH_OBJECT_INSTANCE}
    assert successes(report) == uids(paths)
    assert s.gw.stop() == 0


# -- Done when, line 3 ------------------------------------------------------------------


def test_retention_keeps_the_files_of_an_unreported_commitment(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    s = site(gateway_factory, archive_lab, tmp_path, retention={"keep_bytes": 0})
    committed = study(tmp_path, 3)
    other = study(tmp_path, 1)  # sent, but no commitment asks for it
    # The request arrives before the upload (the archive is down meanwhile), and the
    # modality is gone by the time the report is due.
    archive_lab.stop_nginx()
    tx = send_and_request(s, committed)
    s.modality.send_to_gateway(s.modality.load(other))
    s.modality.kill()
    archive_lab.start_nginx()
    wait_until("the report due and failing", lambda: s.request_row(tx)["attempts"] >= 1)
    (other_uid,) = uids(other)
    wait_until(
        "retention pruned the instance no commitment holds",
        lambda: s.gw.rows("SELECT path FROM instances WHERE sop_instance_uid = ?",
                          (other_uid,))[0]["path"] is None,
    )  # fmt: skip
    held = s.gw.rows("SELECT path FROM instances WHERE sop_instance_uid != ?", (other_uid,))
    assert len(held) == 3 and all(r["path"] is not None for r in held)
    assert len(s.gw.spool_files()) == 3
    assert all((s.gw.spool / r["path"]).exists() for r in held)
    s.modality.start()
    wait_until("the report", lambda: s.report_status(tx) == "Success")
    wait_until("the files pruned once reported", lambda: s.gw.spool_files() == [])
    assert s.gw.stop() == 0


# -- Done when, line 4 ------------------------------------------------------------------


def _cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "study", *args, "--config", str(gw.config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_study_sent_during_an_outage_shows_its_stages_before_and_after(
    gateway_factory: GatewayFactory, archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    archive_lab.stop_nginx()
    s = site(gateway_factory, archive_lab, tmp_path, study={"quiet_seconds": 1})
    paths = study(tmp_path, 3)
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    tx = send_and_request(s, paths)
    api = WebClient(web_port(s.gw))

    def stage() -> str:
        reply = api.get(f"/api/studies/{study_uid}")
        assert reply.status == 200, reply
        return str(reply.json()["stage"])

    # During the outage: received and compressed (kept as received), not uploaded.
    wait_until("compressed, complete", lambda: stage() == "compressed")
    one = api.get(f"/api/studies/{study_uid}").json()
    assert (one["instances"], one["received"]["count"], one["compressed"]["count"]) == (3, 3, 3)
    assert (one["uploaded"]["count"], one["confirmed"]["count"], one["committed"]["count"]) == (
        0, 0, 0,
    )  # fmt: skip
    assert one["calling_aes"] == ["MODALITY"] and one["seconds_to_confirmed"] is None
    listed = api.get("/api/studies?limit=5").json()["studies"]
    assert [p["study_instance_uid"] for p in listed] == [study_uid]
    ls = _cli(s.gw, "ls")
    assert ls.returncode == 0, ls.stderr
    (line,) = [x for x in ls.stdout.splitlines() if study_uid in x]
    assert line.split()[1:7] == ["compressed", "3", "3", "0", "0", "0"]
    wait_until("the page's stage", lambda: ">compressed</td>" in api.get("/").text)
    assert f'<tr data-study="{study_uid}">' in api.get("/").text
    assert api.get("/api/studies/1.2.3.999").status == 404
    assert api.get("/api/studies/not-a-uid").status == 400

    # The archive back: confirmed, then committed once the modality has the report.
    archive_lab.start_nginx()
    wait_until("the report", lambda: s.report_status(tx) == "Success")
    wait_until("committed", lambda: stage() == "committed")
    one = api.get(f"/api/studies/{study_uid}").json()
    assert all(one[k]["count"] == 3 for k in ("uploaded", "confirmed", "committed"))
    assert one["seconds_to_confirmed"] > 0
    show = _cli(s.gw, "show", study_uid)
    assert show.returncode == 0, show.stderr
    assert "stage      committed  (complete)" in show.stdout
    assert "confirmed      3/3" in show.stdout and "committed      3/3" in show.stdout
    assert json.loads(_cli(s.gw, "show", study_uid, "--json").stdout)["stage"] == "committed"
    wait_until("the page's stage", lambda: ">committed</td>" in api.get("/").text)
    # Observed by the tracker (every 10 s) in the histogram of /metrics.
    metric = "dicom_gateway_study_confirmation_seconds_count 1.0"
    wait_until("the histogram", lambda: metric in api.get("/metrics").text, timeout=30)
    assert s.gw.stop() == 0

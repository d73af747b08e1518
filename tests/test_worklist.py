"""Modality Worklist from the local cache, with DCMTK as the peers.

DCMTK ``wlmscpfs`` is the upstream RIS, serving worklist files this test writes;
DCMTK ``findscu -W`` is the modality.  Each query is put to the RIS and to the
gateway, and the answers must be the same.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .conftest import GatewayFactory
from .support.gateway_proc import GatewayProcess
from .support.peers import free_port, tool, wait_for_port
from .support.web_client import WebClient, web_port


def _day(offset: int) -> str:
    # Today when asked, not when the module was imported: a run crosses midnight.
    return (date.today() + timedelta(days=offset)).strftime("%Y%m%d")


# (accession, patient name, charset, patient id, modality, station AE, day offset, time)
ITEMS = [
    ("ACC001", "Dvořák^Zdeněk", "ISO_IR 192", "P001", "CT", "CT_ROOM1", 0, "080000"),
    ("ACC002", "Müller^Jürgen", "ISO_IR 100", "P002", "MR", "MR_ROOM1", 0, "093000"),
    ("ACC003", "Smith^John", "", "P003", "CT", "CT_ROOM2", 1, "110000"),
    ("ACC004", "Dvořáková^Eva", "ISO_IR 192", "P004", "US", "US_ROOM1", 2, "140000"),
    ("ACC005", "Jones^Mary", "", "P005", "CT", "CT_ROOM1", 0, "150000"),
    ("ACC006", "Old^Appointment", "", "P006", "CT", "CT_ROOM1", -10, "080000"),
]


def _item(acc: str, name: str, charset: str, pid: str, modality: str, station: str,
          offset: int, tm: str) -> Dataset:  # fmt: skip
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = acc
    ds.RequestedProcedureID = f"RP{acc}"
    ds.RequestedProcedureDescription = f"{modality} exam"
    ds.StudyInstanceUID = generate_uid()
    ds.ReferringPhysicianName = "Referrer^Rita"
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station
    step.ScheduledProcedureStepStartDate = _day(offset)
    step.ScheduledProcedureStepStartTime = tm
    step.ScheduledPerformingPhysicianName = "Tech^Tom"
    step.ScheduledProcedureStepDescription = f"{modality} step"
    step.ScheduledProcedureStepID = f"SPS{acc}"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


def _write_wl(directory: Path, ds: Dataset) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = directory / f"{ds.AccessionNumber}.wl"
    ds.save_as(path, enforce_file_format=True)
    return path


class Ris:
    """DCMTK wlmscpfs serving worklist files from a directory."""

    def __init__(self, root: Path) -> None:
        self.files = root / "RIS"
        self.files.mkdir(parents=True)
        (self.files / "lockfile").touch()
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            # -csk: answer with each file's own Specific Character Set, as a RIS does.
            [tool("wlmscpfs"), "-csk", "-dfp", str(self.root), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def ris(tmp_path: Path) -> Iterator[Ris]:
    ris = Ris(tmp_path / "wlroot")
    for spec in ITEMS:
        _write_wl(ris.files, _item(*spec))
    ris.start()
    yield ris
    ris.stop()


def findscu(port: int, called: str, keys: list[str | bytes], out: Path,
            extra: tuple[str, ...] = ()) -> list[Dataset]:  # fmt: skip
    """Ask with DCMTK findscu -W; return the response identifiers."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args: list[str | bytes] = [tool("findscu"), "-W", "-aec", called, "-X", "-od", str(out),
                               *extra]  # fmt: skip
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode(errors="replace")
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


RETURN_KEYS = [
    "SpecificCharacterSet", "PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
]  # fmt: skip

QUERIES: dict[str, list[str | bytes]] = {
    "all": [],
    "modality": ["ScheduledProcedureStepSequence[0].Modality=CT"],
    "station": ["ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT_ROOM1"],
    "date range": [f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate="
                   f"{_day(0)}-{_day(1)}"],
    "date and modality": [
        f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={_day(0)}",
        "ScheduledProcedureStepSequence[0].Modality=CT",
    ],
    "utf-8 name wildcard": ["SpecificCharacterSet=ISO_IR 192", "PatientName=Dvořák*"],
    # findscu puts argv bytes on the wire as they are: these are Latin-1 bytes.
    "latin-1 name wildcard": [
        "SpecificCharacterSet=ISO_IR 100",
        "PatientName=Mül*".encode("latin-1"),
    ],
    "patient id": ["PatientID=P003"],
    "accession": ["AccessionNumber=ACC004"],
}  # fmt: skip


def _summary(responses: list[Dataset]) -> set[tuple[str, str, str]]:
    return {
        (str(r.AccessionNumber), str(r.PatientName), str(r.get("PatientID", ""))) for r in responses
    }


def _keys(query: list[str | bytes]) -> list[str | bytes]:
    named = {(k if isinstance(k, str) else k.decode("latin-1")).split("=")[0] for k in query}
    return query + [k for k in RETURN_KEYS if k not in named]


def _gateway(factory: GatewayFactory, ris: Ris, **extra: object) -> GatewayProcess:
    worklist = {"upstream_host": "127.0.0.1", "upstream_port": ris.port,
                "upstream_ae": "RIS", "refresh_seconds": 1, **extra}  # fmt: skip
    gw = factory(worklist=worklist)
    _wait_for(lambda: "worklist refreshed from upstream" in gw.log, "first refresh")
    return gw


def _wait_for(predicate: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_queries_answer_what_the_ris_holds(
    gateway_factory: GatewayFactory, ris: Ris, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, ris)
    for name, query in QUERIES.items():
        upstream = findscu(ris.port, "RIS", _keys(query), tmp_path / "ris" / name)
        ours = findscu(gw.port, "DICOMGW", _keys(query), tmp_path / "gw" / name)
        expected = {s for s in _summary(upstream) if s[0] != "ACC006"}  # expired locally
        assert _summary(ours) == expected, name
        assert expected, f"query {name!r} should find something"
    # Names in other character sets round-trip, and say which set they are in.
    (dvorak,) = findscu(gw.port, "DICOMGW", _keys(["AccessionNumber=ACC001"]),
                        tmp_path / "gw" / "dvorak")  # fmt: skip
    assert str(dvorak.PatientName) == "Dvořák^Zdeněk"
    assert dvorak.SpecificCharacterSet == "ISO_IR 192"
    (muller,) = findscu(gw.port, "DICOMGW", _keys(["AccessionNumber=ACC002"]),
                        tmp_path / "gw" / "muller")  # fmt: skip
    assert str(muller.PatientName) == "Müller^Jürgen"
    assert muller.SpecificCharacterSet == "ISO_IR 100"
    assert gw.stop() == 0


def test_a_query_asked_again_in_one_association_gets_the_same_answer(
    gateway_factory: GatewayFactory, ris: Ris, tmp_path: Path
) -> None:
    """Later answers come from remembered responses, encoded once (gateway/dicom/find_encoding.py).

    findscu asks three times in one association and checks that each response answers
    its own request's message ID; the implicit VR run makes the gateway encode the same
    remembered responses in a second transfer syntax.
    """
    gw = _gateway(gateway_factory, ris)

    def key(r: Dataset) -> str:
        return str(r.AccessionNumber)

    for name in ("all", "utf-8 name wildcard", "latin-1 name wildcard"):
        query = _keys(QUERIES[name])
        once = sorted(findscu(gw.port, "DICOMGW", query, tmp_path / name / "once"), key=key)
        assert once, name
        for syntax in ("-xe", "-xi"):  # explicit, then implicit VR little endian
            out = tmp_path / name / syntax
            thrice = findscu(gw.port, "DICOMGW", query, out, extra=(syntax, "--repeat", "3"))
            assert len(thrice) == 3 * len(once), (name, syntax)
            for n in range(3):
                answer = sorted(thrice[n * len(once) : (n + 1) * len(once)], key=key)
                assert [r.to_json_dict() for r in answer] == [r.to_json_dict() for r in once]
    assert gw.stop() == 0


def test_cache_answers_with_the_ris_down_and_follows_it_back(
    gateway_factory: GatewayFactory, ris: Ris, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, ris)
    before = _summary(findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "before"))
    assert len(before) == len(ITEMS) - 1  # the expired appointment is not served

    ris.stop()
    _wait_for(lambda: "worklist refresh from upstream failed" in gw.log, "a failed refresh")
    during = _summary(findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "during"))
    assert during == before
    rows = gw.rows("SELECT * FROM worklist_sources")
    assert rows[0]["last_error"] and rows[0]["last_success_at"]
    # What the WorklistSourceStale alert (monitoring/alerts.yml) compares.
    metrics = {
        (s.name, s.labels.get("source")): s.value
        for family in text_string_to_metric_families(WebClient(web_port(gw)).get("/metrics").text)
        for s in family.samples
    }
    assert metrics["dicom_gateway_worklist_refresh_interval_seconds", "upstream-mwl"] == 1
    last = metrics["dicom_gateway_worklist_last_refresh_timestamp_seconds", "upstream-mwl"]
    assert 0 < last < time.time()

    # The RIS comes back changed: one item gone, one new.
    (ris.files / "ACC003.wl").unlink()
    _write_wl(ris.files, _item("ACC007", "New^Patient", "", "P007", "MR", "MR_ROOM1", 0, "170000"))
    ris.start()
    wanted = ({s[0] for s in before} - {"ACC003"}) | {"ACC007"}

    def followed() -> bool:
        answer = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "after")
        return {s[0] for s in _summary(answer)} == wanted

    _wait_for(followed, "the cache to follow the RIS", timeout=20)
    assert gw.rows("SELECT * FROM worklist_sources")[0]["last_error"] is None
    assert gw.stop() == 0


def test_cache_survives_a_restart_without_the_ris(
    gateway_factory: GatewayFactory, ris: Ris, tmp_path: Path
) -> None:
    gw = _gateway(gateway_factory, ris)
    before = _summary(findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "before"))
    assert gw.stop() == 0
    ris.stop()
    gw.start()
    after = _summary(findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "after"))
    assert after == before and after
    assert gw.stop() == 0

"""Worklist cache sources: a UPS-RS worklist, a drop folder, and the query prefilter.

The UPS-RS server here is a test double, written for these tests from PS3.18 11.9
(Search Transaction): no real UPS-RS server is packaged for Debian (Orthanc's DICOMweb
plugin has no UPS-RS), so :class:`UpsServer` follows the standard's text: matching on
the query parameters, 200 with a JSON array of DICOM JSON workitems, 204 No Content
when nothing matches, ``limit``/``offset`` paging with a ``Warning: 299`` header (or
HTTP 206, as older editions had it) when there is more, behind real TLS that requires
a client certificate from its own test CA (trustme).  The gateway and DCMTK
``findscu -W`` (the modality) are real, as in tests/test_worklist.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.config import ConfigError, from_dict
from gateway.store import Store
from gateway.worklist import service as worklist_module
from gateway.worklist.cache import prefilter, replace_source
from gateway.worklist.match import find
from gateway.worklist.service import Worklist, to_cached
from gateway.worklist.sources import (
    DROP_SOURCE,
    UPS_SOURCE,
    DropFolder,
    UpsClient,
    is_entry_name,
    ups_to_mwl,
)

from .conftest import GatewayFactory
from .support.gateway_proc import GatewayProcess
from .support.peers import free_port
from .test_worklist import ITEMS, Ris, _day, _item, _keys, _wait_for, _write_wl, findscu
from .test_worklist import ris as ris  # the fixture: wlmscpfs with the test items

UPS_PUSH_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"


# --- the UPS-RS test server ---------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue = value
    code.CodingSchemeDesignator = scheme
    code.CodeMeaning = meaning
    return code


def workitem(acc: str, name: str, pid: str, modality: str, station: str, offset: int,
             tm: str, state: str = "SCHEDULED") -> dict[str, Any]:  # fmt: skip
    """A UPS workitem as DICOM JSON, as a UPS-RS server keeps it (PS3.4 CC.2.5)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = name
    ds.PatientID = pid
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.ProcedureStepState = state
    ds.ScheduledProcedureStepPriority = "HIGH"
    ds.ProcedureStepLabel = f"{modality} exam"
    ds.WorklistLabel = "RADIOLOGY"
    ds.ScheduledProcedureStepStartDateTime = f"{_day(offset)}{tm}"
    ds.ScheduledStationNameCodeSequence = Sequence([_code(station, "99GW", f"{station} room")])
    ds.ScheduledStationClassCodeSequence = Sequence([_code(modality, "DCM", modality)])
    performer = Dataset()
    performer.HumanPerformerName = "Tech^Tina"
    ds.ScheduledHumanPerformersSequence = Sequence([performer])
    request = Dataset()
    request.AccessionNumber = acc
    request.StudyInstanceUID = generate_uid()
    request.RequestedProcedureID = f"RP{acc}"
    request.RequestedProcedureDescription = f"{modality} of something"
    request.RequestingPhysician = "Requester^Rob"
    ds.ReferencedRequestSequence = Sequence([request])
    return ds.to_json_dict()


def _value(item: dict[str, Any], keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    element = item.get(f"{tag:08X}", {})
    values = element.get("Value") or [""]
    return str(values[0])


@dataclass
class CertFiles:
    ca: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


class UpsServer:
    """PS3.18 11.9 UPS-RS Search Transaction over mutual TLS (see the module docstring)."""

    def __init__(self, work: Path, max_results: int = 1000, partial_status: bool = False) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"https://localhost:{self.port}/ups"
        self.max_results = max_results
        self.partial_status = partial_status
        self.workitems: list[dict[str, Any]] = []
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ca = trustme.CA()
        self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_ctx.verify_mode = ssl.CERT_REQUIRED  # a client certificate, or nothing
        ca.configure_trust(self._server_ctx)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(self._server_ctx)
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        client = ca.issue_cert("gateway-test-box")
        client.cert_chain_pems[0].write_to_path(str(work / "client.pem"))
        client.private_key_pem.write_to_path(str(work / "client.key"))
        stranger = trustme.CA().issue_cert("stranger-box")  # signed by a CA nobody trusts
        stranger.cert_chain_pems[0].write_to_path(str(work / "stranger.pem"))
        stranger.private_key_pem.write_to_path(str(work / "stranger.key"))
        for key in ("client.key", "stranger.key"):
            os.chmod(work / key, 0o600)
        self.certs = CertFiles(
            work / "ca.pem", work / "client.pem", work / "client.key",
            work / "stranger.pem", work / "stranger.key",
        )  # fmt: skip

    def set_workitems(self, items: list[dict[str, Any]]) -> None:
        with self._lock:
            self.workitems = list(items)

    # -- the Search Transaction ---------------------------------------------------------
    def _matches(self, item: dict[str, Any], params: dict[str, str]) -> bool:
        for key, wanted in params.items():
            if key in ("limit", "offset", "includefield", "fuzzymatching"):
                continue
            have = _value(item, key)
            if key == "ScheduledProcedureStepStartDateTime" and "-" in wanted:
                low, _, high = wanted.partition("-")
                # DT range: a bound of lower precision stands for its whole span.
                if (low and have[: len(low)] < low) or (high and have[: len(high)] > high):
                    return False
            elif have != wanted:
                return False
        return True

    async def _search(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        self.requests.append(params)
        if request.headers.get("Accept") not in ("application/dicom+json", "*/*"):
            return web.Response(status=406)
        try:
            offset = int(params.get("offset", "0"))
            limit = int(params.get("limit", str(self.max_results)))
            with self._lock:
                found = [i for i in self.workitems if self._matches(i, params)]
        except (KeyError, ValueError):
            return web.Response(status=400, text="invalid query parameter")
        page = found[offset : offset + min(limit, self.max_results)]
        if not page:
            return web.Response(status=204)
        more = offset + len(page) < len(found)
        headers = {"Content-Type": "application/dicom+json"}
        status = 200
        if more and self.partial_status:
            status = 206
        elif more:
            headers["Warning"] = "299 ups-test: There are additional results that can be requested"
        return web.Response(status=status, body=json.dumps(page).encode(), headers=headers)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> UpsServer:
        ready = threading.Event()
        app = web.Application()
        app.router.add_get("/ups/workitems", self._search)

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(app, handle_signals=False)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._server_ctx)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="ups-server", daemon=True)
        self._thread.start()
        assert ready.wait(15), "UPS-RS test server did not start"
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=15)
        self._thread = self._loop = None


@pytest.fixture
def ups(tmp_path: Path) -> Iterator[UpsServer]:
    server = UpsServer(tmp_path / "ups", max_results=2).start()
    yield server
    server.stop()


UPS_ITEMS = [
    workitem("UPS001", "Šťastný^Jan", "U001", "CT", "CT_ROOM1", 0, "081500"),
    workitem("UPS002", "Brown^Bob", "U002", "MR", "MR_ROOM1", 0, "100000"),
    workitem("UPS003", "Green^Gina", "U003", "CT", "CT_ROOM2", 1, "120000"),
    workitem("UPS004", "White^Walt", "U004", "US", "US_ROOM1", 2, "090000"),
    workitem("UPS005", "Done^Already", "U005", "CT", "CT_ROOM1", 0, "070000", "COMPLETED"),
    workitem("UPS006", "Old^Order", "U006", "CT", "CT_ROOM1", -10, "070000"),
]


def _ups_gateway(
    factory: GatewayFactory, server: UpsServer, stranger: bool = False, **worklist: object
) -> GatewayProcess:
    c = server.certs
    cert, key = (c.stranger_cert, c.stranger_key) if stranger else (c.client_cert, c.client_key)
    return factory(
        upload={"ca_file": str(c.ca), "client_cert": str(cert), "client_key": str(key)},
        worklist={"ups_url": server.url, "refresh_seconds": 1, **worklist},
    )


def _accessions(responses: list[Dataset]) -> set[str]:
    return {str(r.AccessionNumber) for r in responses}


def _source(gw: GatewayProcess, source: str) -> Any:
    rows = gw.rows("SELECT * FROM worklist_sources WHERE source = ?", (source,))
    return rows[0] if rows else None


# --- UPS-RS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worklist", "upload", "key"),
    [
        ({"ups_url": "http://ris.example/ups"}, {}, "worklist.ups_url"),
        ({"ups_url": "https://ris.example/ups"}, {"client_cert": "c.pem"}, "upload.client_key"),
        ({"drop_scan_seconds": 0}, {}, "worklist.drop_scan_seconds"),
    ],
)
def test_source_config_is_checked(
    worklist: dict[str, Any], upload: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        from_dict({"worklist": worklist, "upload": upload})
    assert raised.value.key == key


def test_ups_workitem_maps_to_an_mwl_item() -> None:
    mwl = ups_to_mwl(Dataset.from_json(UPS_ITEMS[0]))
    assert str(mwl.PatientName) == "Šťastný^Jan" and mwl.PatientID == "U001"
    assert mwl.IssuerOfPatientID == "HOSP" and mwl.PatientSex == "O"
    assert mwl.AccessionNumber == "UPS001" and mwl.RequestedProcedureID == "RPUPS001"
    assert mwl.StudyInstanceUID == UPS_ITEMS[0]["0040A370"]["Value"][0]["0020000D"]["Value"][0]
    assert mwl.RequestedProcedurePriority == "HIGH"
    (step,) = mwl.ScheduledProcedureStepSequence
    assert step.Modality == "CT"
    assert step.ScheduledStationAETitle == "CT_ROOM1"
    assert step.ScheduledStationName == "CT_ROOM1 room"
    assert step.ScheduledProcedureStepStartDate == _day(0)
    assert step.ScheduledProcedureStepStartTime == "081500"
    assert str(step.ScheduledPerformingPhysicianName) == "Tech^Tina"
    assert step.ScheduledProcedureStepDescription == "CT exam"

    # Modality straight from the workitem wins; a workitem code names it otherwise.
    ups = Dataset.from_json(UPS_ITEMS[1])
    del ups.ScheduledStationClassCodeSequence
    assert "Modality" not in ups_to_mwl(ups).ScheduledProcedureStepSequence[0]
    ups.ScheduledWorkitemCodeSequence = Sequence([_code("MR", "DCM", "Magnetic Resonance")])
    assert ups_to_mwl(ups).ScheduledProcedureStepSequence[0].Modality == "MR"
    ups.Modality = "OT"
    assert ups_to_mwl(ups).ScheduledProcedureStepSequence[0].Modality == "OT"
    # A start with an offset from UTC and a fraction keeps the local date and time.
    ups.ScheduledProcedureStepStartDateTime = "20261124093000.5+0100"
    step = ups_to_mwl(ups).ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (
        "20261124",
        "093000.5",
    )


def test_ups_items_are_served_followed_and_kept_while_the_server_is_down(
    gateway_factory: GatewayFactory, ups: UpsServer, tmp_path: Path
) -> None:
    ups.set_workitems(UPS_ITEMS)
    gw = _ups_gateway(gateway_factory, ups)
    _wait_for(lambda: "worklist refreshed from UPS-RS" in gw.log, "first UPS-RS refresh")

    # Scheduled and not expired only; the server pages two at a time (Warning 299).
    everything = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "all")
    assert _accessions(everything) == {"UPS001", "UPS002", "UPS003", "UPS004"}
    first = next(r for r in ups.requests if r.get("offset") == "0")
    assert first["ProcedureStepState"] == "SCHEDULED"
    assert first["ScheduledProcedureStepStartDateTime"] == f"{_day(-1)}-"
    assert {"0", "2"} <= {r["offset"] for r in ups.requests}
    query = [f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={_day(0)}",
             "ScheduledProcedureStepSequence[0].Modality=CT"]  # fmt: skip
    (ct_today,) = findscu(gw.port, "DICOMGW", _keys(query), tmp_path / "ct-today")
    assert ct_today.AccessionNumber == "UPS001"
    assert str(ct_today.PatientName) == "Šťastný^Jan"
    assert ct_today.SpecificCharacterSet == "ISO_IR 192"
    step = ct_today.ScheduledProcedureStepSequence[0]
    assert step.ScheduledStationAETitle == "CT_ROOM1"
    assert step.ScheduledProcedureStepStartTime == "081500"
    row = _source(gw, UPS_SOURCE)
    assert row["item_count"] == 4 and row["last_error"] is None and row["last_success_at"]
    seen = gw.rows("SELECT DISTINCT source, last_seen_at IS NOT NULL AS seen FROM worklist_items")
    assert [tuple(r) for r in seen] == [(UPS_SOURCE, 1)]

    # The worklist changes upstream: one workitem done, one new.
    ups.set_workitems([*UPS_ITEMS[1:], workitem("UPS007", "New^Nina", "U007", "MR",
                                                "MR_ROOM1", 0, "160000")])  # fmt: skip

    def followed() -> bool:
        answer = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "after")
        return _accessions(answer) == {"UPS002", "UPS003", "UPS004", "UPS007"}

    _wait_for(followed, "the cache to follow the UPS-RS worklist")

    # The server goes away: the cache keeps answering, the error is recorded.
    ups.stop()
    _wait_for(lambda: "worklist refresh from UPS-RS failed" in gw.log, "a failed refresh")
    during = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "during")
    assert _accessions(during) == {"UPS002", "UPS003", "UPS004", "UPS007"}
    row = _source(gw, UPS_SOURCE)
    assert "cannot connect to the UPS-RS server" in row["last_error"]
    assert row["last_success_at"] and row["item_count"] == 4

    # Back, with nothing scheduled (204 No Content): an empty worklist is an answer too.
    ups.set_workitems([])
    ups.start()
    _wait_for(lambda: _source(gw, UPS_SOURCE)["item_count"] == 0, "an empty refresh")
    assert findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "empty") == []
    assert _source(gw, UPS_SOURCE)["last_error"] is None
    assert gw.stop() == 0


def test_a_refused_client_certificate_is_a_clear_recorded_error(
    gateway_factory: GatewayFactory, ups: UpsServer, tmp_path: Path
) -> None:
    ups.set_workitems(UPS_ITEMS)
    gw = _ups_gateway(gateway_factory, ups, stranger=True)
    _wait_for(lambda: _source(gw, UPS_SOURCE) is not None, "a refresh attempt")
    row = _source(gw, UPS_SOURCE)
    assert row["last_success_at"] is None and row["item_count"] == 0
    assert "client_cert" in row["last_error"], row["last_error"]
    assert "worklist refresh from UPS-RS failed" in gw.log and "client_cert" in gw.log
    assert findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "none") == []
    assert gw.stop() == 0


@pytest.mark.asyncio
async def test_ups_client_follows_206_paging_and_takes_204_as_empty(tmp_path: Path) -> None:
    server = UpsServer(tmp_path / "ups", max_results=2, partial_status=True)
    server.set_workitems([i for i in UPS_ITEMS if _value(i, "ProcedureStepState") == "SCHEDULED"])
    c = server.certs
    config = from_dict({
        "upload": {"ca_file": str(c.ca), "client_cert": str(c.client_cert),
                   "client_key": str(c.client_key)},
        "worklist": {"ups_url": server.url + "/"},
    })  # fmt: skip
    await asyncio.to_thread(server.start)
    try:
        answer = await UpsClient(config).scheduled(_day(-1))
        assert {str(w.ReferencedRequestSequence[0].AccessionNumber) for w in answer.workitems} == {
            "UPS001", "UPS002", "UPS003", "UPS004",
        }  # fmt: skip
        assert answer.problems == []
        assert [r["offset"] for r in server.requests] == ["0", "2"]
        server.set_workitems([])
        assert (await UpsClient(config).scheduled(_day(-1))).workitems == []
    finally:
        await asyncio.to_thread(server.stop)


# --- drop folder --------------------------------------------------------------------------


def _json_item(acc: str, name: str, modality: str, offset: int) -> dict[str, Any]:
    spec = (acc, name, "", f"P{acc}", modality, f"{modality}_ROOM1", offset, "101500")
    return _item(*spec).to_json_dict()  # no character set: DICOM JSON is Unicode


def test_drop_folder_names() -> None:
    assert is_entry_name("a.json") and is_entry_name("b.WL")
    for name in (".a.json", "a.json.swp", ".a.json.swp", "a.json~", "#a.json#", "a.txt",
                 "a.wl.part", "lockfile"):  # fmt: skip
        assert not is_entry_name(name), name


def test_drop_folder_loads_both_formats_and_skips_a_bad_file(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "one.json").write_text(json.dumps(_json_item("D001", "Dvořák^Ola", "CT", 0)),
                                   encoding="utf-8")  # fmt: skip
    (drop / "two.json").write_text(json.dumps([_json_item("D002", "Two^A", "MR", 0),
                                               _json_item("D003", "Two^B", "CT", 1)]))  # fmt: skip
    wl = _write_wl(drop, _item("D004", "Müller^Wl", "ISO_IR 100", "PD004", "US", "US_ROOM1",
                               0, "120000"))  # fmt: skip
    (drop / "broken.json").write_text('{"00100010": {"vr": "PN", "Value": [')
    (drop / "noitem.json").write_text(json.dumps({"00100020": {"vr": "LO", "Value": ["X"]}}))
    (drop / "broken.wl").write_bytes(wl.read_bytes()[:300])
    (drop / "notdicom.wl").write_text("(0010,0010) PN [Text^Dump]\n")
    # Not entries: a dotfile, an editor's swap file, a file in a subfolder.
    (drop / ".hidden.json").write_text(json.dumps(_json_item("X001", "Hidden^X", "CT", 0)))
    (drop / "one.json.swp").write_text(json.dumps(_json_item("X002", "Swap^X", "CT", 0)))
    (drop / "sub").mkdir()
    (drop / "sub" / "deep.json").write_text(json.dumps(_json_item("X003", "Deep^X", "CT", 0)))

    gw = gateway_factory(worklist={"drop_folder": str(drop), "drop_scan_seconds": 1})
    _wait_for(lambda: "worklist drop folder loaded" in gw.log, "the first scan")
    answer = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "all")
    assert _accessions(answer) == {"D001", "D002", "D003", "D004"}
    names = {str(r.AccessionNumber): (str(r.PatientName), r.get("SpecificCharacterSet"))
             for r in answer}  # fmt: skip
    assert names["D001"] == ("Dvořák^Ola", "ISO_IR 192")
    assert names["D004"] == ("Müller^Wl", "ISO_IR 100")
    row = _source(gw, DROP_SOURCE)
    assert row["item_count"] == 4 and row["last_success_at"]
    for bad in ("broken.json: not valid JSON", "noitem.json: no Scheduled Procedure Step",
                "broken.wl: ", "notdicom.wl: "):  # fmt: skip
        assert bad in row["last_error"], row["last_error"]

    # Unchanged files are not read again, so each bad one is logged once.
    attempt = row["last_attempt_at"]
    for _ in range(2):
        _wait_for(lambda a=attempt: _source(gw, DROP_SOURCE)["last_attempt_at"] != a, "a rescan")
        attempt = _source(gw, DROP_SOURCE)["last_attempt_at"]
    for name in ("broken.json", "noitem.json", "broken.wl", "notdicom.wl"):
        assert gw.log.count(f"skipping {name}:") == 1, name

    # Removing a file removes its items; repairing one adds its items and clears its error.
    wl.unlink()
    (drop / "broken.json").write_text(json.dumps([_json_item("D005", "Fixed^F", "CT", 0)]))

    def followed() -> bool:
        answer = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "after")
        return _accessions(answer) == {"D001", "D002", "D003", "D005"}

    _wait_for(followed, "the cache to follow the drop folder")
    error = _source(gw, DROP_SOURCE)["last_error"]
    assert "broken.json" not in error and "broken.wl" in error and "noitem.json" in error
    assert gw.stop() == 0


def test_drop_folder_scan_reads_only_what_changed(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_json_item("A1", "A^A", "CT", 0)))
    folder = DropFolder(tmp_path, lambda name, index, ds: (name, ds))
    first = folder.scan()
    assert first.changed and [name for name, _ in first.items] == ["a.json"]
    assert not folder.scan().changed
    (tmp_path / "a.json").write_text(json.dumps([_json_item("A1", "A^A", "CT", 0)] * 2))
    again = folder.scan()
    assert again.changed and len(again.items) == 2
    (tmp_path / "a.json").unlink()
    gone = folder.scan()
    assert gone.changed and gone.items == []


def test_drop_folder_keeps_what_convert_made_not_the_datasets(tmp_path: Path) -> None:
    """The gateway keeps cache rows per file (few objects), numbered within the file."""
    items = [_json_item(f"A{n}", "A^A", "CT", 0) for n in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(items))
    (tmp_path / "b.json").write_text(json.dumps(_json_item("B1", "B^B", "MR", 0)))
    folder = DropFolder(tmp_path, lambda name, index, ds: (name, index, str(ds.AccessionNumber)))
    scan = folder.scan()
    assert scan.items == [("a.json", 0, "A0"), ("a.json", 1, "A1"), ("a.json", 2, "A2"),
                          ("b.json", 0, "B1")]  # fmt: skip
    assert all(isinstance(i, tuple) for seen in folder._seen.values() for i in seen.items)
    # A new file before the others does not renumber their items.
    (tmp_path / "0.json").write_text(json.dumps(_json_item("Z1", "Z^Z", "US", 0)))
    assert folder.scan().items[1:] == scan.items


def test_all_three_sources_together(
    gateway_factory: GatewayFactory, ups: UpsServer, ris: Ris, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "hand.json").write_text(json.dumps(_json_item("D001", "Hand^Made", "CT", 0)))
    ups.set_workitems(UPS_ITEMS[:2])
    gw = _ups_gateway(gateway_factory, ups, upstream_host="127.0.0.1", upstream_port=ris.port,
                      upstream_ae="RIS", drop_folder=str(drop))  # fmt: skip
    _wait_for(lambda: len(gw.rows("SELECT * FROM worklist_sources")) == 3, "all three sources")
    answer = findscu(gw.port, "DICOMGW", _keys([]), tmp_path / "all")
    from_ris = {spec[0] for spec in ITEMS if spec[6] >= -1}
    assert _accessions(answer) == from_ris | {"UPS001", "UPS002", "D001"}
    counts = {r["source"]: r["item_count"] for r in gw.rows("SELECT * FROM worklist_sources")}
    assert counts == {"upstream-mwl": len(from_ris), UPS_SOURCE: 2, DROP_SOURCE: 1}
    assert gw.stop() == 0


# --- the query prefilter ------------------------------------------------------------------


def _prefilter_items() -> list[Dataset]:
    items = []
    for i, modality in enumerate(["CT", "MR", "CT", "US", "CT", "MR"]):
        station = f"{modality}_ROOM{i % 2}"
        items.append(
            _item(f"PF{i:03d}", f"N{i}^T", "", f"PID{i}", modality, station, i % 3, "1000")
        )
    # Items the columns cannot describe: two steps, an ACR-NEMA date, no date, no modality.
    two = _item("PF100", "Two^Steps", "", "PID100", "CT", "CT_ROOM0", 0, "080000")
    second = Dataset()
    second.Modality = "MR"
    second.ScheduledStationAETitle = "MR_ROOM1"
    second.ScheduledProcedureStepStartDate = _day(1)
    two.ScheduledProcedureStepSequence.append(second)
    dotted = _item("PF101", "Dotted^Date", "", "PID101", "CT", "CT_ROOM0", 0, "080000")
    _set(dotted.ScheduledProcedureStepSequence[0], "ScheduledProcedureStepStartDate", DOTTED)
    undated = _item("PF102", "No^Date", "", "PID102", "MR", "MR_ROOM1", 0, "080000")
    del undated.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate
    nomod = _item("PF103", "No^Modality", "", "PID103", "CT", "CT_ROOM1", 0, "080000")
    del nomod.ScheduledProcedureStepSequence[0].Modality
    return [*items, two, dotted, undated, nomod]


DOTTED = f"{_day(1)[:4]}.{_day(1)[4:6]}.{_day(1)[6:]}"  # an ACR-NEMA date, still seen


def _set(ds: Dataset, keyword: str, value: object) -> None:
    # Unvalidated, as values arrive from a modality or a RIS.
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE))


def _query(top: dict[str, str] | None = None, **step_keys: object) -> Dataset:
    query = Dataset()
    query.AccessionNumber = ""
    for key, value in (top or {}).items():
        _set(query, key, value)
    step = Dataset()
    step.Modality = ""
    step.ScheduledProcedureStepStartDate = ""
    for key, value in step_keys.items():
        _set(step, key, value)
    query.ScheduledProcedureStepSequence = Sequence([step])
    return query


PREFILTER_QUERIES = {
    "universal": _query(),
    "date": _query(ScheduledProcedureStepStartDate=_day(0)),
    "date range": _query(ScheduledProcedureStepStartDate=f"{_day(1)}-{_day(2)}"),
    "open low": _query(ScheduledProcedureStepStartDate=f"{_day(1)}-"),
    "open high": _query(ScheduledProcedureStepStartDate=f"-{_day(0)}"),
    "spaced range": _query(ScheduledProcedureStepStartDate=f"{_day(0)} - {_day(1)}"),
    "dotted": _query(ScheduledProcedureStepStartDate=DOTTED),
    "modality": _query(Modality="MR"),
    "modality wildcard": _query(Modality="M?"),
    "modality star": _query(Modality="*"),
    "date and modality": _query(ScheduledProcedureStepStartDate=_day(1), Modality="MR"),
    "station": _query(ScheduledStationAETitle="CT_ROOM0"),
    "station wildcard": _query(ScheduledStationAETitle="*ROOM1"),
    "patient id": _query({"PatientID": "PID3"}),
    "accession wildcard": _query({"AccessionNumber": "PF10*"}),
    "empty value": _query(Modality='""'),
    "list of modalities": _query(Modality=["CT", "US"]),
}


# pydicom warns about the ACR-NEMA date each time it reads the item: expected here.
@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("name", PREFILTER_QUERIES)
def test_prefilter_never_drops_a_match(name: str, store: Store) -> None:
    """The SQL prefilter only narrows: the answer equals matching the whole cache."""
    items = _prefilter_items()
    store.submit(replace_source("test", [to_cached("test", ds) for ds in items])).result()
    worklist = Worklist(from_dict({"worklist": {"expire_after_days": 30}}), store)
    query = PREFILTER_QUERIES[name]
    expected = sorted(r.AccessionNumber for r in find(items, query))
    assert sorted(r.AccessionNumber for r in worklist.answer(query)) == expected
    if name in ("date and modality", "modality", "patient id"):
        assert prefilter(query)[0], "this query should narrow in SQL"
    # Answered twice: the second time from the parsed items kept in memory.
    assert sorted(r.AccessionNumber for r in worklist.answer(query)) == expected


def test_a_remembered_answer_follows_the_cache(store: Store) -> None:
    item = _item("RA001", "Before^Name", "", "PRA1", "CT", "CT_ROOM1", 0, "0800")
    store.submit(replace_source("test", [to_cached("test", item)])).result()
    worklist = Worklist(from_dict({}), store)
    query = _query({"PatientName": ""}, ScheduledProcedureStepStartDate=_day(0), Modality="CT")
    (first,) = worklist.answer(query)
    (again,) = worklist.answer(query)
    assert again is first  # remembered: the same rows gave the same responses
    item.PatientName = "After^Name"
    other = _item("RA002", "Other^Name", "", "PRA2", "CT", "CT_ROOM2", 0, "0900")
    items = [to_cached("test", item), to_cached("test", other)]
    store.submit(replace_source("test", items)).result()
    names = sorted(str(r.PatientName) for r in worklist.answer(query))
    assert names == ["After^Name", "Other^Name"]
    store.submit(replace_source("test", [])).result()
    assert list(worklist.answer(query)) == []


def test_what_the_worklist_keeps_in_memory_is_bounded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed items and remembered responses stay below their limits; answers stay whole."""
    monkeypatch.setattr(worklist_module, "_PARSED_KEPT", 5)
    monkeypatch.setattr(worklist_module, "_RESPONSES_KEPT", 4)
    items = [_item(f"BK{n:03d}", f"Kept^{n}", "", f"PBK{n}", "CT" if n % 2 else "MR",
                   "ROOM1", 0, "0800") for n in range(8)]  # fmt: skip
    store.submit(replace_source("test", [to_cached("test", ds) for ds in items])).result()
    worklist = Worklist(from_dict({}), store)
    everything = _query({"PatientName": ""})
    assert len(list(worklist.answer(everything))) == 8
    assert len(worklist._parsed) <= 5
    assert not worklist._answers  # 8 responses: answered, not remembered
    ct = _query({"PatientName": ""}, Modality="CT")
    mr = _query({"PatientName": ""}, Modality="MR")
    assert len(list(worklist.answer(ct))) == 4
    mr_first = list(worklist.answer(mr))
    assert len(mr_first) == 4 and sum(len(r) for _, r in worklist._answers.values()) == 4
    assert all(a is b for a, b in zip(worklist.answer(mr), mr_first, strict=True))
    again = sorted(str(r.PatientName) for r in worklist.answer(ct))
    assert again == [f"Kept^{n}" for n in (1, 3, 5, 7)]

"""MPPS: the modality's N-CREATE / N-SET, stored durably and forwarded upstream in order.

The modality is pynetdicom's SCU (``Association.send_n_create`` / ``send_n_set``).
The upstream MPPS SCP is a hand-written test double (:class:`UpstreamMpps`, a small
pynetdicom SCP): DCMTK has no MPPS SCP and no Debian package provides one.  It keeps
the PS3.4 F.7.2 rules an RIS keeps (a duplicate N-CREATE is 0x0111, an N-SET on a
finished step 0x0110) and records every request it is sent, in order.  The gateway
runs as the real process (``python -m gateway run``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_CREATE
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from gateway import config as gw_config
from gateway.config import ConfigError
from gateway.dicom import patches
from gateway.dicom.tcp import NO_DELAY_HANDLERS
from gateway.mpps import scp
from gateway.mpps.forwarder import Outcome, classify
from gateway.mpps.outbox import Message
from gateway.mpps.scp import (
    COMPLETED,
    CREATE,
    DISCONTINUED,
    IN_PROGRESS,
    SET,
    Refused,
    check_create,
    check_set,
)
from gateway.store import Store
from gateway.worklist.cache import StepRef, refers_to

from .conftest import GatewayFactory
from .support.gateway_proc import GatewayProcess
from .support.peers import free_port, wait_for_port
from .support.web_client import WebClient, web_port
from .test_config import _cli
from .test_worklist import RETURN_KEYS, Ris, findscu
from .test_worklist import ris as ris  # the fixture

MPPS_CLASS = str(ModalityPerformedProcedureStep)
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


# -- the upstream MPPS SCP (test double) ------------------------------------------------


@dataclass
class Received:
    kind: str
    uid: str
    dataset: dict[str, Any]  # DICOM JSON
    status: int = 0


@dataclass
class UpstreamMpps:
    """A minimal MPPS SCP that keeps the F.7.2 rules and records what it is sent."""

    port: int = field(default_factory=free_port)
    refuse: dict[str, int] = field(default_factory=dict)  # uid -> status for its N-CREATE
    received: list[Received] = field(default_factory=list)
    #: (kind, uid) whose handler waits for ``release`` before answering
    hold: tuple[str, str] | None = None
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.steps: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> UpstreamMpps:
        # pynetdicom leaves a socket the gateway reset (a stop mid-association) for the
        # garbage collector, which warns; the gateway's own guard closes it.
        patches.install()
        ae = AE(ae_title="RIS_MPPS")
        ae.add_supported_context(ModalityPerformedProcedureStep, SYNTAXES)
        handlers = [(evt.EVT_N_CREATE, self._on_create), (evt.EVT_N_SET, self._on_set)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _record(self, kind: str, uid: str, ds: Dataset) -> Received:
        rec = Received(kind, uid, ds.to_json_dict())
        with self._lock:
            self.received.append(rec)
        if self.hold == (kind, uid):
            self.hold = None
            self.holding.set()
            self.release.wait(60)
        return rec

    def _on_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID)
        rec = self._record(CREATE, uid, event.attribute_list)
        with self._lock:
            if uid in self.refuse:
                rec.status = self.refuse[uid]
            elif uid in self.steps:
                rec.status = 0x0111
            else:
                self.steps[uid] = str(event.attribute_list.PerformedProcedureStepStatus)
        return rec.status, None

    def _on_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        uid = str(event.request.RequestedSOPInstanceUID)
        mods = event.modification_list
        rec = self._record(SET, uid, mods)
        with self._lock:
            if uid not in self.steps:
                rec.status = 0x0112
            elif self.steps[uid] in (COMPLETED, DISCONTINUED):
                rec.status = 0x0110
            elif "PerformedProcedureStepStatus" in mods:
                self.steps[uid] = str(mods.PerformedProcedureStepStatus)
        return rec.status, None

    def accepted(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(r.kind, r.uid) for r in self.received if r.status == 0]


@pytest.fixture
def upstream() -> Iterator[UpstreamMpps]:
    up = UpstreamMpps()
    yield up
    up.release.set()
    up.stop()


# -- the modality (pynetdicom SCU) ------------------------------------------------------


class Modality:
    def __init__(self, port: int, syntaxes: list[str] = SYNTAXES) -> None:
        ae = AE(ae_title="CT_ROOM1")
        ae.add_requested_context(ModalityPerformedProcedureStep, syntaxes)
        self.assoc: Association = ae.associate(
            "127.0.0.1", port, ae_title="DICOMGW", evt_handlers=NO_DELAY_HANDLERS
        )
        assert self.assoc.is_established

    def create(self, uid: str | None, ds: Dataset) -> int:
        status, _ = self.assoc.send_n_create(ds, MPPS_CLASS, uid)
        return int(status.Status)

    def set(self, uid: str, ds: Dataset) -> int:
        status, _ = self.assoc.send_n_set(ds, MPPS_CLASS, uid)
        return int(status.Status)

    def close(self) -> None:
        self.assoc.release()


def send(
    port: int, *requests: tuple[str, str | None, Dataset], syntaxes: list[str] = SYNTAXES
) -> list[int]:
    """Send (kind, uid, data set) requests on one association; their statuses."""
    modality = Modality(port, syntaxes)
    try:
        return [
            modality.create(uid, ds) if kind == CREATE else modality.set(str(uid), ds)
            for kind, uid, ds in requests
        ]
    finally:
        modality.close()


def started(
    accession: str = "ACC001", sps_id: str = "SPSACC001", study: str | None = None
) -> Dataset:
    """An N-CREATE attribute list as a CT sends it when the exam starts."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Dvořák^Zdeněk"
    ds.PatientID = "P001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ref = Dataset()
    ref.StudyInstanceUID = generate_uid() if study is None else study
    ref.AccessionNumber = accession
    ref.RequestedProcedureID = f"RP{accession}" if accession else ""
    ref.ScheduledProcedureStepID = sps_id
    ref.ScheduledProcedureStepDescription = "CT step"
    ref.ReferencedStudySequence = Sequence()
    ds.ScheduledStepAttributesSequence = Sequence([ref])
    ds.PerformedProcedureStepID = "PPS-1"
    ds.PerformedStationAETitle = "CT_ROOM1"
    ds.PerformedStationName = "CT 1"
    ds.PerformedLocation = "Room 1"
    ds.PerformedProcedureStepStartDate = "20261204"
    ds.PerformedProcedureStepStartTime = "083000"
    ds.PerformedProcedureStepStatus = IN_PROGRESS
    ds.PerformedProcedureStepDescription = "CT Thorax"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = Sequence()
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = Sequence()
    ds.PerformedSeriesSequence = Sequence()
    return ds


def progress(status: str = IN_PROGRESS, series: int = 0) -> Dataset:
    """An N-SET modification list; with *series* series in its Performed Series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    if status != IN_PROGRESS:
        ds.PerformedProcedureStepEndDate = "20261204"
        ds.PerformedProcedureStepEndTime = "084500"
    items = []
    for n in range(series):
        item = Dataset()
        item.PerformingPhysicianName = "Tech^Tom"
        item.ProtocolName = f"Thorax {n}"
        item.OperatorsName = "Op^Olga"
        item.SeriesInstanceUID = generate_uid()
        item.SeriesDescription = f"series {n}"
        item.RetrieveAETitle = ""
        image = Dataset()
        image.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        image.ReferencedSOPInstanceUID = generate_uid()
        item.ReferencedImageSequence = Sequence([image])
        item.ReferencedNonImageCompositeSOPInstanceSequence = Sequence()
        items.append(item)
    ds.PerformedSeriesSequence = Sequence(items)
    return ds


def _gateway(
    factory: GatewayFactory, up: UpstreamMpps | None, mpps: dict[str, Any] | None = None,
    **sections: Any,
) -> GatewayProcess:  # fmt: skip
    m: dict[str, Any] = {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0,
                         "timeout_seconds": 10}  # fmt: skip
    if up is not None:
        m |= {"upstream_host": "127.0.0.1", "upstream_port": up.port, "upstream_ae": "RIS_MPPS"}
    return factory(mpps=m | (mpps or {}), **sections)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def outbox(gw: GatewayProcess) -> list[Any]:
    return gw.rows("SELECT * FROM mpps_outbox ORDER BY seq")


# -- end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_create_and_sets_reach_the_upstream_intact_and_in_order(
    gateway_factory: GatewayFactory, upstream: UpstreamMpps, syntax: str
) -> None:
    upstream.start()
    gw = _gateway(gateway_factory, upstream)
    uid = generate_uid()
    sent = [
        (CREATE, uid, started()),
        (SET, uid, progress(IN_PROGRESS, series=1)),
        (SET, uid, progress(COMPLETED, series=2)),
    ]
    assert send(gw.port, *sent, syntaxes=[syntax]) == [0, 0, 0]

    wait_for(lambda: len(upstream.accepted()) == 3, "three messages upstream")
    assert upstream.accepted() == [(CREATE, uid), (SET, uid), (SET, uid)]
    for (_, _, ds), rec in zip(sent, upstream.received, strict=True):
        assert rec.dataset == ds.to_json_dict()  # every attribute as the modality sent it
    assert str(Dataset.from_json(upstream.received[0].dataset).PatientName) == "Dvořák^Zdeněk"
    wait_for(lambda: all(r["state"] == "sent" for r in outbox(gw)), "outbox marked sent")
    (step,) = gw.rows("SELECT * FROM mpps")
    assert step["status"] == COMPLETED
    merged = scp.from_bytes(step["dataset"])
    assert len(merged.PerformedSeriesSequence) == 2  # the last N-SET replaced the sequence
    assert merged.PerformedProcedureStepEndTime == "084500"
    assert "delivered upstream" in gw.log
    assert gw.stop() == 0


def test_create_without_an_instance_uid_gets_one(gateway_factory: GatewayFactory) -> None:
    gw = _gateway(gateway_factory, None)
    assert send(gw.port, (CREATE, None, started())) == [0]
    (step,) = gw.rows("SELECT * FROM mpps")
    assert gw_config.is_valid_uid(step["sop_instance_uid"])
    assert gw.stop() == 0


def test_upstream_down_keeps_messages_across_restart_and_kill_and_delivers_in_order(
    gateway_factory: GatewayFactory, upstream: UpstreamMpps
) -> None:
    gw = _gateway(gateway_factory, upstream)  # the upstream is not started: down
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    assert send(gw.port, (CREATE, a, started()), (SET, a, progress(COMPLETED, 1))) == [0, 0]
    assert send(gw.port, (CREATE, b, started("ACC002", "SPSACC002"))) == [0]
    wait_for(lambda: "MPPS upstream" in gw.log and "unavailable" in gw.log, "a failed attempt")
    assert any(r["last_error"] and r["attempts"] for r in outbox(gw))

    assert gw.stop() == 0  # a clean restart
    gw.start()
    assert send(gw.port, (CREATE, c, started("ACC003", "SPSACC003"))) == [0]
    gw.kill()  # kill -9 right after the modality had its answer
    gw.start()
    assert send(gw.port, (SET, b, progress(DISCONTINUED))) == [0]
    assert [r["state"] for r in outbox(gw)] == ["pending"] * 5

    upstream.start()
    wanted = [(CREATE, a), (SET, a), (CREATE, b), (CREATE, c), (SET, b)]
    wait_for(lambda: len(upstream.accepted()) == 5, "five messages upstream")
    assert upstream.accepted() == wanted
    assert [r.status for r in upstream.received] == [0] * 5  # nothing sent twice
    wait_for(lambda: [r["state"] for r in outbox(gw)] == ["sent"] * 5, "outbox sent")
    assert gw.stop() == 0


@pytest.mark.parametrize("silent", ["association", "n-create"])
def test_stop_is_prompt_while_the_upstream_is_silent(
    gateway_factory: GatewayFactory, upstream: UpstreamMpps, silent: str
) -> None:
    """A stop does not wait out the upstream timeouts (60 s here), and the message
    that was on its way is sent again at the next start."""
    uid = generate_uid()
    connection: socket.socket | None = None
    with socket.socket() as listener:
        if silent == "association":
            listener.bind(("127.0.0.1", upstream.port))  # accepts TCP, never answers
            listener.listen(4)
        else:
            upstream.hold = (CREATE, uid)
            upstream.start()
        gw = _gateway(gateway_factory, upstream, mpps={"timeout_seconds": 60})
        assert send(gw.port, (CREATE, uid, started())) == [0]
        if silent == "association":
            listener.settimeout(30)
            # The forwarder connected and waits for an answer that never comes.
            connection, _ = listener.accept()
        else:
            assert upstream.holding.wait(30)
        assert gw.stop(timeout=20) == 0
        if connection is not None:
            connection.close()
    upstream.release.set()
    assert "stopped cleanly" in gw.log
    (row,) = outbox(gw)
    assert row["state"] in ("pending", "sending")


@pytest.mark.parametrize("cut", ["create", "final set"])
def test_resend_after_a_kill_mid_send_counts_as_delivered(
    gateway_factory: GatewayFactory, upstream: UpstreamMpps, cut: str
) -> None:
    """Killed after the upstream took a message but before we recorded it: the
    re-send meets 0x0111 (N-CREATE) or 0x0110 (final N-SET), and that is delivery."""
    uid = generate_uid()
    upstream.hold = (CREATE, uid) if cut == "create" else (SET, uid)
    upstream.start()
    gw = _gateway(gateway_factory, upstream)
    assert send(gw.port, (CREATE, uid, started()), (SET, uid, progress(COMPLETED))) == [0, 0]
    assert upstream.holding.wait(30)
    gw.kill()
    upstream.release.set()
    gw.start()
    wait_for(lambda: [r["state"] for r in outbox(gw)] == ["sent", "sent"], "outbox sent")
    kinds = [(r.kind, r.status) for r in upstream.received]
    if cut == "create":
        assert kinds == [(CREATE, 0), (CREATE, 0x0111), (SET, 0)]
    else:
        assert kinds == [(CREATE, 0), (SET, 0), (SET, 0x0110)]
    assert "counted as delivered: upstream already has it" in gw.log
    assert upstream.steps[uid] == COMPLETED
    assert gw.stop() == 0


def test_a_final_refusal_fails_that_step_only(
    gateway_factory: GatewayFactory, upstream: UpstreamMpps
) -> None:
    bad, good = generate_uid(), generate_uid()
    upstream.refuse[bad] = 0x0106
    upstream.start()
    gw = _gateway(gateway_factory, upstream)
    statuses = send(
        gw.port,
        (CREATE, bad, started()),
        (SET, bad, progress(COMPLETED)),
        (CREATE, good, started("ACC002", "SPSACC002")),
        (SET, good, progress(COMPLETED)),
    )
    assert statuses == [0, 0, 0, 0]
    wait_for(lambda: len(upstream.accepted()) == 2, "the good step upstream")
    assert upstream.accepted() == [(CREATE, good), (SET, good)]
    wait_for(lambda: all(r["state"] in ("sent", "failed") for r in outbox(gw)), "settled")
    rows = {(r["sop_instance_uid"], r["kind"]): r for r in outbox(gw)}
    assert rows[bad, CREATE]["state"] == "failed"
    assert "0x0106" in rows[bad, CREATE]["last_error"]
    assert rows[bad, SET]["state"] == "failed"
    assert "earlier message" in rows[bad, SET]["last_error"]
    assert not any(r.kind == SET and r.uid == bad for r in upstream.received)  # never sent
    assert "failed permanently" in gw.log
    # The refusal is visible where a technician and the monitoring look.
    web = WebClient(web_port(gw))
    doc = web.get("/api/status?fresh=1").json()
    assert doc["mpps"]["failed"] == 2
    assert doc["mpps"]["pending"] == 0
    assert doc["mpps"]["forwarding_to"] == f"RIS_MPPS@127.0.0.1:{upstream.port}"
    assert {f["sop_instance_uid"] for f in doc["mpps"]["failed_messages"]} == {bad}
    assert any("MPPS message(s) refused" in r for r in doc["health"]["reasons"])
    page = web.get("/").text
    assert bad in page and "dicom-gateway mpps retry --all" in page
    metrics = {
        (s.name, s.labels.get("state")): s.value
        for family in text_string_to_metric_families(web.get("/metrics").text)
        for s in family.samples
    }
    assert metrics["dicom_gateway_mpps_outbox_messages", "failed"] == 2
    assert metrics["dicom_gateway_mpps_outbox_messages", "pending"] == 0

    # The technician sees the refusal on the command line, has the RIS fixed, and sends
    # the step again: its two messages go out in their original order.
    listing = _cli("mpps", "ls", "--config", str(gw.config_path), "--state", "failed")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count(bad) == 2 and "0x0106" in listing.stdout
    assert good not in listing.stdout
    del upstream.refuse[bad]
    retried = _cli("mpps", "retry", "--config", str(gw.config_path), bad)
    assert retried.returncode == 0, retried.stderr
    assert "2 failed MPPS message(s) queued again" in retried.stdout
    wait_for(lambda: len(upstream.accepted()) == 4, "the retried step upstream")
    assert upstream.accepted()[2:] == [(CREATE, bad), (SET, bad)]
    wait_for(lambda: all(r["state"] == "sent" for r in outbox(gw)), "all sent")
    assert _cli("mpps", "retry", "--config", str(gw.config_path)).returncode == 2  # no UID
    assert gw.stop() == 0


def test_invalid_requests_are_refused_with_the_right_status(
    gateway_factory: GatewayFactory,
) -> None:
    gw = _gateway(gateway_factory, None)
    uid = generate_uid()
    no_status = started()
    del no_status.PerformedProcedureStepStatus
    empty_status = started()
    empty_status.PerformedProcedureStepStatus = ""
    statuses = send(
        gw.port,
        (SET, generate_uid(), progress(COMPLETED)),  # unknown instance
        (CREATE, generate_uid(), _with_status(COMPLETED)),  # not IN PROGRESS
        (CREATE, generate_uid(), no_status),
        (CREATE, generate_uid(), empty_status),
        (CREATE, uid, started()),
        (CREATE, uid, started()),  # duplicate
        (SET, uid, progress("DONE")),  # not a step status
        (SET, uid, progress(IN_PROGRESS)),
        (SET, uid, progress(COMPLETED)),
        (SET, uid, progress(IN_PROGRESS)),  # after COMPLETED
        (SET, uid, progress(COMPLETED)),  # after COMPLETED, again
    )
    assert statuses == [
        0x0112, 0x0106, 0x0120, 0x0121,
        0x0000, 0x0111, 0x0106, 0x0000, 0x0000, 0x0110, 0x0110,
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns the sender about the bad UID
        assert send(gw.port, (CREATE, "1.02.3", started())) == [0x0117]
        assert send(gw.port, (SET, "1.2.x", progress(COMPLETED))) == [0x0117]
    # Only what was accepted is kept and queued.
    assert [(r["sop_instance_uid"], r["kind"]) for r in outbox(gw)] == [
        (uid, CREATE), (uid, SET), (uid, SET),
    ]  # fmt: skip
    assert [r["status"] for r in gw.rows("SELECT * FROM mpps")] == [COMPLETED]
    assert "may no longer be updated" in gw.log
    assert gw.stop() == 0


def _with_status(status: str) -> Dataset:
    ds = started()
    ds.PerformedProcedureStepStatus = status
    return ds


def test_worklist_items_are_marked_and_the_mark_survives_refreshes(
    gateway_factory: GatewayFactory, ris: Ris, tmp_path: Path
) -> None:
    worklist = {"upstream_host": "127.0.0.1", "upstream_port": ris.port,
                "upstream_ae": "RIS", "refresh_seconds": 1}  # fmt: skip
    gw = _gateway(gateway_factory, None, worklist=worklist)
    wait_for(lambda: "worklist refreshed from upstream" in gw.log, "first refresh")
    keys = [*RETURN_KEYS, "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus"]

    def answer(name: str) -> dict[str, str]:
        found = findscu(gw.port, "DICOMGW", list(keys), tmp_path / name)
        return {
            str(r.AccessionNumber): str(
                r.ScheduledProcedureStepSequence[0].get("ScheduledProcedureStepStatus", "")
            )
            for r in found
        }

    before = answer("before")
    assert before["ACC001"] == before["ACC002"] == ""
    # ACC001 referenced as a modality does (accession, step ID, the study UID it was
    # given), ACC002 by its Study Instance UID alone.
    study = {}
    for acc in ("ACC001", "ACC002"):
        (item,) = findscu(gw.port, "DICOMGW", [*RETURN_KEYS, f"AccessionNumber={acc}"],
                          tmp_path / acc)  # fmt: skip
        study[acc] = str(item.StudyInstanceUID)
    one, two = generate_uid(), generate_uid()
    by_study = started(accession="", sps_id="", study=study["ACC002"])
    assert send(gw.port, (CREATE, one, started("ACC001", "SPSACC001", study["ACC001"])),
                (CREATE, two, by_study)) == [0, 0]  # fmt: skip
    during = answer("during")
    assert during["ACC001"] == during["ACC002"] == "STARTED"

    assert send(gw.port, (SET, one, progress(COMPLETED)), (SET, two, progress(DISCONTINUED))) == [
        0,
        0,
    ]
    refreshes = gw.log.count("worklist refreshed from upstream")
    wait_for(lambda: gw.log.count("worklist refreshed from upstream") >= refreshes + 2,
             "two more refreshes")  # fmt: skip
    after = answer("after")
    assert "ACC001" not in after  # completed: no longer offered
    assert after["ACC002"] == "DISCONTINUED"  # can be redone
    assert set(after) == set(before) - {"ACC001"}
    marks = {r["mpps_instance_uid"]: r["mpps_status"] for r in gw.rows(
        "SELECT * FROM worklist_mpps")}  # fmt: skip
    assert marks == {one: COMPLETED, two: DISCONTINUED}
    assert gw.stop() == 0


# -- units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(IN_PROGRESS, None), (None, 0x0120), ("", 0x0121), (COMPLETED, 0x0106),
     (DISCONTINUED, 0x0106), ("in progress", 0x0106)],
)  # fmt: skip
def test_create_rule(status: str | None, code: int | None) -> None:
    if code is None:
        check_create(status)
        return
    with pytest.raises(Refused) as info:
        check_create(status)
    assert info.value.status == code


@pytest.mark.parametrize(
    ("current", "new", "result"),
    [
        (IN_PROGRESS, None, IN_PROGRESS),
        (IN_PROGRESS, IN_PROGRESS, IN_PROGRESS),
        (IN_PROGRESS, COMPLETED, COMPLETED),
        (IN_PROGRESS, DISCONTINUED, DISCONTINUED),
        (IN_PROGRESS, "DONE", 0x0106),
        (IN_PROGRESS, "", 0x0106),
        (COMPLETED, None, 0x0110),
        (COMPLETED, IN_PROGRESS, 0x0110),
        (COMPLETED, COMPLETED, 0x0110),
        (COMPLETED, DISCONTINUED, 0x0110),
        (DISCONTINUED, IN_PROGRESS, 0x0110),
        (DISCONTINUED, COMPLETED, 0x0110),
        (None, COMPLETED, 0x0112),
        (None, None, 0x0112),
    ],
)
def test_set_transitions(current: str | None, new: str | None, result: str | int) -> None:
    if isinstance(result, str):
        assert check_set(current, new) == result
        return
    with pytest.raises(Refused) as info:
        check_set(current, new)
    assert info.value.status == result


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def _msg(kind: str, final: bool = False, maybe: bool = False) -> Message:
    return Message(1, "1.2.3", kind, b"", final, maybe)


@pytest.mark.parametrize(
    ("message", "status", "outcome"),
    [
        (_msg(CREATE), _status(0), Outcome.DELIVERED),
        (_msg(CREATE), _status(0x0001), Outcome.DELIVERED),  # warning
        (_msg(CREATE), _status(0x0111), Outcome.DELIVERED),  # already there
        (_msg(SET, final=True, maybe=True), _status(0x0110), Outcome.DELIVERED),
        (_msg(SET, final=True), _status(0x0110), Outcome.REFUSED),  # never sent before
        (_msg(SET, maybe=True), _status(0x0110), Outcome.REFUSED),  # not a final N-SET
        (_msg(SET), _status(0x0112), Outcome.REFUSED),
        (_msg(CREATE), _status(0x0106, "bad"), Outcome.REFUSED),
        (_msg(CREATE), _status(0xC001), Outcome.REFUSED),
        (_msg(CREATE), _status(0x0213), Outcome.RETRY),
        (_msg(CREATE), _status(0x0124), Outcome.RETRY),
        (_msg(CREATE), _status(0xA700), Outcome.RETRY),
        (_msg(CREATE), Dataset(), Outcome.RETRY),  # no answer
    ],
)
def test_upstream_answers_are_classified(
    message: Message, status: Dataset, outcome: Outcome
) -> None:
    delivery = classify(message, status)
    assert delivery.outcome is outcome
    if outcome is Outcome.REFUSED:
        assert f"0x{int(status.Status):04X}" in delivery.reason
    if "Status" not in status:
        assert delivery.maybe_delivered


def _item_json(acc: str, study: str, rp: str, sps: str) -> dict[str, Any]:
    ds = Dataset()
    ds.AccessionNumber = acc
    ds.StudyInstanceUID = study
    ds.RequestedProcedureID = rp
    step = Dataset()
    step.ScheduledProcedureStepID = sps
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return json.loads(json.dumps(ds.to_json_dict()))


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (StepRef("1.2.3", "A1", "RP1", "S1"), True),
        (StepRef("", "A1", "", ""), True),
        (StepRef("1.2.3", "", "", ""), True),
        (StepRef("", "A1", "", "S2"), False),  # another step of the same request
        (StepRef("1.2.4", "A1", "RP1", "S1"), False),
        (StepRef("", "A2", "", ""), False),
        (StepRef("", "", "RP1", ""), False),  # a procedure ID alone names nothing
    ],
)
def test_worklist_reference_matching(ref: StepRef, expected: bool) -> None:
    item = _item_json("A1", "1.2.3", "RP1", "S1")
    assert refers_to(ref, item) is expected


def _event(request: N_CREATE, attributes: Dataset) -> Any:
    requestor = SimpleNamespace(ae_title="CT_ROOM1", address="127.0.0.1")
    return SimpleNamespace(
        request=request, attribute_list=attributes, assoc=SimpleNamespace(requestor=requestor)
    )


def test_a_storage_failure_is_never_success(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    store.close()  # takes no more writes
    req = N_CREATE()
    req.AffectedSOPInstanceUID = generate_uid()
    status, reply = scp.MppsScp(store).n_create(_event(req, started()))
    assert isinstance(status, Dataset) and status.Status == 0x0213 and reply is None


def test_a_failing_commit_is_never_success(store: Store) -> None:
    class Broken(Store):
        def submit(self, fn: Any, durable: bool = True) -> Future[Any]:
            fut: Future[Any] = Future()
            fut.set_exception(OSError(28, "No space left on device"))
            return fut

    req = N_CREATE()
    req.AffectedSOPInstanceUID = generate_uid()
    status, _ = scp.MppsScp(Broken(store.path)).n_create(_event(req, started()))
    assert isinstance(status, Dataset) and status.Status == 0x0213
    assert not store.rows("SELECT * FROM mpps")


def test_duplicate_create_is_refused_inside_the_writer(store: Store) -> None:
    uid = generate_uid()
    futures = [store.submit(scp.record_create(uid, started(), "CT")) for _ in range(2)]
    outcomes = []
    for fut in futures:
        try:
            outcomes.append(fut.result())
        except Refused as exc:
            outcomes.append(exc.status)
    assert outcomes[1] == 0x0111 and isinstance(outcomes[0], int)
    assert len(store.rows("SELECT * FROM mpps_outbox")) == 1


# Valid values are drawn more often, so long lawful histories are common.
_STATUS_VALUES = st.sampled_from(
    [IN_PROGRESS, IN_PROGRESS, COMPLETED, DISCONTINUED, None, "", "DONE"]
)
_OPS = st.lists(st.tuples(st.sampled_from([CREATE, SET, SET]), _STATUS_VALUES), max_size=8)


@settings(max_examples=200, deadline=None)
@given(ops=_OPS)
@example(ops=[(CREATE, IN_PROGRESS), (SET, DISCONTINUED), (SET, IN_PROGRESS)])
@example(ops=[(CREATE, IN_PROGRESS), (SET, None), (SET, COMPLETED), (SET, None)])
def test_any_request_sequence_follows_the_rules(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, str | None]]
) -> None:
    """Whatever a modality sends for one instance, the gateway's answers and what it
    keeps follow a plain model of PS3.4 F.7.2."""
    store = Store(tmp_path_factory.mktemp("rules") / "q.sqlite3")
    store.open()
    uid = generate_uid()
    model: str | None = None
    accepted = 0
    try:
        for kind, value in ops:
            ds = Dataset()
            if value is not None:
                ds.PerformedProcedureStepStatus = value
            if kind == CREATE:
                expected = {None: 0x0120, "": 0x0121, IN_PROGRESS: 0}.get(value, 0x0106)
                if expected == 0 and model is not None:
                    expected = 0x0111
            elif model is None:
                expected = 0x0112
            elif model in (COMPLETED, DISCONTINUED):
                expected = 0x0110
            elif value is not None and value not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
                expected = 0x0106
            else:
                expected = 0
            try:
                if kind == CREATE:
                    store.submit(scp.record_create(uid, ds, "CT")).result()
                else:
                    store.submit(scp.record_set(uid, ds)).result()
                code = 0
            except Refused as exc:
                code = exc.status
            assert code == expected, (kind, value, model)
            if code == 0:
                accepted += 1
                model = IN_PROGRESS if kind == CREATE else (value or model)
        rows = store.rows("SELECT status FROM mpps")
        assert [r["status"] for r in rows] == ([model] if model else [])
        assert len(store.rows("SELECT seq FROM mpps_outbox")) == accepted
    finally:
        store.close()


def test_mpps_config_is_validated() -> None:
    c = gw_config.from_dict({"mpps": {"upstream_host": "ris", "upstream_ae": "RIS"}})
    assert c.mpps.upstream_port == 104
    with pytest.raises(ConfigError, match=r"mpps\.upstream_ae"):
        gw_config.from_dict({"mpps": {"upstream_host": "ris"}})
    with pytest.raises(ConfigError, match=r"mpps\.backoff_max_seconds"):
        gw_config.from_dict({"mpps": {"backoff_initial_seconds": 10.0, "backoff_max_seconds": 1.0}})
    with pytest.raises(ConfigError, match=r"mpps\.timeout_seconds"):
        gw_config.from_dict({"mpps": {"timeout_seconds": 0}})

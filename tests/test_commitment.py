"""Storage Commitment: the SCP's N-ACTION, the rules, and what is recorded.

The requester here is pynetdicom's SCU (``Association.send_n_action``), which lets a
test send the malformed requests a real modality does not; the gateway runs as the
real process (``python -m gateway run``).  The end-to-end runs with Orthanc as the
modality and Orthanc + DICOMweb behind nginx as the archive are in
tests/test_commitment_e2e.py.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from gateway import instances
from gateway.commitment import decide as decide_module
from gateway.commitment import reporter as reporter_module
from gateway.commitment import requests
from gateway.commitment.decide import decide
from gateway.commitment.reporter import Reporter, classify, event_information
from gateway.commitment.requests import (
    Decision,
    ItemOutcome,
    Recorded,
    Report,
    ReportItem,
    RequestedItem,
    RequestState,
    Undecided,
    Undelivered,
)
from gateway.commitment.scp import CommitmentScp, Refused, parse_request
from gateway.config import from_dict
from gateway.dicom import negotiation
from gateway.instances import Confirmation, QueueState, ReceivedInstance
from gateway.pipeline.upload import InstanceOutcome, Item, RequestFailed, StowClient
from gateway.store import Store

from .conftest import GatewayFactory
from .support import corpus
from .support.archive import ArchiveLab
from .support.gateway_proc import GatewayProcess
from .support.peers import free_port
from .support.web_client import WebClient, web_port
from .test_upload import wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
INSTANCE = str(negotiation.STORAGE_COMMITMENT_INSTANCE)


def action_info(transaction_uid: str | None, pairs: list[tuple[str, str]] | None) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns the sender about a bad UID
        return _action_info(transaction_uid, pairs)


def _action_info(transaction_uid: str | None, pairs: list[tuple[str, str]] | None) -> Dataset:
    ds = Dataset()
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    if pairs is not None:
        items = []
        for sop_class, sop_instance in pairs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            items.append(item)
        ds.ReferencedSOPSequence = Sequence(items)
    return ds


def n_action(
    port: int, ds: Dataset | None, *, calling_ae: str = "CT_ROOM1", action_type: int = 1,
    instance: str = INSTANCE,
) -> Dataset:  # fmt: skip
    """One N-ACTION on an association of its own; the response's status data set."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # encoding a bad UID warns too
            status, _ = assoc.send_n_action(ds, action_type, StorageCommitmentPushModel, instance)
    finally:
        assoc.release()
    assert "Status" in status, "no answer"
    return status


def gateway_with_remote(factory: GatewayFactory, **sections: Any) -> GatewayProcess:
    dimse = {"remote": [{"ae_title": "CT_ROOM1", "host": "127.0.0.1", "port": 104}]}
    return factory(dimse=dimse | sections.pop("dimse", {}), **sections)


def request_rows(gw: GatewayProcess) -> list[Any]:
    return gw.rows("SELECT * FROM commitment_requests ORDER BY received_at")


def item_rows(gw: GatewayProcess, transaction_uid: str) -> list[Any]:
    return gw.rows(
        "SELECT * FROM commitment_items WHERE transaction_uid = ? ORDER BY position",
        (transaction_uid,),
    )


# -- the SCP, end to end ------------------------------------------------------------------


def test_an_n_action_is_recorded_durably_before_success(gateway_factory: GatewayFactory) -> None:
    gw = gateway_with_remote(gateway_factory)
    tx = generate_uid()
    pairs = [(CT, generate_uid()) for _ in range(3)]
    status = n_action(gw.port, action_info(tx, pairs))
    assert status.Status == 0x0000
    # The answer came after the commit: the rows are there the moment it arrives.
    (row,) = request_rows(gw)
    assert (row["transaction_uid"], row["requesting_ae"], row["state"]) == (
        tx, "CT_ROOM1", RequestState.WAITING,
    )  # fmt: skip
    assert row["item_count"] == 3 and row["deadline_at"] > row["received_at"]
    assert [(r["sop_class_uid"], r["sop_instance_uid"]) for r in item_rows(gw, tx)] == pairs
    assert all(r["outcome"] is None for r in item_rows(gw, tx))
    assert f"transaction {tx}, 3 instances" in gw.log

    # The same request again (a modality that lost our answer) is recorded once.
    assert n_action(gw.port, action_info(tx, pairs)).Status == 0x0000
    assert len(request_rows(gw)) == 1 and len(item_rows(gw, tx)) == 3
    assert f"transaction {tx} again" in gw.log


def test_an_unknown_requester_is_refused_and_logged(gateway_factory: GatewayFactory) -> None:
    gw = gateway_with_remote(gateway_factory)
    status = n_action(gw.port, action_info(generate_uid(), [(CT, generate_uid())]),
                      calling_ae="STRANGER")  # fmt: skip
    assert status.Status == 0x0124
    assert "STRANGER not in dimse.remote" in str(status.ErrorComment)
    assert request_rows(gw) == []
    assert "Storage Commitment N-ACTION from 'STRANGER'" in gw.log
    assert "refused 0x0124" in gw.log


def test_bad_requests_are_refused_with_the_right_status(gateway_factory: GatewayFactory) -> None:
    gw = gateway_with_remote(gateway_factory)
    port = gw.port
    good = [(CT, generate_uid())]
    cases: list[tuple[dict[str, Any], Dataset | None, int]] = [
        ({"instance": "1.2.3.4"}, action_info(generate_uid(), good), 0x0112),
        ({"action_type": 2}, action_info(generate_uid(), good), 0x0123),
        ({}, action_info(None, good), 0x0115),
        ({}, action_info("1.02.3", good), 0x0115),
        ({}, action_info(generate_uid(), None), 0x0115),
        ({}, action_info(generate_uid(), []), 0x0115),
        ({}, action_info(generate_uid(), [(CT, "not-a-uid")]), 0x0115),
        ({}, action_info(generate_uid(), [("", generate_uid())]), 0x0115),
    ]
    for kwargs, ds, expected in cases:
        status = n_action(port, ds, **kwargs)
        assert status.Status == expected, (kwargs, ds)
        assert str(status.get("ErrorComment", "")), "a refusal says why"
    assert request_rows(gw) == []

    # A Transaction UID already used by another request.
    tx = generate_uid()
    assert n_action(port, action_info(tx, good)).Status == 0x0000
    other = n_action(port, action_info(tx, [(CT, generate_uid())]))
    assert other.Status == 0x0115 and "already used" in str(other.ErrorComment)
    assert [r["transaction_uid"] for r in request_rows(gw)] == [tx]
    assert item_rows(gw, tx)[0]["sop_instance_uid"] == good[0][1]


def test_a_class_the_gateway_does_not_store_fails_at_once(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_with_remote(gateway_factory, dimse={"storage_sop_classes": [CT]})
    tx = generate_uid()
    ct, mr = generate_uid(), generate_uid()
    assert n_action(gw.port, action_info(tx, [(CT, ct), (MR, mr)])).Status == 0x0000
    first, second = item_rows(gw, tx)
    assert first["outcome"] is None
    assert (second["outcome"], second["failure_reason"]) == (ItemOutcome.FAILED, 0x0122)


# -- the rules and the table ------------------------------------------------------------


def _event(request: N_ACTION, info: Callable[[], Dataset]) -> Any:
    """What the handler reads of pynetdicom's event (a stand-in: pydicom decodes too
    leniently to make a real peer's bytes fail, and a closed store is no peer)."""

    class Event(SimpleNamespace):
        @property
        def action_information(self) -> Dataset:
            return info()

    requestor = SimpleNamespace(ae_title="CT_ROOM1", address="127.0.0.1", port=104)
    return Event(request=request, assoc=SimpleNamespace(requestor=requestor))


def _n_action_request() -> N_ACTION:
    req = N_ACTION()
    req.RequestedSOPClassUID = StorageCommitmentPushModel
    req.RequestedSOPInstanceUID = INSTANCE
    req.ActionTypeID = 1
    return req


def test_undecodable_information_or_a_store_that_cannot_commit_is_never_success(
    tmp_path: Path,
) -> None:
    config = from_dict({"dimse": {"remote": [{"ae_title": "CT_ROOM1", "host": "h"}]}})
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    try:

        def broken() -> Dataset:
            raise ValueError("truncated sequence item")

        status, _ = CommitmentScp(config, store).n_action(_event(_n_action_request(), broken))
        assert isinstance(status, Dataset) and status.Status == 0x0110
        assert "cannot be decoded" in str(status.ErrorComment)
    finally:
        store.close()  # takes no more writes
    good = action_info(generate_uid(), [(CT, generate_uid())])
    status, _ = CommitmentScp(config, store).n_action(_event(_n_action_request(), lambda: good))
    assert isinstance(status, Dataset) and status.Status == 0x0213


def test_parse_request_rules() -> None:
    uid = generate_uid()
    ok = parse_request(INSTANCE, 1, action_info(uid, [(CT, "1.2.3"), (MR, "1.2.4")]), ())
    assert ok.transaction_uid == uid
    assert ok.items == (RequestedItem(CT, "1.2.3"), RequestedItem(MR, "1.2.4"))
    only_ct = parse_request(INSTANCE, 1, action_info(uid, [(MR, "1.2.4")]), (CT,))
    assert only_ct.items[0].failure_reason == 0x0122
    for args, status in [
        ((INSTANCE + ".1", 1, action_info(uid, [(CT, "1.2")])), 0x0112),
        ((INSTANCE, None, action_info(uid, [(CT, "1.2")])), 0x0123),
        ((INSTANCE, 1, action_info("", [(CT, "1.2")])), 0x0115),
        ((INSTANCE, 1, action_info(uid, [(CT, "1..2")])), 0x0115),
    ]:
        with pytest.raises(Refused) as info:
            parse_request(*args, ())  # type: ignore[arg-type]
        assert info.value.status == status


def test_recording_is_idempotent_and_a_fully_decided_request_is_due_at_once(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    try:
        now, later = "2030-01-01T00:00:00+00:00", "2030-01-02T00:00:00+00:00"
        items = [RequestedItem(MR, "1.2.3", 0x0122, "not stored")]

        def record(tx: str, ae: str, its: list[RequestedItem]) -> Recorded:
            return store.submit(requests.record_request(tx, ae, "peer", its, now, later)).result()

        assert record("1.1", "CT1", items) is Recorded.NEW
        assert record("1.1", "CT1", items) is Recorded.REPEAT
        assert record("1.1", "CT2", items) is Recorded.CONFLICT
        assert record("1.1", "CT1", [RequestedItem(MR, "1.2.4")]) is Recorded.CONFLICT
        counts = store.read(requests.count_by_state)
        assert counts[RequestState.DUE] == 1 and counts[RequestState.WAITING] == 0
        (report,) = store.read(requests.due_reports(later, 10))
        assert report.event_type == requests.EVENT_SOME_FAILED
        assert [(i.sop_instance_uid, i.failure_reason) for i in report.items] == [("1.2.3", 0x0122)]
        assert store.read(lambda c: requests.held_among(c, ["1.2.3", "1.2.9"])) == {"1.2.3"}
    finally:
        store.close()


# -- deciding ---------------------------------------------------------------------------

NOW = "2030-01-01T12:00:00.000000+00:00"
BEFORE = "2030-01-01T11:00:00.000000+00:00"
AFTER = "2030-01-01T13:00:00.000000+00:00"


def _row(state: QueueState, confirmed: bool = False, sop_class: str = CT) -> Confirmation:
    return Confirmation(
        sop_class, "1.9", state, confirmed, "archive said no" if state == "failed" else None
    )


@pytest.mark.parametrize(
    ("row", "deadline", "outcome", "reason"),
    [
        (None, AFTER, None, None),  # not received yet: wait
        (None, BEFORE, ItemOutcome.FAILED, 0x0112),  # never received by the deadline
        (_row(QueueState.RECEIVED), AFTER, None, None),
        (_row(QueueState.UPLOADING), AFTER, None, None),
        (_row(QueueState.UPLOADED), AFTER, None, None),  # stored, not confirmed (qido)
        (_row(QueueState.UPLOADED, True), AFTER, ItemOutcome.COMMITTED, None),
        (_row(QueueState.UPLOADED, True), BEFORE, ItemOutcome.COMMITTED, None),
        (_row(QueueState.FAILED), AFTER, ItemOutcome.FAILED, 0x0110),
        (_row(QueueState.COMPRESSED), BEFORE, ItemOutcome.FAILED, 0x0110),  # too late
        (_row(QueueState.UPLOADED, True, MR), AFTER, ItemOutcome.FAILED, 0x0119),
    ],
)
def test_decision_rules(
    row: Confirmation | None, deadline: str, outcome: ItemOutcome | None, reason: int | None
) -> None:
    item = Undecided("1.5", 0, CT, "1.5.1", deadline)
    decision = decide(item, row, NOW)
    if outcome is None:
        assert decision is None
        return
    assert decision is not None
    assert (decision.outcome, decision.failure_reason) == (outcome, reason)
    assert (decision.transaction_uid, decision.position) == ("1.5", 0)
    if row is not None:
        assert decision.study_instance_uid == "1.9"


def _receive(store: Store, uid: str, sha: str = "a" * 64) -> None:
    store.record_instance(
        ReceivedInstance(uid, CT, "1.9", "1.9.1", "CT_ROOM1", "127.0.0.1:1",
                         "1.2.840.10008.1.2.1", 10, sha, f"objects/{sha[:2]}/{sha}.dcm")
    ).result()  # fmt: skip


def _upload(store: Store, stored: bool, confirm: bool = True) -> None:
    """Through the real queue transitions: compress, claim for upload, the outcome."""
    (claimed,) = store.submit(instances.claim_for_compression(10)).result()
    result = SimpleNamespace(
        outcome="passthrough", reason="", transfer_syntax=claimed.transfer_syntax
    )
    assert store.submit(instances.mark_compressed(claimed, claimed.path, 10, result)).result()
    batch, _ = store.submit(instances.claim_upload_batch(10, 10**9)).result()
    outcome = InstanceOutcome(stored=stored, reason="" if stored else "refused")
    store.submit(
        instances.finish_uploads([(batch[0], outcome)], lambda _: 1.0, lambda *_: None, confirm)
    ).result()


def _round(store: Store) -> list[str]:
    return store.submit(decide_module.record(store.read(decide_module.evaluate))).result()


def test_only_the_confirmed_copy_held_now_is_committed(store: Store) -> None:
    future = "2999-01-01T00:00:00+00:00"
    items = [RequestedItem(CT, "1.5.1"), RequestedItem(CT, "1.5.2")]
    store.submit(requests.record_request("1.5", "CT_ROOM1", "p", items, NOW, future)).result()
    _receive(store, "1.5.1")
    _upload(store, stored=True, confirm=False)  # stored; a search has yet to find it
    assert _round(store) == []
    store.submit(
        instances.mark_confirmed(
            [instances.Unconfirmed(r["sop_instance_uid"], r["sha256"], r["uploaded_at"])
             for r in store.rows("SELECT * FROM instances")]
        )
    ).result()  # fmt: skip
    # Received again before the round: the confirmation was of the older copy.
    _receive(store, "1.5.1", "b" * 64)
    assert store.rows("SELECT confirmed_at FROM instances")[0]["confirmed_at"] is None
    assert _round(store) == []
    _upload(store, stored=True)
    _receive(store, "1.5.2", "c" * 64)
    _upload(store, stored=False)  # the archive refuses it for good
    assert _round(store) == ["1.5"]
    (report,) = store.read(requests.due_reports(future, 10))
    assert report.event_type == requests.EVENT_SOME_FAILED
    assert [(i.sop_instance_uid, i.failure_reason) for i in report.items] == [
        ("1.5.1", None), ("1.5.2", 0x0110),
    ]  # fmt: skip
    rows = store.rows("SELECT * FROM commitment_items ORDER BY position")
    assert [r["study_instance_uid"] for r in rows] == ["1.9", "1.9"]
    assert "refused" in rows[1]["detail"]


def test_the_deadline_fails_what_never_came(store: Store) -> None:
    items = [RequestedItem(CT, "1.6.1")]
    past = "2001-01-01T00:00:00.000000+00:00"
    store.submit(requests.record_request("1.6", "CT_ROOM1", "p", items, past, past)).result()
    assert _round(store) == ["1.6"]
    (report,) = store.read(requests.due_reports(AFTER, 10))
    assert [(i.sop_instance_uid, i.failure_reason) for i in report.items] == [("1.6.1", 0x0112)]


def test_a_round_decides_each_item_of_an_instance_on_its_own_terms(store: Store) -> None:
    """A round asks once per instance (and SOP class) with the earliest deadline, then
    decides each item naming it: the late one fails, the one with time left waits, the
    one naming another SOP class fails on that, and other instances are untouched."""
    past, future = "2001-01-01T00:00:00.000000+00:00", "2999-01-01T00:00:00+00:00"
    record = requests.record_request
    store.submit(record("1.7", "CT_ROOM1", "p", [RequestedItem(CT, "1.7.1")], past, past)).result()
    store.submit(record("1.8", "CT_ROOM1", "p", [RequestedItem(CT, "1.7.1")], NOW, future)).result()
    store.submit(record("1.9", "CT_ROOM1", "p", [RequestedItem(MR, "1.7.1")], NOW, future)).result()
    store.submit(record("2.0", "CT_ROOM1", "p", [RequestedItem(CT, "1.7.2")], NOW, future)).result()
    _receive(store, "1.7.1")  # received (as CT), not uploaded
    waited_on = {(u.sop_instance_uid, u.sop_class_uid, u.deadline_at)
                 for u in store.read(requests.undecided_instances)}  # fmt: skip
    assert waited_on == {("1.7.1", CT, past), ("1.7.1", MR, future), ("1.7.2", CT, future)}
    assert sorted(_round(store)) == ["1.7", "1.9"]
    rows = {
        r["transaction_uid"]: (r["outcome"], r["failure_reason"])
        for r in store.rows("SELECT * FROM commitment_items")
    }
    assert rows == {
        "1.7": (ItemOutcome.FAILED, 0x0110),  # received, not confirmed by its deadline
        "1.8": (None, None),  # the same instance, time left: waits
        "1.9": (ItemOutcome.FAILED, 0x0119),  # held as CT, asked as MR
        "2.0": (None, None),  # never received, time left
    }


@pytest.mark.asyncio
async def test_deciding_rounds_are_spaced_however_often_they_are_woken(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every confirmation and N-ACTION wakes the reporter, and a round reads every
    instance waited on: rounds start at least _ROUND_GAP_S apart, and wait twice what
    the last deciding step took (here 0.2 s: 0.4 s)."""
    started: list[float] = []
    slow = {"from": 3}

    def evaluate(conn: Any) -> list[Any]:
        started.append(time.monotonic())
        if len(started) == slow["from"]:
            time.sleep(0.2)
        return []

    monkeypatch.setattr(decide_module, "evaluate", evaluate)
    reporter = Reporter(from_dict({}), store)
    task = asyncio.create_task(reporter.run())
    try:
        for _ in range(300):  # woken about every 5 ms for 1.5 s
            reporter.wake()
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(started) >= 3, started
    gaps = [b - a for a, b in itertools.pairwise(started)]
    tolerance = 0.01  # the event loop's clock resolution
    assert min(gaps) >= reporter_module._ROUND_GAP_S - tolerance, gaps
    # After the slow step (0.2 s), the next round came no sooner than 0.2 + 2 x 0.2 s.
    if len(started) > slow["from"]:
        assert gaps[slow["from"] - 1] >= 0.6 - tolerance, gaps


@pytest.mark.asyncio
async def test_a_qido_search_finds_what_the_archive_stored(
    archive_lab: ArchiveLab, tmp_path: Path
) -> None:
    """``commitment.verify = "qido"``: the search the confirmation relies on, against
    the real archive (Orthanc + DICOMweb behind nginx, mutual TLS), paged."""
    config = from_dict(
        {"upload": {"dicomweb_url": archive_lab.dicomweb_url, "ca_file": str(archive_lab.ca_file),
                    "client_cert": str(archive_lab.client_cert),
                    "client_key": str(archive_lab.client_key)}}
    )  # fmt: skip
    study = generate_uid()
    items = []
    for n in range(3):
        path = tmp_path / f"{n}.dcm"
        ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path, study=study)
        items.append(Item(str(ds.SOPInstanceUID), path))
    async with StowClient(config.upload) as client:
        assert await client.study_instances(study) == set()  # nothing yet
        outcomes = await client.store(items)
        assert all(o.stored for o in outcomes.values())
        assert await client.study_instances(study, page=2) == {i.sop_instance_uid for i in items}
        assert await client.study_instances(generate_uid()) == set()
        archive_lab.stop_nginx()
        with pytest.raises(RequestFailed, match="QIDO-RS"):
            await client.study_instances(study)


# -- the report -------------------------------------------------------------------------


def test_the_event_information_follows_ps3_4_j_3_3() -> None:
    all_ok = Report("1.7", "CT_ROOM1", 1, 0, False, (ReportItem(CT, "1.7.1", None),))
    ds = event_information(all_ok)
    assert ds.TransactionUID == "1.7"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
            for i in ds.ReferencedSOPSequence] == [(CT, "1.7.1")]  # fmt: skip
    assert "FailedSOPSequence" not in ds
    some = Report("1.8", "CT_ROOM1", 2, 0, False,
                  (ReportItem(CT, "1.8.1", None), ReportItem(MR, "1.8.2", 0x0112)))  # fmt: skip
    ds = event_information(some)
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.8.1"]
    (failed,) = ds.FailedSOPSequence
    assert failed.ReferencedSOPClassUID == MR and failed.ReferencedSOPInstanceUID == "1.8.2"
    assert failed.FailureReason == 0x0112
    only_failed = Report("1.9", "CT_ROOM1", 2, 0, False, (ReportItem(CT, "1.9.1", 0x0110),))
    assert "ReferencedSOPSequence" not in event_information(only_failed)


def _status(code: int | None) -> Dataset:
    ds = Dataset()
    if code is not None:
        ds.Status = code
    return ds


@pytest.mark.parametrize(
    ("code", "delivered", "maybe"),
    [(0x0000, True, False), (0x0001, True, False), (0xB000, True, False),
     (0x0110, False, False), (0x0213, False, False), (None, False, True)],
)  # fmt: skip
def test_only_a_success_or_warning_answer_counts_as_delivered(
    code: int | None, delivered: bool, maybe: bool
) -> None:
    result = classify(_status(code))
    assert (result.delivered, result.maybe) == (delivered, maybe)
    if code not in (0x0000, None):
        assert f"0x{code:04X}" in result.reason


def test_stop_is_prompt_while_the_modality_is_silent(gateway_factory: GatewayFactory) -> None:
    """A stop does not wait out the report's timeouts (60 s here) on a modality that
    accepts the connection and never answers; the report is still due afterwards."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))  # accepts TCP, never answers
        listener.listen(4)
        port = listener.getsockname()[1]
        remote = {"ae_title": "CT_ROOM1", "host": "127.0.0.1", "port": port}
        gw = gateway_factory(
            dimse={"remote": [remote]},
            commitment={"report_timeout_seconds": 60, "timeout_hours": 0.0003},
        )
        tx = generate_uid()
        # Never received: failed at the deadline (about a second), then the report.
        assert n_action(gw.port, action_info(tx, [(CT, generate_uid())])).Status == 0x0000
        listener.settimeout(30)
        connection, _ = listener.accept()  # the reporter waits for an answer
        try:
            assert gw.stop(timeout=20) == 0
        finally:
            connection.close()
    assert "stopped cleanly" in gw.log
    (row,) = request_rows(gw)
    assert row["state"] in ("due", "reporting") and row["event_type"] == 2


# -- what the status shows ------------------------------------------------------------------


def test_the_status_summary_counts_requests_and_lists_undelivered_reports(store: Store) -> None:
    """requests.summary(), as the status snapshot reads it: counts by state, those with
    failures, the oldest unreported, and per AE with reports due the oldest due, the
    tries and the newest error (a report being sent has no next try)."""
    far = "2999-01-01T00:00:00.000000+00:00"

    def record(tx: str, ae: str, at: str, failed: bool = False) -> None:
        item = (
            RequestedItem(MR, f"{tx}.1", 0x0122, "not stored")
            if failed
            else RequestedItem(CT, f"{tx}.1")
        )
        store.submit(requests.record_request(tx, ae, "p", [item], at, far)).result()

    def run(write: Any) -> None:
        store.submit(write).result()

    record("3.1", "CT_ROOM1", "2030-01-01T08:00:00.000000+00:00")  # waits for the archive
    record("3.2", "CT_ROOM1", "2030-01-01T09:00:00.000000+00:00", failed=True)  # due at once
    record("3.3", "CT_ROOM1", "2030-01-01T10:00:00.000000+00:00", failed=True)
    run(requests.retry_report("3.2", "cannot connect: refused", "2030-01-01T10:05:00+00:00", False))
    record("3.4", "US_ROOM2", "2030-01-01T07:00:00.000000+00:00")
    run(lambda conn: requests.record_decisions(
        conn, [Decision("3.4", 0, ItemOutcome.COMMITTED)], "2030-01-01T07:30:00.000000+00:00"
    ))  # fmt: skip
    run(requests.mark_reporting("3.4"))
    run(requests.mark_reported("3.4"))
    record("3.5", "MR_ROOM3", "2030-01-01T11:00:00.000000+00:00", failed=True)
    run(requests.mark_reporting("3.5"))

    s = store.read(lambda conn: requests.summary(conn, 10))
    assert s.by_state == {RequestState.WAITING: 1, RequestState.DUE: 2,
                          RequestState.REPORTING: 1, RequestState.REPORTED: 1}  # fmt: skip
    assert s.some_failed == 3  # 3.2, 3.3 and 3.5; 3.4 all committed, 3.1 undecided
    assert s.oldest_unreported_at == "2030-01-01T08:00:00.000000+00:00"
    ct, mr = s.undelivered
    assert ct == Undelivered(
        requesting_ae="CT_ROOM1", reports=2, due_since="2030-01-01T09:00:00.000000+00:00",
        attempts=1, last_error="cannot connect: refused", last_error_at=ct.last_error_at,
        next_attempt_at="2030-01-01T10:00:00.000000+00:00",  # 3.3's first try
    )  # fmt: skip
    assert ct.last_error_at is not None
    assert (mr.requesting_ae, mr.reports, mr.attempts, mr.last_error, mr.next_attempt_at) == (
        "MR_ROOM3", 1, 0, None, None,
    )  # fmt: skip
    # At most so many AEs, the one waiting longest first.
    assert [u.requesting_ae for u in store.read(lambda c: requests.summary(c, 1)).undelivered] == [
        "CT_ROOM1"
    ]


def test_an_undeliverable_report_shows_on_the_page_the_api_and_the_metrics(
    gateway_factory: GatewayFactory,
) -> None:
    """The modality's port refuses connections: the report stays due, and the status
    says to whom, why and when the next try is; health is judged only after an hour
    (tests/test_status.py)."""
    closed = free_port()  # nothing listens there
    gw = gateway_factory(
        dimse={"remote": [{"ae_title": "CT_ROOM1", "host": "127.0.0.1", "port": closed}]},
        commitment={"timeout_hours": 0.0003, "report_backoff_initial_seconds": 60,
                    "report_backoff_max_seconds": 120},
    )  # fmt: skip
    client = WebClient(web_port(gw))
    quiet = client.status()["commitment"]
    assert (quiet["waiting"], quiet["due"], quiet["undelivered"]) == (0, 0, [])
    page = client.get("/").text
    # Shown as soon as [[dimse.remote]] is configured, before any request.
    assert "<h2>Storage Commitment</h2>" in page and "commitment-undelivered" not in page
    assert f"CT_ROOM1@127.0.0.1:{closed}" in page

    # Never received: failed at the deadline (about a second), then the report is due.
    assert n_action(gw.port, action_info(generate_uid(), [(CT, generate_uid())])).Status == 0
    wait_until(
        "the first try of the report failed",
        lambda: any(u["last_error"] for u in client.status()["commitment"]["undelivered"]),
        timeout=30,
    )
    doc = client.status()
    c = doc["commitment"]
    assert (c["waiting"], c["due"], c["reported"], c["some_failed"]) == (0, 1, 0, 1)
    (u,) = c["undelivered"]
    assert (u["requesting_ae"], u["address"], u["reports_due"]) == (
        "CT_ROOM1", f"127.0.0.1:{closed}", 1,
    )  # fmt: skip
    assert u["attempts"] >= 1 and u["next_attempt_ts"] > time.time()
    # What the reporter found (pynetdicom says only that no association came about).
    assert u["last_error"] in ("association refused, aborted or not answered",) or (
        u["last_error"].startswith("cannot connect:")
    ), u["last_error"]
    assert not any("Storage Commitment" in r for r in doc["health"]["reasons"])

    page = client.get("/").text
    row = page.split('<tr data-ae="CT_ROOM1">', 1)[1].split("</tr>", 1)[0]
    assert f"127.0.0.1:{closed}" in row and u["last_error"] in row
    assert ", next try in " in row
    assert '<b id="c-due">1</b>' in page

    metrics = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(client.get("/metrics").text)
        for s in f.samples
    }
    p = "dicom_gateway_commitment_"
    assert metrics[p + "requests", (("state", "due"),)] == 1
    assert metrics[p + "requests", (("state", "waiting"),)] == 0
    assert metrics[p + "report_due_timestamp_seconds", (("requesting_ae", "CT_ROOM1"),)] == (
        pytest.approx(u["due_since_ts"])
    )
    assert metrics[p + "oldest_unreported_timestamp_seconds", ()] == pytest.approx(
        c["oldest_unreported_ts"]
    )

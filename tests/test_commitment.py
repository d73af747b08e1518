"""Storage Commitment: the SCP's N-ACTION, the rules, and what is recorded.

The requester here is pynetdicom's SCU (``Association.send_n_action``), which lets a
test send the malformed requests a real modality does not; the gateway runs as the
real process (``python -m gateway run``).  The end-to-end runs with Orthanc as the
modality and Orthanc + DICOMweb behind nginx as the archive are in
tests/test_commitment_e2e.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from gateway.commitment import requests
from gateway.commitment.requests import ItemOutcome, Recorded, RequestedItem, RequestState
from gateway.commitment.scp import Refused, parse_request
from gateway.dicom import negotiation
from gateway.store import Store

from .conftest import GatewayFactory
from .support.gateway_proc import GatewayProcess

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
        assert store.read(requests.held_instances) == {"1.2.3"}
    finally:
        store.close()

"""Per-study proof of delivery: the stages of a study, from a real queue database.

The end-to-end view (``study ls/show``, ``/api/studies``, the page) of a study sent
during an archive outage is in tests/test_commitment_e2e.py, and the page's in a
real browser in tests/test_web_browser.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from prometheus_client import generate_latest

from gateway import instances, studies
from gateway.commitment import decide, requests
from gateway.commitment.requests import RequestedItem
from gateway.instances import ReceivedInstance, StudyRows
from gateway.metrics import Metrics
from gateway.pipeline.upload import InstanceOutcome
from gateway.store import Store

CT = "1.2.840.10008.5.1.4.1.1.2"
T0 = "2030-01-01T10:00:00.000000+00:00"


def _rows(**changes: object) -> StudyRows:
    base: dict[str, object] = dict(
        instances=3, received_first=T0, received_last="2030-01-01T10:00:10.000000+00:00",
        compressed=3, compressed_first=T0, compressed_last=T0,
        uploaded=3, uploaded_first=T0, uploaded_last=T0,
        confirmed=3, confirmed_first=T0, confirmed_last="2030-01-01T10:01:40.000000+00:00",
        failed=0, calling_aes=("CT_ROOM1",),
    )  # fmt: skip
    base.update(changes)
    return StudyRows(**base)  # type: ignore[arg-type]


LATER = datetime(2030, 1, 1, 11, tzinfo=UTC)


def test_a_study_is_receiving_until_quiet_then_at_its_furthest_common_stage() -> None:
    early = datetime(2030, 1, 1, 10, 0, 30, tzinfo=UTC)
    p = studies.progress_of("1.2", _rows(), None, 60, early)
    assert (p.stage, p.complete) == ("receiving", False)
    assert p.complete_at == "2030-01-01T10:01:10.000000+00:00"
    p = studies.progress_of("1.2", _rows(), None, 60, LATER)
    assert (p.stage, p.complete) == ("confirmed", True)
    assert p.seconds_to_confirmed == 100.0  # first receipt to the last confirmation
    assert (p.received.count, p.received.first_at) == (3, T0)
    assert studies.progress_of("1.2", _rows(), (3, T0, T0), 60, LATER).stage == "committed"
    assert studies.progress_of("1.2", _rows(), (2, T0, T0), 60, LATER).stage == "confirmed"
    partly = _rows(uploaded=2, confirmed=1)
    p = studies.progress_of("1.2", partly, None, 60, LATER)
    assert (p.stage, p.seconds_to_confirmed) == ("compressed", None)
    none = _rows(compressed=0, uploaded=0, confirmed=0, confirmed_last=None)
    assert studies.progress_of("1.2", none, None, 60, LATER).stage == "received"
    assert studies.progress_of("1.2", _rows(failed=1, confirmed=2), None, 60, LATER).stage == (
        "failed"
    )


def _receive(store: Store, uid: str, study: str) -> None:
    sha = uid.replace(".", "").ljust(64, "0")
    store.record_instance(
        ReceivedInstance(uid, CT, study, study + ".1", "CT_ROOM1", "127.0.0.1:1",
                         "1.2.840.10008.1.2.1", 10, sha, f"objects/{sha[:2]}/{sha}.dcm")
    ).result()  # fmt: skip


def _through_the_pipeline(store: Store, upload: bool) -> None:
    for claimed in store.submit(instances.claim_for_compression(100)).result():
        result = SimpleNamespace(
            outcome="passthrough", reason="", transfer_syntax=claimed.transfer_syntax
        )
        store.submit(instances.mark_compressed(claimed, claimed.path, 10, result)).result()
    if upload:
        batch, _ = store.submit(instances.claim_upload_batch(100, 10**9)).result()
        stored = [(c, InstanceOutcome(stored=True)) for c in batch]
        store.submit(instances.finish_uploads(stored, lambda _: 1.0, lambda *_: None)).result()


def test_the_stages_follow_the_queue_and_the_commitment(store: Store) -> None:
    for n in range(3):
        _receive(store, f"1.3.{n}", "1.3")
    _receive(store, "1.4.0", "1.4")
    (newest, older) = store.read(lambda conn: studies.recent(conn, 10, 0.001))
    assert (newest.study_instance_uid, older.study_instance_uid) == ("1.4", "1.3")
    assert (older.instances, older.stage, older.compressed.count) == (3, "received", 0)
    assert older.calling_aes == ("CT_ROOM1",)
    _through_the_pipeline(store, upload=False)
    assert store.read(lambda conn: studies.one(conn, "1.3", 0.001)).stage == "compressed"  # type: ignore[union-attr]
    _through_the_pipeline(store, upload=True)
    p = store.read(lambda conn: studies.one(conn, "1.3", 0.001))
    assert p is not None and p.stage == "confirmed" and p.confirmed.count == 3
    assert p.seconds_to_confirmed is not None and p.seconds_to_confirmed >= 0
    # A commitment of two of its three instances, reported: two committed.
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    items = [RequestedItem(CT, "1.3.0"), RequestedItem(CT, "1.3.1")]
    store.submit(requests.record_request("9.1", "CT_ROOM1", "p", items, T0, future)).result()
    store.submit(decide.record(store.read(decide.evaluate))).result()
    assert store.read(lambda conn: studies.one(conn, "1.3", 0.001)).committed.count == 0  # type: ignore[union-attr]
    store.submit(requests.mark_reported("9.1")).result()
    p = store.read(lambda conn: studies.one(conn, "1.3", 0.001))
    assert p is not None and (p.committed.count, p.stage) == (2, "confirmed")
    assert p.committed.last_at is not None
    # Received again: the new copy is not confirmed, the study is not either.
    _receive(store, "1.3.2", "1.3")
    p = store.read(lambda conn: studies.one(conn, "1.3", 3600))
    assert p is not None and (p.stage, p.confirmed.count, p.received.count) == ("receiving", 2, 3)
    assert store.read(lambda conn: studies.one(conn, "7.7", 1)) is None


def test_the_histogram_observes_each_study_once_and_not_what_was_done_before(
    store: Store,
) -> None:
    metrics = Metrics()
    tracker = studies.StudyTracker(store, 0.001, metrics.study_confirmation.observe)
    done = studies.progress_of("1.5", _rows(), None, 60, LATER)
    later_one = studies.progress_of("1.6", _rows(), None, 60, LATER)
    receiving = studies.progress_of("1.7", _rows(), None, 60, datetime(2030, 1, 1, 10, tzinfo=UTC))
    assert tracker.observe([done]) == 0  # done before this start: not observed
    assert tracker.observe([done, later_one, receiving]) == 1
    assert tracker.observe([done, later_one]) == 0
    text = generate_latest(metrics.registry).decode()
    assert "dicom_gateway_study_confirmation_seconds_count 1.0" in text
    assert 'dicom_gateway_study_confirmation_seconds_bucket{le="120.0"} 1.0' in text
    assert 'dicom_gateway_study_confirmation_seconds_bucket{le="60.0"} 0.0' in text

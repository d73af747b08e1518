"""The SQLite queue and the spool, exercised directly with a real database file."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from gateway.config import is_valid_uid
from gateway.instances import QueueState, ReceivedInstance
from gateway.pipeline.reconcile import reconcile
from gateway.spool import Spool
from gateway.store import MIGRATIONS, Store


def _instance(uid: str, path: str = "objects/00/x.dcm", sha: str = "0" * 64) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        calling_ae="CT1",
        peer_address="127.0.0.1:1234",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10,
        sha256=sha,
        path=path,
    )


def test_pragmas_and_schema(store: Store) -> None:
    with store.reader() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        columns = {r["name"] for r in conn.execute("PRAGMA table_info(instances)")}
    assert {
        "sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid",
        "calling_ae", "peer_address", "transfer_syntax", "size", "sha256", "received_at",
        "state", "attempts", "next_attempt_at", "last_error",
    } <= columns  # fmt: skip


def test_concurrent_writers_all_commit(store: Store) -> None:
    # 8 threads x 50 rows, like 8 associations storing at once: no "database is
    # locked", every row committed once.
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                store.record_instance(_instance(f"1.2.{n}.{i}")).result(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.rows("SELECT count(*) AS n FROM instances")[0]["n"] == 400


def test_resend_keeps_one_row_and_reports_the_replaced_file(store: Store) -> None:
    assert store.record_instance(_instance("1.2.3", "objects/aa/a.dcm")).result() == []
    store.submit(
        lambda c: c.execute("UPDATE instances SET state = ?, attempts = 3", (QueueState.FAILED,))
    ).result()
    replaced = store.record_instance(_instance("1.2.3", "objects/bb/b.dcm", "1" * 64)).result()
    assert replaced == ["objects/aa/a.dcm"]
    (row,) = store.rows("SELECT * FROM instances")
    assert (row["path"], row["state"], row["attempts"]) == (
        "objects/bb/b.dcm",
        QueueState.RECEIVED,
        0,
    )
    # Same content again: nothing to remove.
    assert store.record_instance(_instance("1.2.3", "objects/bb/b.dcm", "1" * 64)).result() == []


def test_one_failing_write_does_not_undo_its_batch(store: Store) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO instances (sop_instance_uid) VALUES ('x')")  # NOT NULLs

    futures = [store.record_instance(_instance("1.1")), store.submit(boom),
               store.record_instance(_instance("1.2"))]  # fmt: skip
    assert futures[0].result() == []
    with pytest.raises(sqlite3.IntegrityError):
        futures[1].result()
    assert futures[2].result() == []
    assert {r["sop_instance_uid"] for r in store.rows("SELECT * FROM instances")} == {"1.1", "1.2"}


def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    from gateway.store import StoreClosed

    s = Store(tmp_path / "q.sqlite3")
    s.open()
    s.close()
    with pytest.raises(StoreClosed):
        s.record_instance(_instance("1.2"))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path).open()


def test_reopen_keeps_rows_and_does_not_migrate_again(tmp_path: Path) -> None:
    s = Store(tmp_path / "q.sqlite3")
    s.open()
    s.record_instance(_instance("1.2")).result()
    s.close()
    s2 = Store(tmp_path / "q.sqlite3")
    s2.open()
    assert len(s2.rows("SELECT * FROM instances")) == 1
    s2.close()


def test_a_queue_from_before_the_stage_times_counts_uploads_as_confirmed(tmp_path: Path) -> None:
    """Migration 11 on a queue of schema 10: an uploaded row was confirmed when it was
    uploaded, so Storage Commitment can commit it; the others are not."""
    import sqlite_utils

    path = tmp_path / "q.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    for migrate in MIGRATIONS[:10]:
        migrate(db)
    conn.execute("PRAGMA user_version = 10")
    for uid, state, uploaded in (
        ("1.1", "uploaded", "2024-01-01T00:00:00"),
        ("1.2", "compressed", None),
        ("1.3", "received", None),
    ):
        conn.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
            " series_instance_uid, size, sha256, received_at, state, attempts, updated_at,"
            " uploaded_at) VALUES (?, '1.2', '1.3', '1.4', 1, 'x', 't', ?, 0, 'u', ?)",
            (uid, state, uploaded),
        )  # fmt: skip
    conn.close()
    s = Store(path)
    s.open()
    try:
        rows = {r["sop_instance_uid"]: r for r in s.rows("SELECT * FROM instances")}
        assert rows["1.1"]["confirmed_at"] == "2024-01-01T00:00:00"
        assert rows["1.1"]["compressed_at"] == "2024-01-01T00:00:00"
        assert rows["1.2"]["confirmed_at"] is None and rows["1.2"]["compressed_at"] == "u"
        assert rows["1.3"]["confirmed_at"] is None and rows["1.3"]["compressed_at"] is None
    finally:
        s.close()


def test_reconcile(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    # A committed instance, a leased one, a row whose file vanished, an orphan file,
    # and a temp file of an interrupted C-STORE.
    kept = spool.commit_file(_write(spool.tmp_dir / "a", b"kept"))
    leased = spool.commit_file(_write(spool.tmp_dir / "b", b"leased"))
    orphan = spool.commit_file(_write(spool.tmp_dir / "c", b"orphan"))
    _write(spool.tmp_dir / "partial.dcm", b"half")
    store.record_instance(_instance("1.1", kept.relpath, kept.sha256)).result()
    store.record_instance(_instance("1.2", leased.relpath, leased.sha256)).result()
    store.record_instance(_instance("1.3", "objects/ff/gone.dcm")).result()
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ? WHERE sop_instance_uid = '1.2'", (QueueState.UPLOADING,)
        )
    ).result()

    result = reconcile(spool, store)
    assert (result.temp_files_removed, result.orphans_removed) == (1, 1)
    assert (result.requeued, result.missing_files) == (1, 1)
    assert not spool.path_of(orphan.relpath).exists()
    assert spool.path_of(kept.relpath).exists()
    states = {r["sop_instance_uid"]: r["state"] for r in store.rows("SELECT * FROM instances")}
    assert states == {
        "1.1": QueueState.RECEIVED,
        "1.2": QueueState.COMPRESSED,
        "1.3": QueueState.FAILED,
    }
    assert list(spool.tmp_dir.iterdir()) == []
    assert QueueState.COMPRESSING not in states.values()
    store.close()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_spool_file_name_is_the_content_hash(tmp_path: Path) -> None:
    import hashlib

    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    data = b"DICM" * 1000
    f = spool.commit_file(_write(spool.tmp_dir / "t", data))
    sha = hashlib.sha256(data).hexdigest()
    assert f.relpath == f"objects/{sha[:2]}/{sha}.dcm"
    assert (f.sha256, f.size) == (sha, len(data))
    assert spool.path_of(f.relpath).read_bytes() == data


@given(st.text(max_size=80))
def test_only_digits_and_dots_pass_as_uids(value: str) -> None:
    if is_valid_uid(value):
        assert set(value) <= set("0123456789.")
        assert "/" not in value and ".." not in value and len(value) <= 64


@given(st.integers(min_value=0, max_value=2**64))
def test_generated_uids_are_valid(seed: int) -> None:
    assert is_valid_uid(generate_uid(entropy_srcs=[str(seed)]))


@pytest.mark.parametrize(
    "bad", ["", "../../x", "1.2/../3", "1.02.3", "1..2", ".1.2", "1.2.", "1" * 65, "1.2 ", "a.b"]
)
def test_bad_uids_rejected(bad: str) -> None:
    assert not is_valid_uid(bad)


# -- the owners' reads for the status page (gateway/web/status.py takes its snapshot) --------


def test_queue_reads_for_the_status(store: Store) -> None:
    from gateway import instances

    for uid, ae in (("1.1", "CT1"), ("1.2", "CT1"), ("1.3", "MR1"), ("1.4", "MR1")):
        store.record_instance(_instance(uid, f"objects/00/{uid}.dcm")).result()
        store.submit(
            lambda c, uid=uid, ae=ae: c.execute(
                "UPDATE instances SET calling_ae = ? WHERE sop_instance_uid = ?", (ae, uid)
            )
        ).result()
    s = QueueState
    rows = {
        "1.1": (s.UPLOADED, "2030-01-01T10:00:30", None, '["0xB000 coerced"]', "2020-01-01"),
        "1.2": (s.FAILED, None, "boom", None, "2020-01-02"),
        "1.3": (s.COMPRESSED, None, "HTTP 503", None, "2020-01-03"),
        "1.4": (s.RECEIVED, None, None, None, "2020-01-04"),
    }
    for uid, (state, uploaded_at, error, warnings, received_at) in rows.items():
        store.submit(
            lambda c, uid=uid, r=(state, uploaded_at, error, warnings, received_at): c.execute(
                "UPDATE instances SET state = ?, uploaded_at = ?, last_error = ?, warnings = ?,"
                " received_at = ?, upload_size = 5, upload_path = 'objects/j2k'"
                " WHERE sop_instance_uid = ?",
                (*r, uid),
            )
        ).result()
    conn_reads = store.read
    assert conn_reads(instances.count_by_state) == {
        s.RECEIVED: 1, s.COMPRESSING: 0, s.COMPRESSED: 1, s.UPLOADING: 0, s.UPLOADED: 1,
        s.FAILED: 1,
    }  # fmt: skip
    assert conn_reads(lambda c: instances.uploaded_since(c, "2030-01-01T00:00")) == 1
    assert conn_reads(lambda c: instances.uploaded_since(c, "2030-01-02T00:00")) == 0
    pending = (s.RECEIVED, s.COMPRESSING, s.COMPRESSED, s.UPLOADING)
    assert conn_reads(lambda c: instances.oldest_received_at(c, pending)) == "2020-01-03"
    assert conn_reads(instances.last_uploaded_at) == "2030-01-01T10:00:30"
    received, uploaded = conn_reads(lambda c: instances.per_minute(c, "2000"))
    assert received == {"2020-01-01": (1, 10), "2020-01-02": (1, 10), "2020-01-03": (1, 10),
                        "2020-01-04": (1, 10)}  # fmt: skip
    assert uploaded == {"2030-01-01T10:00": (1, 5)}
    assert conn_reads(lambda c: instances.calling_aes(c, "2020-01-02")) == [
        {"calling_ae": "MR1", "last_24h": 2, "last_seen": "2020-01-04"},
        {"calling_ae": "CT1", "last_24h": 1, "last_seen": "2020-01-02"},
    ]
    assert [r["sop_instance_uid"] for r in conn_reads(lambda c: instances.failed(c, 10))] == ["1.2"]
    assert conn_reads(instances.retrying)[0]["sop_instance_uid"] == "1.3"
    count, recent = conn_reads(lambda c: instances.warned(c, 10))
    assert (count, recent[0]["warnings"]) == (1, ["0xB000 coerced"])
    assert conn_reads(instances.bytes_on_disk) == 4 * (10 + 5)


def test_outbox_reads_for_the_status(store: Store) -> None:
    from gateway.mpps import outbox as mpps_outbox
    from gateway.mpps.outbox import OutboxState

    def fill(conn: sqlite3.Connection) -> None:
        for i, state in enumerate(("sent", "pending", "sending", "failed", "failed")):
            seq = mpps_outbox.enqueue(conn, f"1.{i}", "create", b"", False, f"2020-01-0{i + 1}")
            conn.execute("UPDATE mpps_outbox SET state = ? WHERE seq = ?", (state, seq))

    store.submit(fill).result()
    assert store.read(mpps_outbox.count_unsent) == {
        OutboxState.PENDING: 1, OutboxState.SENDING: 1, OutboxState.FAILED: 2,
    }  # fmt: skip
    assert store.read(mpps_outbox.oldest_waiting_at) == "2020-01-02"
    failed = store.read(lambda c: mpps_outbox.failed_messages(c, 1))
    assert [m["sop_instance_uid"] for m in failed] == ["1.4"]


def test_a_write_waits_for_its_turn_and_takes_it_when_freed(tmp_path: Path) -> None:
    """The writers' turn (another process's writer holding ``<database>-writers``)
    is waited for, and taken as soon as it is released: without the turn, SQLite's
    lock is free here and the write would commit at once."""
    import fcntl
    import os

    from gateway.spool import ofd_lock

    store = Store(tmp_path / "q.sqlite3")
    store.open()
    other = os.open(tmp_path / "q.sqlite3-writers", os.O_RDWR)
    try:
        assert ofd_lock(other, fcntl.F_WRLCK, 0, wait=False)
        future = store.submit(lambda conn: conn.execute("SELECT 1").fetchone()[0])
        with pytest.raises(TimeoutError):
            future.result(timeout=0.3)
        ofd_lock(other, fcntl.F_UNLCK, 0, wait=False)
        assert future.result(timeout=10) == 1
        # And the store lets go of it after each batch: another writer can take it.
        store.submit(lambda conn: None).result(timeout=10)
        assert ofd_lock(other, fcntl.F_WRLCK, 0, wait=True)
    finally:
        os.close(other)
        store.close()

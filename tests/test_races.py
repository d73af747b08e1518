"""Fault injection for the races that lose files and for the store's writer (issue 12).

Spool files are content-addressed, so a row and a C-STORE (or two rows) can share one
path.  Each race is forced, not hoped for: a SQLite write lock held from the test holds
the queue's commits back, and hooks on the spool run the competing step at the exact
point between a commit and the unlink that used to follow it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from gateway import instances
from gateway import store as store_module
from gateway.config import from_dict
from gateway.instances import QueueState, ReceivedInstance
from gateway.pipeline import jobs
from gateway.pipeline.reconcile import reconcile
from gateway.spool import Spool
from gateway.store import Store

from .conftest import GatewayFactory
from .support import corpus
from .support.peers import tool


@contextmanager
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on *db*: the gateway's next commit waits for it."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
        conn.close()


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def _storescu(port: int, path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [tool("storescu"), "-v", "-aec", "DICOMGW", "127.0.0.1", str(port), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _succeeded(proc: subprocess.Popen[str]) -> bool:
    output, _ = proc.communicate(timeout=60)
    if "Received Store Response (Success)" in output:
        return True
    print(output)
    return False


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- defect 1: a changed and an identical re-send racing each other ----------------------


def test_concurrent_changed_and_identical_resend_keep_the_file(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """Content A is stored; then B (same UID, other bytes) and A again arrive on two
    associations while the queue's commits are held back.  Both are acknowledged.  The
    row ends at one of them, and its file must be there: B's commit used to delete A's
    file after A's re-send had renamed onto it, and A's commit deleted B's."""
    gw = gateway_factory(upload={"compression": "none"})
    a = tmp_path / "a.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), a)
    ds.PatientName = "CHANGED^CONTENT"
    b = tmp_path / "b.dcm"
    ds.save_as(b, enforce_file_format=True)
    assert _sha(a) != _sha(b)  # else the test proves nothing

    assert _succeeded(_storescu(gw.port, a))
    (row,) = gw.rows()
    path_a = gw.spool / row["path"]
    first_inode = path_a.stat().st_ino

    with write_lock(gw.db_path):
        send_b = _storescu(gw.port, b)
        # B's file is renamed into the spool; its row waits for the lock.
        _wait_for("B renamed", lambda: len(gw.spool_files()) == 2)
        send_a = _storescu(gw.port, a)
        # A's identical copy is renamed onto A's path (a new inode); its row waits too.
        _wait_for("A renamed again", lambda: path_a.stat().st_ino != first_inode)
    assert _succeeded(send_b)
    assert _succeeded(send_a)

    # The two C-STOREs may be in two receiver processes, each with its own queue
    # writer: either commit can come last once the lock goes, and the row is the
    # content committed last.  Whichever it is, its file must be there, and the
    # other content's file, which nothing refers to, gone.
    (row,) = gw.rows()
    kept = gw.spool / row["path"]
    assert kept.exists(), "the acknowledged re-send lost its file"
    assert _sha(kept) == row["sha256"]
    assert gw.spool_files() == [kept]
    assert gw.stop() == 0
    gw.start()
    (row,) = gw.rows()
    assert row["state"] != QueueState.FAILED, row["last_error"]
    assert gw.stop() == 0


# -- in-process fixtures: a real Store and Spool ----------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", 0)
    s.prepare()
    return s


@pytest.fixture
def wired(tmp_path: Path, spool: Spool) -> Iterator[Store]:
    """A store wired to the spool as the gateway wires them."""
    s = Store(tmp_path / "q.sqlite3", remove_file=spool.remove_unpinned)
    s.open()
    yield s
    s.close()


def _instance(uid: str, path: str, sha: str, size: int) -> ReceivedInstance:
    return ReceivedInstance(
        uid, "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.1", "CT", "127.0.0.1:1",
        "1.2.840.10008.1.2.1", size, sha, path,
    )  # fmt: skip


def _receive(spool: Spool, store: Store, uid: str, data: bytes) -> Future[list[str]]:
    """What the receiver does for one C-STORE: rename (pinned), record, unpin."""
    tmp = spool.tmp_dir / f"in-{uid}-{time.monotonic_ns()}.dcm"
    tmp.write_bytes(data)
    f = spool.commit_file(tmp)
    inst = _instance(uid, f.relpath, f.sha256, f.size)
    return store.record_instance(inst, when_done=lambda: spool.release(f.relpath))


def _settle(store: Store) -> None:
    """Wait until the writer has removed what earlier batches discarded: a caller's
    result comes before the removals that follow its batch's commit."""
    store.submit(lambda c: None).result(timeout=30)


def _config(tmp_path: Path, spool: Spool) -> object:
    return from_dict(
        {
            "spool": {"dir": str(spool.root), "min_free_bytes": 0},
            "database": {"path": str(tmp_path / "q.sqlite3")},
            "upload": {"compression": "none"},
            "retention": {"keep_bytes": 0, "keep_hours": 0},
        }
    )


# -- defect 4: retention against an identical re-send ------------------------------------


@pytest.mark.asyncio
async def test_retention_keeps_the_file_of_an_identical_resend(
    tmp_path: Path, spool: Spool, wired: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uploaded instance is pruned; its identical re-send renames onto the same
    path after the prune committed and before its file is unlinked (the hook)."""
    store = wired
    data = b"DICM" + os.urandom(4096)
    _receive(spool, store, "1.1", data).result()
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ?, uploaded_at = '2000-01-01T00:00:00+00:00'",
            (QueueState.UPLOADED,),
        )
    ).result()
    (row,) = store.rows("SELECT * FROM instances")
    relpath = row["path"]
    resend: list[Future[list[str]]] = []
    real_remove = spool.remove_unpinned

    def hooked(path: str, referenced: Callable[[], bool]) -> bool:
        if path == relpath and not resend:
            # Between the prune's commit and its unlink: the re-send is renamed onto
            # the path (synchronously, here); its row commits afterwards.
            resend.append(_receive(spool, store, "1.1", data))
        return real_remove(path, referenced)

    monkeypatch.setattr(spool, "remove_unpinned", hooked)
    store.remove_file = spool.remove_unpinned
    pipeline = jobs.Pipeline(_config(tmp_path, spool), spool, store)  # type: ignore[arg-type]
    task = asyncio.create_task(pipeline._retention_loop())
    try:
        for _ in range(500):
            if resend and resend[0].done():
                break
            await asyncio.sleep(0.01)
        assert resend, "the prune never tried to remove the file"
        resend[0].result()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (row,) = store.rows("SELECT * FROM instances")
    assert (row["path"], row["state"]) == (relpath, QueueState.RECEIVED)
    assert spool.path_of(relpath).read_bytes() == data, "the re-send's file was deleted"


def test_pruned_file_goes_when_nothing_refers_to_it(spool: Spool, wired: Store) -> None:
    """The other side of the check: an unreferenced, unpinned file is removed, and one
    still referenced by another row (same content, other UID) is kept."""
    store = wired
    _receive(spool, store, "1.1", b"same bytes").result()
    _receive(spool, store, "1.2", b"same bytes").result()
    _receive(spool, store, "1.3", b"other bytes").result()
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ?, uploaded_at = '2000-01-01T00:00:00+00:00'"
            " WHERE sop_instance_uid IN ('1.1', '1.3')",
            (QueueState.UPLOADED,),
        )
    ).result()
    paths = {r["sop_instance_uid"]: r["path"] for r in store.rows("SELECT * FROM instances")}
    candidates = store.read(instances.prune_candidates(0, 0))
    store.submit(instances.prune(candidates), durable=True).result()
    _settle(store)
    assert spool.path_of(paths["1.2"]).exists()  # 1.2 (not uploaded) still refers to it
    assert not spool.path_of(paths["1.3"]).exists()


def test_replaced_file_stays_while_a_cstore_has_it_pinned(spool: Spool, wired: Store) -> None:
    """Replacement against a C-STORE of the same content renamed but not committed."""
    store = wired
    _receive(spool, store, "1.1", b"content A").result()
    (row,) = store.rows("SELECT path FROM instances")
    tmp = spool.tmp_dir / "pending.dcm"
    tmp.write_bytes(b"content A")
    pending = spool.commit_file(tmp)  # another UID's C-STORE, row not yet committed
    _receive(spool, store, "1.1", b"content B").result()
    _settle(store)
    assert spool.path_of(row["path"]).exists(), "removed under a pinned C-STORE"
    spool.release(pending.relpath)
    # Unpinned and never committed: an orphan for the reconciler, not lost data.
    assert reconcile(spool, store).orphans_removed == 1
    assert not spool.path_of(row["path"]).exists()


# -- the compress stage's output that lost its race --------------------------------------


def test_lost_compression_output_is_removed_only_if_unreferenced(
    spool: Spool, wired: Store
) -> None:
    store = wired
    _receive(spool, store, "1.1", b"original").result()
    claimed = store.submit(instances.claim_for_compression(1)).result()[0]
    tmp = spool.tmp_dir / "j2k.dcm"
    tmp.write_bytes(b"compressed")
    output = spool.commit_file(tmp)
    # Re-received meanwhile, and the very output bytes arrive as another instance.
    _receive(spool, store, "1.1", b"original, changed").result()
    _receive(spool, store, "1.9", b"compressed").result()
    result = jobs.TranscodeResult("compressed", "", "1.2.840.10008.1.2.4.90", 8, 10, 0.1)
    mark = instances.mark_compressed(claimed, output.relpath, 10, result)
    unpin = lambda: spool.release(output.relpath)  # noqa: E731
    assert store.submit(mark, durable=False, when_done=unpin).result() is False
    _settle(store)
    assert spool.path_of(output.relpath).exists(), "1.9 refers to it"

    claimed = store.submit(instances.claim_for_compression(2)).result()
    one = next(c for c in claimed if c.sop_instance_uid == "1.1")
    tmp.write_bytes(b"another output")
    output = spool.commit_file(tmp)
    _receive(spool, store, "1.1", b"changed again").result()
    mark = instances.mark_compressed(one, output.relpath, 10, result)
    assert store.submit(mark, durable=False, when_done=unpin).result() is False
    _settle(store)
    assert not spool.path_of(output.relpath).exists()


# -- defect 5: the writer and cancelled callers ------------------------------------------


@pytest.mark.asyncio
async def test_writer_survives_a_cancelled_caller(store: Store) -> None:
    def insert(uid: str) -> Callable[[sqlite3.Connection], None]:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO worklist_sources (source, item_count) VALUES (?, 0)", (uid,))

        return write

    with write_lock(store.path):
        first = store.submit(insert("first"))
        # The writer has taken it and waits for the lock.
        await asyncio.to_thread(_wait_for, "dequeued", store._queue.empty)
        queued = asyncio.wrap_future(store.submit(insert("cancelled")))
        queued.cancel()
        await asyncio.sleep(0)  # the cancel reaches the concurrent future
        running = asyncio.wrap_future(first)
        running.cancel()  # too late: the writer has started it
        await asyncio.sleep(0)
    assert (await asyncio.to_thread(first.result, 10)) is None
    later = store.submit(insert("later"))
    assert later.result(timeout=10) is None, "a write after the cancel hung"
    assert store.alive
    sources = {r["source"] for r in store.rows("SELECT source FROM worklist_sources")}
    # A write cancelled before it started is skipped; one already running completes.
    assert sources == {"first", "later"}


def test_writer_survives_a_raising_done_callback(store: Store) -> None:
    fut = store.submit(lambda c: None)

    def boom(_: object) -> None:
        raise RuntimeError("callback bug")

    fut.add_done_callback(boom)
    fut.result(timeout=10)
    assert store.submit(lambda c: 1).result(timeout=10) == 1
    assert store.alive


@pytest.mark.asyncio
async def test_store_run_is_the_loop_side_submit(store: Store) -> None:
    assert await store.run(lambda c: c.execute("SELECT 41 + 1").fetchone()[0]) == 42


def test_close_finishes_queued_writes_and_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(tmp_path / "q.sqlite3")
    s.open()
    with write_lock(s.path):
        futures = [s.submit(lambda c: 7) for _ in range(5)]
        started = time.monotonic()
        s.close(timeout=0.2)  # the lock outlives the timeout: close does not hang
        assert time.monotonic() - started < 5
    assert "queue database writer still busy after 0.2 s" in caplog.text
    for fut in futures:
        assert fut.result(timeout=30) == 7  # the writer outlives the caller's close
    s._thread.join(timeout=30)  # type: ignore[union-attr]
    assert not s.alive


def test_close_without_a_timeout_is_bounded_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caller's close (the CLI's too) has a bound: store.CLOSE_TIMEOUT_S."""
    monkeypatch.setattr(store_module, "CLOSE_TIMEOUT_S", 0.2)
    s = Store(tmp_path / "q.sqlite3")
    s.open()
    with write_lock(s.path):
        future = s.submit(lambda c: 7)
        s.close()
        assert s.alive  # not waited for: the lock is still held
    assert "queue database writer still busy after 0.2 s" in caplog.text
    assert future.result(timeout=30) == 7
    s._thread.join(timeout=30)  # type: ignore[union-attr]


# -- stop order ------------------------------------------------------------------------------


def test_requests_in_flight_at_sigterm_get_their_true_answer(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """SIGTERM while a C-STORE and an MPPS N-CREATE wait for their commit (held back
    by a write lock the test holds long enough for the pipeline's poll to queue a
    write ahead of them): the stop drains them before cancelling the pipeline, so the
    pipeline's cancelled write cannot take the writer down, and both get Success."""
    from .test_mpps import CREATE, send, started

    gw = gateway_factory(upload={"compression": "none"})
    src = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), src)
    mpps_uid = generate_uid()
    mpps_status: list[int] = []
    assert gw.proc is not None
    with write_lock(gw.db_path):
        time.sleep(jobs._IDLE_POLL_S + 0.5)  # the compress stage's claim is now waiting
        sender = _storescu(gw.port, src)
        _wait_for("C-STORE renamed", lambda: len(gw.spool_files()) == 1)
        modality = threading.Thread(
            target=lambda: mpps_status.extend(send(gw.port, (CREATE, mpps_uid, started())))
        )
        modality.start()
        _wait_for("MPPS association", lambda: "'CT_ROOM1' accepted" in gw.log)
        time.sleep(1.0)  # the N-CREATE follows its association at once
        gw.proc.send_signal(signal.SIGTERM)
        _wait_for("stop began", lambda: "stopping" in gw.log)
        time.sleep(0.5)  # let the old order cancel the pipeline first
    assert _succeeded(sender), gw.log
    modality.join(timeout=60)
    assert mpps_status == [0], gw.log
    assert gw.proc.wait(timeout=60) == 0, gw.log
    assert "stopped cleanly" in gw.log
    assert "Traceback" not in gw.log, gw.log
    rows = gw.rows()
    assert [r["sop_instance_uid"] for r in rows] == [ds.SOPInstanceUID]
    assert [r["sop_instance_uid"] for r in gw.rows("SELECT * FROM mpps")] == [mpps_uid]
    gw.start()
    (row,) = gw.rows()
    assert row["state"] != QueueState.FAILED and (gw.spool / row["path"]).exists()
    assert gw.stop() == 0


# -- the temp sweep and the reconciler ---------------------------------------------------


def test_sweep_keeps_outputs_in_use(spool: Spool) -> None:
    old = time.time() - 3600
    with spool.temp_output("j2k-") as dst:
        dst.write_bytes(b"being verified")
        os.utime(dst, (old, old))
        debris = spool.tmp_dir / "j2k-abandoned.dcm"
        debris.write_bytes(b"x")
        os.utime(debris, (old, old))
        assert spool.sweep_tmp(240) == 1
        assert dst.exists() and not debris.exists()
    assert not dst.exists()  # the output's owner cleans up what it left


@pytest.mark.asyncio
async def test_compress_stage_registers_its_output(
    tmp_path: Path, spool: Spool, wired: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The J2K output being written is known to the sweep for as long as the
    transcode runs (the pool is replaced by a stand-in that sweeps mid-encode)."""
    seen: list[tuple[bool, bool]] = []

    async def fake_transcode(self: jobs.Pipeline, src: Path, dst: Path, claimed: object) -> object:
        dst.write_bytes(b"half an encode")
        old = time.time() - 3600
        os.utime(dst, (old, old))
        spool.sweep_tmp(1)
        seen.append((dst.exists(), str(dst) in spool._outputs))
        dst.unlink()
        return jobs.TranscodeResult("fallback", "stand-in", "1.2.840.10008.1.2.1", 1, 1, 0.0)

    monkeypatch.setattr(jobs.Pipeline, "_transcode", fake_transcode)
    _receive(spool, wired, "1.1", b"x").result()
    pipeline = jobs.Pipeline(_config(tmp_path, spool), spool, wired)  # type: ignore[arg-type]
    pipeline._pool = object()  # type: ignore[assignment]
    (claimed,) = wired.submit(instances.claim_for_compression(1)).result()
    await pipeline._compress_one(claimed)
    assert seen == [(True, True)]
    assert spool._outputs == set()
    (row,) = wired.rows("SELECT state FROM instances")
    assert row["state"] == QueueState.COMPRESSED


def test_reconciler_recompresses_a_missing_j2k_copy(spool: Spool, wired: Store) -> None:
    store = wired
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        _receive(spool, store, uid, f"original {uid}".encode()).result()
    copies = {}
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        tmp = spool.tmp_dir / "out.dcm"
        tmp.write_bytes(f"j2k {uid}".encode())
        f = spool.commit_file(tmp, pin=False)
        copies[uid] = f.relpath
        store.submit(
            lambda c, uid=uid, p=f.relpath: c.execute(
                "UPDATE instances SET upload_path = ?, upload_size = 5,"
                " transcode_outcome = 'compressed' WHERE sop_instance_uid = ?",
                (p, uid),
            )
        ).result()
    s = QueueState
    states = {"1.1": s.COMPRESSED, "1.2": s.UPLOADING, "1.3": s.UPLOADED, "1.4": s.COMPRESSED}
    for uid, state in states.items():
        store.submit(
            lambda c, uid=uid, state=state: c.execute(
                "UPDATE instances SET state = ? WHERE sop_instance_uid = ?", (state, uid)
            )
        ).result()
    for uid in ("1.1", "1.2", "1.3"):
        spool.path_of(copies[uid]).unlink()

    result = reconcile(spool, store)
    assert (result.missing_files, result.recompress, result.orphans_removed) == (0, 2, 0)
    rows = {r["sop_instance_uid"]: r for r in store.rows("SELECT * FROM instances")}
    assert {u: r["state"] for u, r in rows.items()} == {
        "1.1": s.RECEIVED, "1.2": s.RECEIVED, "1.3": s.UPLOADED, "1.4": s.COMPRESSED,
    }  # fmt: skip
    assert [u for u, r in rows.items() if r["upload_path"] is None] == ["1.1", "1.2", "1.3"]
    assert rows["1.4"]["upload_path"] == copies["1.4"]
    assert QueueState.COMPRESSING not in {r["state"] for r in rows.values()}


def test_reconciler_keeps_files_any_row_refers_to(spool: Spool, wired: Store) -> None:
    store = wired
    _receive(spool, store, "1.1", b"shared").result()
    _receive(spool, store, "1.2", b"original").result()
    (shared,) = store.rows("SELECT path FROM instances WHERE sop_instance_uid = '1.1'")
    # 1.2's upload copy has 1.1's content: referenced by upload_path only.
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET upload_path = ? WHERE sop_instance_uid = '1.2'",
            (shared["path"],),
        )
    ).result()
    store.submit(
        lambda c: c.execute("UPDATE instances SET path = NULL WHERE sop_instance_uid = '1.1'")
    ).result()
    result = reconcile(spool, store)
    assert result.orphans_removed == 0
    assert spool.path_of(shared["path"]).exists()


def test_prune_works_in_bounded_passes(spool: Spool, wired: Store) -> None:
    """The writer unlinks what a prune discards, so one pass is bounded; the next
    passes take the rest."""
    store = wired
    for i in range(5):
        _receive(spool, store, f"1.{i}", f"bytes {i}".encode()).result()
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ?, uploaded_at = '2000-01-01T00:00:00+00:00'",
            (QueueState.UPLOADED,),
        )
    ).result()
    passes = []
    while candidates := store.read(instances.prune_candidates(0, 0, max_rows=2)):
        files = store.submit(instances.prune(candidates), durable=True).result()
        passes.append(len(files))
    _settle(store)
    assert passes == [2, 2, 1]
    assert spool.stored_relpaths() == set()

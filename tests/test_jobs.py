"""Queue transitions, retention, backoff and STOW-RS answer parsing, on a real database."""

from __future__ import annotations

import json
import os
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backoff import backoff_seconds
from gateway.config import ConfigError, UploadConfig, from_dict
from gateway.https import ssl_context
from gateway.instances import (
    Claimed,
    HeldAmong,
    QueueState,
    ReceivedInstance,
    prune,
    prune_candidates,
    retry_failed,
)
from gateway.pipeline.jobs import (
    _ENCODER_NICENESS,
    GiveUp,
    _finish_uploads,
    _new_pool,
    _stop_pool,
)
from gateway.pipeline.upload import InstanceOutcome, Item, parse_response
from gateway.store import Store


def _add(store: Store, uid: str, size: int, state: str, hours_ago: float = 0.0) -> None:
    inst = ReceivedInstance(
        uid, "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.1", "CT", "127.0.0.1:1",
        "1.2.840.10008.1.2.1", size, uid.replace(".", "") * 4, f"objects/00/{uid}.dcm",
    )  # fmt: skip
    store.record_instance(inst).result()
    when = (datetime.now(UTC) - timedelta(hours=hours_ago)).isoformat()
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ?, uploaded_at = ?, upload_path = ?, upload_size = ?"
            " WHERE sop_instance_uid = ?",
            (state, when, f"objects/01/{uid}.j2k", size // 2, uid),
        )
    ).result()


def _prune(
    store: Store, keep_bytes: int, keep_hours: float, held: HeldAmong | None = None
) -> list[str]:
    """What the retention loop does: choose on a reader, then clear in a write."""
    candidates = store.read(prune_candidates(keep_bytes, keep_hours, held))
    return store.submit(prune(candidates, held)).result()


def _held(*uids: str) -> HeldAmong:
    return lambda conn, among: set(uids) & set(among)


def _paths(store: Store) -> dict[str, str | None]:
    return {r["sop_instance_uid"]: r["path"] for r in store.rows("SELECT * FROM instances")}


def test_prune_without_cache_deletes_every_confirmed_file(store: Store) -> None:
    _add(store, "1.1", 1000, QueueState.UPLOADED)
    _add(store, "1.2", 1000, QueueState.COMPRESSED)  # not confirmed: never deleted
    _add(store, "1.3", 1000, QueueState.FAILED)  # kept for the operator
    files = _prune(store, 0, 0)
    assert sorted(files) == ["objects/00/1.1.dcm", "objects/01/1.1.j2k"]
    assert _paths(store) == {"1.1": None, "1.2": "objects/00/1.2.dcm", "1.3": "objects/00/1.3.dcm"}


def test_prune_never_takes_the_files_a_commitment_holds(store: Store) -> None:
    _add(store, "1.1", 1000, QueueState.UPLOADED)
    _add(store, "1.2", 1000, QueueState.UPLOADED)
    files = _prune(store, 0, 0, _held("1.2"))
    assert sorted(files) == ["objects/00/1.1.dcm", "objects/01/1.1.j2k"]
    assert _paths(store) == {"1.1": None, "1.2": "objects/00/1.2.dcm"}
    # Released (the report was delivered): it goes with the next round.
    assert sorted(_prune(store, 0, 0, _held())) == [
        "objects/00/1.2.dcm", "objects/01/1.2.j2k",
    ]  # fmt: skip


def test_prune_rechecks_what_changed_after_the_choice(store: Store) -> None:
    """The choice is a read; the write clears only candidates that are still uploaded
    at the same time and that no commitment request has named since."""
    for uid in ("1.1", "1.2", "1.3"):
        _add(store, uid, 1000, QueueState.UPLOADED)
    candidates = store.read(prune_candidates(0, 0))
    assert sorted(c.sop_instance_uid for c in candidates) == ["1.1", "1.2", "1.3"]
    # Between the read and the write: 1.1 is received again, 1.2 is named by a request.
    _add(store, "1.1", 1000, QueueState.RECEIVED)
    files = store.submit(prune(candidates, _held("1.2"))).result()
    assert sorted(files) == ["objects/00/1.3.dcm", "objects/01/1.3.j2k"]
    assert _paths(store) == {"1.1": "objects/00/1.1.dcm", "1.2": "objects/00/1.2.dcm", "1.3": None}


def test_prune_keeps_the_newest_within_the_cache_size(store: Store) -> None:
    for i, age in enumerate([5, 4, 3, 2, 1]):  # 1.0 oldest ... 1.4 newest
        _add(store, f"1.{i}", 1000, QueueState.UPLOADED, hours_ago=age)
    # Each instance counts 1000 + 500 (its J2K copy): 3000 bytes keep the newest two.
    _prune(store, 3000, 0)
    kept = {uid for uid, path in _paths(store).items() if path}
    assert kept == {"1.3", "1.4"}


def test_prune_age_limit_applies_within_the_cache(store: Store) -> None:
    _add(store, "1.1", 10, QueueState.UPLOADED, hours_ago=30)
    _add(store, "1.2", 10, QueueState.UPLOADED, hours_ago=1)
    _prune(store, 10**9, 24)
    assert _paths(store) == {"1.1": None, "1.2": "objects/00/1.2.dcm"}


def test_retry_failed(store: Store) -> None:
    _add(store, "1.1", 10, QueueState.FAILED)
    _add(store, "1.2", 10, QueueState.FAILED)
    store.submit(lambda c: c.execute("UPDATE instances SET upload_path = NULL WHERE "
                                     "sop_instance_uid = '1.2'")).result()  # fmt: skip
    assert store.submit(lambda c: retry_failed(c, ["1.1"])).result() == 1
    assert store.submit(lambda c: retry_failed(c, None)).result() == 1
    states = {r["sop_instance_uid"]: r["state"] for r in store.rows("SELECT * FROM instances")}
    # With its J2K file it goes straight back to upload; without, to compression.
    assert states == {"1.1": QueueState.COMPRESSED, "1.2": QueueState.RECEIVED}
    assert store.submit(lambda c: retry_failed(c, None)).result() == 0


@given(st.integers(min_value=1, max_value=60))
def test_backoff_grows_is_capped_and_jittered(attempts: int) -> None:
    delay = backoff_seconds(attempts, initial=5, maximum=900)
    ceiling = min(900, 5 * 2 ** (attempts - 1))
    assert ceiling / 2 <= delay <= ceiling


def _answer(stored: list[str], failed: list[tuple[str, int]]) -> bytes:
    def ref(uid: str) -> dict[str, object]:
        return {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [uid]}}  # fmt: skip

    body: dict[str, object] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [ref(u) for u in stored]}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [{**ref(u), "00081197": {"vr": "US", "Value": [code]}} for u, code in failed],
        }
    return json.dumps(body).encode()


def test_parse_response_per_instance() -> None:
    items = [Item(uid, Path("/x")) for uid in ("1.1", "1.2", "1.3", "1.4")]
    out = parse_response(202, _answer(["1.1"], [("1.2", 0xC000), ("1.3", 0xA700)]), items)
    assert out["1.1"].stored
    assert not out["1.2"].stored and not out["1.2"].retryable
    assert out["1.2"].reason == "archive refused: cannot understand (0xC000)"
    assert not out["1.3"].stored and out["1.3"].retryable  # out of resources: transient
    assert not out["1.4"].stored and out["1.4"].retryable  # not mentioned: send again


def test_unparsable_answer_is_retried_with_the_reason() -> None:
    (out,) = parse_response(200, b"<html>oops</html>", [Item("1.1", Path("/x"))]).values()
    assert not out.stored and out.retryable and "unparsable" in out.reason


def _seq(*items: object, vr: str = "SQ") -> dict[str, object]:
    return {"vr": vr, "Value": list(items)}


def _uid_el(uid: str) -> dict[str, object]:
    return {"vr": "UI", "Value": [uid]}


# Answers a STOW-RS archive must not give (PS3.18 10.5.3 wants a JSON object), and
# what each must become: (body, reason part) -- every instance retried, none raising.
_ODD_ANSWERS = [
    (b"[]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"42", "not a JSON object"),
    (b'"stored"', "not a JSON object"),
    (b"{not json", "unparsable"),
    # Referenced SOP Sequence that is not a sequence
    (json.dumps({"00081199": _uid_el("1.1")}).encode(), "did not confirm"),
    # items of the sequence are not objects
    (json.dumps({"00081199": _seq("1.1", 7)}).encode(), "unreadable STOW-RS answer"),
    # an item without Referenced SOP Instance UID
    (json.dumps({"00081199": _seq({"00081150": _uid_el("1.2.3")})}).encode(), "did not confirm"),
    # garbage DICOM JSON: unknown VR, wrong value types, a bulk data URI nobody serves
    (json.dumps({"00081199": {"vr": "XX", "Value": [1]}}).encode(), ""),
    (json.dumps({"00100010": {"vr": "PN", "Value": [5]}}).encode(), ""),
    (json.dumps({"7FE00010": {"vr": "OB", "BulkDataURI": "http://x/"}}).encode(), ""),
    (json.dumps({"00081199": {"vr": "SQ", "Value": "abc"}}).encode(), ""),
    (json.dumps({"0008": 1}).encode(), ""),
]


@pytest.mark.parametrize(("body", "reason"), _ODD_ANSWERS)
def test_odd_200_answers_retry_the_batch_never_raise(body: bytes, reason: str) -> None:
    items = [Item("1.1", Path("/x")), Item("1.2", Path("/x"))]
    out = parse_response(200, body, items)
    assert set(out) == {"1.1", "1.2"}
    for outcome in out.values():
        assert not outcome.stored and outcome.retryable, (body, outcome)
        assert reason in outcome.reason and outcome.reason.startswith("HTTP 200"), outcome


def _failed_with(code_element: dict[str, object]) -> bytes:
    item = {"00081155": _uid_el("1.1"), "00081197": code_element}
    return json.dumps({"00081198": _seq(item)}).encode()


@pytest.mark.parametrize(
    "code_element",
    [
        {"vr": "US", "Value": [0xC000, 0xA700]},  # multi-valued
        {"vr": "LO", "Value": ["C000"]},  # not a number
        {"vr": "US", "Value": [None]},
    ],
)
def test_unreadable_failure_reason_is_retried(code_element: dict[str, object]) -> None:
    out = parse_response(409, _failed_with(code_element), [Item("1.1", Path("/x"))])["1.1"]
    assert not out.stored and out.retryable
    assert "FailureReason" in out.reason or "no failure reason" in out.reason


def test_backoff_never_overflows() -> None:
    for attempts in (1024, 1025, 10_000, 10**18):
        assert 450 <= backoff_seconds(attempts, initial=5, maximum=900) <= 900


def _finish(store: Store, attempts: int, give_up: GiveUp, failing_since: str | None) -> None:
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ?, attempts = ?, failing_since = ?",
            (QueueState.UPLOADING, attempts, failing_since),
        )
    ).result()
    (row,) = store.rows("SELECT * FROM instances")
    claimed = Claimed(
        row["sop_instance_uid"], row["study_instance_uid"], row["sha256"], row["path"],
        row["upload_path"], row["transfer_syntax"], row["size"], row["attempts"],
    )  # fmt: skip
    outcome = InstanceOutcome(stored=False, retryable=True, reason="HTTP 503: busy")
    store.submit(_finish_uploads([(claimed, outcome)], lambda n: 1.0, give_up)).result()


def test_attempts_beyond_the_cap_end_as_failed_with_the_reason(store: Store) -> None:
    """Done-when 3: 10,000 attempts in the database (2.0 ** 9999 overflowed before)."""
    _add(store, "1.1", 10, QueueState.COMPRESSED)
    _finish(store, 10_000, GiveUp(max_attempts=500, after_hours=72), None)
    (row,) = store.rows("SELECT * FROM instances")
    assert row["state"] == QueueState.FAILED
    assert row["attempts"] == 10_001
    assert row["last_error"] == (
        "HTTP 503: busy; gave up after 10001 attempts (upload.max_attempts)"
    )
    # An operator's retry gives it a fresh start.
    assert store.submit(lambda c: retry_failed(c, None)).result() == 1
    (row,) = store.rows("SELECT * FROM instances")
    assert (row["state"], row["attempts"], row["failing_since"]) == (QueueState.COMPRESSED, 0, None)


def test_gives_up_after_hours_of_failures(store: Store) -> None:
    _add(store, "1.1", 10, QueueState.COMPRESSED, hours_ago=100)
    store.submit(
        lambda c: c.execute(
            "UPDATE instances SET received_at = ?",
            ((datetime.now(UTC) - timedelta(hours=100)).isoformat(),),
        )
    ).result()
    limits = GiveUp(max_attempts=500, after_hours=72)
    _finish(store, 3, limits, None)  # the first failure starts the clock now
    (row,) = store.rows("SELECT * FROM instances")
    assert row["state"] == QueueState.COMPRESSED and row["failing_since"] is not None
    since = (datetime.now(UTC) - timedelta(hours=73)).isoformat()
    _finish(store, 4, limits, since)
    (row,) = store.rows("SELECT * FROM instances")
    assert row["state"] == QueueState.FAILED
    assert row["last_error"].startswith("HTTP 503: busy; gave up after 73 hours")


def test_tls_context_always_verifies(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ca.issue_cert("box")
    client.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    client.private_key_pem.write_to_path(str(tmp_path / "c.key"))
    ctx = ssl_context(
        UploadConfig(
            dicomweb_url="https://archive.example/dicom-web",
            ca_file=tmp_path / "ca.pem",
            client_cert=tmp_path / "c.pem",
            client_key=tmp_path / "c.key",
        )
    )
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def _buggy_transcode(src: Path, dst: Path, codec: str) -> object:
    """Stands in for a bug inside transcode() (module level: the pool pickles it)."""
    raise ValueError("bug in the encoder glue")


@pytest.mark.asyncio
async def test_a_transcode_bug_falls_back_to_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from gateway.pipeline import jobs
    from gateway.spool import Spool

    from .support import corpus

    config = from_dict(
        {
            "spool": {"dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "database": {"path": str(tmp_path / "q.sqlite3")},
        }
    )
    spool = Spool(config.spool.dir, 0)
    spool.prepare()
    store = Store(config.database.path)
    store.open()
    tmp = spool.tmp_dir / "in.dcm"
    tmp.write_bytes(corpus.testdata("CT_small.dcm").read_bytes())
    f = spool.commit_file(tmp)
    store.record_instance(
        ReceivedInstance(
            "1.2.3",
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2",
            "1.2.1",
            "CT",
            "x:1",
            "1.2.840.10008.1.2.1",
            f.size,
            f.sha256,
            f.relpath,
        )
    ).result()
    monkeypatch.setattr(jobs, "transcode", _buggy_transcode)
    pipeline = jobs.Pipeline(config, spool, store)
    task = asyncio.create_task(pipeline.run())
    try:
        for _ in range(300):
            (row,) = store.rows("SELECT * FROM instances")
            if row["state"] == QueueState.COMPRESSED:
                break
            await asyncio.sleep(0.1)
        assert row["state"] == QueueState.COMPRESSED, "the pipeline stopped on the bug"
        assert row["transcode_outcome"] == "fallback"
        assert "bug in the encoder glue" in row["transcode_reason"]
        assert row["upload_path"] == f.relpath  # the original goes up unchanged
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.close()


def test_encoder_processes_default_to_one_per_core() -> None:
    cores = len(os.sched_getaffinity(0))
    assert from_dict({}).upload.encoder_processes == cores
    assert from_dict({"upload": {"compress_workers": 3}}).upload.encoder_processes == 3
    with pytest.raises(ConfigError, match=r"upload\.compress_workers"):
        from_dict({"upload": {"compress_workers": -1}})


def test_encoder_workers_run_at_lower_priority() -> None:
    pool = _new_pool(1)
    try:
        niceness = pool.submit(os.nice, 0).result(timeout=60)
    finally:
        _stop_pool(pool)
    assert niceness == max(os.nice(0), _ENCODER_NICENESS)


def test_encoders_start_with_the_pool_codecs_loaded_without_the_pipeline() -> None:
    """The encoders are up before the first instance, with the codecs loaded, and
    import only the codec's module: not the pipeline's (aiohttp and the rest)."""
    pool = _new_pool(2)
    try:
        started = len(pool._processes or {})  # before any instance is submitted
        names = ("gateway.pipeline.transcode", "imagecodecs._jpeg2k", "imagecodecs._htj2k",
                 "openjpeg.utils", "gateway.pipeline.jobs", "aiohttp")  # fmt: skip
        # eval: a builtin is what pickles to a spawned process without a test module.
        loaded = pool.submit(eval, f"[m for m in {names!r} if m in __import__('sys').modules]")
        modules = loaded.result(timeout=60)
    finally:
        _stop_pool(pool)
    assert started == 2
    assert modules == list(names[:4])

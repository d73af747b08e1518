"""Fault injection (issue 12): one instance, batch or archive answer fails only itself.

The archive here is the scripted STOW-RS server (tests/support/scripted_archive.py, a
hand-written double written from PS3.18 10.5) for the answers Orthanc cannot be made
to give; the pipeline is the real one, on a real spool and database, in this process
(cheap), and the real gateway process where it matters that it never exits.  The
encoder faults (a hang, a worker that dies) are module-level stand-ins for
transcode() that the spawned pool workers import by name.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway import app as app_module
from gateway import instances
from gateway.config import Config, from_dict
from gateway.instances import QueueState, ReceivedInstance
from gateway.pipeline import jobs
from gateway.pipeline.transcode import TranscodeResult, transcode
from gateway.spool import Spool
from gateway.store import Store

from .conftest import GatewayFactory
from .support import corpus
from .support.peers import storescu
from .support.scripted_archive import (
    ScriptedArchive,
    failed_all,
    html_error,
    json_answer,
    raw,
    reset,
    scripted_archive,
    stall,
    throttled,
    too_large,
)

__all__ = ["scripted_archive"]

HANG_ME = "HANG-ME"
CRASH_ME = "CRASH-ME"


# -- encoder stand-ins (module level: the pool's spawned workers import them) ------------


def _hanging_transcode(src: Path, dst: Path, codec: str) -> TranscodeResult:
    if pydicom.dcmread(src, stop_before_pixels=True).PatientID == HANG_ME:
        time.sleep(3600)
    return transcode(src, dst, codec)


def _crashing_transcode(src: Path, dst: Path, codec: str) -> TranscodeResult:
    if pydicom.dcmread(src, stop_before_pixels=True).PatientID == CRASH_ME:
        os._exit(9)
    return transcode(src, dst, codec)


# -- a pipeline on a real spool and database -----------------------------------------------


class Bench:
    def __init__(self, root: Path, **upload: Any) -> None:
        self.root = root
        self.config: Config = from_dict(
            {
                "spool": {"dir": str(root / "spool"), "min_free_bytes": 0},
                "database": {"path": str(root / "q.sqlite3")},
                "upload": {
                    "compression": "none",
                    "backoff_initial_seconds": 0.05,
                    "backoff_max_seconds": 0.2,
                    **upload,
                },
            }
        )
        self.spool = Spool(self.config.spool.dir, 0)
        self.spool.prepare()
        self.store = Store(self.config.database_path)
        self.store.open()
        self.study = pydicom.uid.generate_uid()
        self.pipeline = jobs.Pipeline(self.config, self.spool, self.store)

    def add(self, name: str = "CT_small.dcm", patient_id: str | None = None) -> str:
        tmp = self.spool.tmp_dir / "in.dcm"
        ds = corpus.with_new_uids(corpus.testdata(name), tmp, study=self.study)
        if patient_id is not None:
            ds.PatientID = patient_id
            ds.save_as(tmp)
        f = self.spool.commit_file(tmp)
        uid = str(ds.SOPInstanceUID)
        self.store.record_instance(
            ReceivedInstance(
                uid,
                str(ds.SOPClassUID),
                self.study,
                str(ds.SeriesInstanceUID),
                "CT",
                "x:1",
                str(ds.file_meta.TransferSyntaxUID),
                f.size,
                f.sha256,
                f.relpath,
            )
        ).result()
        return uid

    def rows(self) -> dict[str, Any]:
        return {r["sop_instance_uid"]: r for r in self.store.rows("SELECT * FROM instances")}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[asyncio.Task[None]]:
        task = asyncio.create_task(self.pipeline.run())
        try:
            yield task
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            self.store.close()

    async def in_one_batch(self, task: asyncio.Task[None]) -> None:
        """Uploads held until every instance is compressed, so they go in one batch."""
        self.pipeline.pause()
        await self.until("compressed", task, _all(QueueState.COMPRESSED))
        self.pipeline.resume()

    async def until(
        self, what: str, task: asyncio.Task[None], done: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
    ) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            assert not task.done(), f"the pipeline stopped: {task.exception()!r}"
            rows = self.rows()
            if done(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}: {[dict(r) for r in rows.values()]}"
                )
            await asyncio.sleep(0.05)


def _all(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda rows: bool(rows) and all(r["state"] == state for r in rows.values())


# -- archive answers ---------------------------------------------------------------------

_ODD_ANSWERS = {
    "empty list": raw(200, b"[]"),
    "null": raw(200, b"null"),
    "a number": raw(200, b"42"),
    "a string": raw(200, b'"ok"'),
    "Referenced item not a sequence": json_answer(
        200, lambda uids: {"00081199": {"vr": "UI", "Value": uids}}
    ),
    "Referenced items not objects": json_answer(
        200, lambda uids: {"00081199": {"vr": "SQ", "Value": [1, "x"]}}
    ),
    "multi-valued FailureReason": failed_all(409, [0xC000, 0xA700]),
    "FailureReason not a number": failed_all(409, ["C000"], vr="LO"),
    "garbage DICOM JSON": json_answer(200, lambda uids: {"0008": {"vr": "SQ"}}),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", list(_ODD_ANSWERS))
async def test_odd_archive_answer_is_retried_then_uploaded(
    answer: str, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = Bench(tmp_path, **scripted_archive.upload_config())
    uids = [bench.add(), bench.add()]
    scripted_archive.script(_ODD_ANSWERS[answer])  # then the default: stored
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert scripted_archive.stored == set(uids)
    assert [r["attempts"] for r in rows.values()] == [2, 2]  # one odd answer, one good


@pytest.mark.asyncio
async def test_a_batch_too_large_for_the_archive_is_split(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.default = too_large(limit=1)
    bench = Bench(tmp_path, batch_max_instances=4, **scripted_archive.upload_config())
    uids = [bench.add() for _ in range(4)]
    async with bench.running() as task:
        await bench.in_one_batch(task)
        await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert scripted_archive.stored == set(uids)
    assert [len(r) for r in scripted_archive.requests] == [4, 2, 1, 1, 2, 1, 1]


@pytest.mark.asyncio
async def test_one_instance_too_large_fails_with_the_reason(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.default = too_large(limit=0)
    bench = Bench(tmp_path, batch_max_instances=2, **scripted_archive.upload_config())
    bench.add()
    bench.add()
    async with bench.running() as task:
        await bench.in_one_batch(task)
        rows = await bench.until("failed", task, _all(QueueState.FAILED))
    assert {r["last_error"] for r in rows.values()} == {"archive refuses the size (HTTP 413)"}
    assert [len(r) for r in scripted_archive.requests] == [2, 1, 1]


@pytest.mark.asyncio
async def test_a_stalled_batch_is_split_and_retried(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.script(stall(60))
    bench = Bench(tmp_path, request_timeout_seconds=1, **scripted_archive.upload_config())
    uids = [bench.add(), bench.add()]
    async with bench.running() as task:
        await bench.in_one_batch(task)
        await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert scripted_archive.stored == set(uids)
    assert [len(r) for r in scripted_archive.requests] == [2, 1, 1]


@pytest.mark.asyncio
async def test_a_big_instance_finishes_on_a_slow_line(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """486 kB at 150 kB/s takes over 3 s, three times request_timeout_seconds: the
    request's budget grows with its size at upload.min_bytes_per_second."""
    scripted_archive.default = throttled(150_000)
    bench = Bench(
        tmp_path, request_timeout_seconds=1, min_bytes_per_second=100_000,
        **scripted_archive.upload_config(),
    )  # fmt: skip
    uid = bench.add("OBXXXX1A.dcm")
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert rows[uid]["attempts"] == 1
    assert scripted_archive.stored == {uid}


@pytest.mark.asyncio
async def test_attempts_beyond_the_cap_fail_with_the_reason_not_a_crash(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """Done-when 3: with 10,000 attempts recorded, the next failure (HTTP 503) makes
    the instance `failed` with the reason; before, 2.0 ** 10000 raised OverflowError."""
    scripted_archive.default = html_error(503)
    bench = Bench(tmp_path, **scripted_archive.upload_config())
    uid = bench.add()
    other = bench.add()
    bench.store.submit(
        lambda c: c.execute(
            "UPDATE instances SET state = ?, upload_path = path, upload_size = size,"
            " attempts = 10000, next_attempt_at = '' WHERE sop_instance_uid = ?",
            (QueueState.COMPRESSED, uid),
        )
    ).result()
    async with bench.running() as task:
        rows = await bench.until(
            "failed", task, lambda rows: rows[uid]["state"] == QueueState.FAILED
        )
        assert rows[uid]["attempts"] == 10_001
        assert rows[uid]["last_error"].startswith("archive answered HTTP 503")
        assert rows[uid]["last_error"].endswith(
            "gave up after 10001 attempts (upload.max_attempts)"
        )
        # The other one is retried meanwhile, and goes up when the archive is back.
        scripted_archive.default = html_error(429)
        await bench.until("retried", task, lambda rows: rows[other]["attempts"] >= 2)
        from .support.scripted_archive import store_all

        scripted_archive.default = store_all()
        await bench.until(
            "uploaded", task, lambda rows: rows[other]["state"] == QueueState.UPLOADED
        )


@pytest.mark.asyncio
async def test_an_unexpected_upload_error_fails_only_its_batch(
    scripted_archive: ScriptedArchive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_store = jobs.StowClient.store
    calls = 0

    async def buggy_store(self: jobs.StowClient, items: Any, priority: bool = False) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug in the upload glue")
        return await real_store(self, items, priority)

    monkeypatch.setattr(jobs.StowClient, "store", buggy_store)
    bench = Bench(tmp_path, **scripted_archive.upload_config())
    uid = bench.add()
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert rows[uid]["attempts"] == 2
    assert scripted_archive.stored == {uid}


# -- the compress stage ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_compress_stage_error_quarantines_only_that_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = Bench(tmp_path)
    bad = bench.add()
    good = [bench.add(), bench.add()]
    real_mark = instances.mark_compressed

    def mark(claimed: instances.Claimed, *args: Any) -> Callable[[sqlite3.Connection], bool]:
        write = real_mark(claimed, *args)
        if claimed.sop_instance_uid != bad:
            return write

        def failing(conn: sqlite3.Connection) -> bool:
            raise sqlite3.IntegrityError("CHECK constraint failed: a database surprise")

        return failing

    monkeypatch.setattr(instances, "mark_compressed", mark)
    async with bench.running() as task:
        rows = await bench.until(
            "settled", task, lambda rows: rows[bad]["state"] == QueueState.FAILED
            and all(rows[g]["state"] == QueueState.COMPRESSED for g in good),
        )  # fmt: skip
    assert "compress stage error" in rows[bad]["last_error"]
    assert "a database surprise" in rows[bad]["last_error"]


@pytest.mark.asyncio
async def test_the_j2k_copy_not_kept_sends_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = Bench(tmp_path, compression="j2k-lossless")
    uid = bench.add()

    def disk_full(path: Path) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench.spool, "commit_file", disk_full)
    async with bench.running() as task:
        rows = await bench.until("compressed", task, _all(QueueState.COMPRESSED))
    assert rows[uid]["transcode_outcome"] == "fallback"
    assert "No space left on device" in rows[uid]["transcode_reason"]
    assert rows[uid]["upload_path"] == rows[uid]["path"]
    assert not list(bench.spool.tmp_dir.iterdir())


@pytest.mark.asyncio
async def test_a_hung_encoder_sends_only_its_image_uncompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "transcode", _hanging_transcode)
    bench = Bench(
        tmp_path, compression="j2k-lossless", compress_workers=2, compress_timeout_seconds=6
    )
    others = [bench.add()]
    async with bench.running() as task:
        # The workers are started (spawned, imports done) before the timed batch, so
        # the images next to the hung one do not spend their time budget starting up.
        await bench.until("warm", task, _all(QueueState.COMPRESSED), timeout=60)
        hung = bench.add(patient_id=HANG_ME)
        others += [bench.add(), bench.add()]
        bench.pipeline.wake()
        rows = await bench.until("compressed", task, _all(QueueState.COMPRESSED), timeout=60)
    assert rows[hung]["transcode_outcome"] == "fallback"
    assert rows[hung]["transcode_reason"] == "encoder timed out after 6 s"
    assert [rows[u]["transcode_outcome"] for u in others] == ["compressed"] * 3


@pytest.mark.asyncio
async def test_a_dying_encoder_sends_only_its_image_uncompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "transcode", _crashing_transcode)
    bench = Bench(tmp_path, compression="j2k-lossless", compress_workers=2)
    others = [bench.add(), bench.add()]
    crasher = bench.add(patient_id=CRASH_ME)
    others.append(bench.add())
    async with bench.running() as task:
        rows = await bench.until("compressed", task, _all(QueueState.COMPRESSED), timeout=60)
    assert rows[crasher]["transcode_outcome"] == "fallback"
    assert rows[crasher]["transcode_reason"] == "encoder process crashed"
    assert [rows[u]["transcode_outcome"] for u in others] == ["compressed"] * 3


# -- the supervisor --------------------------------------------------------------------


def _gateway(tmp_path: Path) -> app_module.Gateway:
    config = from_dict(
        {
            "spool": {"dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "database": {"path": str(tmp_path / "q.sqlite3")},
            "dimse": {"port": 0},
            "web": {"port": 0},
        }
    )
    return app_module.Gateway(config)


@pytest.mark.asyncio
async def test_a_crashed_component_is_restarted_and_shown_degraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "_RESTART_INITIAL_S", 0.01)
    gw = _gateway(tmp_path)
    runs = 0

    async def fail(n: int) -> None:
        raise RuntimeError(f"surprise {n}")

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            async with asyncio.TaskGroup() as tg:  # as the pipeline's stages raise it
                tg.create_task(fail(runs))

    await asyncio.wait_for(gw._supervise("pipeline", flaky), 10)
    assert runs == 3
    assert not gw._stop.is_set() and gw._failure is None
    restarts = gw.metrics.registry.get_sample_value(
        "dicom_gateway_component_restarts_total", {"component": "pipeline"}
    )
    assert restarts == 2
    doc = gw.status.build()
    assert doc.health.state == "degraded"
    (reason,) = [r for r in doc.health.reasons if r.startswith("pipeline")]
    assert "pipeline restarting after error RuntimeError('surprise 2')" in reason
    assert doc.components["pipeline"].count == 2


@pytest.mark.asyncio
async def test_a_corrupt_database_stops_the_gateway(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)

    async def corrupt() -> None:
        async with asyncio.TaskGroup() as tg:  # as the pipeline's stages raise it
            tg.create_task(asyncio.sleep(0))
            raise sqlite3.DatabaseError("database disk image is malformed")

    await asyncio.wait_for(gw._supervise("pipeline", corrupt), 10)
    assert gw._stop.is_set()
    assert gw._failure is not None and "malformed" in gw._failure


@pytest.mark.asyncio
async def test_a_stop_during_the_monitors_spool_check_is_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop ends the receiver's threads; a monitor round that was already under way
    must not take that for a thread that died (CI saw exit 70 after a plain SIGTERM)."""
    monkeypatch.setattr(app_module, "_MONITOR_INTERVAL_S", 0.01)
    gw = _gateway(tmp_path)  # not started: its threads read as not alive
    monkeypatch.setattr(gw.spool, "check", lambda: gw.request_stop("SIGTERM"))
    await asyncio.wait_for(gw._monitor(), 10)
    assert gw._failure is None

    # Without a stop, the same dead threads are a failure.
    gw = _gateway(tmp_path / "again")
    monkeypatch.setattr(gw.spool, "check", lambda: None)
    await asyncio.wait_for(gw._monitor(), 10)
    assert gw._failure == "DIMSE receiver supervisor thread died"


# -- the real gateway process ------------------------------------------------------------


def test_the_gateway_outlives_every_odd_answer(
    gateway_factory: GatewayFactory, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """storescu -> gateway process -> the scripted archive answering, in turn, each
    odd answer, 503/429/502 error pages, a reset, an HTML 200 and a stall: every instance ends
    in the archive, and the process never exits (it used to, with status 70)."""
    scripted_archive.script(
        *_ODD_ANSWERS.values(),
        html_error(503), html_error(429), html_error(502), reset(), raw(200, b"<html>ok</html>",
        content_type="text/html"), stall(60),
    )  # fmt: skip
    gw = gateway_factory(
        upload=scripted_archive.upload_config(
            compression="none", backoff_initial_seconds=0.05, backoff_max_seconds=0.2,
            request_timeout_seconds=1, batch_max_instances=1,
        )
    )  # fmt: skip
    paths = []
    study = pydicom.uid.generate_uid()
    for i in range(2):
        paths.append(tmp_path / f"{i}.dcm")
        corpus.with_new_uids(corpus.testdata("CT_small.dcm"), paths[-1], study=study)
    assert storescu(gw.port, paths).acknowledged == 2
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert gw.proc is not None and gw.proc.poll() is None, gw.log
        states = {r["state"] for r in gw.rows()}
        if states == {"uploaded"} and not scripted_archive.pending_script:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"not all uploaded: {[dict(r) for r in gw.rows()]}\n{gw.log}")
    assert len(scripted_archive.stored) == 2
    assert "crashed" not in gw.log and "Traceback" not in gw.log
    assert json.dumps(gw.rows()[0]["last_error"]) == "null"
    assert gw.stop() == 0


# Installed into the gateway child through sitecustomize (test-only): the compress
# stage raises once, as a bug or a library surprise would, taking the pipeline down.
_CRASH_ONCE = """
import gateway.pipeline.jobs as jobs

_real = jobs.Pipeline._compress_loop
_crashed = []


async def _compress_loop(self):
    if not _crashed:
        _crashed.append(1)
        raise RuntimeError("injected pipeline crash")
    await _real(self)


jobs.Pipeline._compress_loop = _compress_loop
"""


def test_a_crashed_pipeline_restarts_in_process_and_the_port_stays_open(
    gateway_factory: GatewayFactory, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    from .support.peers import echoscu
    from .support.web_client import WebClient, web_port

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CRASH_ONCE)
    gw = gateway_factory(
        start=False,
        upload=scripted_archive.upload_config(
            compression="none", backoff_initial_seconds=0.05, backoff_max_seconds=0.2
        ),
    )
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    gw.start(env={"PYTHONPATH": path})
    src = tmp_path / "ct.dcm"
    sent = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), src)
    assert storescu(gw.port, [src]).acknowledged == 1
    assert echoscu(gw.port)
    deadline = time.monotonic() + 60
    while {r["state"] for r in gw.rows()} != {"uploaded"}:
        assert gw.proc is not None and gw.proc.poll() is None, gw.log
        assert time.monotonic() < deadline, gw.log
        time.sleep(0.1)
    assert scripted_archive.stored == {sent.SOPInstanceUID}
    assert "pipeline crashed; restarting it in 1 s" in gw.log
    assert "injected pipeline crash" in gw.log
    web = WebClient(web_port(gw))
    health = web.get("/api/status").json()["health"]
    assert health["state"] == "degraded"
    assert any(
        r.startswith("pipeline restarting after error RuntimeError('injected pipeline crash')")
        for r in health["reasons"]
    ), health
    metrics = web.get("/metrics").text
    assert 'dicom_gateway_component_restarts_total{component="pipeline"} 1.0' in metrics
    assert web.get("/readyz").status == 200  # receiving is fine
    assert gw.stop() == 0

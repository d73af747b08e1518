"""Bandwidth control (issue 13): the cap, the upload windows and the priority lane.

The token bucket and the windows are pure code, tested with a fake clock.  The cap is
measured where it matters, at the archive: the scripted STOW-RS archive
(tests/support/scripted_archive.py, a hand-written double, because no real archive reports
when each chunk of a request body arrived) logs every chunk it reads, and the bytes
are counted per interval with a generous tolerance (no timed assertion on a noisy
rate).  The windows and the lane run the real pipeline on a real spool and database
with an injected wall clock, and the real gateway process with DCMTK storescu.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, from_dict
from gateway.instances import QueueState, ReceivedInstance
from gateway.pipeline.bandwidth import (
    CHUNK,
    DAYS,
    Bandwidth,
    TokenBucket,
    WindowError,
    Windows,
    parse_window,
)

from .conftest import GatewayFactory
from .support import corpus
from .support.peers import storescu
from .support.scripted_archive import ScriptedArchive, reset, scripted_archive
from .support.web_client import WebClient, web_port
from .test_isolation import Bench, _all
from .test_upload import wait_until

__all__ = ["scripted_archive"]

# 2026-12-07 is a Monday.
MONDAY = datetime(2026, 12, 7)


def _at(day: int, hh: int, mm: int = 0) -> datetime:
    """*day* days after Monday 2026-12-07, at hh:mm (local, naive)."""
    return MONDAY.replace(day=7 + day, hour=hh, minute=mm)


# -- the token bucket ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_bucket_paces_a_stream_to_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, 250, clock, clock.sleep)

    async def send() -> None:
        for _ in range(100):
            await bucket.take(100)

    asyncio.run(send())
    # 10,000 bytes at 1000/s, less the initial burst of 250.
    assert clock.t == pytest.approx(9.75)


def test_bucket_debt_orders_concurrent_takers_and_refills_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 50, clock, clock.sleep)
    assert bucket.charge(50) == 0  # the burst
    assert bucket.charge(100) == pytest.approx(1.0)
    # A second taker at the same instant queues behind the first one's debt.
    assert bucket.charge(100) == pytest.approx(2.0)
    clock.t = 2.0
    assert bucket.charge(0) == 0  # out of debt: 200 tokens earned, 200 owed
    clock.t = 100.0  # a long idle spell earns no more than the burst
    assert bucket.charge(60) == pytest.approx(0.1)
    # A chunk larger than the burst passes, after its time.
    assert bucket.charge(1000) == pytest.approx(10.1)


def test_bucket_with_rate_zero_never_waits() -> None:
    bucket = TokenBucket(0, 0)
    assert bucket.charge(10**12) == 0


# -- windows --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("mon-fri", "not DAYS HH:MM-HH:MM"),
        ("mon-fri 19:00", "not DAYS HH:MM-HH:MM"),
        ("weekdays 19:00-07:00", "unknown day 'weekdays'"),
        ("mon-xyz 19:00-07:00", "unknown day 'mon-xyz'"),
        ("mon 7-9", "is not a time HH:MM"),
        ("mon 19:00-25:00", "is not a time HH:MM"),
        ("mon 24:00-07:00", "cannot start at 24:00"),
        ("mon 10:00-10:00", "starts and ends at the same time"),
    ],
)
def test_bad_windows_are_refused(text: str, problem: str) -> None:
    with pytest.raises(WindowError, match=problem):
        parse_window(text)


def test_a_bad_window_is_a_one_line_config_error_naming_file_and_key() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"upload": {"windows": ["mon-fri 19:00-07:00", "mon-fri 7-19"]}}, "gw.toml")
    message = str(err.value)
    assert message == "gw.toml: upload.windows: 'mon-fri 7-19': '7' is not a time HH:MM"
    assert "\n" not in message
    with pytest.raises(ConfigError, match=r"upload\.max_bytes_per_second: must not be negative"):
        from_dict({"upload": {"max_bytes_per_second": -1}})
    with pytest.raises(ConfigError, match=r"upload\.priority_aets: not a valid AE title"):
        from_dict({"upload": {"priority_aets": ["A" * 17]}})
    c = from_dict({"upload": {"windows": ["daily 00:00-24:00"], "priority_aets": ["ED_CT"]}})
    assert c.upload.windows == ("daily 00:00-24:00",) and c.upload.priority_aets == ("ED_CT",)


def test_windows_cross_midnight_and_belong_to_their_first_day() -> None:
    w = Windows(["mon-fri 19:00-07:00", "sat-sun 00:00-24:00"])
    assert not w.is_open(_at(0, 18, 59))
    assert w.is_open(_at(0, 19, 0))
    assert w.is_open(_at(1, 6, 59))  # Monday night into Tuesday
    assert not w.is_open(_at(1, 7, 0))
    assert w.is_open(_at(5, 6, 0))  # Friday night into Saturday (and Saturday itself)
    assert w.is_open(_at(6, 23, 59))
    assert not w.is_open(_at(7, 6, 0))  # Monday morning: Sunday is not a weeknight start
    assert not w.is_open(_at(0, 6, 0))
    assert Windows([]).is_open(_at(3, 12))  # no windows: always open


def test_day_ranges_lists_and_daily() -> None:
    assert parse_window("fri-mon 08:00-09:00").days == frozenset({4, 5, 6, 0})
    assert parse_window("sat,sun,wed 08:00-09:00").days == frozenset({5, 6, 2})
    assert parse_window("daily 08:00-09:00").days == frozenset(range(7))
    assert parse_window("Mon 08:00-09:00").days == frozenset({0})


def test_next_change() -> None:
    w = Windows(["mon-fri 19:00-07:00"])
    assert w.next_change(_at(0, 12)) == _at(0, 19)
    assert w.next_change(_at(0, 20)) == _at(1, 7)
    assert w.next_change(_at(4, 20)) == _at(5, 7)  # Friday night ends Saturday morning
    assert w.next_change(_at(5, 8)) == _at(7, 19)  # then nothing until Monday evening
    assert Windows([]).next_change(_at(0, 0)) is None
    assert Windows(["daily 00:00-24:00"]).next_change(_at(0, 0)) is None


# -- the pipeline: cap, lane and windows ---------------------------------------------------


def _add(bench: Bench, calling_ae: str, study: str, padding: int = 0) -> str:
    """One instance from *calling_ae* in *study*, padded with a private OB element."""
    tmp = bench.spool.tmp_dir / "in.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), tmp, study=study)
    if padding:
        block = ds.private_block(0x0029, "BANDWIDTH TEST", create=True)
        block.add_new(0x01, "OB", bytes(range(256)) * (padding // 256))
        ds.save_as(tmp, enforce_file_format=True)
    f = bench.spool.commit_file(tmp)
    uid = str(ds.SOPInstanceUID)
    bench.store.record_instance(
        ReceivedInstance(
            uid, str(ds.SOPClassUID), study, str(ds.SeriesInstanceUID), calling_ae, "x:1",
            str(ds.file_meta.TransferSyntaxUID), f.size, f.sha256, f.relpath,
        )
    ).result()  # fmt: skip
    return uid


@pytest.mark.asyncio
async def test_the_cap_holds_at_the_archive(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """Two requests at once share the cap: the archive receives the body bytes at the
    cap (within 10% over the whole run, and within a burst of it in any second)."""
    cap = 500_000
    bench = Bench(
        tmp_path, max_bytes_per_second=cap, batch_max_instances=2, concurrent_requests=2,
        **scripted_archive.upload_config(),
    )  # fmt: skip
    study = pydicom.uid.generate_uid()
    uids = [_add(bench, "CT", study, padding=250_000) for _ in range(8)]
    async with bench.running() as task:
        await bench.until("uploaded", task, _all(QueueState.UPLOADED), timeout=60)
    assert scripted_archive.stored == set(uids)
    chunks = scripted_archive.chunks
    total = sum(n for _, n in chunks)
    assert total > 8 * 250_000
    start, end = chunks[0][0], chunks[-1][0]
    # What the bucket allows from the first chunk to the last: the cap over the
    # interval plus its burst (a quarter second) and the first chunk.
    allowed = cap * (end - start) + cap / 4 + CHUNK
    mean = total / (end - start)
    assert total <= allowed * 1.1, f"mean {mean:.0f} B/s against a cap of {cap}"
    # Not much slower either (the gaps between requests are short).
    assert mean >= cap * 0.7, f"mean {mean:.0f} B/s against a cap of {cap}"
    per_second: dict[int, int] = {}
    for t, n in chunks:
        per_second[int(t - start)] = per_second.get(int(t - start), 0) + n
    assert max(per_second.values()) <= (cap + cap / 4 + CHUNK) * 1.1, per_second


@pytest.mark.asyncio
async def test_the_priority_lane_is_not_held_by_the_cap(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """At 2 KB/s a 240 KB instance would take 90 s; from a priority AE it goes at once,
    and its bytes are charged to the bucket (the other uploads give way)."""
    bench = Bench(
        tmp_path, max_bytes_per_second=2000, priority_aets=["ED_CT"],
        **scripted_archive.upload_config(),
    )  # fmt: skip
    uid = _add(bench, "ED_CT", pydicom.uid.generate_uid(), padding=200_000)
    async with bench.running() as task:
        await bench.until("uploaded", task, _all(QueueState.UPLOADED), timeout=10)
    assert scripted_archive.stored == {uid}
    assert bench.pipeline.bandwidth.bucket.charge(0) > 5  # in debt for its bytes


@pytest.mark.asyncio
async def test_a_closed_window_holds_all_but_the_priority_lane(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = Bench(
        tmp_path, windows=["mon 01:00-02:00"], priority_aets=["ED_CT"], batch_max_instances=10,
        **scripted_archive.upload_config(),
    )  # fmt: skip
    clock = {"now": _at(0, 3)}  # Monday 03:00: closed
    c = bench.config.upload
    bench.pipeline.bandwidth = Bandwidth(
        c.max_bytes_per_second, c.windows, c.priority_aets, now=lambda: clock["now"]
    )
    routine = pydicom.uid.generate_uid()
    stat_study = pydicom.uid.generate_uid()
    held = [_add(bench, "CT_ROOM1", routine) for _ in range(3)]
    # A study with instances from both: only the priority AE's go while closed.
    stat = [_add(bench, "ED_CT", stat_study), _add(bench, "ED_CT", stat_study)]
    mixed = _add(bench, "CT_ROOM1", stat_study)
    assert bench.pipeline.bandwidth.state().window_open is False
    async with bench.running() as task:
        await bench.in_one_batch(task)  # (pause stops the lane too)
        await bench.until(
            "the priority lane uploaded", task, lambda r: all(r[u]["state"] == QueueState.UPLOADED
                                                              for u in stat))  # fmt: skip
        await asyncio.sleep(1.0)  # the loop has looked again meanwhile (idle poll: 5 s)
        bench.pipeline.kick()
        await asyncio.sleep(0.5)
        rows = bench.rows()
        assert [rows[u]["state"] for u in [*held, mixed]] == [QueueState.COMPRESSED] * 4
        assert scripted_archive.requests == [stat]  # one request, one study
        clock["now"] = _at(7, 1, 30)  # next Monday 01:30: open
        assert bench.pipeline.bandwidth.state().window_open is True
        bench.pipeline.kick()
        await bench.until("the rest uploaded", task, _all(QueueState.UPLOADED))
    assert scripted_archive.stored == {*held, *stat, mixed}
    # Still one study per request.
    assert sorted(map(sorted, scripted_archive.requests[1:])) == sorted([sorted(held), [mixed]])


# -- the real gateway process ----------------------------------------------------------------


def _closed_now() -> list[str]:
    """A window that is closed now and for the next two days."""
    return [f"{DAYS[(datetime.now().weekday() + 3) % 7]} 00:00-24:00"]


def _gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return float(family.samples[0].value)
    raise AssertionError(f"no {name}")


def _send(gw_port: int, tmp_path: Path, calling: str, study: str, n: int) -> list[str]:
    paths, uids = [], []
    for i in range(n):
        path = tmp_path / f"{calling}-{i}.dcm"
        ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path, study=study)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    result = storescu(gw_port, paths, calling=calling)
    assert result.acknowledged == n, result.output
    return uids


def test_closed_window_holds_uploads_while_storescu_is_accepted_and_the_stat_lane_flows(
    gateway_factory: GatewayFactory, scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    upload: dict[str, Any] = scripted_archive.upload_config(
        windows=_closed_now(), priority_aets=["ED_CT"], max_bytes_per_second=10_000_000
    )
    gw = gateway_factory(upload=upload)
    routine = _send(gw.port, tmp_path, "CT_ROOM1", pydicom.uid.generate_uid(), 3)
    stat = _send(gw.port, tmp_path, "ED_CT", pydicom.uid.generate_uid(), 1)
    wait_until("the STAT instance in the archive", lambda: scripted_archive.stored == set(stat))

    def compressed() -> bool:
        rows = gw.rows("SELECT * FROM instances WHERE calling_ae = 'CT_ROOM1'")
        return len(rows) == 3 and all(
            r["state"] == QueueState.COMPRESSED and r["transcode_outcome"] == "compressed"
            for r in rows
        )

    wait_until("the routine instances compressed", compressed)
    web = WebClient(web_port(gw))
    uploads = web.status()["uploads"]
    assert uploads["window_open"] is False and uploads["window_changes_at"] is not None
    assert uploads["limit_bytes_per_second"] == 10_000_000
    assert uploads["priority_aets"] == ["ED_CT"]
    metrics = web.get("/metrics").text
    assert _gauge(metrics, "dicom_gateway_upload_window_open") == 0
    assert _gauge(metrics, "dicom_gateway_upload_limit_bytes_per_second") == 10_000_000
    page = web.get("/").text
    assert 'id="upload-window" class="warn">closed' in page and "9.5 MB/s" in page
    assert [uid for r in scripted_archive.requests for uid in r] == stat
    assert gw.stop() == 0

    # The window opens (here: the same spool and queue, started with no window).
    gw = gateway_factory(upload={**upload, "windows": []})
    wait_until("everything in the archive", lambda: scripted_archive.stored == {*routine, *stat})
    metrics = WebClient(web_port(gw)).get("/metrics").text
    assert _gauge(metrics, "dicom_gateway_upload_window_open") == 1
    assert gw.stop() == 0


@pytest.mark.asyncio
async def test_a_paced_request_cut_short_is_retried(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    """A connection reset in the middle of a paced body: the batch is retried, and the
    paced payload's generator is left cleanly (warnings are errors here)."""
    scripted_archive.script(reset())
    bench = Bench(tmp_path, max_bytes_per_second=1_000_000, **scripted_archive.upload_config())
    uid = _add(bench, "CT", pydicom.uid.generate_uid(), padding=300_000)
    async with bench.running() as task:
        rows = await bench.until("uploaded", task, _all(QueueState.UPLOADED))
    assert rows[uid]["attempts"] == 2
    assert scripted_archive.stored == {uid}

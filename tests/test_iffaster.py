"""``upload.compress_when = "if-faster"`` (issue 13): compress only when it does not
delay the instance.

The decision is a pure function, tested with synthetic rates.  The pipeline is then
run for real (spool, database, encoder pool) against the scripted STOW-RS archive
(tests/support/scripted_archive.py, a hand-written double: no real archive can be told to read
a request body at a set rate), once fast and once throttled, and each queue row must
show the decision and its reason.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.instances import QueueState
from gateway.pipeline.iffaster import (
    HOLD_MAX_S,
    CompressMeter,
    IfFaster,
    LinkMeter,
    compress_share,
    plan,
)

from .support.scripted_archive import ScriptedArchive, scripted_archive, throttled
from .test_isolation import Bench, _all

__all__ = ["scripted_archive"]

MB = 1_000_000


def _plan(sizes: list[int], **kw: float) -> list[bool]:
    return [d.compress for d in plan(sizes, **kw)[0]]  # type: ignore[arg-type]


def test_no_measurements_compresses() -> None:
    for link, comp, ratio in [(None, 10 * MB, 2.0), (10 * MB, None, 2.0), (10 * MB, 10 * MB, None)]:
        (d,), _ = plan([MB], link_bps=link, compress_bps=comp, ratio=ratio, backlog_bytes=0,
                       pending_bytes=MB)  # fmt: skip
        assert d.compress and "no measurements" in d.reason


def test_an_idle_fast_link_sends_raw() -> None:
    # 1 Gbit/s (125 MB/s) against one encoder at 10 MB/s: raw 0.004 s, J2K 0.1 s + 0.002.
    (d,), _ = plan([500_000], link_bps=125 * MB, compress_bps=10 * MB, ratio=2.0,
                   backlog_bytes=0, pending_bytes=500_000)  # fmt: skip
    assert not d.compress
    assert d.reason.startswith("if-faster: link idle (compress 8%: link 125.0 MB/s")


def test_a_slow_link_compresses() -> None:
    # 20 Mbit/s (2.5 MB/s): raw 0.2 s, J2K 0.05 s + 0.1 s; and all of a long queue.
    kw = {"link_bps": 2.5 * MB, "compress_bps": 10 * MB, "ratio": 2.0, "backlog_bytes": 0}
    assert _plan([500_000], pending_bytes=500_000, **kw) == [True]
    assert _plan([500_000] * 2, pending_bytes=50 * MB, **kw) == [True, True]
    (d,), _ = plan([500_000], pending_bytes=500_000, **kw)  # type: ignore[arg-type]
    assert d.reason.startswith("if-faster: link busy (compress 100%")


def test_the_break_even_point_of_one_instance() -> None:
    # raw = size/L; compressed = size/C + size/(r*L): equal at L = C * (1 - 1/r).
    comp, ratio = 10 * MB, 2.0
    even = comp * (1 - 1 / ratio)
    kw = {"compress_bps": comp, "ratio": ratio, "backlog_bytes": 0, "pending_bytes": MB}
    assert _plan([MB], link_bps=even * 0.95, **kw) == [True]
    assert _plan([MB], link_bps=even * 1.05, **kw) == [False]


def test_a_busy_link_compresses_even_when_fast() -> None:
    # The link is fast, but 20 MB are queued: 0.16 s to send, more than the 0.05 s
    # this instance takes to compress.
    kw = {"link_bps": 125 * MB, "compress_bps": 10 * MB, "ratio": 2.0, "pending_bytes": 500_000}
    assert _plan([500_000], backlog_bytes=20 * MB, **kw) == [True]
    assert not _plan([500_000], backlog_bytes=1 * MB, **kw)[0]


def test_a_share_keeps_link_and_encoder_both_busy() -> None:
    # 100 Mbit/s, one encoder at 10 MB/s, ratio 2, 50 MB waiting: compressing f of it
    # takes 5 f s to encode and (50 - 25 f) / 12.5 s to send: equal at f = 4/7.
    f = compress_share(link_bps=12.5 * MB, compress_bps=10 * MB, ratio=2.0, backlog_bytes=0,
                       pending_bytes=50 * MB)  # fmt: skip
    assert f == pytest.approx(4 / 7)
    kw = {"link_bps": 12.5 * MB, "compress_bps": 10 * MB, "ratio": 2.0, "backlog_bytes": 0}
    assert _plan([500_000] * 4, pending_bytes=50 * MB, **kw) == [True, True, False, False]
    # The encoder far slower than the link: all raw, however much waits.
    slow = {**kw, "compress_bps": 0.5 * MB}
    assert _plan([500_000] * 4, pending_bytes=50 * MB, **slow) == [False] * 4


def test_link_meter_counts_busy_time_once_and_skips_gaps() -> None:
    meter = LinkMeter()
    assert meter.rate() is None
    meter.started()
    meter.started()  # two requests at once
    time.sleep(0.2)
    meter.finished(1 * MB, ok=True)
    meter.finished(1 * MB, ok=True)
    time.sleep(0.3)  # idle: not counted
    meter.started()
    time.sleep(0.1)
    meter.finished(0, ok=False)  # a failed request's time counts against the next
    meter.started()
    time.sleep(0.1)
    meter.finished(1 * MB, ok=True)
    rate = meter.rate()
    assert rate is not None
    # 3 MB over about 0.4 s busy (not 0.7 s wall, nor 0.6 s of request time).
    assert 3 * MB / 0.6 < rate <= 3 * MB / 0.4


def test_compress_meter_and_the_cap() -> None:
    meter = CompressMeter()
    meter.add(MB, MB // 2, 0.1)
    assert meter.rate() is None  # one encode is not enough
    meter.add(MB, MB // 4, 0.1)
    assert meter.rate() == pytest.approx(10 * MB)
    assert meter.ratio() == pytest.approx(2 * MB / (MB // 2 + MB // 4))
    f = IfFaster(max_bytes_per_second=1000)
    f.link._samples.extend([(10 * MB, 0.01)] * 3)  # measured: 1 GB/s
    assert f.link_rate() == 1000  # at most the cap
    f.encoder.add(MB, MB // 2, 0.1)
    f.encoder.add(MB, MB // 2, 0.1)
    assert f.plan([MB], 0, MB, 1)[0].compress  # 1000 B/s: the link is the bottleneck


def test_one_instance_claims_carry_the_share() -> None:
    """The compress stage claims one instance at a time: a share of 4/7 must still
    compress about 4 of every 7, not none (floor(4/7 * 1) is 0)."""
    f = IfFaster()
    f.link._samples.extend([(int(12.5 * MB), 1.0)] * 3)  # 100 Mbit/s
    f.encoder.add(10 * MB, 5 * MB, 1.0)
    f.encoder.add(10 * MB, 5 * MB, 1.0)  # one encoder at 10 MB/s, ratio 2
    decisions = [f.plan([MB], 0, 50 * MB, 1)[0] for _ in range(70)]
    compressed = sum(d.compress for d in decisions)
    assert compressed == 40, compressed  # 70 * 4/7
    # Spread out, not all at the start or the end.
    assert 3 <= sum(d.compress for d in decisions[:7]) <= 5
    # A small share (a fast link, 1 Gbit/s) is not carried: all raw.
    f.link._samples.extend([(125 * MB, 1.0)] * 20)
    assert not any(f.plan([MB], 0, 50 * MB, 1)[0].compress for _ in range(20))


def test_an_unmeasured_link_is_measured_with_raw_instances_first() -> None:
    f = IfFaster()
    first = f.plan([MB] * 3, 0, 3 * MB, 1)
    assert [d.compress for d in first] == [False, False, True]
    assert first[0].reason == "if-faster: measuring the link (sent raw)"
    assert first[2].reason == "if-faster: no measurements yet"
    # Only MIN_SAMPLES probes, however long the link takes to be measured.
    assert f.ready()  # one more compressed, for the encoders' second sample
    assert f.plan([MB], 0, MB, 1)[0].compress
    # Then nothing more is claimed until the figures are in, for at most HOLD_MAX_S.
    assert not f.ready()
    f._holding_since = time.monotonic() - HOLD_MAX_S  # an archive that answers nothing
    assert f.ready()
    f._holding_since = time.monotonic()
    f.link._samples.extend([(MB, 0.1)] * 2)
    f.encoder.add(MB, MB // 2, 0.1)
    f.encoder.add(MB, MB // 2, 0.1)
    assert f.measured() and f.ready()


# -- the real pipeline -------------------------------------------------------------------

#: 512x512 16-bit CT from pydicom-data (about 0.5 MB, J2K about 2:1).
CT = "693_UNCR.dcm"


async def _upload(bench: Bench, task: asyncio.Task[None], n: int) -> list[str]:
    uids = [bench.add(CT) for _ in range(n)]
    await bench.until("uploaded", task, _all(QueueState.UPLOADED), timeout=60)
    return uids


@pytest.mark.asyncio
async def test_fast_idle_archive_gets_raw(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = Bench(
        tmp_path, compression="j2k-lossless", compress_when="if-faster", compress_workers=1,
        **scripted_archive.upload_config(),
    )  # fmt: skip
    async with bench.running() as task:
        # Measurements: two sent raw to measure the link, two compressed to measure
        # the encoder.
        first = await _upload(bench, task, 4)
        # The uploads above were measured by the pipeline itself...
        f = bench.pipeline.if_faster
        assert f is not None and f.link.rate() is not None and f.encoder.rate() is not None
        # ...but this scripted archive runs on the test's own loop and core, so its
        # measured rate follows the machine's load (13.9 MB/s was seen against 13.3 MB/s
        # of encoding, a fair "link busy").  The decision itself is tested above with
        # synthetic rates; here the link is made what this test means, a fast idle
        # one (1 GB/s), to check the pipeline acts on the decision.
        f.link._samples.extend([(100 * MB, 0.1)] * f.link._samples.maxlen)  # type: ignore[operator]
        later = await _upload(bench, task, 2)
        rows = bench.rows()
    reasons = sorted((rows[u]["transcode_outcome"], rows[u]["transcode_reason"]) for u in first)
    assert reasons == [
        ("compressed", "if-faster: no measurements yet"),
        ("compressed", "if-faster: no measurements yet"),
        ("passthrough", "if-faster: measuring the link (sent raw)"),
        ("passthrough", "if-faster: measuring the link (sent raw)"),
    ]
    for uid in later:
        assert rows[uid]["transcode_outcome"] == "passthrough", rows[uid]["transcode_reason"]
        assert rows[uid]["transcode_reason"].startswith("if-faster: link idle")
        assert rows[uid]["upload_transfer_syntax"] == rows[uid]["transfer_syntax"]
        assert rows[uid]["upload_size"] == rows[uid]["size"]
    assert scripted_archive.stored == set(first + later)


@pytest.mark.asyncio
async def test_throttled_archive_gets_compressed(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    scripted_archive.default = throttled(400_000)  # 3.2 Mbit/s
    bench = Bench(
        tmp_path, compression="j2k-lossless", compress_when="if-faster", compress_workers=1,
        batch_max_instances=1,
        **scripted_archive.upload_config(),
    )  # fmt: skip
    async with bench.running() as task:
        await _upload(bench, task, 4)  # two measure the link, two the encoder
        later = await _upload(bench, task, 2)
        rows = bench.rows()
    for uid in later:
        assert rows[uid]["transcode_outcome"] == "compressed", rows[uid]["transcode_reason"]
        reason = rows[uid]["transcode_reason"]
        assert reason.startswith("if-faster: link busy")
        assert rows[uid]["upload_transfer_syntax"] == "1.2.840.10008.1.2.4.90"
        assert rows[uid]["upload_size"] < rows[uid]["size"]

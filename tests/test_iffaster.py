"""``upload.compress_when = "if-faster"`` (issue 13): compress only when it does not
delay the instance.

The decision is a pure function, tested with synthetic rates.  The pipeline is then
run for real (spool, database, encoder pool) against the scripted STOW-RS archive
(tests/scripted_archive.py, a hand-written double: no real archive can be told to read
a request body at a set rate), once fast and once throttled, and each queue row must
show the decision and its reason.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.iffaster import CompressMeter, IfFaster, LinkMeter, decide
from gateway.store import UPLOADED

from .scripted_archive import ScriptedArchive, scripted_archive, throttled
from .test_isolation import Bench, _all

__all__ = ["scripted_archive"]

MB = 1_000_000


def test_no_measurements_compresses() -> None:
    for link, comp, ratio in [(None, 10 * MB, 2.0), (10 * MB, None, 2.0), (10 * MB, 10 * MB, None)]:
        d = decide(MB, link_bps=link, compress_bps=comp, ratio=ratio, backlog_bytes=0)
        assert d.compress and "no measurements" in d.reason


def test_an_idle_fast_link_sends_raw() -> None:
    # 1 Gbit/s (125 MB/s) against one encoder at 10 MB/s: raw 0.004 s, J2K 0.1 s + 0.002.
    d = decide(500_000, link_bps=125 * MB, compress_bps=10 * MB, ratio=2.0, backlog_bytes=0)
    assert not d.compress
    assert d.reason.startswith("if-faster: link idle")


def test_a_slow_link_compresses() -> None:
    # 20 Mbit/s (2.5 MB/s): raw 0.2 s, J2K 0.05 s + 0.1 s.
    d = decide(500_000, link_bps=2.5 * MB, compress_bps=10 * MB, ratio=2.0, backlog_bytes=0)
    assert d.compress
    assert d.reason.startswith("if-faster: compressing is quicker")


def test_the_break_even_point() -> None:
    # raw = size/L; compressed = size/C + size/(r*L): equal at L = C * (1 - 1/r).
    comp, ratio = 10 * MB, 2.0
    even = comp * (1 - 1 / ratio)
    below = decide(MB, link_bps=even * 0.95, compress_bps=comp, ratio=ratio, backlog_bytes=0)
    above = decide(MB, link_bps=even * 1.05, compress_bps=comp, ratio=ratio, backlog_bytes=0)
    assert below.compress and not above.compress


def test_a_busy_link_compresses_even_when_fast() -> None:
    # The link is fast, but 20 MB are queued: 0.16 s to send, more than the 0.05 s
    # this instance takes to compress, so compressing it costs no time.
    kw = {"link_bps": 125 * MB, "compress_bps": 10 * MB, "ratio": 2.0}
    d = decide(500_000, backlog_bytes=20 * MB, **kw)
    assert d.compress and d.reason.startswith("if-faster: link busy")
    # A backlog shorter than the encode does not count as busy.
    assert not decide(500_000, backlog_bytes=1 * MB, **kw).compress


def test_encodes_queued_ahead_count() -> None:
    # A link busy for 0.2 s: enough for one 0.05 s encode, not behind 0.3 s of others.
    kw = {"link_bps": 125 * MB, "compress_bps": 10 * MB, "ratio": 2.0}
    assert decide(500_000, backlog_bytes=25 * MB, **kw).compress
    d = decide(500_000, backlog_bytes=25 * MB, encodes_ahead_s=0.3, **kw)
    assert not d.compress and d.reason.startswith("if-faster: link idle")


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
    assert f.decide(MB, 0).compress  # 1000 B/s: the link is the bottleneck


# -- the real pipeline -------------------------------------------------------------------

#: 512x512 16-bit CT from pydicom-data (about 0.5 MB, J2K about 2:1).
CT = "693_UNCR.dcm"


async def _upload(bench: Bench, task: asyncio.Task[None], n: int) -> list[str]:
    uids = [bench.add(CT) for _ in range(n)]
    await bench.until("uploaded", task, _all(UPLOADED), timeout=60)
    return uids


@pytest.mark.asyncio
async def test_fast_idle_archive_gets_raw(
    scripted_archive: ScriptedArchive, tmp_path: Path
) -> None:
    bench = Bench(
        tmp_path, compression="j2k-lossless", compress_when="if-faster",
        **scripted_archive.upload_config(),
    )  # fmt: skip
    async with bench.running() as task:
        first = await _upload(bench, task, 4)  # measurements: these are compressed
        later = await _upload(bench, task, 2)
        rows = bench.rows()
    for uid in first[:2]:
        assert rows[uid]["transcode_outcome"] == "compressed"
        assert rows[uid]["transcode_reason"] == "if-faster: no measurements yet"
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
        tmp_path, compression="j2k-lossless", compress_when="if-faster", batch_max_instances=1,
        **scripted_archive.upload_config(),
    )  # fmt: skip
    async with bench.running() as task:
        await _upload(bench, task, 2)
        later = await _upload(bench, task, 2)
        rows = bench.rows()
    for uid in later:
        assert rows[uid]["transcode_outcome"] == "compressed", rows[uid]["transcode_reason"]
        reason = rows[uid]["transcode_reason"]
        assert reason.startswith(("if-faster: compressing is quicker", "if-faster: link busy"))
        assert rows[uid]["upload_transfer_syntax"] == "1.2.840.10008.1.2.4.90"
        assert rows[uid]["upload_size"] < rows[uid]["size"]

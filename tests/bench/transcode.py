"""Lossless transcode figures per file and codec (ratio, time, peak memory), and the
stage's throughput per set with 1 and 2 encoder processes.

Run as ``python tests/bench/transcode.py`` (``make bench``).

* Per file: each file is measured with JPEG 2000 (``j2k-lossless``, OpenJPEG) and
  HTJ2K (``htj2k-lossless``, OpenJPH encoding, OpenJPEG verifying), one worker, each
  in a fresh process so peak memory (ru_maxrss above the loaded-codec baseline) is
  its own; time is the best of three, encode plus the whole verification.  The sets
  of issue 13 are 693_UNCR (CT 512x512, signed 14-bit), MR2_UNCR (MR 1024x1024,
  12-bit) and RG1_UNCR (CR, 7.2 MB, 15-bit).
* Per set: the stage as the pipeline runs it (``gateway.jobs._new_pool``: spawned,
  niced encoder processes), N transcodes of one file submitted at once, after one
  warm-up per process.  MB/s is input MB over the wall clock (encode plus verify);
  CPU is the encoder processes' user+system time.  The machine's load average is
  printed with it: on a shared machine the wall clock is noisy, the CPU time less so.

MB is 10^6 bytes; memory in MiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = [
    "CT_small.dcm",
    "693_UNCR.dcm",
    "MR2_UNCR.dcm",
    "emri_small.dcm",
    "US1_UNCR.dcm",
    "RG1_UNCR.dcm",
]
CODECS = ["j2k-lossless", "htj2k-lossless", "htj2k-lossless-rpcl"]
#: (set, pydicom-data file, instances per run); "MF" is built from 693_UNCR's frame.
SETS = [("CT", "693_UNCR.dcm", 40), ("MR", "MR2_UNCR.dcm", 10), ("CR", "RG1_UNCR.dcm", 4),
        ("MF", "693_UNCR.dcm", 1)]  # fmt: skip
MF_FRAMES = 100


def measure_one(name: str, codec: str) -> None:
    sys.path.insert(0, str(REPO))
    import pydicom
    from pydicom.data import get_testdata_file

    from gateway.transcode import transcode
    from tests.corpus import testdata

    src = testdata(name)
    _ = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array  # load the codecs
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        results = [transcode(src, Path(d) / f"{i}.dcm", codec) for i in range(3)]
    best = min(results, key=lambda r: r.seconds)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    ratio = best.size_in / best.size_out
    print(
        f"| {name} | {codec} | {best.outcome} | {best.size_in / 1e6:.2f} | {ratio:.2f} "
        f"| {best.seconds:.3f} | {best.size_in / 1e6 / best.seconds:.1f} | +{peak_mib:.0f} |"
    )


def _multiframe(directory: Path, frames: int) -> Path:
    """A Multi-frame instance of *frames* copies of 693_UNCR's CT slice, each shifted."""
    import numpy as np
    import pydicom

    from tests.corpus import testdata

    ds = pydicom.dcmread(testdata("693_UNCR.dcm"))
    arr = ds.pixel_array
    stack = np.stack([np.roll(arr, i, axis=1) for i in range(frames)])
    ds.NumberOfFrames = frames
    ds.PixelData = stack.astype(arr.dtype.newbyteorder("<")).tobytes()
    path = directory / f"mf{frames}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def timed_transcode(src: Path, dst: Path, codec: str) -> tuple[str, float]:
    """In an encoder process: the outcome and the process's CPU time for it (all its
    threads; the process runs one transcode at a time)."""
    from gateway.transcode import transcode

    start = time.process_time()
    outcome = transcode(src, dst, codec).outcome
    return outcome, time.process_time() - start


def measure_set(name: str, source: str, count: int, workers: int, codec: str) -> str:
    sys.path.insert(0, str(REPO))
    from gateway.jobs import _new_pool, _stop_pool
    from gateway.transcode import transcode
    from tests.corpus import testdata

    if str(REPO) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        # The spawned encoder processes import this file's gateway, not another one.
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = _multiframe(tmp, MF_FRAMES) if name == "MF" else testdata(source)
        size = src.stat().st_size
        pool = _new_pool(workers)
        try:
            warm = [pool.submit(transcode, src, tmp / f"w{i}.dcm", codec) for i in range(workers)]
            [f.result() for f in warm]
            start = time.perf_counter()
            futures = [
                pool.submit(timed_transcode, src, tmp / f"{i}.dcm", codec) for i in range(count)
            ]
            results = [f.result() for f in futures]
            wall = time.perf_counter() - start
        finally:
            _stop_pool(pool)
    outcomes = {outcome for outcome, _ in results}
    cpu = sum(seconds for _, seconds in results)
    total = size * count / 1e6
    load = os.getloadavg()[0]
    return (
        f"| {name} | {source if name != 'MF' else f'{MF_FRAMES} x 693_UNCR'} | {count} "
        f"| {total:.1f} | {codec} | {workers} | {'/'.join(sorted(outcomes))} | {wall:.2f} "
        f"| {total / wall:.1f} | {total / cpu:.1f} | {load:.1f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", nargs="?", help="measure one file (internal)")
    parser.add_argument("codec", nargs="?", help="with this codec (internal)")
    parser.add_argument("--codecs", default="j2k-lossless,htj2k-lossless", help="for the sets")
    parser.add_argument("--sets", default=",".join(s[0] for s in SETS))
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.name:
        measure_one(args.name, args.codec)
        return 0
    print("## Lossless transcode, one worker (encode + verification, best of 3)\n")
    print("| file | codec | outcome | MB in | ratio | seconds | MB/s | peak memory MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    sys.stdout.flush()
    for name in NAMES:
        for codec in CODECS:
            subprocess.run([sys.executable, __file__, name, codec], check=True)
    print("\n## J2K stage throughput (encode + verification, encoder processes as in the")
    print("pipeline; MB/s of input over the wall clock, and over the workers' CPU time)\n")
    print(
        "| set | file | instances | MB | codec | workers | outcome | seconds | MB/s "
        "| MB/CPU s | load |"
    )
    print("|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|")
    wanted = set(args.sets.split(","))
    for name, source, count in SETS:
        if name not in wanted:
            continue
        for codec in args.codecs.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                for _ in range(args.repeats):
                    print(measure_set(name, source, count, workers, codec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

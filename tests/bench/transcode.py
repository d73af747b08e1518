"""Lossless transcode figures per file and codec (ratio, time, peak memory), and the
stage's throughput per set with 1 and 2 encoder processes.

Run as ``python tests/bench/transcode.py`` (``make bench``).

* Per file: each file is measured with JPEG 2000 (``j2k-lossless``, OpenJPEG) and
  HTJ2K (``htj2k-lossless``, OpenJPH encoding, OpenJPEG verifying), one worker, each
  in a fresh process so peak memory (ru_maxrss above the loaded-codec baseline) is
  its own; time is the best of three, encode plus the whole verification.  The sets
  of issue 13 are 693_UNCR (CT 512x512, signed 14-bit), MR2_UNCR (MR 1024x1024,
  12-bit) and RG1_UNCR (CR, 7.2 MB, 15-bit).
* Per set: the stage as the pipeline runs it (``gateway.pipeline.jobs._new_pool``: spawned,
  niced encoder processes), N transcodes of one file submitted at once, after one
  warm-up per process.  MB/s is input MB over the wall clock (encode plus verify);
  CPU is the encoder processes' user+system time.  The machine's load average is
  printed with it: on a shared machine the wall clock is noisy, the CPU time less so.
* Peak memory of the whole gateway process tree (issue 13, target <= 300 MiB) while it
  compresses one ~300 MB multi-frame instance: a real gateway (``python -m gateway
  run``, ``upload.compression`` set, default encoder processes, no archive), sent
  572 frames of 693_UNCR's CT slice (each shifted, 16-bit, 299.9 MB of Pixel Data)
  by storescu.  The resident set of the gateway and every process below it (encoder
  processes, multiprocessing's helpers) is summed every 20 ms from the C-STORE until
  the queue row says the instance is compressed; each process's own peak (VmHWM) is
  given too, and their sum, an upper bound of the tree's peak.  The summed RSS counts
  every page the processes share (the interpreter, numpy, pydicom, the codecs) once per
  process; the summed PSS (proportional set size) counts each page once, split among
  its sharers, and is what the tree really takes.

MB is 10^6 bytes; memory in MiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
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
#: The multi-frame instance of the memory target: 572 x 512 x 512 x 16 bit = 299.9 MB.
TREE_FRAMES = 572
TREE_TARGET_MIB = 300.0
MIB = 1024 * 1024


def measure_one(name: str, codec: str) -> None:
    sys.path.insert(0, str(REPO))
    import pydicom
    from pydicom.data import get_testdata_file

    from gateway.pipeline.transcode import transcode
    from tests.support.corpus import testdata

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

    from tests.support.corpus import testdata

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
    from gateway.pipeline.transcode import transcode

    start = time.process_time()
    outcome = transcode(src, dst, codec).outcome
    return outcome, time.process_time() - start


def measure_set(name: str, source: str, count: int, workers: int, codec: str) -> str:
    sys.path.insert(0, str(REPO))
    from gateway.pipeline.jobs import _new_pool, _stop_pool
    from gateway.pipeline.transcode import transcode
    from tests.support.corpus import testdata

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


def _big_multiframe(directory: Path, frames: int) -> Path:
    """*frames* copies of 693_UNCR's CT slice (each shifted), written frame by frame."""
    import numpy as np
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from tests.support.corpus import testdata

    ds = pydicom.dcmread(testdata("693_UNCR.dcm"))
    arr = ds.pixel_array
    del ds.PixelData
    ds.NumberOfFrames = frames
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = directory / f"ct{frames}.dcm"
    length = arr.nbytes * frames
    with open(path, "wb") as f:
        pydicom.dcmwrite(f, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
        # (7FE0,0010) Pixel Data, explicit VR little endian: tag, "OW", 2 reserved, length.
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for i in range(frames):
            f.write(np.roll(arr, i, axis=1).astype(arr.dtype.newbyteorder("<")).tobytes())
    return path


def _vmhwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_tree(codec: str, frames: int = TREE_FRAMES) -> str:
    """Peak RSS of the gateway's process tree while it compresses one big multi-frame."""
    sys.path.insert(0, str(REPO))
    import psutil

    from tests.support.gateway_proc import GatewayProcess
    from tests.support.peers import tool

    if str(REPO) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        # The gateway (and its encoder processes) run this file's gateway, not another.
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = _big_multiframe(tmp, frames)
        size = src.stat().st_size
        gw = GatewayProcess(tmp / "gw", upload={"compression": codec})
        gw.start()
        try:
            assert gw.proc is not None
            root = psutil.Process(gw.proc.pid)
            stop = threading.Event()
            peak = [0]
            # PSS: each process's share of the pages it shares (libraries, numpy, the
            # interpreter are in every process): their sum is what the tree takes.
            peak_pss = [0]
            hwm: dict[int, tuple[str, int]] = {}

            def tree() -> list[psutil.Process]:
                return [root, *root.children(recursive=True)]

            def sample() -> None:
                while not stop.is_set():
                    total = pss = 0
                    for proc in tree():
                        try:
                            total += proc.memory_info().rss
                            pss += proc.memory_full_info().pss
                            hwm[proc.pid] = (" ".join(proc.cmdline()[-2:])[-40:], _vmhwm(proc.pid))
                        except (psutil.Error, OSError):
                            pass
                    peak[0] = max(peak[0], total)
                    peak_pss[0] = max(peak_pss[0], pss)
                    time.sleep(0.02)

            idle = sum(p.memory_info().rss for p in tree())
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            start = time.perf_counter()
            cmd = [tool("storescu"), "-aec", "DICOMGW", "-xe", "127.0.0.1", str(gw.port), str(src)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            outcome = None
            while outcome is None and time.perf_counter() - start < 1800:
                rows = gw.rows("SELECT transcode_outcome FROM instances")
                outcome = rows[0][0] if rows else None
                time.sleep(0.1)
            seconds = time.perf_counter() - start
            stop.set()
            sampler.join()
        finally:
            gw.stop()
    per_process = ", ".join(f"{hwm[pid][1] / MIB:.0f}" for pid in sorted(hwm))
    hwm_sum = sum(v for _, v in hwm.values()) / MIB
    met = "met" if peak[0] / MIB <= TREE_TARGET_MIB else "NOT met"
    return (
        f"| {frames} x 693_UNCR, {size / 1e6:.1f} MB | {codec} | {outcome} "
        f"| {seconds:.1f} | {idle / MIB:.0f} | **{peak[0] / MIB:.0f}** ({met}) "
        f"| {peak_pss[0] / MIB:.0f} | {per_process} | {hwm_sum:.0f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", nargs="?", help="measure one file (internal)")
    parser.add_argument("codec", nargs="?", help="with this codec (internal)")
    parser.add_argument("--codecs", default="j2k-lossless,htj2k-lossless", help="for the sets")
    parser.add_argument("--sets", default=",".join(s[0] for s in SETS))
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--only-tree", action="store_true", help="only the process tree's peak memory"
    )
    args = parser.parse_args()
    if args.name:
        measure_one(args.name, args.codec)
        return 0
    if args.only_tree:
        print_tree(args.codecs)
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
    print_tree(args.codecs)
    return 0


def print_tree(codecs: str) -> None:
    print("\n## Peak memory of the gateway's process tree compressing one 300 MB multi-frame")
    print(f"(target <= {TREE_TARGET_MIB:.0f} MiB; RSS summed over the tree every 20 ms)\n")
    print(
        "| instance | codec | outcome | seconds | idle tree MiB | peak tree RSS MiB "
        "| peak tree PSS MiB | VmHWM per process MiB | sum of VmHWM MiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---|---:|")
    for codec in codecs.split(","):
        print(measure_tree(codec), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

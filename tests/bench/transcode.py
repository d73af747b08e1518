"""J2K lossless transcode figures: ratio, time and peak memory per file.

Run as ``python tests/bench/transcode.py`` (``make bench``).  Each file is measured
in a fresh process so peak memory (ru_maxrss above the loaded-codec baseline) is its
own; time is the best of three, including the verifying decode.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = ["CT_small.dcm", "693_UNCR.dcm", "emri_small.dcm", "US1_UNCR.dcm", "RG1_UNCR.dcm"]


def measure_one(name: str) -> None:
    sys.path.insert(0, str(REPO))
    import pydicom
    from pydicom.data import get_testdata_file

    from gateway.transcode import transcode

    src = Path(str(get_testdata_file(name)))
    _ = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array  # load the codecs
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        results = [transcode(src, Path(d) / f"{i}.dcm") for i in range(3)]
    best = min(results, key=lambda r: r.seconds)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    ratio = best.size_in / best.size_out
    print(
        f"| {name} | {best.outcome} | {best.size_in / 1e6:.2f} | {ratio:.2f} "
        f"| {best.seconds:.3f} | {best.size_in / 1e6 / best.seconds:.1f} | +{peak_mib:.0f} |"
    )


def main() -> int:
    if len(sys.argv) > 1:
        measure_one(sys.argv[1])
        return 0
    print("## J2K lossless transcode (encode + verifying decode, best of 3)\n")
    print("| file | outcome | MB in | ratio | seconds | MB/s | peak memory MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    sys.stdout.flush()
    for name in NAMES:
        subprocess.run([sys.executable, __file__, name], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

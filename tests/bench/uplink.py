"""Emulated uplinks (issue 13, Done-when 4): ``python tests/bench/uplink.py`` (as root).

The archive (Orthanc + DICOMweb behind nginx with mutual TLS, tests/support/archive.py) runs
on loopback; only traffic *to nginx's port* is shaped, with ``tc`` on ``lo``: an
``htb`` root qdisc without a default class (packets no filter classifies are sent
directly, unshaped: every other flow on loopback passes as before), one class at the
link's rate, and u32 filters (IPv4 and IPv6) that put packets with destination port =
nginx's port into it.  (This kernel has no ``prio``/``netem`` qdiscs; ``htb``, ``tbf``
and ``u32`` it has.)  The archive's answers and everything else are not
shaped.  The qdisc is removed in ``finally`` (and the bench refuses to start if
``lo`` already has one: it is not ours to replace).

For each link rate (20, 100, 1000 Mbit/s by default) and each mode, a fresh gateway
process receives ``--count`` copies of pydicom-data's 693_UNCR.dcm (512x512 CT,
0.53 MB) over one storescu association, each run with fresh UIDs; e2e is the time
from just before storescu starts until the archive holds every instance.  Modes:
``upload.compression = "none"``, ``"j2k-lossless"`` with ``compress_when = "always"``
and with ``"if-faster"``.  Reported: the table and, per link, if-faster / min(none,
always) (target <= 1.1).  A report, not a test: it exits non-zero only when something
failed functionally.

Measured on the 2-core development box (shared, so +-15% run to run), 2026-12-06,
100 x 693_UNCR.dcm (53 MB), one encoder, e2e in s:

| link | none | always J2K | if-faster | if-faster / min |
|---|---:|---:|---:|---:|
| 20 Mbit/s | 21.35 | 7.57 | 6.94 (92 J2K, 8 raw) | 0.92 |
| 100 Mbit/s | 4.64 | 7.69 | 3.93 (46 J2K, 54 raw) | 0.85 |
| 1000 Mbit/s | 2.37 | 6.57 | 2.39 (14 J2K, 86 raw) | 1.01 |
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from tests.support import corpus  # noqa: E402
from tests.support.archive import ArchiveLab  # noqa: E402
from tests.support.gateway_proc import GatewayProcess  # noqa: E402
from tests.support.peers import storescu  # noqa: E402

MODES = {
    "none": {"compression": "none"},
    "always": {"compression": "j2k-lossless", "compress_when": "always"},
    "if-faster": {"compression": "j2k-lossless", "compress_when": "if-faster"},
}


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)


def shape(port: int, mbit: int) -> None:
    """Shape packets to *port* on lo to *mbit* Mbit/s (see the module docstring)."""
    # lo's MTU is 64 KiB: the bucket must hold a few of its packets.
    burst = str(max(256_000, mbit * 1_000_000 // 8 // 200))  # at least 5 ms of the rate
    tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")  # default 0: direct
    tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb",
       "rate", f"{mbit}mbit", "ceil", f"{mbit}mbit", "burst", burst, "cburst", burst)  # fmt: skip
    for prio, proto, match in (("1", "ip", "ip"), ("2", "ipv6", "ip6")):
        tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", proto, "prio", prio,
           "u32", "match", match, "dport", str(port), "0xffff", "flowid", "1:1")  # fmt: skip


def unshape() -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)


def make_set(directory: Path, source: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    study = pydicom.uid.generate_uid()
    paths = []
    for i in range(count):
        path = directory / f"ct-{i:04d}.dcm"
        corpus.with_new_uids(source, path, study=study)
        paths.append(path)
    return paths


def run_once(
    work: Path, lab: ArchiveLab, mode: str, paths: list[Path], timeout: float
) -> dict[str, object]:
    before = lab.instance_count()
    gw = GatewayProcess(
        work,
        upload={
            "dicomweb_url": lab.dicomweb_url,
            "ca_file": str(lab.ca_file),
            "client_cert": str(lab.client_cert),
            "client_key": str(lab.client_key),
            **MODES[mode],
        },
    ).start()
    try:
        t0 = time.monotonic()
        result = storescu(gw.port, paths, calling="BENCH", timeout=timeout)
        ingest = time.monotonic() - t0
        if result.acknowledged != len(paths):
            raise RuntimeError(f"storescu: {result.acknowledged}/{len(paths)}\n{result.output}")
        deadline = t0 + timeout
        while lab.instance_count() - before < len(paths):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: not all in the archive after {timeout:.0f} s")
            time.sleep(0.05)
        e2e = time.monotonic() - t0
        outcomes = gw_outcomes(gw)
    finally:
        gw.stop()
    return {"e2e": round(e2e, 2), "ingest": round(ingest, 2), "outcomes": outcomes}


def gw_outcomes(gw: GatewayProcess) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(gw.db_path) as conn:
        rows = conn.execute(
            "SELECT transcode_outcome, count(*) FROM instances GROUP BY transcode_outcome"
        ).fetchall()
    return {str(k): int(n) for k, n in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--links", default="20,100,1000", help="Mbit/s, comma-separated")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    check = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    if check.returncode != 0 or "noqueue" not in check.stdout:
        print(f"lo already has a qdisc, not replacing it: {check.stdout!r}", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-uplink-"))
    work.mkdir(parents=True, exist_ok=True)
    source = corpus.testdata("693_UNCR.dcm")
    size = source.stat().st_size
    lab = ArchiveLab(work / "archive").start()
    table: dict[int, dict[str, dict[str, object]]] = {}
    try:
        for mbit in (int(x) for x in args.links.split(",")):
            table[mbit] = {}
            shape(lab.nginx_port, mbit)
            try:
                for mode in MODES:
                    paths = make_set(work / f"set-{mbit}-{mode}", source, args.count)
                    r = run_once(work / f"gw-{mbit}-{mode}", lab, mode, paths, args.timeout)
                    table[mbit][mode] = r
                    print(f"{mbit:5d} Mbit/s {mode:10s} e2e {r['e2e']:7.2f} s  "
                          f"ingest {r['ingest']:5.2f} s  {r['outcomes']}", flush=True)  # fmt: skip
                    shutil.rmtree(work / f"set-{mbit}-{mode}", ignore_errors=True)
            finally:
                unshape()
    finally:
        unshape()
        lab.stop()
    print(f"\nCT {args.count} x 512x512 ({args.count * size / 1e6:.0f} MB), e2e in seconds"
          " (first C-STORE -> last instance in the archive)")  # fmt: skip
    print("| link | none | always J2K | if-faster | if-faster / min(none, always) |")
    print("|---|---:|---:|---:|---:|")
    report = []
    for mbit, row in table.items():
        e = {m: float(str(row[m]["e2e"])) for m in row}
        ratio = e["if-faster"] / min(e["none"], e["always"])
        print(f"| {mbit} Mbit/s | {e['none']:.2f} | {e['always']:.2f} | {e['if-faster']:.2f}"
              f" | {ratio:.2f} {'ok' if ratio <= 1.1 else 'MISSED'} |")  # fmt: skip
        report.append({"mbit": mbit, **row, "ratio": round(ratio, 3)})
    print(json.dumps(report))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

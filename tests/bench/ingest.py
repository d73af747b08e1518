"""Ingest benchmark: the gateway against DCMTK storescp on the same corpus, same run.

Run as ``python tests/bench/ingest.py`` (``make bench`` does).  It is a report, not a
test: it exits 0 whether or not a target is met, and non-zero only when something
failed functionally (an instance not acknowledged or not stored, a server that died or
did not stop cleanly, a tool missing).

What it measures, for each corpus set and each server:

* a fresh server with a fresh output directory on the filesystem of ``--workdir``:
  the gateway as a child process (``python -m gateway run``, default config: fsync of
  every file and of its directory, SQLite ``synchronous=FULL``, ``min_free_bytes = 0``)
  or ``storescp -aet DICOMGW -od DIR +xa PORT`` (DCMTK defaults: no fsync);
* the wall clock of ONE ``storescu`` invocation sending the whole set (explicit VR
  little endian proposed first, the corpus is explicit VR little endian);
* every file acknowledged with Success and present in the output (else: failure);
* the server's peak RSS (``VmHWM`` of the server process, read just before it stops).

Each throughput measurement is repeated (``--repeats``, gateway and storescp
alternating) and the median is reported.  A ~300 MB multi-frame instance is then sent
once to each server, for the peak-RSS target.  DCMTK only disables Nagle's algorithm
when the environment variable ``TCP_NODELAY=1`` is set (checked here before measuring);
it is set for storescu and storescp, and the gateway sets TCP_NODELAY itself.

Corpus (built once under ``<workdir>/corpus`` and reused): ``RG1_UNCR.dcm`` (7.2 MB
Computed Radiography) x20 and ``693_UNCR.dcm`` (512x512 CT) x300 from pydicom-data,
each copy with a fresh SOP Instance UID (one fresh study and series per set), and one
16-bit 512x512x572-frame Multi-frame Grayscale Word Secondary Capture instance
(299.9 MB of pixel data) streamed to disk frame by frame.

MB is 10^6 bytes throughout; RSS is in MiB (2^20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from tests.support.corpus import testdata  # noqa: E402
from tests.support.gateway_proc import GatewayProcess  # noqa: E402
from tests.support.peers import free_port, tool, wait_for_port  # noqa: E402

AE_TITLE = "DICOMGW"
CALLING_AE = "BENCHSCU"
MB = 1_000_000
MIB = 1024 * 1024

# Targets from the issue: gateway MB/s over storescp MB/s, and the multi-frame peak RSS.
RATIO_TARGETS = {"CT": 0.5, "CR": 0.4}
MF_RSS_TARGET_MIB = 150.0

# The multi-frame instance: 512 x 512 x 16 bit x 572 frames = 299,892,736 bytes.
MF_ROWS = MF_COLS = 512
MF_FRAMES = 572
MF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC Image Storage

# DCMTK reads TCP_NODELAY from the environment (Debian's 3.6.7 leaves Nagle on otherwise).
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
_SUCCESS = re.compile(r"Received Store Response \(Success\)")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


class BenchFailure(Exception):
    """Something did not work (as opposed to: a target was not met)."""


@dataclass(frozen=True)
class SetSpec:
    name: str
    source: str
    count: int


SETS = [SetSpec("CT", "693_UNCR.dcm", 300), SetSpec("CR", "RG1_UNCR.dcm", 20)]


@dataclass
class Measurement:
    set: str
    server: str
    instances: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    idle_rss_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds

    @property
    def inst_per_s(self) -> float:
        return self.instances / self.seconds


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout is only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- corpus ------------------------------------------------------------------------------


def _manifest_ok(directory: Path, expect: dict[str, Any]) -> list[Path] | None:
    manifest = directory / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if {k: data.get(k) for k in expect} != expect:
        return None
    files = [directory / name for name in data["files"]]
    sizes = data["sizes"]
    for path, size in zip(files, sizes, strict=True):
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
    return files


def _write_manifest(directory: Path, expect: dict[str, Any], files: list[Path]) -> None:
    data = dict(expect, files=[p.name for p in files], sizes=[p.stat().st_size for p in files])
    tmp = directory / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, directory / "manifest.json")


def build_set(spec: SetSpec, root: Path) -> list[Path]:
    """*spec.count* copies of the pydicom-data file, each with a fresh SOP Instance UID."""
    directory = root / spec.name.lower()
    src = testdata(spec.source)
    expect = {
        "kind": "copies",
        "source": spec.source,
        "source_size": src.stat().st_size,
        "count": spec.count,
    }
    files = _manifest_ok(directory, expect)
    if files is not None:
        log(f"corpus {spec.name}: reusing {len(files)} files in {directory}")
        return files
    log(f"corpus {spec.name}: writing {spec.count} copies of {spec.source} to {directory}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    files = []
    for i in range(spec.count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "InstanceNumber" in ds:
            ds.InstanceNumber = i + 1
        path = directory / f"{spec.name.lower()}_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    _write_manifest(directory, expect, files)
    return files


def build_multiframe(root: Path) -> Path:
    """One uncompressed 16-bit multi-frame instance of ~300 MB, written frame by frame."""
    directory = root / "multiframe"
    expect = {"kind": "multiframe", "rows": MF_ROWS, "cols": MF_COLS, "frames": MF_FRAMES}
    files = _manifest_ok(directory, expect)
    if files is not None:
        log(f"corpus MF: reusing {files[0]}")
        return files[0]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    path = directory / "mf_word_sc.dcm"
    log(f"corpus MF: writing {MF_FRAMES} frames of {MF_ROWS}x{MF_COLS}x16 bit to {path}")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MF_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MF_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = "Bench^Multiframe"
    ds.PatientID = "BENCH-MF"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = MF_FRAMES
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    ds.Rows = MF_ROWS
    ds.Columns = MF_COLS
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"

    frame_bytes = MF_ROWS * MF_COLS * 2
    length = frame_bytes * MF_FRAMES
    yy, xx = np.mgrid[0:MF_ROWS, 0:MF_COLS]
    base = ((yy * 3 + xx * 5) % 4096).astype(np.uint16)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pydicom.dcmwrite(f, ds, enforce_file_format=True)
        # (7FE0,0010) Pixel Data, explicit VR little endian: tag, "OW", 2 reserved, length.
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        header_end = f.tell()
        for i in range(MF_FRAMES):
            f.write(((base + i * 7) % 4096).astype("<u2").tobytes())
        if f.tell() != header_end + length:
            raise BenchFailure(f"{tmp}: wrote {f.tell() - header_end} bytes of pixel data")
        expected_size = f.tell()
    os.replace(tmp, path)
    check = pydicom.dcmread(path, stop_before_pixels=True)
    if path.stat().st_size != expected_size or int(check.NumberOfFrames) != MF_FRAMES:
        raise BenchFailure(f"{path}: the multi-frame instance did not come out as written")
    _write_manifest(directory, expect, [path])
    return path


def warm_cache(files: list[Path]) -> None:
    """Read the corpus once so no server pays for storescu's first cold read."""
    for path in files:
        with open(path, "rb") as f:
            while f.read(8 * MIB):
                pass


# -- servers -----------------------------------------------------------------------------


def proc_status_bytes(pid: int, field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of *pid* from /proc, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise BenchFailure(f"no {field} in /proc/{pid}/status")


class Server(Protocol):
    name: str
    port: int

    def start(self) -> None: ...
    def pid(self) -> int: ...
    def check_alive(self) -> None: ...
    def check_stored(self, count: int) -> int: ...
    def stop(self) -> None: ...
    def diagnostics(self) -> str: ...


class GatewayServer:
    name = "gateway"

    def __init__(self, root: Path) -> None:
        # The tests' config: state under *root*, INFO logging, min_free_bytes = 0, and no
        # knob touching durability (every file and directory is fsynced).  Compression
        # is off: this measures the receive stage, which is what answers the modality;
        # the J2K stage runs after the answer and is measured on its own
        # (tests/bench/transcode.py).
        self.gw = GatewayProcess(root, upload={"compression": "none"})
        self.port = self.gw.port

    def start(self) -> None:
        self.gw.start()

    def pid(self) -> int:
        assert self.gw.proc is not None
        return self.gw.proc.pid

    def check_alive(self) -> None:
        assert self.gw.proc is not None
        if self.gw.proc.poll() is not None:
            raise BenchFailure(f"gateway died (exit {self.gw.proc.returncode})")

    def check_stored(self, count: int) -> int:
        rows = self.gw.rows("SELECT state, size FROM instances")
        files = self.gw.spool_files()
        if len(rows) != count or len(files) != count:
            raise BenchFailure(
                f"gateway: expected {count} queue rows and spool files, "
                f"found {len(rows)} rows and {len(files)} files"
            )
        if leftover := self.gw.temp_files():
            raise BenchFailure(f"gateway: {len(leftover)} temp files left in the spool")
        return sum(int(r["size"]) for r in rows)

    def stop(self) -> None:
        code = self.gw.stop()
        if code != 0:
            raise BenchFailure(f"gateway exited with {code} on SIGTERM")

    def diagnostics(self) -> str:
        return "\n".join(self.gw.log.splitlines()[-30:])


class StorescpServer:
    name = "storescp"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "storescp.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [tool("storescp"), "-aet", AE_TITLE, "-od", str(self.out), "+xa", str(self.port)]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        wait_for_port(self.port)
        self.check_alive()

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchFailure(f"storescp died (exit {self.proc.returncode})")

    def check_stored(self, count: int) -> int:
        files = [p for p in self.out.iterdir() if p.is_file()]
        if len(files) != count:
            raise BenchFailure(f"storescp: expected {count} files, found {len(files)}")
        return sum(p.stat().st_size for p in files)

    def stop(self) -> None:
        assert self.proc is not None
        self.check_alive()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)

    def diagnostics(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-30:])


# -- one measurement ---------------------------------------------------------------------


def send(port: int, files: list[Path], timeout: float) -> tuple[float, str]:
    """One storescu for all *files*; return (wall seconds, output); fail if any is refused."""
    cmd = [tool("storescu"), "-v", "-aec", AE_TITLE, "-aet", CALLING_AE, "-xe"]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=DCMTK_ENV
        )
    except subprocess.TimeoutExpired:
        raise BenchFailure(f"storescu did not finish within {timeout:.0f} s") from None
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    statuses = _RESPONSE.findall(output)
    ok = len(_SUCCESS.findall(output))
    if proc.returncode != 0 or ok != len(files):
        refused = sorted({s for s in statuses if s != "Success"})
        tail = "\n".join(output.splitlines()[-20:])
        raise BenchFailure(
            f"storescu exit {proc.returncode}: {ok} of {len(files)} acknowledged with "
            f"Success ({len(statuses)} responses; others: {refused or 'none'})\n{tail}"
        )
    return seconds, output


def measure(
    set_name: str,
    make_server: Callable[[Path], Server],
    run_dir: Path,
    files: list[Path],
    corpus_bytes: int,
    timeout: float,
) -> Measurement:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    server = make_server(run_dir)
    try:
        server.start()
        time.sleep(0.2)  # let start-up settle before sampling the idle RSS
        idle_rss = proc_status_bytes(server.pid(), "VmRSS")
        seconds, _ = send(server.port, files, timeout)
        server.check_alive()
        peak_rss = proc_status_bytes(server.pid(), "VmHWM")
        stored_bytes = server.check_stored(len(files))
        server.stop()
    except BaseException as exc:
        diag = server.diagnostics()
        _force_stop(server)
        if isinstance(exc, Exception):  # not KeyboardInterrupt: that just stops
            msg = f"{set_name} / {server.name}: {exc!s}\n--- server log (tail) ---\n{diag}"
            raise BenchFailure(msg) from exc
        raise
    # storescp stores the data set with its own File Meta: the corpus size is what was
    # sent, and both servers are credited with the same bytes.
    if abs(stored_bytes - corpus_bytes) > 0.01 * corpus_bytes:
        raise BenchFailure(
            f"{set_name} / {server.name}: stored {stored_bytes} bytes for a "
            f"{corpus_bytes}-byte corpus"
        )
    # Drop this run's files and flush what the server left dirty in the page cache, so
    # the write-back of one run (storescp does not fsync) is not paid by the next one.
    shutil.rmtree(run_dir, ignore_errors=True)
    os.sync()
    return Measurement(
        set=set_name,
        server=server.name,
        instances=len(files),
        bytes=corpus_bytes,
        seconds=seconds,
        peak_rss_bytes=peak_rss,
        idle_rss_bytes=idle_rss,
    )


def _force_stop(server: Server) -> None:
    """Best-effort stop after a failure (the failure is what gets reported)."""
    try:
        server.stop()
    except Exception:
        proc = getattr(server, "proc", None) or getattr(getattr(server, "gw", None), "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def check_dcmtk_nodelay(root: Path) -> str:
    """Prove that this DCMTK honours TCP_NODELAY=1 on both ends before relying on it."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    scp_log = root / "nodelay-storescp.log"
    with open(scp_log, "wb") as logf:
        scp = subprocess.Popen(
            [tool("storescp"), "-d", "-aet", AE_TITLE, "-od", str(root), str(port)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
    try:
        wait_for_port(port)
        echo = subprocess.run(
            [tool("echoscu"), "-d", "-aec", AE_TITLE, "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=DCMTK_ENV,
        )
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    mark = "disabling Nagle algorithm"
    scu_ok = mark in echo.stdout + echo.stderr
    scp_ok = mark in scp_log.read_text(errors="replace")
    scp_log.unlink()
    if not (scu_ok and scp_ok):
        return "TCP_NODELAY=1 set, but DCMTK did NOT confirm disabling Nagle (" + (
            f"scu={'yes' if scu_ok else 'no'}, scp={'yes' if scp_ok else 'no'})"
        )
    return "TCP_NODELAY=1 set for storescu and storescp (DCMTK confirmed: Nagle disabled)"


# -- report ------------------------------------------------------------------------------


@dataclass
class Row:
    set: str
    server: str
    instances: int
    mb: float
    seconds: float
    mb_per_s: float
    inst_per_s: float
    peak_rss_mib: float
    runs: int
    seconds_all: list[float]
    peak_rss_mib_all: list[float]


def summarise(ms: list[Measurement]) -> Row:
    """Median of the repeats (by time); peak RSS is the highest of the repeats."""
    seconds = statistics.median(m.seconds for m in ms)
    first = ms[0]
    return Row(
        set=first.set,
        server=first.server,
        instances=first.instances,
        mb=first.bytes / MB,
        seconds=seconds,
        mb_per_s=first.bytes / MB / seconds,
        inst_per_s=first.instances / seconds,
        peak_rss_mib=max(m.peak_rss_bytes for m in ms) / MIB,
        runs=len(ms),
        seconds_all=[round(m.seconds, 3) for m in ms],
        peak_rss_mib_all=[round(m.peak_rss_bytes / MIB, 1) for m in ms],
    )


def versions() -> dict[str, str]:
    from gateway import __version__ as gateway_version

    dcmtk = subprocess.run(
        [tool("storescu"), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "gateway": gateway_version,
        "dcmtk": dcmtk[0].strip("$ ") if dcmtk else "?",
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
    }


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "bench-results",
        help="corpus cache and server output dirs (default: bench-results/)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per set and server")
    parser.add_argument("--sets", default="CT,CR", help="comma-separated subset of CT,CR")
    parser.add_argument("--no-multiframe", action="store_true", help="skip the 300 MB instance")
    parser.add_argument("--json", type=Path, help="default: <workdir>/ingest.json")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    json_path: Path = args.json or workdir / "ingest.json"
    wanted = {s.strip().upper() for s in args.sets.split(",") if s.strip()}
    sets = [s for s in SETS if s.name in wanted]
    if not sets or len(sets) != len(wanted):
        parser.error(f"--sets must name some of {', '.join(s.name for s in SETS)}")

    servers: list[Callable[[Path], Server]] = [GatewayServer, StorescpServer]
    results: dict[str, list[Measurement]] = {}
    try:
        for name in ("storescu", "storescp", "echoscu"):
            tool(name)
        corpus_root = workdir / "corpus"
        runs_root = workdir / "runs"
        nodelay = check_dcmtk_nodelay(runs_root / "nodelay")
        log(nodelay)
        corpus = {spec.name: build_set(spec, corpus_root) for spec in sets}
        mf = None if args.no_multiframe else build_multiframe(corpus_root)

        for spec in sets:
            files = corpus[spec.name]
            size = sum(p.stat().st_size for p in files)
            warm_cache(files)
            for i in range(args.repeats):
                for make in servers:
                    m = measure(spec.name, make, runs_root / "current", files, size, timeout=600)
                    results.setdefault(f"{spec.name}/{m.server}", []).append(m)
                    log(
                        f"{spec.name} {m.server} run {i + 1}/{args.repeats}: "
                        f"{m.seconds:.2f} s, {m.mb_per_s:.1f} MB/s, "
                        f"{m.inst_per_s:.1f} inst/s, peak RSS {m.peak_rss_bytes / MIB:.0f} MiB"
                    )
        if mf is not None:
            warm_cache([mf])
            for make in servers:
                m = measure("MF", make, runs_root / "current", [mf], mf.stat().st_size, timeout=900)
                results.setdefault(f"MF/{m.server}", []).append(m)
                log(
                    f"MF {m.server}: {m.seconds:.2f} s, {m.mb_per_s:.1f} MB/s, "
                    f"peak RSS {m.peak_rss_bytes / MIB:.0f} MiB"
                )
        shutil.rmtree(runs_root, ignore_errors=True)
    except BenchFailure as exc:
        print(f"ingest benchmark FAILED: {exc}", file=sys.stderr)
        return 1

    rows = {key: summarise(ms) for key, ms in results.items()}
    vers = versions()
    out: list[str] = []
    out.append("## Ingest benchmark: dicom-gateway vs DCMTK storescp")
    out.append("")
    out.append(
        f"{datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()}, "
        f"{os.cpu_count()} CPUs, workdir {workdir}; dicom-gateway {vers['gateway']}, "
        f"{vers['dcmtk']}, Python {vers['python']}. "
        f"Median of {args.repeats} run(s) per set (MF: 1 run); one storescu per run "
        "(`-xe`, wall clock). The gateway fsyncs every file, its directory and a SQLite "
        "commit before acknowledging; storescp (DCMTK defaults) does not fsync. "
        f"{nodelay}. MB = 10^6 bytes; peak RSS = VmHWM of the server process, in MiB."
    )
    out.append("")
    out.append("| set | server | instances | MB | seconds | MB/s | inst/s | peak RSS MiB |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows.values():
        out.append(
            f"| {r.set} | {r.server} | {r.instances} | {r.mb:.1f} | {r.seconds:.2f} | "
            f"{r.mb_per_s:.1f} | {r.inst_per_s:.1f} | {r.peak_rss_mib:.0f} |"
        )
    out.append("")
    ratios: dict[str, dict[str, Any]] = {}
    for spec in sets:
        gw, scp = rows[f"{spec.name}/gateway"], rows[f"{spec.name}/storescp"]
        ratio = gw.mb_per_s / scp.mb_per_s
        target = RATIO_TARGETS[spec.name]
        ratios[spec.name] = {"ratio": ratio, "target": target, "met": ratio >= target}
        out.append(
            f"- {spec.name}: gateway/storescp = {gw.mb_per_s:.1f}/{scp.mb_per_s:.1f} MB/s = "
            f"**{ratio:.2f}x** (target >= {target}x): {verdict(ratio >= target)}"
        )
    mf_summary: dict[str, Any] | None = None
    if "MF/gateway" in rows:
        gw, scp = rows["MF/gateway"], rows["MF/storescp"]
        met = gw.peak_rss_mib <= MF_RSS_TARGET_MIB
        gw_idle_mib = results["MF/gateway"][0].idle_rss_bytes / MIB
        mf_summary = {
            "gateway_peak_rss_mib": gw.peak_rss_mib,
            "gateway_idle_rss_mib": gw_idle_mib,
            "storescp_peak_rss_mib": scp.peak_rss_mib,
            "target_mib": MF_RSS_TARGET_MIB,
            "met": met,
        }
        out.append(
            f"- multi-frame {gw.mb:.1f} MB instance: gateway peak RSS **{gw.peak_rss_mib:.0f} "
            f"MiB** (idle before it: {gw_idle_mib:.0f} MiB; target <= "
            f"{MF_RSS_TARGET_MIB:.0f} MiB): {verdict(met)}; storescp {scp.peak_rss_mib:.0f} MiB"
        )
    print("\n".join(out))

    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "workdir": str(workdir),
        "repeats": args.repeats,
        "tcp_nodelay": nodelay,
        "versions": vers,
        "commands": {
            "send": f"storescu -v -aec {AE_TITLE} -aet {CALLING_AE} -xe 127.0.0.1 PORT FILES...",
            "storescp": f"storescp -aet {AE_TITLE} -od DIR +xa PORT",
            "gateway": "python -m gateway run --config gateway.toml"
            " (tests/support/gateway_proc.py)",
            "env": "TCP_NODELAY=1 for storescu and storescp",
        },
        "units": {"mb": "10^6 bytes", "rss": "MiB (2^20 bytes), VmHWM of the server"},
        "rows": [asdict(r) for r in rows.values()],
        "runs": [
            dict(asdict(m), mb_per_s=m.mb_per_s, inst_per_s=m.inst_per_s)
            for ms in results.values()
            for m in ms
        ],
        "ratios": ratios,
        "multiframe": mf_summary,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

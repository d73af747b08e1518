"""Bandwidth cap benchmark (issue 13, Done-when 5): ``python tests/bench/bandwidth.py``.

A real gateway process with ``upload.max_bytes_per_second`` set (``--cap``, 2 MB/s by
default) uploads to the real archive (Orthanc + DICOMweb behind nginx with mutual TLS,
tests/support/archive.py).  Between the two sits a byte-counting TCP relay that only forwards
(TLS passes through it untouched, so the gateway still verifies nginx and nginx the
gateway): it counts what the gateway sends, per second, as it arrives.  storescu first
sends more than ``--seconds`` at the cap can carry (``compression = "none"``, so the
sizes are known), and the measurement runs for ``--seconds`` from the first byte.

Reported: the mean over the interval and the per-second min/max, against the cap.
The wire carries a little more than the cap counts (HTTP and multipart headers, TLS
records: well under 1%).  It is a report, not a test: it exits 0 whether or not the
target (mean within 10% of the cap) is met, and non-zero only when something failed
functionally (an instance not acknowledged, a server that did not start).

The instances are CT_small (pydicom's test data) with fresh UIDs and a private OB
element of ``--instance-kb`` KB, so a few storescu calls fill the backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from tests.support import corpus  # noqa: E402
from tests.support.archive import ArchiveLab  # noqa: E402
from tests.support.gateway_proc import GatewayProcess  # noqa: E402
from tests.support.peers import storescu  # noqa: E402


class CountingRelay:
    """127.0.0.1:port -> 127.0.0.1:target, counting client-to-server bytes per read."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        #: (time.monotonic(), bytes) of each read from the gateway.
        self.reads: list[tuple[float, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if count:
                    self.reads.append((time.monotonic(), len(data)))
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(
            self._pipe(client_r, server_w, True), self._pipe(server_r, client_w, False)
        )

    def start(self) -> CountingRelay:
        started: Future[None] = Future()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()

            async def up() -> None:
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]

            loop.run_until_complete(up())
            started.set_result(None)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="relay", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


def make_corpus(work: Path, count: int, instance_kb: int) -> list[Path]:
    study = pydicom.uid.generate_uid()
    paths = []
    for i in range(count):
        path = work / f"bw-{i:04d}.dcm"
        ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path, study=study)
        block = ds.private_block(0x0029, "BANDWIDTH BENCH", create=True)
        block.add_new(0x01, "OB", bytes(range(256)) * (instance_kb * 1000 // 256))
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cap", type=int, default=2_000_000, help="max_bytes_per_second")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--instance-kb", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-bandwidth-"))
    work.mkdir(parents=True, exist_ok=True)
    # What the interval carries at the cap, and half again, so the queue never runs dry.
    count = int(args.cap * args.seconds * 1.5 / (args.instance_kb * 1000)) + 2
    paths = make_corpus(work, count, args.instance_kb)
    lab = ArchiveLab(work / "archive").start()
    relay = CountingRelay(lab.nginx_port).start()
    gw: GatewayProcess | None = None
    try:
        url = f"https://localhost:{relay.port}/dicom-web"
        gw = GatewayProcess(
            work / "gw",
            upload={
                "dicomweb_url": url,
                "ca_file": str(lab.ca_file),
                "client_cert": str(lab.client_cert),
                "client_key": str(lab.client_key),
                "compression": "none",
                "max_bytes_per_second": args.cap,
            },
        ).start()
        for i in range(0, len(paths), 20):
            result = storescu(gw.port, paths[i : i + 20], calling="BENCH")
            if result.acknowledged != len(paths[i : i + 20]):
                print(f"storescu failed:\n{result.output}", file=sys.stderr)
                return 1
        deadline = time.monotonic() + 60
        while not relay.reads:
            if time.monotonic() > deadline:
                print("nothing reached the archive in 60 s", file=sys.stderr)
                return 1
            time.sleep(0.05)
        start = relay.reads[0][0]
        time.sleep(max(0.0, start + args.seconds + 0.5 - time.monotonic()))
        reads = [(t - start, n) for t, n in relay.reads if t - start < args.seconds]
        stored = lab.instance_count()
    finally:
        if gw is not None and gw.proc is not None:
            gw.stop()
        relay.stop()
        lab.stop()
    seconds = int(args.seconds)
    per_second = [0] * seconds
    for t, n in reads:
        per_second[min(int(t), seconds - 1)] += n
    total = sum(per_second)
    mean = total / args.seconds
    report = {
        "cap_bytes_per_second": args.cap,
        "seconds": args.seconds,
        "wire_bytes": total,
        "mean_bytes_per_second": round(mean),
        "mean_vs_cap": round(mean / args.cap, 3),
        "per_second_min": min(per_second),
        "per_second_max": max(per_second),
        "per_second_min_vs_cap": round(min(per_second) / args.cap, 3),
        "per_second_max_vs_cap": round(max(per_second) / args.cap, 3),
        "per_second_stdev": round(statistics.pstdev(per_second)),
        "instances_in_archive_at_the_end": stored,
        "instances_sent": len(paths),
        "target_mean_within_10_percent": abs(mean / args.cap - 1) <= 0.10,
    }
    print(f"bandwidth cap {args.cap / 1e6:.2f} MB/s over {args.seconds:.0f} s (wire bytes,"
          " gateway -> nginx mTLS -> Orthanc)")  # fmt: skip
    print(f"  mean     {mean / 1e6:6.3f} MB/s  ({mean / args.cap:.3f} x cap)")
    low, high = min(per_second), max(per_second)
    print(f"  per-second min {low / 1e6:6.3f} MB/s  max {high / 1e6:6.3f} MB/s"
          f"  ({low / args.cap:.3f} .. {high / args.cap:.3f} x cap)")  # fmt: skip
    print(f"  per second (MB): {' '.join(f'{b / 1e6:.2f}' for b in per_second)}")
    print(json.dumps(report))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

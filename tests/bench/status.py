"""Status endpoints on a large queue: ``/api/status`` and ``/`` with 100,000 rows.

Run as ``python tests/bench/status.py`` (``make bench`` does).  A report, not a test:
it exits 0 whether or not the target (p99 < 100 ms) is met, non-zero only when
something failed functionally (a gateway that did not start, a non-200 answer).

Set-up: a queue database of ``--rows`` instances (85 % uploaded over the last week,
2,000 of them in the last hour; 12 % waiting for upload; 3 % failed with a reason;
eight calling AEs), made through the gateway's own migrations and then bulk-inserted;
the waiting rows point at 100 real spool files.  The real gateway runs as a child
process on it (no archive configured, so the queue stays as it is).

Measured, each on one keep-alive connection, ``--requests`` sequential requests after
20 warm-up ones, latency per request (p50, p99, max):

* ``GET /api/status`` and ``GET /`` of the gateway (answered from the latest status
  snapshot, refreshed in a worker thread when older than a second);
* ``GET /api/status?fresh=1``: waits for a new snapshot each time, i.e. the cost of the
  status queries themselves (the worst case a single request can see);
* the reference: the same page and JSON, saved to files and served as static files by
  a plain aiohttp server in another process (``web.FileResponse``);
* while the gateway is being measured, a second connection asks ``/livez`` every 10 ms:
  its latency shows whether the event loop was ever blocked by the status work.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway.store import Store  # noqa: E402
from tests.support.gateway_proc import GatewayProcess  # noqa: E402
from tests.support.peers import free_port, wait_for_port  # noqa: E402

TARGET_P99_MS = 100.0
AES = ["CT_ROOM1", "CT_ROOM2", "MR_3T", "US_1", "US_2", "CR_ER", "DX_WARD", "MG_1"]

_STATIC_SERVER = """
import sys
from pathlib import Path
from aiohttp import web
root = Path(sys.argv[1])
async def page(request):
    return web.FileResponse(root / "page.html", headers={"Content-Type": "text/html"})
async def status(request):
    return web.FileResponse(root / "status.json", headers={"Content-Type": "application/json"})
app = web.Application()
app.router.add_get("/", page)
app.router.add_get("/api/status", status)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds")


def build_queue(root: Path, rows: int) -> None:
    db_path = root / "gateway.sqlite3"
    store = Store(db_path)
    store.open()  # the gateway's own schema and migrations
    store.close()
    objects = root / "spool" / "objects"
    files = []
    for i in range(100):
        data = f"bench file {i}".encode() * 100
        sha = hashlib.sha256(data).hexdigest()
        (objects / sha[:2]).mkdir(parents=True, exist_ok=True)
        (objects / sha[:2] / f"{sha}.dcm").write_bytes(data)
        files.append((f"objects/{sha[:2]}/{sha}.dcm", len(data)))
    (root / "spool" / "tmp").mkdir(parents=True, exist_ok=True)

    rng = random.Random(5)
    now = datetime.now(UTC)
    uploaded = int(rows * 0.85)
    failed = int(rows * 0.03)
    batch = []
    for i in range(rows):
        if i < uploaded:
            # 2,000 in the last hour, the rest over the last week.
            age = rng.uniform(0, 3600) if i < 2000 else rng.uniform(3600, 7 * 86400)
            received = now - timedelta(seconds=age + 30)
            state, uploaded_at = "uploaded", _iso(received + timedelta(seconds=20))
            path, size, error = None, rng.randint(100_000, 600_000), None
        else:
            received = now - timedelta(seconds=rng.uniform(0, 6 * 3600))
            uploaded_at = None
            path, size = files[i % len(files)]
            if i < uploaded + failed:
                state, error = "failed", "archive refused: cannot understand (0xC000)"
            else:
                state, error = "compressed", None
        batch.append(
            (
                f"1.2.826.0.1.3680043.8.498.{i + 1}", "1.2.840.10008.5.1.4.1.1.2",
                f"1.2.826.0.1.3680043.8.498.9{i // 200}", f"1.2.826.0.1.3680043.8.498.8{i // 50}",
                AES[i % len(AES)], "10.0.0.5:40000", "1.2.840.10008.1.2.1", size,
                hashlib.sha256(str(i).encode()).hexdigest(), path, _iso(received), state,
                1 if state != "compressed" else 0, _iso(received), error, _iso(received),
                path, size, "1.2.840.10008.1.2.4.90", uploaded_at,
            )
        )  # fmt: skip
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid,"
            " series_instance_uid, calling_ae, peer_address, transfer_syntax, size, sha256,"
            " path, received_at, state, attempts, next_attempt_at, last_error, updated_at,"
            " upload_path, upload_size, upload_transfer_syntax, uploaded_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            batch,
        )
    conn.execute("ANALYZE")
    conn.close()


def _get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:200]!r}")
    return body


def measure(port: int, path: str, requests: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(20):
            _get(conn, path)
        latencies = []
        for _ in range(requests):
            started = time.perf_counter()
            _get(conn, path)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies
    finally:
        conn.close()


class LoopProbe(threading.Thread):
    """Asks /livez every 10 ms on its own connection while the gateway is measured."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            started = time.perf_counter()
            _get(conn, "/livez")
            self.latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
        conn.close()


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "status.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-status-", dir=args.workdir))
    results: dict[str, Any] = {"rows": args.rows, "requests": args.requests}
    static: subprocess.Popen[bytes] | None = None
    gw = GatewayProcess(work / "gw", upload={"compression": "none"})
    try:
        started = time.perf_counter()
        build_queue(work / "gw", args.rows)
        results["build_seconds"] = round(time.perf_counter() - started, 1)
        gw.start(timeout=120)
        from tests.support.web_client import web_port

        port = web_port(gw)
        probe_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status = json.loads(_get(probe_conn, "/api/status?fresh=1"))
        assert sum(status["queue"]["by_state"].values()) == args.rows, status["queue"]
        ref = work / "static"
        ref.mkdir()
        (ref / "page.html").write_bytes(_get(probe_conn, "/"))
        (ref / "status.json").write_bytes(_get(probe_conn, "/api/status"))
        probe_conn.close()

        probe = LoopProbe(port)
        probe.start()
        rows = {
            "gateway GET /api/status": summary(measure(port, "/api/status", args.requests)),
            "gateway GET /": summary(measure(port, "/", args.requests)),
            "gateway GET /api/status?fresh=1": summary(
                measure(port, "/api/status?fresh=1", max(50, args.requests // 5))
            ),
            "gateway GET /metrics": summary(measure(port, "/metrics", max(50, args.requests // 5))),
        }
        probe.stop.set()
        probe.join()
        rows["gateway GET /livez during the above"] = summary(probe.latencies)

        static_port = free_port()
        static = subprocess.Popen(
            [sys.executable, "-c", _STATIC_SERVER, str(ref), str(static_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(static_port)
        rows["reference: static copy of /api/status (aiohttp)"] = summary(
            measure(static_port, "/api/status", args.requests)
        )
        rows["reference: static copy of / (aiohttp)"] = summary(
            measure(static_port, "/", args.requests)
        )
        results["latency"] = rows
        results["page_bytes"] = (ref / "page.html").stat().st_size
        results["status_bytes"] = (ref / "status.json").stat().st_size
    finally:
        if static is not None:
            static.terminate()
            static.wait(timeout=10)
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"status endpoints with {args.rows:,} queue rows ({args.requests} requests each,")
    print(f"sequential, keep-alive; {os.cpu_count()} CPUs; target p99 < {TARGET_P99_MS:.0f} ms)")
    print(f"{'':52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'n':>6}")
    for name, s in results["latency"].items():
        print(f"{name:52} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.2f} {s['n']:6d}")
    for name in ("gateway GET /api/status", "gateway GET /"):
        met = results["latency"][name]["p99_ms"] < TARGET_P99_MS
        print(f"{name}: p99 target {'met' if met else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

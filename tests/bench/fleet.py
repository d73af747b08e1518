"""The fleet receiver under a fleet: ``--boxes`` simulated boxes heartbeating once per
``--window-seconds`` over mutual TLS, and the fleet page with all of them.

Run as ``python tests/bench/fleet.py`` (``make bench`` does; ``--boxes 50 --windows 1
--window-seconds 5`` for a quick look).  A report, not a test: it exits 0 whether or
not the targets are met (heartbeat handling p99 < 20 ms, page p99 < 200 ms), non-zero
only when something failed functionally (a receiver that did not start, a heartbeat
not answered 204, a page without every box).

Set-up: a test CA (trustme) signs the receiver's certificate and one client
certificate per box (EC P-256, CN ``bench-box-NNNN``); the real receiver (`python -m
gateway fleet serve`) runs as a child process.  Each box is an aiohttp session of its
own with its certificate, closing its connection after each heartbeat, as a real box
does at a 30 s interval (aiohttp keeps an idle connection 15 s): every heartbeat pays a
TLS handshake.  In each window the boxes send in turn, evenly spread (1,000 boxes
every 30 s: one every 30 ms), the body a box of this release sends.

Measured:

* heartbeat handling, server side: the ``Server-Timing: handle;dur=`` the receiver puts
  on each answer (from the request's arrival at the handler to its answer: body read,
  checks, the write committed by the database writer), p50/p99/max over every window;
  the client's round trip (TLS handshake included) beside it;
* ``GET /`` (the fleet page with every box) and ``GET /metrics``, sequential on one
  connection: during the last window (the heartbeats still arriving) and after it.
  Both are served from memory and rebuilt at most once per change, at most every
  1 s / 2 s (gateway/fleet/views.py): most answers are the cached bytes, the slow
  ones waited for a rebuild.  ``view_builds`` in the JSON counts the rebuilds.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.fleet import (  # noqa: E402
    BoxCert,
    FleetPki,
    FleetReceiverProcess,
    heartbeat,
)

TARGET_HANDLE_P99_MS = 20.0
TARGET_PAGE_P99_MS = 200.0


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


class Box:
    def __init__(self, name: str, cert: BoxCert, pki: FleetPki, url: str) -> None:
        self.name = name
        self.url = url
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.ssl = ctx
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.ssl, limit=1, force_close=True)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        )

    async def beat(self) -> tuple[float, float]:
        """One heartbeat: (server-side ms, client round trip ms)."""
        assert self.session is not None
        body = json.dumps(heartbeat(ae_title="BENCH", sent_at=datetime.now(UTC))).encode()
        started = time.perf_counter()
        async with self.session.post(
            self.url, data=body, headers={"Content-Type": "application/json"}
        ) as reply:
            await reply.read()
            rtt = (time.perf_counter() - started) * 1000
            if reply.status != 204:
                raise RuntimeError(f"{self.name}: HTTP {reply.status} {await reply.text()}")
            timing = reply.headers["Server-Timing"]
        return float(timing.split("dur=")[1]), rtt


async def run_windows(
    boxes: list[Box], windows: int, seconds: float, last_window: threading.Event
) -> tuple[list[float], list[float]]:
    handle: list[float] = []
    rtt: list[float] = []
    for box in boxes:
        await box.open()
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[tuple[float, float]]] = []
    try:
        start = loop.time()
        for w in range(windows):
            if w == windows - 1:
                last_window.set()
            for i, box in enumerate(boxes):
                due = start + w * seconds + i * seconds / len(boxes)
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(box.beat()))
            # A window's stragglers finish while the next one starts, as on a real fleet.
        for result in await asyncio.gather(*tasks):
            handle.append(result[0])
            rtt.append(result[1])
    finally:
        for box in boxes:
            if box.session is not None:
                await box.session.close()
    return handle, rtt


def measure(port: int, path: str, requests: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    latencies = []
    try:
        for _ in range(requests):
            started = time.perf_counter()
            conn.request("GET", path)
            reply = conn.getresponse()
            body = reply.read()
            latencies.append((time.perf_counter() - started) * 1000)
            if reply.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {reply.status} {body[:200]!r}")
    finally:
        conn.close()
    return latencies


class PageProbe(threading.Thread):
    """Asks for the page (and /metrics) during the last window, every 200 ms."""

    def __init__(self, port: int, start_when: threading.Event, until: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.start_when = start_when
        self.until = until
        self.page: list[float] = []
        self.metrics: list[float] = []

    def run(self) -> None:
        self.start_when.wait()
        while not self.until.is_set():
            self.page += measure(self.port, "/", 1)
            self.metrics += measure(self.port, "/metrics", 1)
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window-seconds", type=float, default=30.0)
    parser.add_argument("--page-requests", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "fleet.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=args.workdir))
    results: dict[str, Any] = {
        "boxes": args.boxes,
        "windows": args.windows,
        "window_seconds": args.window_seconds,
    }
    pki = FleetPki(work / "pki")
    receiver = FleetReceiverProcess(
        work / "fleet", pki, boxes={"stale_after_seconds": args.window_seconds * 3}
    )
    try:
        started = time.perf_counter()
        names = [f"bench-box-{i:04d}" for i in range(args.boxes)]
        boxes = [Box(n, pki.box(n), pki, receiver.url) for n in names]
        results["certificates_seconds"] = round(time.perf_counter() - started, 1)
        receiver.start()
        last_window, done = threading.Event(), threading.Event()
        probe = PageProbe(receiver.view_port, last_window, done)
        probe.start()
        handle, rtt = asyncio.run(
            run_windows(boxes, args.windows, args.window_seconds, last_window)
        )
        done.set()
        probe.join()
        listed = receiver.boxes()
        if set(listed) != set(names):
            raise RuntimeError(f"the receiver lists {len(listed)} boxes, not {len(names)}")
        # The page is rebuilt at most every second: the last heartbeats show up then.
        deadline = time.monotonic() + 30
        while True:
            status, html = receiver.view("/")
            if status == 200 and html.count('<tr class="box') == args.boxes:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the page does not show every box")
            time.sleep(0.2)
        results["page_bytes"] = len(html.encode())
        rows = {
            "heartbeat handling, server side (Server-Timing)": summary(handle),
            "heartbeat round trip, client side (TLS handshake incl.)": summary(rtt),
        }
        if probe.page:
            rows["GET / during the last window"] = summary(probe.page)
            rows["GET /metrics during the last window"] = summary(probe.metrics)
        rows["GET / after the windows"] = summary(
            measure(receiver.view_port, "/", args.page_requests)
        )
        rows["GET /metrics after the windows"] = summary(
            measure(receiver.view_port, "/metrics", max(10, args.page_requests // 5))
        )
        results["latency"] = rows
        results["view_builds"] = {
            line.split('view="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in receiver.metrics().splitlines()
            if line.startswith("dicom_gateway_fleet_view_builds_total{")
        }
    finally:
        receiver.kill()
        shutil.rmtree(work, ignore_errors=True)

    rate = args.boxes / args.window_seconds
    print(f"fleet receiver: {args.boxes:,} boxes, one heartbeat each per {args.window_seconds:g} s")
    print(f"({rate:.1f}/s), {args.windows} windows, mutual TLS; {os.cpu_count()} CPUs")
    print(f"{'':58} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'n':>6}")
    for name, s in results["latency"].items():
        print(f"{name:58} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['max_ms']:8.2f} {s['n']:6d}")
    builds = results["view_builds"]
    print(f"views built: page {builds.get('page', 0):.0f}, /metrics {builds.get('metrics', 0):.0f}")
    targets = [
        ("heartbeat handling, server side (Server-Timing)", TARGET_HANDLE_P99_MS),
        ("GET / after the windows", TARGET_PAGE_P99_MS),
        ("GET / during the last window", TARGET_PAGE_P99_MS),
    ]
    for name, target in targets:
        if name in results["latency"]:
            met = results["latency"][name]["p99_ms"] < target
            print(f"{name}: p99 < {target:.0f} ms {'met' if met else 'MISSED'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MPPS figures: ``python tests/bench/mpps.py --steps 200``.

A real gateway process; the modality is pynetdicom's SCU, the upstream the test
double of ``tests/test_mpps.py`` (no packaged MPPS SCP exists).  Measures:

* the modality's wait for each acknowledged N-CREATE and N-SET (durable commit
  included), with the upstream up;
* the backlog: *steps* steps (N-CREATE + N-SET COMPLETED each) accepted while the
  upstream is down, then the time from its return until all are delivered, in order.

Prints one line per figure; exits 1 if anything arrived out of order or is missing.

A response the modality never got (pynetdicom's SCU can lose one to its own reactor:
the reactor checks its pause flag without a lock, pydicom/pynetdicom#875) is not
timed: the request is sent again on a new association, where the gateway must answer
that it already has it (0x0111 for an N-CREATE, 0x0110 for the N-SET that ended the
step), and the bench counts and prints it with the gateway's log lines about it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.support.gateway_proc import GatewayProcess  # noqa: E402
from tests.test_mpps import (  # noqa: E402
    COMPLETED,
    CREATE,
    MPPS_CLASS,
    SET,
    Modality,
    UpstreamMpps,
    progress,
    started,
    wait_for,
)


def _gateway(root: Path, upstream: UpstreamMpps) -> GatewayProcess:
    mpps = {"upstream_host": "127.0.0.1", "upstream_port": upstream.port,
            "upstream_ae": "RIS_MPPS", "backoff_initial_seconds": 0.5,
            "backoff_max_seconds": 1.0}  # fmt: skip
    return GatewayProcess(root, mpps=mpps).start()


#: What the gateway answers to a request it already carried out (see the docstring).
_ALREADY = {CREATE: 0x0111, SET: 0x0110}


def _send(modality: Modality, kind: str, uid: str, ds: Dataset) -> int | None:
    """The response's status, or None when the SCU got no response."""
    assoc = modality.assoc
    if kind == CREATE:
        status, _ = assoc.send_n_create(ds, MPPS_CLASS, uid)
    else:
        status, _ = assoc.send_n_set(ds, MPPS_CLASS, uid)
    return int(status.Status) if "Status" in status else None


def _ack_latency(root: Path, steps: int) -> tuple[list[float], int]:
    upstream = UpstreamMpps().start()
    gw = _gateway(root / "latency", upstream)
    waits = []
    lost = 0
    modality = Modality(gw.port)
    try:
        for _ in range(steps):
            uid = generate_uid()
            for kind, ds in ((CREATE, started()), (SET, progress(COMPLETED, series=1))):
                t = time.perf_counter()
                code = _send(modality, kind, uid, ds)
                if code is None:
                    lost += 1
                    print(f"mpps bench: no {kind} response after {time.perf_counter() - t:.1f} s"
                          f" (association aborted: {modality.assoc.is_aborted}); sending again."
                          f" Gateway log about {uid}:", file=sys.stderr)  # fmt: skip
                    for line in gw.log.splitlines():
                        if uid in line or "ERROR" in line or "Traceback" in line:
                            print("  " + line, file=sys.stderr)
                    modality.close()
                    modality = Modality(gw.port)
                    again = _send(modality, kind, uid, ds)
                    assert again == _ALREADY[kind], f"sent again: {again!r}, not 'already done'"
                    continue
                waits.append(time.perf_counter() - t)
                assert code == 0, hex(code)
    finally:
        modality.close()
    wait_for(lambda: len(upstream.accepted()) == 2 * steps, "delivery", timeout=600)
    gw.stop()
    upstream.stop()
    return waits, lost


def _backlog(root: Path, steps: int) -> tuple[float, bool]:
    upstream = UpstreamMpps()
    gw = _gateway(root / "backlog", upstream)
    wanted = []
    modality = Modality(gw.port)
    try:
        for _ in range(steps):
            uid = generate_uid()
            assert modality.create(uid, started()) == 0
            assert modality.set(uid, progress(COMPLETED)) == 0
            wanted += [(CREATE, uid), (SET, uid)]
    finally:
        modality.close()
    t = time.perf_counter()
    upstream.start()
    wait_for(lambda: len(upstream.accepted()) == len(wanted), "the backlog", timeout=600)
    elapsed = time.perf_counter() - t
    in_order = upstream.accepted() == wanted
    gw.stop()
    upstream.stop()
    return elapsed, in_order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="procedure steps (default 200)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mpps-bench-"))
    try:
        waits, lost = _ack_latency(root, args.steps)
        waits.sort()
        p95 = waits[int(len(waits) * 0.95) - 1]
        print(f"mpps ack: {len(waits)} requests, median {statistics.median(waits) * 1000:.1f} ms,"
              f" p95 {p95 * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms;"
              f" responses lost by the SCU and confirmed on a re-send: {lost}")  # fmt: skip
        elapsed, in_order = _backlog(root, args.steps)
        count = 2 * args.steps
        print(f"mpps backlog: {count} messages delivered in {elapsed:.2f} s after the upstream"
              f" returned ({count / elapsed:.0f}/s), in order: {in_order}")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if in_order else 1


if __name__ == "__main__":
    sys.exit(main())

"""Storage Commitment figures: ``python tests/bench/commitment.py`` (20 studies x 50).

A real gateway process (its defaults: J2K compression, one receiver per core)
uploading to the real archive of the tests (Orthanc + DICOMweb behind nginx, mutual
TLS).  The modality is pynetdicom: an SCU that sends each study by C-STORE on one
association and then requests commitment of it on the same association, and an SCP
(Storage Commitment, accepting our Role Selection) that takes the N-EVENT-REPORTs
and notes when each arrived, in a process of its own: in the SCU's process, taking
200 reports held its interpreter lock and added up to 200 ms to the N-ACTION waits
it measures.  pynetdicom rather than Orthanc so the times are the gateway's and not
a REST client's.  Measures:

* the N-ACTION answer latency (the modality's wait for Success: the request made
  durable), p50 / p99 over the studies' requests and ``--extra-requests`` more that
  name the same instances (target p99 < 50 ms);
* per study, the time from its last C-STORE's answer to its report's arrival
  (everything between: compression, upload, the archive's confirmation, deciding,
  the report's association).

``--scu stock`` (the default) is pynetdicom as released: each of its two reactor
threads per association polls with 1 ms sleeps, so the SCU's own waits are in the
figure.  ``--scu woken`` installs the gateway's pynetdicom patches in the SCU's process
(gateway/dicom/patches.py: reactor threads woken by work), as an event-driven modality
toolkit behaves; the difference between the two runs is the SCU's polling, not the
gateway.  ``make bench`` runs both.

The archive stands for a remote server: Orthanc and nginx run at ``--archive-nice``
(default 19), so on this box's few cores they take only the CPU the gateway leaves
instead of lengthening its waits (in 14 alternating runs each, the p99 was 27-53 ms
with the archive at niceness 0 and 21-32 ms at 19).

Prints one line per figure; exits 1 if a report is missing or not all committed.
``--studies 2 --instances 5 --extra-requests 10`` is a quick run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    CTImageStorage,
    StorageCommitmentPushModel,  # type: ignore[attr-defined]
)

from gateway.dicom.tcp import NO_DELAY_HANDLERS  # noqa: E402
from tests.support import corpus  # noqa: E402
from tests.support.archive import ArchiveLab  # noqa: E402
from tests.support.gateway_proc import GatewayProcess  # noqa: E402
from tests.support.peers import free_port  # noqa: E402

MODALITY_AE = "BENCH_CT"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
TARGET_P99_MS = 50.0


def _sink_main(port: int, arrivals: multiprocessing.Queue, ready: multiprocessing.Event) -> None:
    """The modality's SCP, in a process of its own (see :class:`ReportSink`)."""

    def on_report(event: evt.Event) -> tuple[int, None]:
        tx = str(event.event_information.TransactionUID)
        arrivals.put((tx, time.perf_counter(), int(event.request.EventTypeID)))
        return 0x0000, None

    ae = AE(ae_title=MODALITY_AE)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    ready.set()
    try:
        threading.Event().wait()  # until killed
    finally:
        server.shutdown()


class ReportSink:
    """The modality's SCP for the N-EVENT-REPORTs: Transaction UID -> (arrival, event).

    It runs in a process of its own, so that taking the reports does not slow the
    SCU's N-ACTIONs in this one (the interpreter lock) and count against the gateway.
    Arrival times are perf_counter() readings, one clock for every process here."""

    def __init__(self) -> None:
        self.port = free_port()
        self.reports: dict[str, tuple[float, int]] = {}
        #: Every report that arrived (a transaction reported twice counts twice).
        self.received = 0
        self._lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")
        self._arrivals: multiprocessing.Queue = ctx.Queue()
        ready = ctx.Event()
        self._process = ctx.Process(
            target=_sink_main, args=(self.port, self._arrivals, ready), daemon=True
        )
        self._process.start()
        if not ready.wait(60):
            raise TimeoutError("the report sink did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        while True:
            tx, at, event_type = self._arrivals.get()
            with self._lock:
                self.reports.setdefault(tx, (at, event_type))
                self.received += 1

    def got(self, uids: set[str]) -> bool:
        with self._lock:
            return uids <= set(self.reports)

    def stop(self) -> None:
        self._process.kill()
        self._process.join(10)


def _request(pairs: list[tuple[str, str]]) -> tuple[str, Dataset]:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return str(ds.TransactionUID), ds


def _make_study(root: Path, count: int) -> list[Dataset]:
    study = generate_uid()
    template = corpus.testdata("CT_small.dcm")
    out = []
    for n in range(count):
        path = root / f"{study[-8:]}-{n}.dcm"
        corpus.with_new_uids(template, path, study=study)
        out.append(dcmread(path))
    return out


def run(root: Path, studies: int, per_study: int, extra: int, scu: str, archive_nice: int) -> int:
    if scu == "woken":
        from gateway.dicom import patches

        patches.install()
    lab = ArchiveLab(root / "archive")
    lab.prefix = ["nice", "-n", str(archive_nice)]
    lab.start()
    sink = ReportSink()
    remote = {"ae_title": MODALITY_AE, "host": "127.0.0.1", "port": sink.port}
    gw = GatewayProcess(
        root / "gw", dimse={"remote": [remote]},
        upload={"dicomweb_url": lab.dicomweb_url, "ca_file": str(lab.ca_file),
                "client_cert": str(lab.client_cert), "client_key": str(lab.client_key)},
    ).start()  # fmt: skip
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StorageCommitmentPushModel)
    waits: list[float] = []
    last_store: dict[str, float] = {}
    everything: list[tuple[str, str]] = []
    try:
        datasets = [_make_study(root, per_study) for _ in range(studies)]
        for study in datasets:
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW",
                                 evt_handlers=NO_DELAY_HANDLERS)  # fmt: skip
            assert assoc.is_established
            try:
                for ds in study:
                    status = assoc.send_c_store(ds)
                    assert status.Status == 0, status
                stored_at = time.perf_counter()
                pairs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in study]
                everything += pairs
                tx, info = _request(pairs)
                t = time.perf_counter()
                status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN)
                waits.append(time.perf_counter() - t)
                assert status.Status == 0, status
                last_store[tx] = stored_at
            finally:
                assoc.release()
        extra_uids = set()
        assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW",
                             evt_handlers=NO_DELAY_HANDLERS)  # fmt: skip
        try:
            for n in range(extra):
                start = (n * per_study) % max(1, len(everything))
                tx, info = _request(everything[start : start + per_study])
                t = time.perf_counter()
                status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, WELL_KNOWN)
                waits.append(time.perf_counter() - t)
                assert status.Status == 0, status
                extra_uids.add(tx)
        finally:
            assoc.release()
        wanted = set(last_store) | extra_uids
        deadline = time.monotonic() + 1800
        while not sink.got(wanted) and time.monotonic() < deadline:
            time.sleep(0.05)
        missing = wanted - set(sink.reports)
        failed = [tx for tx in wanted - missing if sink.reports[tx][1] != 1]
    finally:
        gw.stop(timeout=120)
        sink.stop()
        lab.stop()
    waits.sort()
    p50 = statistics.median(waits) * 1000
    p99 = waits[max(0, int(len(waits) * 0.99) - 1)] * 1000
    met = "met" if p99 < TARGET_P99_MS else "NOT met"
    print(f"commitment N-ACTION answer ({scu} SCU): {len(waits)} requests, p50 {p50:.1f} ms, p99"
          f" {p99:.1f} ms (target p99 < {TARGET_P99_MS:.0f} ms: {met}),"
          f" max {waits[-1] * 1000:.1f} ms")  # fmt: skip
    delays = sorted(sink.reports[tx][0] - at for tx, at in last_store.items() if tx in sink.reports)
    if delays:
        p50_s = statistics.median(delays)
        print(f"commitment last C-STORE to report: {len(delays)} studies of {per_study}"
              f" instances, p50 {p50_s:.2f} s, max {delays[-1]:.2f} s")  # fmt: skip
    print(f"commitment reports: {len(wanted) - len(missing)}/{len(wanted)} arrived,"
          f" {len(failed)} with failures, {sink.received - len(sink.reports)} twice")  # fmt: skip
    return 1 if missing or failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="studies (default 20)")
    parser.add_argument("--instances", type=int, default=50, help="per study (default 50)")
    parser.add_argument("--extra-requests", type=int, default=180,
                        help="more N-ACTIONs for the latency figure (default 180)")  # fmt: skip
    parser.add_argument("--scu", choices=("stock", "woken"), default="stock",
                        help="the SCU's pynetdicom: as released, or with the gateway's"
                        " wake-up patches (default stock)")  # fmt: skip
    parser.add_argument("--archive-nice", type=int, default=19,
                        help="the archive's (Orthanc, nginx) niceness (default 19)")  # fmt: skip
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="commitment-bench-"))
    try:
        return run(
            root, args.studies, args.instances, args.extra_requests, args.scu, args.archive_nice
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Power cuts while modalities send: every acknowledged instance survives.

kill -9 cannot show this.  A killed process loses only its own memory; whatever it
handed to the kernel with ``write`` is in the page cache, and the kernel writes it to
disk later whether or not anyone called ``fsync``.  So a gateway that never fsyncs
passes every kill -9 test (``tests/test_crash.py``), and loses acknowledged images the
first time the power goes.  Here the power goes: the disk the spool lives on is copied
at random moments while DCMTK storescu sends (a copy of the block device is what a
power cut leaves; see ``tests/support/powercut.py`` for how and why the copy is consistent),
and each copy is booted: mounted, so ext4 replays its journal, and handed to the real
gateway (``python -m gateway run``), which runs its own start-up reconciliation on it
and is stopped again.  Then every instance storescu saw acknowledged *before the copy
began* must be intact in it: its queue row, and its spool file hashing to the row's
sha256 and carrying byte for byte the data set that was sent.

The test drives the gateway only from outside (DIMSE in, files and the queue database
out), so it holds whichever process receives.  It must be able to fail, and does: the
same run with the gateway under ``eatmydata`` (fsync, fdatasync and sync made no-ops)
must find lost instances; the ext4 is mounted with a one-minute journal commit interval
so that, without fsync, nothing of the run reaches the disk.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .support.crashloop import Instance, build_corpus, sha256_file
from .support.gateway_proc import GatewayProcess
from .support.peers import dataset_bytes
from .support.powercut import DiskLab, Sender, Snapshot, snapshot_while_sending

pytestmark = pytest.mark.slow

#: Instances per run, sent by SENDERS storescu processes at once (one association each).
INSTANCES = 300
SENDERS = 2
#: Random pause before each copy of the disk, in seconds.
SNAPSHOT_GAP = (0.15, 0.7)


@dataclass
class PowerCutReport:
    variant: str
    seed: int
    seconds: float = 0.0
    snapshots: list[Snapshot] = field(default_factory=list)
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        during = sum(1 for s in self.snapshots if s.during_send)
        lines = [
            f"{self.variant}: seed {self.seed}, {len(self.snapshots)} snapshots"
            f" ({during} while sending), {self.checked} acknowledged instances checked,"
            f" {len(self.violations)} violations, {self.seconds:.1f} s"
        ]
        for i, s in enumerate(self.snapshots):
            since = "-" if s.since_last_ack is None else f"{s.since_last_ack * 1000:.0f} ms"
            lines.append(
                f"  snapshot {i}: at {s.at:.2f} s (copy {s.seconds * 1000:.0f} ms),"
                f" {len(s.acknowledged)} acknowledged before, last ack {since} before"
                f"{'' if s.during_send else ', after storescu exited'}"
            )
        lines += [f"  {v}" for v in self.violations[:20]]
        if len(self.violations) > 20:
            lines.append(f"  ... and {len(self.violations) - 20} more")
        return "\n".join(lines)


def _gateway(root: Path, spool: Path) -> GatewayProcess:
    # database.path unset: the queue database inside the spool, on the same disk.
    return GatewayProcess(
        root, spool={"dir": str(spool), "min_free_bytes": 0}, database={"path": ""}
    )


def _stop(gw: GatewayProcess) -> None:
    if gw.proc is None or gw.proc.poll() is not None:
        return
    try:
        gw.stop(timeout=30)
    except Exception:
        gw.kill()
        raise


def _uses_eatmydata(gw: GatewayProcess) -> bool:
    assert gw.proc is not None
    return "libeatmydata" in Path(f"/proc/{gw.proc.pid}/maps").read_text()


def check_snapshot(
    lab: DiskLab, shot: Snapshot, index: int, sent: dict[Path, Instance], root: Path
) -> tuple[int, list[str]]:
    """Boot *shot* and check its acknowledged instances: (how many, violations)."""
    problems: list[str] = []
    with lab.mounted(shot.path) as mnt:
        gw = _gateway(root, mnt / "spool")
        try:
            gw.start()  # reconciles before it is ready
        finally:
            _stop(gw)
        assert gw.proc is not None and gw.proc.returncode == 0, gw.log
        conn = sqlite3.connect(gw.db_path)
        conn.row_factory = sqlite3.Row
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances")}
        finally:
            conn.close()
        for path in sorted(shot.acknowledged):
            instance = sent[path]
            where = f"snapshot {index} ({shot.at:.2f} s): {path.name}"
            row = rows.get(instance.sop_instance_uid)
            if row is None:
                problems.append(f"{where}: acknowledged, no queue row")
                continue
            spooled = gw.spool / row["path"]
            if not spooled.is_file():
                problems.append(f"{where}: row {row['state']!r}, file {row['path']} missing")
            elif sha256_file(spooled) != row["sha256"]:
                problems.append(f"{where}: {row['path']} does not hash to the row's sha256")
            elif dataset_bytes(spooled) != instance.dataset:
                problems.append(f"{where}: {row['path']} differs from the data set sent")
    return len(shot.acknowledged), problems


def power_cut_run(tmp_path: Path, variant: str) -> PowerCutReport:
    seed = random.SystemRandom().randrange(2**32)
    report = PowerCutReport(variant, seed)
    rng = random.Random(seed)
    began = time.monotonic()
    instances = build_corpus(tmp_path / "corpus", INSTANCES)
    sent = {i.path: i for i in instances}
    with DiskLab(tmp_path / "lab") as lab:
        gw = _gateway(tmp_path / "gw", lab.mnt / "spool")
        if variant == "eatmydata":
            gw.prefix = ["eatmydata"]
        senders: list[Sender] = []
        try:
            gw.start()
            assert _uses_eatmydata(gw) == (variant == "eatmydata")
            files = [i.path for i in instances]
            senders = [Sender(gw.port, files[k::SENDERS], f"MODALITY{k}") for k in range(SENDERS)]
            report.snapshots = snapshot_while_sending(lab, senders, rng, SNAPSHOT_GAP, 180)
        finally:
            for s in senders:
                s.kill()
            _stop(gw)
        for s in senders:
            assert s.proc.returncode == 0, "".join(s.output[-30:])
            assert s.statuses == ["Success"] * len(s.statuses), "".join(s.output[-30:])
        # storescu's log read right: the gateway logged each acknowledged one as stored.
        stored = set(re.findall(r"stored sop=(\S+)", gw.log))
        acknowledged = {sent[p].sop_instance_uid for p in report.snapshots[-1].acknowledged}
        assert acknowledged <= stored, sorted(acknowledged - stored)[:5]
        for index, shot in enumerate(report.snapshots):
            checked, problems = check_snapshot(lab, shot, index, sent, tmp_path / f"boot{index}")
            report.checked += checked
            report.violations += problems
    report.seconds = time.monotonic() - began
    print(report.summary())
    return report


def test_a_snapshot_is_the_disk_not_the_page_cache(tmp_path: Path) -> None:
    """The lab itself: what was fsynced is in a copy, what was only written is not."""
    with DiskLab(tmp_path / "lab") as lab:
        (lab.mnt / "synced").write_bytes(b"on disk")
        fd = os.open(lab.mnt / "synced", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(lab.mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        (lab.mnt / "cached").write_bytes(b"in the page cache only")
        with lab.mounted(lab.snapshot("check.img")) as copy:
            assert (copy / "synced").read_bytes() == b"on disk"
            assert not (copy / "cached").exists()
        # After sync(2) (which a power cut does not do) a copy holds it too.
        os.sync()
        with lab.mounted(lab.snapshot("check2.img")) as copy:
            assert (copy / "cached").read_bytes() == b"in the page cache only"


def test_power_cut_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    report = power_cut_run(tmp_path, "fsync")
    summary = report.summary()
    assert not report.violations, summary
    # The run meant something: copies taken mid-transfer with acknowledgements in them,
    # and the last one holding every instance.
    assert any(s.during_send and s.acknowledged for s in report.snapshots), summary
    assert len(report.snapshots[-1].acknowledged) == INSTANCES, summary


def test_power_cut_catches_a_gateway_without_fsync(tmp_path: Path) -> None:
    """The same run under eatmydata must lose acknowledged instances."""
    report = power_cut_run(tmp_path, "eatmydata")
    summary = report.summary()
    assert len(report.snapshots[-1].acknowledged) == INSTANCES, summary
    assert report.violations, summary

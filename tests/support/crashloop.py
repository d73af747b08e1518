"""The kill -9 loop shared by ``tests/test_crash.py`` and ``tests/bench/crash_run.py``.

One round: start the real gateway (``python -m gateway run``, a child process), let
DCMTK storescu send it a batch of files, SIGKILL the gateway at a random moment of
that transfer, and read from storescu's ``-v`` log which files it saw acknowledged.
The moment is drawn per round: either a random time after storescu starts (which
also lands before or during association set-up), or a random delay after storescu
logs the k-th ``Sending Store Request`` (k random), so that kills land inside
C-STOREs (data arriving, file being fsynced/renamed, queue row committing, response
on its way) however loaded the machine is.

Between rounds, with nothing running, the debris a kill left is recorded from a copy
of the database (temp files in ``spool/tmp``, files in ``spool/objects`` that no row
references) and, after the next start, checked to be gone: the reconciler must have
removed exactly those.  Every instance acknowledged in a round must already have its
queue row and its file (with the row's sha256) in that copy, i.e. before any
reconciliation.

After the last kill the gateway is started once more, left to finish its background
work, stopped with SIGTERM, and the end state is checked: every instance storescu saw
acknowledged in any round has exactly one queue row, its spool file exists, hashes to
the row's sha256 and carries, byte for byte, the data set of the file that was sent;
``PRAGMA integrity_check`` is ``ok``; ``spool/tmp`` is empty; every file under
``spool/objects`` is referenced by a row and every row's file exists.

Each check that fails adds a line to :attr:`CrashReport.problems`; the run goes on, so
one report shows everything that went wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pydicom
from pydicom.uid import generate_uid

from .corpus import testdata
from .gateway_proc import GatewayProcess
from .peers import dataset_bytes, tool

# Explicit VR little endian sources (what storescu proposes first, so it sends them
# without converting).  The 512x512 CT is ~0.5 MB: ~32 PDUs of 16 kB, so a kill often
# lands while its data set is still arriving.
TEMPLATES = ("CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "CT_small.dcm")

_SENDING_FILE = re.compile(r"Sending file: (.+?)\s*$")
_SENDING_REQUEST = re.compile(r"Sending Store Request \(MsgID (\d+)")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")

#: Largest random delay between storescu's k-th request and the kill.
KILL_JITTER_S = 0.06
#: Largest random delay after storescu starts, for the rounds not keyed to a request.
KILL_AT_RANDOM_TIME_S = 0.4
#: Generous: other test runs share the (2-core) machine.
STORESCU_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 300.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class Instance:
    path: Path
    sop_instance_uid: str
    dataset: bytes  # the data set part of the file, as storescu sends it


def build_corpus(directory: Path, count: int) -> list[Instance]:
    """*count* instances with fresh UIDs (a few studies), written under *directory*.

    DCMTK drops Data Set Trailing Padding (FFFC,FFFC) when it sends a file, so it is
    removed here: what storescu puts on the wire is then exactly the file's data set,
    and the spooled copy can be compared with the source byte for byte.
    """
    directory.mkdir(parents=True, exist_ok=True)
    templates = [pydicom.dcmread(testdata(name)) for name in TEMPLATES]
    instances = []
    study = generate_uid()
    for i in range(count):
        if i % 10 == 0:
            study = generate_uid()
        ds = templates[i % len(templates)]
        if 0xFFFCFFFC in ds:
            del ds[0xFFFCFFFC]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(Instance(path, str(ds.SOPInstanceUID), dataset_bytes(path)))
    return instances


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


# -- one round: storescu, and a SIGKILL at a random moment -----------------------------


@dataclass
class Round:
    number: int
    batch: list[Path]
    kill_rule: str
    returncode: int = 0
    output: str = ""
    sent: list[Path] = field(default_factory=list)
    acknowledged: list[Path] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    @property
    def progress(self) -> str:
        """zero / partial / complete: how much of the batch storescu saw acknowledged."""
        if not self.acknowledged:
            return "zero"
        return "complete" if len(self.acknowledged) == len(self.batch) else "partial"


class _StorescuWatcher:
    """Reads storescu's log as it is written; tells how many requests it has sent."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.requests = 0
        self.done = False
        self._cond = threading.Condition()
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self.lines.append(line)
                if _SENDING_REQUEST.search(line):
                    self.requests += 1
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for_request(self, k: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.done or self.requests >= k, timeout)

    def join(self, timeout: float) -> str:
        self._thread.join(timeout)
        with self._cond:
            return "".join(self.lines)


def kill_gateway(gw: GatewayProcess) -> int:
    """SIGKILL the gateway and every process it started (its compression workers).

    Killing the children too is what systemd does with the service's control group
    when the main process dies.  Left alone they would live on: a pool worker never
    sees its parent go (see the report of ``tests/test_crash.py``), and one still
    encoding would write into ``spool/tmp`` after the next start had reconciled it.
    The gateway is frozen with SIGSTOP first, so that it cannot start a worker between
    the list of its children being taken and the kill; a stopped process does nothing
    more, so what is on disk is what a SIGKILL at that moment would have left.
    Returns how many children there were.
    """
    assert gw.proc is not None
    pid = gw.proc.pid
    children: list[psutil.Process] = []
    with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not _all_threads_stopped(pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        children = psutil.Process(pid).children(recursive=True)
    gw.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    # Dead is enough: reaping them is up to whoever inherited them (pid 1).
    deadline = time.monotonic() + 30
    while any(_running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(children)


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of *pid* is in state T (stopped) or gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # "pid (comm) S ...": comm may hold spaces and parentheses.
                state = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def _running(proc: psutil.Process) -> bool:
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def parse_storescu(batch: list[Path], output: str) -> tuple[list[Path], list[Path], list[str]]:
    """Which files storescu sent and which it saw acknowledged, from its ``-v`` log.

    Raises ValueError when the log does not read as expected: files sent in
    command-line order, request n carrying MsgID n, one response per request.
    """
    sent: list[Path] = []
    msg_ids: list[int] = []
    acknowledged: list[Path] = []
    statuses: list[str] = []
    for line in output.splitlines():
        if m := _SENDING_FILE.search(line):
            if len(msg_ids) != len(sent):
                raise ValueError(f"file {len(sent)} was never sent: {line!r}")
            sent.append(Path(m.group(1)))
        elif m := _SENDING_REQUEST.search(line):
            msg_ids.append(int(m.group(1)))
            if len(msg_ids) != len(sent) or msg_ids[-1] != len(msg_ids):
                raise ValueError(f"request {msg_ids[-1]} for file {len(sent)}: {line!r}")
        elif m := _RESPONSE.search(line):
            statuses.append(m.group(1))
            if len(statuses) != len(msg_ids):
                raise ValueError(f"response {len(statuses)} to {len(msg_ids)} requests")
            if m.group(1) == "Success":
                acknowledged.append(sent[-1])
    if sent != batch[: len(sent)]:
        raise ValueError("storescu did not send the files in command-line order")
    return sent, acknowledged, statuses


def send_and_kill(gw: GatewayProcess, rnd: Round, rng: random.Random) -> int:
    """Run storescu on *rnd.batch*; SIGKILL the gateway at a random moment.

    Fills in *rnd*; returns the number of gateway children killed with it.
    """
    cmd = [tool("storescu"), "-v", "-aec", "DICOMGW", "-aet", "CRASHSCU"]
    cmd += ["127.0.0.1", str(gw.port), *map(str, rnd.batch)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        watcher = _StorescuWatcher(proc)
        k = rng.randint(0, len(rnd.batch))
        if k == 0:
            delay = rng.uniform(0, KILL_AT_RANDOM_TIME_S)
            rnd.kill_rule = f"{delay * 1000:.0f} ms after storescu started"
        else:
            watcher.wait_for_request(k, STORESCU_TIMEOUT_S)
            delay = rng.uniform(0, KILL_JITTER_S)
            rnd.kill_rule = f"{delay * 1000:.0f} ms after request {k}/{len(rnd.batch)}"
        time.sleep(delay)
        children = kill_gateway(gw)
        try:
            proc.wait(timeout=STORESCU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rnd.returncode = proc.returncode
        rnd.output = watcher.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    rnd.sent, rnd.acknowledged, rnd.statuses = parse_storescu(rnd.batch, rnd.output)
    return children


# -- the state on disk -------------------------------------------------------------------


@dataclass
class SpoolState:
    """The database (read from a copy) and the spool directory, gateway not running."""

    rows: dict[str, dict[str, Any]]  # by SOP Instance UID
    temp_files: dict[Path, tuple[int, int]]  # path -> (inode, ctime_ns)
    objects: dict[str, tuple[int, int]]  # relpath -> (inode, ctime_ns)
    integrity: list[str]

    @property
    def referenced(self) -> set[str]:
        return {
            p for row in self.rows.values() for p in (row.get("path"), row.get("upload_path")) if p
        }

    @property
    def orphans(self) -> dict[str, tuple[int, int]]:
        referenced = self.referenced
        return {p: ident for p, ident in self.objects.items() if p not in referenced}


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_ctime_ns


def read_state(gw: GatewayProcess) -> SpoolState:
    """Read the database from a copy, so that nothing this test does (WAL recovery,
    checkpoint on close) changes what the next gateway start finds."""
    with tempfile.TemporaryDirectory(prefix="crash-db-") as scratch:
        copy = Path(scratch) / gw.db_path.name
        for suffix in ("", "-wal"):
            src = Path(f"{gw.db_path}{suffix}")
            if src.exists():
                shutil.copyfile(src, Path(f"{copy}{suffix}"))
        conn = sqlite3.connect(copy)
        conn.row_factory = sqlite3.Row
        try:
            integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            rows = {r["sop_instance_uid"]: dict(r) for r in conn.execute("SELECT * FROM instances")}
        finally:
            conn.close()
    tmp_dir = gw.spool / "tmp"
    temp_files = {p: _identity(p) for p in tmp_dir.iterdir()} if tmp_dir.is_dir() else {}
    objects = {str(p.relative_to(gw.spool)): _identity(p) for p in gw.spool_files()}
    return SpoolState(rows, temp_files, objects, integrity)


def check_acknowledged(
    state: SpoolState, gw: GatewayProcess, instances: Iterable[Instance], when: str
) -> list[str]:
    """Each instance has its queue row, and the row's file exists with its sha256."""
    problems = []
    for inst in instances:
        row = state.rows.get(inst.sop_instance_uid)
        if row is None:
            problems.append(f"{when}: acknowledged {inst.path.name} has no queue row")
            continue
        if not row["path"]:
            problems.append(f"{when}: acknowledged {inst.path.name}: row has no spool path")
            continue
        spooled = gw.spool / row["path"]
        if not spooled.is_file():
            problems.append(f"{when}: acknowledged {inst.path.name}: {row['path']} missing")
        elif sha256_file(spooled) != row["sha256"]:
            problems.append(f"{when}: acknowledged {inst.path.name}: sha256 differs from row")
    return problems


def check_debris_gone(before: SpoolState, gw: GatewayProcess, when: str) -> list[str]:
    """Every temp file and orphan seen before the start is gone after it.

    A file is identified by inode and ctime, so an identical file the restarted
    gateway wrote again under the same content-addressed name does not count.
    """
    problems = []
    for path, ident in before.temp_files.items():
        if path.exists() and _identity(path) == ident:
            problems.append(f"{when}: temp file {path.name} survived the restart")
    for relpath, ident in before.orphans.items():
        path = gw.spool / relpath
        try:
            survived = _identity(path) == ident
        except FileNotFoundError:
            survived = False
        if survived:
            problems.append(f"{when}: orphan {relpath} survived the restart")
    return problems


def check_final(
    state: SpoolState,
    gw: GatewayProcess,
    instances: list[Instance],
    acknowledged: set[str],
) -> list[str]:
    problems = []
    if state.integrity != ["ok"]:
        problems.append(f"final: PRAGMA integrity_check: {state.integrity}")
    by_uid = {inst.sop_instance_uid: inst for inst in instances}
    conn = sqlite3.connect(gw.db_path)
    try:
        for uid in sorted(acknowledged):
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM instances WHERE sop_instance_uid = ?", (uid,)
            ).fetchone()
            if count != 1:
                problems.append(f"final: acknowledged {uid} has {count} queue rows")
    finally:
        conn.close()
    problems += check_acknowledged(
        state, gw, [by_uid[uid] for uid in sorted(acknowledged)], "final"
    )
    for uid in sorted(acknowledged):
        row = state.rows.get(uid)
        spooled = gw.spool / str(row["path"]) if row and row["path"] else None
        if spooled is not None and spooled.is_file():
            if dataset_bytes(spooled) != by_uid[uid].dataset:
                problems.append(f"final: {by_uid[uid].path.name}: spooled data set differs")
            if row is not None and row["size"] != spooled.stat().st_size:
                problems.append(f"final: {by_uid[uid].path.name}: size differs from row")
    for uid, row in state.rows.items():
        if uid not in by_uid:
            problems.append(f"final: queue row for an instance never sent: {uid}")
        for column in ("path", "upload_path"):
            relpath = row.get(column)
            if relpath and relpath not in state.objects:
                problems.append(f"final: row {uid} {column} {relpath} has no file")
        if row["state"] in ("compressing", "uploading"):
            problems.append(f"final: row {uid} left in transient state {row['state']}")
    for relpath in state.objects:
        if Path(relpath).stem != sha256_file(gw.spool / relpath):
            problems.append(f"final: {relpath} does not hash to its name")
    if state.temp_files:
        names = sorted(p.name for p in state.temp_files)
        problems.append(f"final: spool/tmp not empty: {names}")
    if state.orphans:
        problems.append(f"final: orphan files in spool/objects: {sorted(state.orphans)}")
    return problems


def wait_until_settled(gw: GatewayProcess, timeout: float) -> bool:
    """Wait for the background pipeline to finish what it can do without an archive:
    no row waiting for or in compression, nothing in ``spool/tmp``, for 1 s running."""
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        (waiting,) = gw.rows(
            "SELECT COUNT(*) FROM instances WHERE state IN ('received', 'compressing')"
        )[0]
        busy = waiting > 0 or any((gw.spool / "tmp").iterdir())
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= 1.0:
            return True
        time.sleep(0.2)
    return False


# -- the whole run -------------------------------------------------------------------------


@dataclass
class CrashReport:
    kills: int
    seed: int
    corpus: int = 0
    acknowledged: int = 0
    rounds_zero: int = 0
    rounds_partial: int = 0
    rounds_complete: int = 0
    temp_files_cleaned: int = 0
    orphans_cleaned: int = 0
    children_killed: int = 0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    gateway_log: Path | None = None

    def summary(self) -> str:
        return (
            f"crash-run kills={self.kills} seed={self.seed} corpus={self.corpus}"
            f" acknowledged={self.acknowledged} rounds_partial={self.rounds_partial}"
            f" rounds_zero={self.rounds_zero} rounds_complete={self.rounds_complete}"
            f" temp_files_cleaned={self.temp_files_cleaned}"
            f" orphans_cleaned={self.orphans_cleaned} workers_killed={self.children_killed}"
            f" elapsed_s={self.elapsed_s:.1f} problems={len(self.problems)}"
        )

    def count(self, rnd: Round) -> None:
        self.rounds.append(rnd)
        if rnd.progress == "zero":
            self.rounds_zero += 1
        elif rnd.progress == "partial":
            self.rounds_partial += 1
        else:
            self.rounds_complete += 1

    def details(self, limit: int = 40) -> str:
        """The summary, the problems, and the end of the gateway log if any failed."""
        lines = [self.summary(), *self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        if self.problems and self.gateway_log is not None and self.gateway_log.exists():
            tail = self.gateway_log.read_text(errors="replace").splitlines()[-60:]
            lines += [f"--- {self.gateway_log} (last 60 lines) ---", *tail]
        return "\n".join(lines)


def _batch(
    rng: random.Random, instances: list[Instance], acked: set[str], size: int
) -> list[Instance]:
    """Mostly instances not yet acknowledged, plus a few re-sends of acknowledged ones
    (a re-send replaces the queue row: that too must survive a kill)."""
    pending = [i for i in instances if i.sop_instance_uid not in acked]
    done = [i for i in instances if i.sop_instance_uid in acked]
    resend = rng.sample(done, min(len(done), 2, size))
    fresh = rng.sample(pending, min(len(pending), size - len(resend)))
    batch = fresh + resend
    if len(batch) < size:
        batch += rng.sample(done, min(len(done), size - len(batch)))
    rng.shuffle(batch)
    return batch


def run(
    root: Path,
    kills: int,
    seed: int | None = None,
    *,
    corpus_size: int | None = None,
    log: Log | None = None,
    **sections: dict[str, Any],
) -> CrashReport:
    """Kill a gateway under *root* *kills* times while storescu sends; check it all."""
    started = time.monotonic()
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    report = CrashReport(kills=kills, seed=seed, gateway_log=root / "gw" / "gateway.log")
    say = log or (lambda _msg: None)
    instances = build_corpus(root / "corpus", corpus_size or max(40, 3 * kills))
    report.corpus = len(instances)
    by_path = {inst.path: inst for inst in instances}
    acked: set[str] = set()
    gw = GatewayProcess(root / "gw", **sections)
    try:
        before: SpoolState | None = None
        for number in range(1, kills + 1):
            gw.start(timeout=120)
            if before is not None:
                report.problems += check_debris_gone(before, gw, f"start {number}")
            batch = [i.path for i in _batch(rng, instances, acked, rng.randint(6, 14))]
            rnd = Round(number, batch, kill_rule="")
            try:
                report.children_killed += send_and_kill(gw, rnd, rng)
            except ValueError as exc:
                report.problems.append(f"round {number}: storescu log not understood: {exc}")
                report.problems.append(rnd.output)
                break
            report.count(rnd)
            newly = [by_path[p] for p in rnd.acknowledged]
            acked.update(i.sop_instance_uid for i in newly)
            say(
                f"round {number}: killed {rnd.kill_rule}; acknowledged"
                f" {len(rnd.acknowledged)}/{len(batch)}, storescu exit {rnd.returncode}"
            )
            # Before any reconciliation: what was acknowledged is already durable.
            before = read_state(gw)
            if before.integrity != ["ok"]:
                report.problems.append(f"after kill {number}: integrity_check {before.integrity}")
            report.problems += check_acknowledged(before, gw, newly, f"after kill {number}")
            report.temp_files_cleaned += len(before.temp_files)
            report.orphans_cleaned += len(before.orphans)

        report.acknowledged = len(acked)
        # The restart after the last kill: reconcile, let the pipeline settle, stop.
        gw.start(timeout=120)
        if before is not None:
            report.problems += check_debris_gone(before, gw, "final start")
        if not wait_until_settled(gw, SETTLE_TIMEOUT_S):
            report.problems.append(f"final: pipeline not idle after {SETTLE_TIMEOUT_S:.0f} s")
        code = gw.stop(timeout=60)
        if code != 0:
            report.problems.append(f"final: gateway exited {code} on SIGTERM")
        report.problems += check_final(read_state(gw), gw, instances, acked)
    finally:
        if gw.proc is not None and gw.proc.poll() is None:
            kill_gateway(gw)
        report.elapsed_s = time.monotonic() - started
    return report


def seed_from_env() -> int | None:
    value = os.environ.get("CRASH_SEED")
    return int(value) if value else None

"""The chaos soak shared by ``tests/test_chaos.py`` and ``tests/bench/chaos.py``.

A real gateway (``python -m gateway run``, a child process) uploads with J2K
compression, small batches, a short request timeout and short backoff, and retention
with a small local cache, to :class:`tests.support.chaos_archive.ChaosArchive`: a TLS proxy
requiring our client certificate in front of a real Orthanc + DICOMweb that answers
each STOW-RS request at random (seeded) with a fault or Orthanc's own answer, and is
itself stopped (listening socket closed) and Orthanc killed and restarted now and then.

Meanwhile two sender threads run DCMTK ``storescu`` in a loop (two concurrent
associations), each run sending 1-4 files made from pydicom's test files with our own
UIDs: new instances, identical re-sends of a UID (the same bytes as its latest send)
and changed re-sends (a new content marker in ImageComments and in a private element,
and for uncompressed little-endian images one pixel bit flipped).  Which files were
acknowledged is read from storescu's ``-v`` log (:func:`tests.support.crashloop.parse_storescu`).

Checked all the while (each failure is a :class:`Violation` naming the invariant, the
SOP Instance UID where there is one, and an excerpt of the gateway's log):

* the gateway process never exits (polled every second; if it does, the exit code and
  the log are recorded and it is started again, as systemd would, so one soak shows
  every failure);
* the DIMSE port answers C-ECHO (DCMTK echoscu) every second;
* no file a queue row references (``path``, ``upload_path``) is missing from the
  spool (every 10 s; a miss is read again before it counts, as retention may just
  have moved on).

At the end the chaos stops (every request forwarded, Orthanc up), the queue must drain
within a bounded time, and then every acknowledged instance must be either in the
archive with the content of its last acknowledged send (ImageComments and the private
marker, and the pixels: the same PixelData bytes, or the same decoded pixel values
when the gateway sent J2K) or ``failed`` in the queue with a non-empty reason.  "Last"
allows for concurrency: a send counts as possibly last unless an acknowledged send of
the same UID started after it ended; an unacknowledged send is acceptable content under
the same rule (the gateway may have stored it and lost only the answer).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from .chaos_archive import DEFAULT_WEIGHTS, ChaosArchive, Fault
from .corpus import testdata
from .crashloop import parse_storescu
from .gateway_proc import GatewayProcess
from .peers import PROPOSE_FLAG, tool, transfer_syntax_of

Log = Callable[[str], None]

#: pydicom test files the senders use: uncompressed (explicit and implicit little
#: endian, big endian, RGB, multi-frame), RLE, JPEG 2000, JPEG lossy, no pixels.
TEMPLATES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "SC_rgb_small_odd.dcm",
    "MR_small_bigendian.dcm",
    "emri_small.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle_2frame.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG-lossy.dcm",
    "rtplan.dcm",
)

PRIVATE_GROUP = 0x0029
PRIVATE_CREATOR = "CHAOS SOAK"

#: The gateway's request timeout in the soak; the archive stalls longer than that.
REQUEST_TIMEOUT_S = 4.0
STALL_S = 7.0
DRAIN_TIMEOUT_S = 240.0
STORESCU_TIMEOUT_S = 180.0
#: A C-ECHO failure is the receiver's only if the gateway has not exited this much later
#: (it closes the port while it stops: drain, then exit).
ECHO_GRACE_S = 30.0
#: With instances due, no request to the archive for this long is a stalled pipeline.
STALLED_AFTER_S = 60.0
#: A gateway still running this long after SIGTERM does not stop (drain is 10 s).
STOP_TIMEOUT_S = 60.0

_DRAINED_STATES = ("uploaded", "failed")


def seconds_from_env(default: float) -> float:
    value = os.environ.get("CHAOS_SECONDS")
    return float(value) if value else default


def faults_from_env() -> dict[Fault, float] | None:
    """``CHAOS_FAULTS=forward,stall,reset``: only these faults, with their usual weights
    (to look at one class of failure, or at the races without the crashes)."""
    value = os.environ.get("CHAOS_FAULTS")
    if not value:
        return None
    names = {f.strip() for f in value.split(",") if f.strip()}
    unknown = names - {f.value for f in Fault}
    if unknown:
        raise ValueError(f"CHAOS_FAULTS: unknown {sorted(unknown)}; known: {[*map(str, Fault)]}")
    return {f: w for f, w in DEFAULT_WEIGHTS.items() if f.value in names}


def seed_from_env() -> int | None:
    value = os.environ.get("CHAOS_SEED")
    return int(value) if value else None


def gateway_sections(archive: ChaosArchive) -> dict[str, dict[str, Any]]:
    return {
        "upload": {
            "dicomweb_url": archive.dicomweb_url,
            "ca_file": str(archive.ca_file),
            "client_cert": str(archive.client_cert),
            "client_key": str(archive.client_key),
            "compression": "j2k-lossless",
            "compress_workers": 1,
            "batch_max_instances": 3,
            "concurrent_requests": 2,
            "request_timeout_seconds": REQUEST_TIMEOUT_S,
            "backoff_initial_seconds": 0.5,
            "backoff_max_seconds": 4.0,
            # Bounded retries are exercised too: an instance unlucky this often ends
            # `failed` with its reason, which the end check accepts.
            "max_attempts": 60,
        },
        # A cache of a few instances: files are pruned all the time, next to re-sends.
        "retention": {"keep_bytes": 400_000},
    }


@dataclass
class Send:
    number: int
    uid: str
    kind: str  # new, identical, changed
    path: Path
    marker: str
    sender: int
    started: float = 0.0
    ended: float = 0.0
    status: str = "not sent"

    @property
    def acknowledged(self) -> bool:
        return self.status == "Success"


@dataclass
class Violation:
    invariant: str
    uid: str | None
    detail: str
    log_excerpt: str = ""

    def render(self) -> str:
        head = f"[{self.invariant}]" + (f" sop={self.uid}" if self.uid else "")
        text = f"{head}: {self.detail}"
        if self.log_excerpt:
            text += "\n    " + "\n    ".join(self.log_excerpt.splitlines())
        return text


@dataclass
class _Uid:
    uid: str
    template: str
    transfer_syntax: str
    study: str
    series: str
    sends: list[Send] = field(default_factory=list)


@dataclass
class SoakReport:
    seed: int
    seconds: float
    sends: list[Send] = field(default_factory=list)
    storescu_runs: int = 0
    violations: list[Violation] = field(default_factory=list)
    archive_answers: Counter[str] = field(default_factory=Counter)
    listening_pauses: int = 0
    orthanc_restarts: int = 0
    gateway_exits: list[int] = field(default_factory=list)
    exit_causes: Counter[str] = field(default_factory=Counter)
    acknowledged_by_template: Counter[str] = field(default_factory=Counter)
    echoes_ok: int = 0
    echoes_failed_while_up: int = 0
    echoes_failed_while_down: int = 0
    in_archive: int = 0
    orthanc_instances: int = 0
    failed_reasons: Counter[str] = field(default_factory=Counter)
    drained: bool = False
    drain_seconds: float = 0.0
    final_stop_code: int | None = None
    elapsed_s: float = 0.0

    def summary(self) -> str:
        acked = [s for s in self.sends if s.acknowledged]
        kinds = Counter(s.kind for s in self.sends)
        acked_kinds = Counter(s.kind for s in acked)
        statuses = Counter(s.status for s in self.sends)
        by_invariant = Counter(v.invariant for v in self.violations)
        lines = [
            f"chaos soak: seed {self.seed} (CHAOS_SEED), {self.seconds:.0f} s of chaos, "
            f"{self.elapsed_s:.0f} s in all",
            f"  sends: {len(self.sends)} files in {self.storescu_runs} storescu runs "
            f"({kinds['new']} new, {kinds['identical']} identical re-sends, "
            f"{kinds['changed']} changed re-sends)",
            f"  acknowledged: {len(acked)} ({acked_kinds['new']} new, "
            f"{acked_kinds['identical']} identical, {acked_kinds['changed']} changed); "
            f"distinct UIDs acknowledged: {len({s.uid for s in acked})}",
            "  storescu statuses: " + _counts(statuses),
            "  archive answers: " + _counts(self.archive_answers),
            f"  archive listening pauses: {self.listening_pauses}, "
            f"Orthanc restarts: {self.orthanc_restarts}",
            "  acknowledged by source file: " + _counts(self.acknowledged_by_template),
            f"  gateway exits: {len(self.gateway_exits)}"
            + "".join(f"\n    {n} x {c}" for c, n in self.exit_causes.most_common()),
            f"  C-ECHO: ok {self.echoes_ok}, failed while the gateway ran "
            f"{self.echoes_failed_while_up}, failed around an exit {self.echoes_failed_while_down}",
            f"  queue drained: {self.drained} ({self.drain_seconds:.0f} s); "
            f"final SIGTERM exit code: {self.final_stop_code}",
            f"  acknowledged instances in the archive with their last content: "
            f"{self.in_archive} (Orthanc holds {self.orthanc_instances})",
            f"  failed in the queue: {sum(self.failed_reasons.values())}"
            + "".join(f"\n    {n} x {r}" for r, n in self.failed_reasons.most_common()),
            f"  invariant violations: {len(self.violations)}"
            + (" (" + _counts(by_invariant) + ")" if by_invariant else ""),
        ]
        return "\n".join(lines)

    def details(self, limit: int = 30) -> str:
        shown: Counter[str] = Counter()
        out = []
        for v in self.violations:
            shown[v.invariant] += 1
            if shown[v.invariant] <= limit:
                out.append(v.render())
        hidden = sum(max(0, n - limit) for n in shown.values())
        if hidden:
            out.append(f"... and {hidden} more")
        return self.summary() + ("\n" + "\n".join(out) if out else "")


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {n}" for k, n in c.most_common()) or "none"


class Soak:
    def __init__(
        self,
        workdir: Path,
        seconds: float,
        seed: int,
        log: Log,
        faults: dict[Fault, float] | None = None,
    ) -> None:
        self.work = workdir
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.log = log
        self.report = SoakReport(seed=seed, seconds=seconds)
        self.archive = ChaosArchive(
            workdir / "archive", seed, stall_seconds=STALL_S, weights=faults
        )
        self.gw: GatewayProcess | None = None
        self.sends_dir = workdir / "sends"
        self.sends_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._uids: dict[str, _Uid] = {}
        self._recent: list[str] = []
        self._stop_sending = threading.Event()
        self._stop_watching = threading.Event()
        self._gateway_down = threading.Event()
        self._log_offset = 0
        self._reported: set[tuple[str, str, str]] = set()
        self._progress_seen: tuple[float, int, int | None] | None = None
        self._stall_reported = False
        self._started = time.monotonic()

    # -- helpers ------------------------------------------------------------------------
    def violation(self, invariant: str, uid: str | None, detail: str, excerpt: str = "") -> None:
        v = Violation(invariant, uid, detail, excerpt)
        with self._lock:
            self.report.violations.append(v)
        self.log(f"VIOLATION {v.render()}")

    def _t(self) -> float:
        return time.monotonic() - self._started

    def _log_lines(self, uid: str | None = None, since: int = 0, last: int = 12) -> str:
        assert self.gw is not None
        try:
            with open(self.gw.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        lines = text.splitlines()
        if uid is not None:
            lines = [line for line in lines if uid in line]
        return "\n".join(lines[-last:])

    def _send_story(self, uid: str) -> str:
        """What the senders did with this UID: each send, its kind, time and answer."""
        with self._lock:
            entry = self._uids.get(uid)
            sends = list(entry.sends) if entry else []
        return "sends: " + "; ".join(
            f"#{s.number} {s.kind} via CHAOS{s.sender} t={s.started:.1f}-{s.ended:.1f} s {s.status}"
            for s in sends[-6:]
        )

    def _crash_excerpt(self) -> str:
        """Since the gateway last started: its CRITICAL lines and, for each traceback,
        the innermost frame and the exception (the whole log is in the work dir)."""
        assert self.gw is not None
        text = self._log_lines(since=self._log_offset, last=100000)
        keep: list[str] = []
        frame = ""
        for line in text.splitlines():
            bare = line.strip(" |+-")
            if bare.startswith("File "):
                frame = bare
            elif "CRITICAL" in line:
                keep.append(line.strip())
            elif _EXCEPTION_LINE.match(bare) and not bare.startswith(_GROUPS):
                keep += [f"  {frame}", f"  {bare}"] if frame else [f"  {bare}"]
                frame = ""
        out = list(dict.fromkeys(keep))  # a traceback printed twice shows once
        return "\n".join(out[-30:]) or "\n".join(text.splitlines()[-15:])

    # -- instances to send --------------------------------------------------------------
    def _plan_batch(self, sender: int) -> list[Send]:
        with self._lock:
            n = self.rng.randint(1, 4)
            batch: list[Send] = []
            for _ in range(n):
                r = self.rng.random()
                known = [u for u in self._recent if u not in {s.uid for s in batch}]
                if not known or r < 0.45:
                    batch.append(self._new_send(sender, None, "new"))
                    continue
                # Mostly recent UIDs (so the two associations collide), sometimes any.
                if self.rng.random() < 0.8:
                    uid = self.rng.choice(known[-12:])
                else:
                    uid = self.rng.choice(sorted(self._uids))
                if r < 0.72 and self._uids[uid].sends:
                    last = self._uids[uid].sends[-1]
                    send = Send(self._next_number(), uid, "identical", last.path, last.marker,
                                sender)  # fmt: skip
                    self._uids[uid].sends.append(send)
                    self.report.sends.append(send)
                    batch.append(send)
                else:
                    batch.append(self._new_send(sender, self._uids[uid], "changed"))
            return batch

    def _next_number(self) -> int:
        return len(self.report.sends) + 1

    def _new_send(self, sender: int, entry: _Uid | None, kind: str) -> Send:
        if entry is None:
            template = self.rng.choice(TEMPLATES)
            entry = _Uid(generate_uid(), template, transfer_syntax_of(testdata(template)),
                         generate_uid(), generate_uid())  # fmt: skip
            self._uids[entry.uid] = entry
            self._recent.append(entry.uid)
            del self._recent[:-40]
        number = self._next_number()
        marker = f"chaos {self.report.seed} send {number}"
        path = self.sends_dir / f"{number:06d}.dcm"
        ds = pydicom.dcmread(testdata(entry.template))
        ds.SOPInstanceUID = entry.uid
        ds.file_meta.MediaStorageSOPInstanceUID = entry.uid
        ds.StudyInstanceUID = entry.study
        ds.SeriesInstanceUID = entry.series
        ds.ImageComments = marker
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", marker)
        ts = ds.file_meta.TransferSyntaxUID
        native = ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and "PixelData" in ds
        # Every other changed version of an uncompressed image has other pixels (one bit).
        if kind == "changed" and native and len(entry.sends) % 2 == 1:
            pixels = bytearray(ds.PixelData)
            pixels[0] ^= 1
            ds.PixelData = bytes(pixels)
        ds.save_as(path, enforce_file_format=True)
        send = Send(number, entry.uid, kind, path, marker, sender)
        entry.sends.append(send)
        self.report.sends.append(send)
        return send

    # -- threads ------------------------------------------------------------------------
    def _sender(self, sender: int) -> None:
        while not self._stop_sending.is_set():
            batch = self._plan_batch(sender)
            # One association per transfer syntax, proposing exactly it, so each file
            # goes as it is (storescu would otherwise convert or skip it).
            groups: dict[str, list[Send]] = {}
            for s in batch:
                groups.setdefault(self._uids[s.uid].transfer_syntax, []).append(s)
            for ts, group in groups.items():
                self._store(sender, ts, group)
            self._stop_sending.wait(self.rng.uniform(0.1, 0.8))

    def _store(self, sender: int, ts: str, group: list[Send]) -> None:
        # One link per send: storescu's log names files, and identical re-sends share
        # their source file.
        links = []
        for s in group:
            link = self.sends_dir / f"run-{s.number:06d}.dcm"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            os.link(s.path, link)
            links.append(link)
        cmd = [tool("storescu"), "-v", PROPOSE_FLAG[ts], "-aec", "DICOMGW",
               "-aet", f"CHAOS{sender}", "-to", "30", "-ta", "30", "-td", "60",
               "127.0.0.1", str(self._port()), *map(str, links)]  # fmt: skip
        started = self._t()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"),
                timeout=STORESCU_TIMEOUT_S, check=False,
            )  # fmt: skip
            output = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            output = str(exc.stdout or "") + str(exc.stderr or "")
        ended = self._t()
        try:
            sent, _, statuses = parse_storescu(links, output)
        except ValueError as exc:
            self.log(f"sender {sender}: unreadable storescu log ({exc}):\n{output[-800:]}")
            sent, statuses = [], []
        with self._lock:
            self.report.storescu_runs += 1
            for i, s in enumerate(group):
                s.started, s.ended = started, ended
                if i < len(statuses):
                    s.status = statuses[i]
                    if s.acknowledged:
                        self.report.acknowledged_by_template[self._uids[s.uid].template] += 1
                elif i < len(sent):
                    s.status = "no response"
        for link in links:
            link.unlink()

    def _port(self) -> int:
        assert self.gw is not None
        return self.gw.port

    def _watch_gateway(self) -> None:
        """Poll the process every second; restart it (as systemd would) if it exited."""
        assert self.gw is not None and self.gw.proc is not None
        while not self._stop_watching.wait(1.0):
            code = self.gw.proc.poll()
            if code is None:
                continue
            self._gateway_down.set()
            excerpt = self._crash_excerpt()
            cause = _exit_cause(excerpt)
            with self._lock:
                self.report.gateway_exits.append(code)
                self.report.exit_causes[f"exit {code}: {cause}"] += 1
            self.violation(
                "gateway exited", None, f"exit code {code} at t={self._t():.0f} s ({cause})",
                excerpt,
            )  # fmt: skip
            for attempt in range(5):
                time.sleep(1.0)
                try:
                    self._start_gateway()
                    break
                except (RuntimeError, TimeoutError) as exc:
                    self.violation("gateway does not start", None,
                                   f"restart {attempt + 1}: {str(exc)[-1500:]}")  # fmt: skip
            else:
                return
            self._gateway_down.clear()

    def _start_gateway(self) -> None:
        assert self.gw is not None
        self._log_offset = self.gw.log_path.stat().st_size if self.gw.log_path.exists() else 0
        self.gw.start(timeout=60, env={"PYTHONFAULTHANDLER": "1"})

    def _echo(self) -> None:
        """C-ECHO every second.  A failure counts against the receiver only if the same
        gateway process is still running :data:`ECHO_GRACE_S` later; otherwise it is
        part of an exit, which is its own violation (the port closes while it stops)."""
        pending: list[tuple[float, int | None, str]] = []
        while True:
            stopping = self._stop_watching.wait(1.0)
            now = time.monotonic()
            for entry in [p for p in pending if stopping or now - p[0] >= ECHO_GRACE_S]:
                pending.remove(entry)
                self._judge_echo(*entry)
            if stopping:
                return
            pid = None if self._gateway_down.is_set() else self._pid()
            try:
                proc = subprocess.run(
                    [tool("echoscu"), "-to", "5", "-ta", "5", "-td", "5", "-aec", "DICOMGW",
                     "-aet", "CHAOSECHO", "127.0.0.1", str(self._port())],
                    capture_output=True, text=True, timeout=20, check=False,
                )  # fmt: skip
                ok, out = proc.returncode == 0, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired:
                ok, out = False, "echoscu: no answer in 20 s"
            if ok:
                with self._lock:
                    self.report.echoes_ok += 1
            else:
                pending.append((now, pid, f"at t={self._t():.0f} s: {out.strip()[-300:]}"))

    def stop_gateway(self) -> None:
        """SIGTERM; one that does not end the process in :data:`STOP_TIMEOUT_S` is a
        violation, and SIGABRT then makes Python's faulthandler (PYTHONFAULTHANDLER)
        write every thread's stack into the log before the process dies."""
        gw = self.gw
        assert gw is not None and gw.proc is not None
        if gw.proc.poll() is not None:
            return
        try:
            self.report.final_stop_code = gw.stop(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            gw.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                gw.proc.wait(timeout=15)
            self.violation(
                "does not stop on SIGTERM", None,
                f"still running {STOP_TIMEOUT_S:.0f} s after SIGTERM; thread stacks (SIGABRT):",
                self._thread_dump(),
            )  # fmt: skip
            return
        if self.report.final_stop_code != 0:
            self.violation("unclean stop", None,
                           f"SIGTERM: exit code {self.report.final_stop_code}",
                           self._crash_excerpt())  # fmt: skip

    def _thread_dump(self) -> str:
        """faulthandler's dump: per thread, its innermost frames (the log has it all)."""
        text = self._log_lines(since=self._log_offset, last=100000)
        start = text.rfind("Fatal Python error")
        if start < 0:
            return "(no faulthandler dump in the log)"
        out: list[str] = []
        frames = 0
        for line in text[start:].splitlines():
            if line.startswith(("Thread ", "Current thread ")):
                out.append(line.strip())
                frames = 0
            elif line.startswith("  File ") and frames < 4:
                out.append(line.rstrip())
                frames += 1
        return "\n".join(out[:80])

    def _pid(self) -> int | None:
        assert self.gw is not None
        proc = self.gw.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _judge_echo(self, _at: float, pid: int | None, what: str) -> None:
        running = pid is not None and pid == self._pid() and not self._gateway_down.is_set()
        with self._lock:
            if running:
                self.report.echoes_failed_while_up += 1
            else:
                self.report.echoes_failed_while_down += 1
        if running:
            self.violation("C-ECHO failed", None, what, self._log_lines(last=5))

    def _conduct(self) -> None:
        """Stop listening now and then; kill and restart Orthanc at least once."""
        restart_at = [self.seconds * 0.4]
        while restart_at[-1] + 150 < self.seconds:
            restart_at.append(restart_at[-1] + 150)
        next_pause = self.rng.uniform(10, 30)
        while not self._stop_sending.is_set():
            t = self._t()
            if restart_at and t >= restart_at[0]:
                restart_at.pop(0)
                self.log(f"t={t:.0f} s: restarting Orthanc")
                self.archive.restart_orthanc()
            elif t >= next_pause:
                pause = self.rng.uniform(2, 5)
                self.log(f"t={t:.0f} s: archive stops listening for {pause:.1f} s")
                self.archive.pause_listening(pause)
                next_pause = self._t() + self.rng.uniform(15, 35)
            self._stop_sending.wait(0.5)

    def _check_files(self) -> None:
        while not self._stop_watching.wait(10.0):
            self.check_referenced_files()
            self.check_progress()

    def _jobs_log_tail(self, last: int = 8) -> str:
        """The pipeline's and the app's last log lines since the gateway last started."""
        text = self._log_lines(since=self._log_offset, last=100000)
        lines = [
            ln
            for ln in text.splitlines()
            if " gateway.pipeline.jobs:" in ln or " gateway.app:" in ln
        ]
        return "\n".join(lines[-last:])

    def check_progress(self) -> None:
        """The pipeline must keep trying: with instances due for upload, some request
        must reach the archive within :data:`STALLED_AFTER_S` (backoff is a few seconds)."""
        gw = self.gw
        assert gw is not None
        answers = sum(self.archive.counts.answers.values())
        pid = self._pid()
        try:
            due = gw.rows(
                "SELECT state, count(*) AS n FROM instances WHERE state IN"
                " ('received', 'compressing', 'compressed', 'uploading') GROUP BY state"
            )
        except Exception as exc:  # the database is the gateway's; reading may race it
            self.log(f"cannot read the queue: {exc}")
            return
        now = time.monotonic()
        seen = self._progress_seen
        if pid is None or not due or seen is None or seen[1] != answers or seen[2] != pid:
            self._progress_seen = (now, answers, pid)
            self._stall_reported = False
            return
        if now - seen[0] >= STALLED_AFTER_S and not self._stall_reported:
            self._stall_reported = True
            states = ", ".join(f"{r['state']} {r['n']}" for r in due)
            errors = gw.rows(
                "SELECT last_error, count(*) AS n FROM instances WHERE state IN"
                " ('received', 'compressing', 'compressed', 'uploading')"
                " AND last_error IS NOT NULL GROUP BY last_error ORDER BY n DESC LIMIT 3"
            )
            if errors:
                states += "; their last errors: " + "; ".join(
                    f"{r['n']} x {r['last_error'][:160]}" for r in errors
                )
            self.violation(
                "pipeline stalled", None,
                f"no request reached the archive for {now - seen[0]:.0f} s (t={self._t():.0f} s) "
                f"with instances waiting ({states}); the gateway process is running",
                self._jobs_log_tail(),
            )  # fmt: skip

    # -- checks -------------------------------------------------------------------------
    def check_referenced_files(self) -> None:
        gw = self.gw
        assert gw is not None
        try:
            rows = gw.rows("SELECT sop_instance_uid, state, path, upload_path FROM instances")
        except Exception as exc:  # the database is the gateway's; reading may race it
            self.log(f"cannot read the queue: {exc}")
            return
        for row in rows:
            for column in ("path", "upload_path"):
                rel = row[column]
                if rel is None or (gw.spool / rel).exists():
                    continue
                again = gw.rows(
                    f"SELECT state, {column} AS rel FROM instances WHERE sop_instance_uid = ?",
                    (row["sop_instance_uid"],),
                )
                if again and again[0]["rel"] == rel and not (gw.spool / rel).exists():
                    key = ("missing", row["sop_instance_uid"], rel)
                    if key in self._reported:
                        continue
                    self._reported.add(key)
                    self.violation(
                        "referenced file missing", row["sop_instance_uid"],
                        f"{column} {rel} (state {again[0]['state']}) is not in the spool "
                        f"at t={self._t():.0f} s",
                        self._send_story(row["sop_instance_uid"]) + "\n"
                        + self._log_lines(row["sop_instance_uid"]),
                    )  # fmt: skip

    def wait_drained(self) -> bool:
        assert self.gw is not None
        started = time.monotonic()
        states = "','".join(_DRAINED_STATES)
        pending = -1
        # Given up early when nothing moves (no row leaves, no request reaches the
        # archive) for STALLED_AFTER_S: the 'pipeline stalled' check says why.
        last_change, last_seen = started, (-1, -1)
        while time.monotonic() - started < DRAIN_TIMEOUT_S:
            if self.gw.proc is not None and self.gw.proc.poll() is not None:
                time.sleep(1)  # the watcher restarts it
                continue
            pending = self.gw.rows(
                f"SELECT count(*) AS n FROM instances WHERE state NOT IN ('{states}')"
            )[0]["n"]
            if pending == 0:
                self.report.drain_seconds = time.monotonic() - started
                return True
            seen = (pending, sum(self.archive.counts.answers.values()))
            if seen != last_seen:
                last_change, last_seen = time.monotonic(), seen
            elif time.monotonic() - last_change > STALLED_AFTER_S + 15:
                self.check_progress()
                break
            time.sleep(1)
        self.report.drain_seconds = time.monotonic() - started
        self.log(f"queue not drained after {self.report.drain_seconds:.0f} s: {pending} pending")
        return False

    def check_final(self) -> None:
        assert self.gw is not None
        rows = {r["sop_instance_uid"]: r for r in self.gw.rows()}
        for uid, entry in sorted(self._uids.items()):
            acked = [s for s in entry.sends if s.acknowledged]
            if not acked:
                continue
            row = rows.get(uid)
            if row is None:
                self.violation("acknowledged instance lost", uid,
                               "no queue row and not in the archive" if not self._in_archive(uid)
                               else "no queue row", self._log_lines(uid))  # fmt: skip
                continue
            state = row["state"]
            if state == "failed":
                reason = (row["last_error"] or "").strip()
                if not reason:
                    self.violation("failed without a reason", uid, "last_error is empty")
                else:
                    self.report.failed_reasons[_reason_group(reason)] += 1
                # Failed is a state an operator retries from: its data must still be here.
                if row["path"] is None or not (self.gw.spool / row["path"]).exists():
                    self.violation(
                        "acknowledged instance lost", uid,
                        f"failed ({reason!r}) and its file {row['path']} is gone: "
                        "nothing is left to retry",
                        self._send_story(uid) + "\n" + self._log_lines(uid, last=6),
                    )  # fmt: skip
                continue
            if state != "uploaded":
                self.violation(
                    "not drained", uid,
                    f"state {state}, attempts {row['attempts']}, last_error {row['last_error']!r}",
                    self._send_story(uid) + "\n" + self._log_lines(uid, last=6),
                )  # fmt: skip
                continue
            self._check_archive_copy(uid, entry)

    def _in_archive(self, uid: str) -> bool:
        try:
            self.archive.orthanc.instance_file(uid)
            return True
        except AssertionError:
            return False

    def _check_archive_copy(self, uid: str, entry: _Uid) -> None:
        try:
            data = self.archive.orthanc.instance_file(uid)
        except AssertionError as exc:
            self.violation("uploaded but not in the archive", uid, str(exc),
                           self._archive_story(uid))  # fmt: skip
            return
        stored = pydicom.dcmread(BytesIO(data))
        marker = str(stored.get("ImageComments", ""))
        candidates = _possibly_last(entry.sends)
        by_marker = {s.marker: s for s in candidates}
        send = by_marker.get(marker)
        if send is None:
            known = next((s for s in entry.sends if s.marker == marker), None)
            later = [s for s in entry.sends if s.acknowledged and known and s.started > known.ended]
            what = (
                f"the archive holds {marker!r} (send #{known.number}, {known.kind}, "
                f"{known.status}, t={known.started:.0f}-{known.ended:.0f} s), superseded by "
                + ", ".join(f"#{s.number} ({s.kind}, t={s.started:.0f} s)" for s in later[:3])
                if known
                else f"the archive holds an unknown marker {marker!r}"
            )
            self.violation("archive holds stale content", uid, what,
                           self._send_story(uid) + "\n" + self._archive_story(uid))  # fmt: skip
            return
        problems = _compare(stored, send.path)
        if problems:
            self.violation("archive content differs from the send", uid,
                           f"send #{send.number}: " + "; ".join(problems))  # fmt: skip
            return
        self.report.in_archive += 1

    def _archive_story(self, uid: str) -> str:
        decisions = self.archive.decisions_for(uid)
        lines = [
            f"archive t={d.at - self._started:.0f} s: {d.fault} {d.detail}" for d in decisions[-6:]
        ]
        return "\n".join([*lines, self._log_lines(uid, last=8)])

    # -- the run ------------------------------------------------------------------------
    def run(self) -> SoakReport:
        self.log(f"chaos soak: seed {self.report.seed}, {self.seconds:.0f} s, in {self.work}")
        self.archive.start()
        threads: list[threading.Thread] = []
        try:
            self.gw = GatewayProcess(self.work / "gw", **gateway_sections(self.archive))
            self._start_gateway()
            self.archive.set_chaos(True)
            watchers = [
                threading.Thread(target=self._watch_gateway, name="watch"),
                threading.Thread(target=self._echo, name="echo"),
                threading.Thread(target=self._check_files, name="files"),
            ]
            senders = [threading.Thread(target=self._sender, args=(i,), name=f"sender{i}")
                       for i in (1, 2)]  # fmt: skip
            conductor = threading.Thread(target=self._conduct, name="conductor")
            threads = [*watchers, *senders, conductor]
            for th in threads:
                th.daemon = True
                th.start()
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
                self.log(self._progress())
            self._stop_sending.set()
            for th in [*senders, conductor]:
                th.join(timeout=STORESCU_TIMEOUT_S + 30)
            self.archive.set_chaos(False)
            self.log(f"t={self._t():.0f} s: chaos off, waiting for the queue to drain")
            self.report.drained = self.wait_drained()
            self._stop_watching.set()
            for th in watchers:
                th.join(timeout=60)
            self.check_referenced_files()
            self.check_final()
            self.report.orthanc_instances = self.archive.orthanc.instance_count()
            self.stop_gateway()
            self.check_referenced_files()
        except Exception as exc:  # reported with everything else, not instead of it
            self.violation("soak harness error", None, repr(exc), traceback.format_exc())
        finally:
            self._stop_sending.set()
            self._stop_watching.set()
            if self.gw is not None and self.gw.proc is not None and self.gw.proc.poll() is None:
                self.gw.kill()
            c = self.archive.counts
            self.report.archive_answers = Counter(c.answers)
            self.report.listening_pauses = c.listening_pauses
            self.report.orthanc_restarts = c.orthanc_restarts
            self.archive.stop()
            self.report.elapsed_s = self._t()
        return self.report

    def _progress(self) -> str:
        with self._lock:
            sends = len(self.report.sends)
            acked = sum(1 for s in self.report.sends if s.acknowledged)
            exits = len(self.report.gateway_exits)
            violations = len(self.report.violations)
        return (
            f"t={self._t():.0f} s: {sends} sends, {acked} acknowledged, archive "
            f"{dict(self.archive.counts.answers)}, gateway exits {exits}, "
            f"violations {violations}"
        )


def _exit_cause(excerpt: str) -> str:
    """The exceptions named in a crash excerpt (sorted, addresses and spool paths
    blanked), so that exits with the same causes group together."""
    names = set()
    for line in excerpt.splitlines():
        bare = line.strip()
        if _EXCEPTION_LINE.match(bare) and not bare.startswith(_GROUPS):
            bare = _SPOOL_PATH.sub("<spool file>", _ADDRESS.sub("0x...", bare))
            names.add(bare[:120])
    return " + ".join(sorted(names)) or "no exception in the log"


def _possibly_last(sends: list[Send]) -> list[Send]:
    """Sends whose content may rightly be the archive's: none that an acknowledged send
    of the same UID definitely followed (started after it ended)."""
    acked = [s for s in sends if s.acknowledged]
    return [s for s in sends if s.status != "not sent" and not any(
        t.started > s.ended for t in acked)]  # fmt: skip


def _compare(stored: Dataset, sent_path: Path) -> list[str]:
    """What differs between the archive's copy and the file sent (marker, pixels)."""
    sent = pydicom.dcmread(sent_path)
    problems = []
    block_sent = sent.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    try:
        block_stored = stored.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        if block_stored[0x10].value != block_sent[0x10].value:
            problems.append(f"private marker {block_stored[0x10].value!r}")
    except KeyError:
        problems.append("private marker element missing")
    if "PixelData" not in sent:
        return problems
    if "PixelData" not in stored:
        return [*problems, "no PixelData in the archive's copy"]
    if stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID:
        if stored.PixelData != sent.PixelData:
            problems.append("PixelData bytes differ")
        return problems
    try:
        a, b = stored.pixel_array, sent.pixel_array
    except Exception as exc:  # a decoder's own exception types vary
        return [*problems, f"cannot decode to compare: {exc!r}"]
    if a.shape != b.shape or not np.array_equal(a, b):
        problems.append(
            f"decoded pixels differ ({stored.file_meta.TransferSyntaxUID.name} "
            f"{a.shape} vs sent {sent.file_meta.TransferSyntaxUID.name} {b.shape})"
        )
    return problems


_EXCEPTION_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Group|Interrupt|Exit)\b(:|$)")
_GROUPS = ("ExceptionGroup", "BaseExceptionGroup")  # the wrappers, not the causes
_SPOOL_PATH = re.compile(r"'?/\S*/spool/\S+?\.dcm'?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_NUMBERS = re.compile(r"\d{3,}|0x[0-9A-Fa-f]+|\d+(\.\d+){3,}")


def _reason_group(reason: str) -> str:
    return _NUMBERS.sub(lambda m: m.group(0) if m.group(0).startswith("0x") else "N", reason)[:160]


def run(
    workdir: Path,
    seconds: float,
    seed: int | None = None,
    log: Log = print,
    faults: dict[Fault, float] | None = None,
) -> SoakReport:
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    return Soak(workdir, seconds, seed, log, faults).run()

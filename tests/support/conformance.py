"""The real-SCU conformance matrix (issue 11): send the public corpus through four SCUs
into one gateway and one archive, and compare each archive copy with what was sent.

Shared by tests/test_conformance_matrix.py (fidelity, every instance stored) and
tests/bench/conformance.py (J2K compression coverage).  Every peer is real:

* the gateway (``python -m gateway run``, tests/support/gateway_proc.py);
* the archive: Orthanc + DICOMweb behind nginx with mutual TLS (tests/support/archive.py);
* the SCUs of tests/support/scus.py, each with its default proposals;
* a reference receiver, DCMTK ``storescp -pm +xa +B`` (accepts every SOP class and
  transfer syntax, writes what arrived bit for bit).  Each SCU sends the same files
  to it as to the gateway, so an instance the SCU cannot send by its own defaults
  (a class it does not propose, a syntax it cannot convert) is told apart from one
  the gateway refused, and the transfer syntax the SCU uses with a neutral receiver
  is known.

The comparison (:func:`compare`) walks both data sets element by element, at every
sequence depth, VR included.  File Meta Information is not compared (it describes the
file, and the gateway rewrites it for a compressed copy).  What may legitimately
differ: Pixel Data's encoding (compared as decoded pixels instead), and, where the
transfer syntax changed on the way, Photometric Interpretation and Planar
Configuration (RGB becomes YBR_RCT in JPEG 2000; PS3.5 8.2.4) and the Lossy Image
Compression attributes an SCU adds when it decompresses lossy data.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import warnings
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless

from . import corpus, scus
from .archive import ArchiveLab
from .gateway_proc import GatewayProcess
from .peers import free_port, tool, wait_for_port

PIXEL_DATA = 0x7FE00010
PHOTOMETRIC = 0x00280004
PLANAR = 0x00280006
LOSSY_ATTRS = {0x00282110, 0x00282112, 0x00282114}  # Lossy Image Compression (Ratio/Method)
#: Data Set Trailing Padding: PS3.10 7.2 lets any writer drop it; not content.
TRAILING_PADDING = 0xFFFCFFFC
_DONE_STATES = {"uploaded", "failed"}
_SWAP = {"US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OL": 4, "OF": 4,
         "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8}  # fmt: skip


# -- comparison ------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    kind: str  # "lost VR" | "private value" | "value" | "missing" | "added" | "pixels"
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: {self.detail}"


@dataclass
class Comparison:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # legitimately not compared, and why
    #: differences already in what the SCU put on the wire (its own conversion)
    scu_conversion: list[Problem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for p in self.problems if p.kind == kind)


def _read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


def _le_bytes(value: bytes, vr: str, little: bool) -> bytes:
    if little or vr not in _SWAP or len(value) % _SWAP[vr]:
        return value
    size = _SWAP[vr]
    return np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def _raw_value(ds: Dataset, tag: BaseTag) -> bytes | None:
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement) and elem.value is not None:
        return bytes(elem.value)
    return None


def _vr(ds: Dataset, tag: BaseTag) -> str:
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return str(ds[tag].VR)
    return str(elem.VR)


def _is_sequence(ds: Dataset, tag: BaseTag) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds[tag].VR == "SQ"


def _strip(data: bytes) -> bytes:
    return data.rstrip(b" \0")


def compare(original: bytes, archived: bytes) -> Comparison:
    """Compare the archive's copy with the file that was sent, element by element."""
    result = Comparison()
    a, b = _read(original), _read(archived)
    ts_a = UID(a.file_meta.TransferSyntaxUID)
    ts_b = UID(b.file_meta.TransferSyntaxUID)
    ctx = _Ctx(ts_a, ts_b, result)
    ctx.walk(a, b, "", top=True)
    if PIXEL_DATA in a or PIXEL_DATA in b:
        ctx.pixels(a, b, "", top=True)
    return result


@dataclass
class _Ctx:
    ts_a: UID
    ts_b: UID
    result: Comparison

    @property
    def converted(self) -> bool:
        return self.ts_a != self.ts_b

    def add(self, kind: str, where: str, detail: str) -> None:
        self.result.problems.append(Problem(kind, where, detail))

    def walk(self, a: Dataset, b: Dataset, path: str, *, top: bool = False) -> None:
        ignored = {TRAILING_PADDING}
        tags_a = {t for t in a.keys() if t.element != 0 and t not in ignored}  # noqa: SIM118
        tags_b = {t for t in b.keys() if t.element != 0 and t not in ignored}  # noqa: SIM118
        for tag in sorted(tags_a - tags_b):
            self.add("missing", f"{path}{tag}", "in the original, not in the archive copy")
        for tag in sorted(tags_b - tags_a):
            if top and self.converted and tag in LOSSY_ATTRS:
                self.result.notes.append(f"{tag} added by the conversion on the wire")
                continue
            self.add("added", f"{path}{tag}", "in the archive copy only")
        for tag in sorted(tags_a & tags_b):
            where = f"{path}{tag}"
            if tag == PIXEL_DATA:
                if not top:
                    self.pixels(a, b, path, top=False)
                continue
            if top and self.converted and tag in (PHOTOMETRIC, PLANAR, *LOSSY_ATTRS):
                continue  # what the standard lets a change of transfer syntax change
            # The raw bytes first: reading the VR converts the element in place.
            raws = _raw_value(a, tag), _raw_value(b, tag)
            try:
                vr_a, vr_b = _vr(a, tag), _vr(b, tag)
            except Exception as exc:  # a value pydicom cannot even convert
                self.add("value", where, f"cannot read: {type(exc).__name__}: {exc}")
                continue
            if not self.ts_a.is_implicit_VR and vr_a != vr_b:
                kind = "lost VR"
                self.add(kind, where, f"VR {vr_a} sent, {vr_b} archived"
                         + (" (private)" if tag.is_private else ""))  # fmt: skip
                continue
            if vr_a == "SQ" and vr_b == "SQ":
                seq_a, seq_b = a[tag].value, b[tag].value
                if len(seq_a) != len(seq_b):
                    self.add("value", where, f"{len(seq_a)} items sent, {len(seq_b)} archived")
                    continue
                for i, (ia, ib) in enumerate(zip(seq_a, seq_b, strict=True)):
                    self.walk(ia, ib, f"{where}[{i}].")
                continue
            self.value(a, b, tag, vr_a, where, raws)

    def value(
        self, a: Dataset, b: Dataset, tag: BaseTag, vr: str, where: str,
        raws: tuple[bytes | None, bytes | None],
    ) -> None:  # fmt: skip
        raw_a, raw_b = raws
        if raw_a is not None and raw_b is not None:
            la = _le_bytes(raw_a, vr, self.ts_a.is_little_endian)
            lb = _le_bytes(raw_b, vr, self.ts_b.is_little_endian)
            if la == lb or _strip(la) == _strip(lb):
                return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                same = a[tag].value == b[tag].value
            except Exception:
                same = False
        if not same:
            kind = "private value" if tag.is_private else "value"
            self.add(kind, where, f"{_short(a, tag)} sent, {_short(b, tag)} archived")

    def pixels(self, a: Dataset, b: Dataset, path: str, *, top: bool) -> None:
        where = f"{path}(7FE0,0010)"
        if PIXEL_DATA not in a or PIXEL_DATA not in b:
            self.add("pixels", where, "Pixel Data in one copy only")
            return
        ea, eb = a.get_item(PIXEL_DATA), b.get_item(PIXEL_DATA)
        enc_a = (top and self.ts_a.is_compressed) or _undefined(ea)
        enc_b = (top and self.ts_b.is_compressed) or _undefined(eb)
        if not enc_a and not enc_b and not top:
            raw_a, raw_b = _raw_value(a, PIXEL_DATA), _raw_value(b, PIXEL_DATA)
            if raw_a is not None and raw_b is not None:
                vr = "OW" if _vr(a, PIXEL_DATA) == "OW" else "OB"
                la = _le_bytes(raw_a, vr, self.ts_a.is_little_endian)
                lb = _le_bytes(raw_b, vr, self.ts_b.is_little_endian)
                if la != lb:
                    self.add("pixels", where, "nested native pixel data differs")
                return
        if self.ts_a == self.ts_b and enc_a and enc_b:
            if a.PixelData != b.PixelData:
                self.add("pixels", where, "encapsulated pixel data differs")
            return
        lossy = self.ts_a in corpus_lossy()
        try:
            arr_a = _decode(a, self.ts_a if enc_a else _native(self.ts_a), top=top)
        except Exception as exc:
            note = "lossy original converted on the wire" if lossy else "cannot decode original"
            self.result.notes.append(f"{where}: {note} ({type(exc).__name__}: {exc}"[:200] + ")")
            return
        try:
            arr_b = _decode(b, self.ts_b if enc_b else _native(self.ts_b), top=top)
        except Exception as exc:
            self.add(
                "pixels", where, f"archive copy cannot be decoded: {type(exc).__name__}: {exc}"
            )
            return
        if lossy and self.converted:
            self.result.notes.append(f"{where}: lossy original decoded by the SCU, not compared")
            return
        if arr_a.shape != arr_b.shape or not np.array_equal(arr_a, arr_b):
            self.add("pixels", where, f"decoded pixels differ ({arr_a.shape} vs {arr_b.shape})")


def corpus_lossy() -> set[str]:
    return {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.91"}  # fmt: skip


def _undefined(elem: Any) -> bool:
    return getattr(elem, "length", 0) == 0xFFFFFFFF or getattr(elem, "is_undefined_length", False)


def _native(ts: UID) -> UID:
    return ts if not ts.is_compressed else ExplicitVRLittleEndian


def _decode(ds: Dataset, ts: UID, *, top: bool) -> np.ndarray[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not top:  # a nested image (icon): give it the file's transfer syntax
            item = Dataset()
            for tag in ds.keys():  # noqa: SIM118
                item[tag] = ds[tag]
            item.file_meta = FileMetaDataset()
            item.file_meta.TransferSyntaxUID = ts
            ds = item
        arr = ds.pixel_array
    return arr.astype(arr.dtype.newbyteorder("="))


def _short(ds: Dataset, tag: BaseTag) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = repr(ds[tag].value)
    except Exception as exc:
        text = f"<{type(exc).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


# -- the run ---------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one corpus copy sent by one SCU."""

    scu: str
    copy: corpus.CorpusCopy
    reference_ts: str  # how it reached the reference storescp; "" if the SCU did not send it
    wire_ts: str  # how it reached the gateway (queue row); "" if not received
    state: str  # queue state; "" if not received
    transcode_outcome: str
    transcode_reason: str
    last_error: str
    archive_ts: str  # "" if not in the archive
    comparison: Comparison | None

    @property
    def sent_by_scu(self) -> bool:
        return bool(self.reference_ts)

    @property
    def stored(self) -> bool:
        return bool(self.archive_ts)

    @property
    def archive_refuses_the_original(self) -> bool:
        """A known archive refusal (corpus.ARCHIVE_REFUSES), shown as ``failed`` with
        the archive's answer: the gateway kept it and said why."""
        known = self.copy.entry.name in corpus.ARCHIVE_REFUSES
        return known and self.state == "failed" and "archive refused" in self.last_error

    def failure(self) -> str:
        """Why this instance fails the matrix's criteria, or ""."""
        if not self.sent_by_scu and not self.wire_ts:
            return ""  # the SCU cannot send it by its defaults: reported, not a failure
        if not self.wire_ts:
            return "refused by the gateway (the reference SCP accepted it)"
        if not self.stored:
            if self.archive_refuses_the_original:
                return ""  # reported; the archive refuses the public file itself
            return f"acknowledged but not in the archive: {self.state} {self.last_error}".strip()
        assert self.comparison is not None
        reasons = []
        ts_a = UID(self.copy.transfer_syntax)
        if not ts_a.is_implicit_VR and UID(self.wire_ts).is_implicit_VR:
            ref = f" (reference SCP got {self.reference_ts})" if self.reference_ts else ""
            reasons.append(f"sent as Implicit VR{ref}")
        for kind in ("lost VR", "private value", "value", "missing", "added", "pixels"):
            if n := self.comparison.count(kind):
                first = next(p for p in self.comparison.problems if p.kind == kind)
                reasons.append(f"{n} {kind} (first {first.where}: {first.detail})")
        return "; ".join(reasons)


@dataclass
class MatrixRun:
    outcomes: list[Outcome]
    runs: dict[str, list[scus.SendRun]]
    seconds: float
    gateway_log: str
    phases: dict[str, float] = field(default_factory=dict)

    def for_scu(self, scu: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.scu == scu]


class ReferenceScp:
    """DCMTK storescp accepting every SOP class and transfer syntax, bit-preserving,
    one process per association (the SCUs send at the same time)."""

    def __init__(self, directory: Path, aet: str = "REFERENCE") -> None:
        self.directory = directory
        self.aet = aet
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [tool("storescp"), "--fork", "+B", "-pm", "+xa", "-aet", aet, "-od", str(directory),
             str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)

    def received(self) -> dict[str, str]:
        """SOP Instance UID -> transfer syntax of everything received so far."""
        found = {}
        for path in self.directory.iterdir():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            found[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
        return found

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def upload_config(lab: ArchiveLab) -> dict[str, Any]:
    return {
        "dicomweb_url": lab.dicomweb_url,
        "ca_file": str(lab.ca_file),
        "client_cert": str(lab.client_cert),
        "client_key": str(lab.client_key),
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1.0,
    }


def run_matrix(
    root: Path,
    *,
    full: bool,
    scu_names: tuple[str, ...] = scus.SCUS,
    compare_copies: bool = True,
    settle_timeout: float = 240.0,
    **gateway_sections: dict[str, Any],
) -> MatrixRun:
    """Send the corpus through every SCU, wait for the pipeline, compare; stop all."""
    began = time.monotonic()
    lab = ArchiveLab(root / "archive")
    sections = dict(gateway_sections)
    sections["upload"] = {**upload_config(lab), **sections.get("upload", {})}
    # Spooled files stay after upload: they are what each SCU put on the wire.
    sections.setdefault("retention", {"keep_bytes": 1 << 40})
    gw = GatewayProcess(root / "gateway", **sections)
    ref = ReferenceScp(root / "reference")
    sender: scus.OrthancSender | None = None
    runs: dict[str, list[scus.SendRun]] = {}
    try:
        lab.start()
        gw.start()
        copies = {s: corpus.write_matrix_corpus(root / "corpus" / s, full=full) for s in scu_names}
        # Each SCU sends to the gateway and to the reference at the same time, and the
        # SCUs run side by side: independent processes, mostly waiting on each other.
        jobs: dict[tuple[str, str], Future[scus.SendRun]] = {}
        with ThreadPoolExecutor(max_workers=2 * len(scu_names)) as pool:
            for scu in scu_names:
                files = [c.path for c in copies[scu]]
                if scu == "orthanc":
                    sender = scus.OrthancSender(
                        root / "orthanc-sender",
                        {"gateway": ("DICOMGW", gw.port), "reference": (ref.aet, ref.port)},
                    ).start()
                    sender.upload(files)
                    jobs[scu, "gateway"] = pool.submit(sender.store, "gateway", files)
                    jobs[scu, "reference"] = pool.submit(sender.store, "reference", files)
                else:
                    send = {
                        "dcmtk": scus.dcmtk_storescu,
                        "gdcm": scus.gdcmscu,
                        "pynetdicom": scus.pynetdicom_storescu,
                    }[scu]
                    jobs[scu, "gateway"] = pool.submit(send, gw.port, "DICOMGW", files)
                    jobs[scu, "reference"] = pool.submit(send, ref.port, ref.aet, files)
        runs = {scu: [jobs[scu, "gateway"].result(), jobs[scu, "reference"].result()]
                for scu in scu_names}  # fmt: skip
        if sender is not None:
            sender.stop()
            sender = None
        phases = {"start and send": time.monotonic() - began}
        _settle(gw, settle_timeout)
        phases["compress and upload (after the last send)"] = (
            time.monotonic() - began - sum(phases.values())
        )
        reference = ref.received()
        rows = {r["sop_instance_uid"]: dict(r) for r in gw.rows()}
        in_archive = lab.sop_instance_uids()
        outcomes = []
        for scu in scu_names:
            for c in copies[scu]:
                row = rows.get(c.sop_instance_uid, {})
                archive_ts, comparison = "", None
                if c.sop_instance_uid in in_archive:
                    data = lab.instance_file(c.sop_instance_uid)
                    archive_ts = str(_read(data).file_meta.TransferSyntaxUID)
                    if compare_copies:
                        comparison = compare(c.path.read_bytes(), data)
                        wire = gw.spool / str(row.get("path") or "-")
                        if row.get("transfer_syntax") != c.transfer_syntax and wire.is_file():
                            _attribute_to_scu(comparison, c.path.read_bytes(), wire.read_bytes())
                outcomes.append(
                    Outcome(
                        scu, c, reference.get(c.sop_instance_uid, ""),
                        row.get("transfer_syntax") or "", row.get("state") or "",
                        row.get("transcode_outcome") or "", row.get("transcode_reason") or "",
                        row.get("last_error") or "", archive_ts, comparison,
                    )
                )  # fmt: skip
        phases["fetch and compare"] = time.monotonic() - began - sum(phases.values())
        return MatrixRun(outcomes, runs, time.monotonic() - began, gw.log, phases)
    finally:
        if sender is not None:
            sender.stop()
        if gw.proc is not None and gw.proc.poll() is None:
            gw.stop()
        ref.stop()
        lab.stop()
        shutil.rmtree(root / "archive" / "orthanc-storage", ignore_errors=True)


def _attribute_to_scu(comparison: Comparison, original: bytes, wire: bytes) -> None:
    """The SCU converted the data set on the wire: differences that are already in what
    the gateway received (its spooled copy) are the SCU's doing, reported as notes.

    A lost VR never is: the SCU converts to Implicit VR only because the gateway
    accepted Implicit VR (the reference SCP shows the SCU could send it explicitly).
    """
    on_wire = {(p.kind, p.where) for p in compare(original, wire).problems}
    kept = []
    for p in comparison.problems:
        if p.kind != "lost VR" and (p.kind, p.where) in on_wire:
            comparison.scu_conversion.append(p)
        else:
            kept.append(p)
    comparison.problems = kept


def _settle(gw: GatewayProcess, timeout: float) -> None:
    """Wait until every queue row is uploaded or failed (and stays so briefly)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = Counter(r["state"] for r in gw.rows("SELECT state FROM instances"))
        if set(states) <= _DONE_STATES:
            return
        time.sleep(0.2)
    raise AssertionError(f"pipeline not settled after {timeout} s: {dict(states)}")


# -- reports ---------------------------------------------------------------------------
def markdown(run: MatrixRun) -> str:
    lines = [f"# Conformance matrix ({len(run.outcomes)} sends, {run.seconds:.0f} s)", ""]
    lines += [", ".join(f"{k}: {v:.0f} s" for k, v in run.phases.items()), ""]
    lines += ["| SCU | corpus | sent by SCU (reference) | received | in archive | failures "
              "| send s (gateway, reference) |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for scu in run.runs:
        os_ = run.for_scu(scu)
        lines.append(
            f"| {scu} | {len(os_)} | {sum(o.sent_by_scu for o in os_)} "
            f"| {sum(bool(o.wire_ts) for o in os_)} | {sum(o.stored for o in os_)} "
            f"| {sum(bool(o.failure()) for o in os_)} "
            f"| {', '.join(f'{r.seconds:.1f}' for r in run.runs[scu])} |"
        )
    lines += ["", "| SCU | file | rewrite | sent TS | reference TS | wire TS | archive TS "
              "| transcode | result |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for o in run.outcomes:
        result = o.failure() or ("not sent by this SCU's defaults" if not o.sent_by_scu else "ok")
        if o.archive_refuses_the_original:
            result = f"known archive refusal: {o.last_error}"
        if o.comparison and o.comparison.scu_conversion:
            conv = "; ".join(map(str, o.comparison.scu_conversion))
            result += f" (SCU's own conversion to {o.wire_ts}: {conv})"[:300]
        if o.comparison and o.comparison.notes and not o.failure():
            result += " (" + "; ".join(o.comparison.notes)[:120] + ")"
        transcode = f"{o.transcode_outcome} {o.transcode_reason}".strip()
        lines.append(
            f"| {o.scu} | {o.copy.entry.label} | {o.copy.entry.rewrite} | {o.copy.transfer_syntax} "
            f"| {o.reference_ts} | {o.wire_ts} | {o.archive_ts} | {transcode} "
            f"| {result.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def jpeg2000_lossless() -> str:
    return str(JPEG2000Lossless)

"""Element-by-element fidelity of the JPEG 2000 copy, over every uncompressed file in
pydicom's test data and pydicom-data.

Each element at every sequence depth is read from both files as pydicom's raw
element (the value bytes as stored, never decoded and encoded again) and compared:
the same tags, the same VR as written (Explicit VR originals; an Implicit VR original
has none, and the copy carries the one pydicom picks: the dictionary's, or UN for a
private tag it does not know), the same value bytes (swapped per VR for a big endian
original).  Only what PS3.5 changes for compressed pixel data may differ: Transfer
Syntax UID, Pixel Data (the icon's included), Photometric Interpretation RGB ->
YBR_RCT, Planar Configuration -> 0 for colour (8.2.4).  Lossy Image Compression
(0028,2110) must not appear: JPEG 2000 lossless is not lossy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from gateway.pipeline import transcode as transcode_module
from gateway.pipeline.transcode import compressibility

from .support import corpus
from .test_transcode import run

NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
J2K = "1.2.840.10008.1.2.4.90"
SWAP = {
    "US": 2, "SS": 2, "OW": 2, "AT": 2, "UL": 4, "SL": 4, "FL": 4, "OL": 4, "OF": 4,
    "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8,
}  # fmt: skip
TOP_CHANGED = {"(0028,0004)", "(0028,0006)", "(7FE0,0010)"}
ICON_CHANGED = {"(0028,0006)", "(7FE0,0010)"}


def _native_files() -> list[Path]:
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files():
            path = Path(name)
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # not DICOM, or no File Meta: not something we store
                continue
            ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            if ts in NATIVE:
                found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


NATIVE_FILES = _native_files()


@dataclass
class Element:
    vr: str | None  # as written; None in an Implicit VR data set
    assigned_vr: str  # what pydicom makes of it
    value: bytes | None  # raw bytes; None for a sequence or a decoded element
    decoded: Any = None  # the value of an element pydicom decoded on reading
    items: int = 0


def elements(ds: Dataset, implicit: bool, path: str = "") -> Iterator[tuple[str, Element]]:
    for tag in list(ds.keys()):  # not `for elem in ds`: that converts every element
        where = f"{path}{tag}"
        raw = ds.get_item(tag, keep_deferred=True)
        elem = ds[tag]  # converted only now, after its bytes were taken
        if isinstance(raw, RawDataElement):
            written_vr = raw.VR
        else:
            # pydicom decodes a few elements while reading (Specific Character Set,
            # Pixel Representation, the sequences around it): their VR is the one
            # read, and they are compared by value.
            written_vr = None if implicit else str(elem.VR)
        if elem.VR == "SQ":
            yield where, Element(written_vr, "SQ", None, items=len(elem.value))
            for i, item in enumerate(elem.value):
                yield from elements(item, implicit, f"{where}[{i}]")
        elif isinstance(raw, RawDataElement):
            value = bytes(raw.value or b"")
            yield where, Element(written_vr, str(elem.VR), value, decoded=elem.value)
        else:
            yield where, Element(written_vr, str(elem.VR), None, decoded=elem.value)


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def swap(value: bytes, size: int) -> bytes:
    return np.frombuffer(value, f">u{size}").astype(f"<u{size}").tobytes()


def assert_faithful(src: Path, dst: Path) -> dict[str, int]:
    """Compare every element of *src* and its J2K copy *dst*; return what was seen."""
    a, b = read(src), read(dst)
    implicit, little = a.original_encoding
    want = {k: e for k, e in elements(a, implicit) if not k.endswith("0000)")}  # group lengths
    got = dict(elements(b, False))
    icons = [k for k in got if k.startswith("(0088,0200)[") and k.endswith("(7FE0,0010)")]

    def may_change(key: str) -> bool:
        if key in TOP_CHANGED:
            return True
        return any(key == icon[: -len("(7FE0,0010)")] + c for icon in icons for c in ICON_CHANGED)

    assert sorted(want) == sorted(got)
    seen = {"elements": 0, "private UN": 0, "private": 0, "icons": len(icons)}
    for key, ea in want.items():
        eb = got[key]
        if may_change(key):
            continue
        assert eb.vr is not None  # the copy is Explicit VR
        if not implicit:
            assert eb.vr == ea.vr, f"{key}: VR {ea.vr} written as {eb.vr}"
        elif " or " in ea.assigned_vr:
            assert eb.vr in ea.assigned_vr.split(" or "), key
        else:
            assert eb.vr == ea.assigned_vr, key
        seen["elements"] += 1
        tag = key.rsplit("(", 1)[1]
        if int(tag[:4], 16) % 2:
            seen["private"] += 1
            seen["private UN"] += eb.vr == "UN"
        if ea.value is None or eb.value is None:  # a sequence, or decoded on reading
            assert (eb.items, eb.decoded) == (ea.items, ea.decoded), key
            continue
        expected = ea.value
        if not little and eb.vr in SWAP:
            expected = swap(expected, SWAP[eb.vr])
        if len(expected) % 2:  # padded to even length on writing
            assert eb.value is not None and eb.value[:-1] == expected, key
        else:
            assert eb.value == expected, key

    assert b.file_meta.TransferSyntaxUID == J2K
    pi = str(a.PhotometricInterpretation)
    assert b.PhotometricInterpretation == ("YBR_RCT" if pi == "RGB" else pi)
    if a.SamplesPerPixel == 3:
        assert b.PlanarConfiguration == 0
    assert "LossyImageCompression" not in b or b.LossyImageCompression == a.LossyImageCompression
    for kw in ("SOPInstanceUID", "SOPClassUID"):
        assert b.file_meta[f"MediaStorage{kw}"].value == a.file_meta[f"MediaStorage{kw}"].value
    return seen


@pytest.mark.parametrize("src", NATIVE_FILES, ids=lambda p: p.name)
def test_copy_is_faithful(src: Path, tmp_path: Path) -> None:
    result, dst = run(src, tmp_path)
    allowed, why = compressibility(src)
    if result.outcome == "compressed":
        assert allowed, why
        assert assert_faithful(src, dst)["elements"] > 5
    else:
        # compressibility() names the same reason without encoding anything.
        assert (allowed, why) == (False, f"{result.outcome}: {result.reason}")


def test_corpus_coverage() -> None:
    """The coverage list: which files the policy lets this stage compress, and why not.

    Run with ``-s`` to see it (the bench report builds it the same way).  That each
    allowed file is compressed and faithful is test_copy_is_faithful's part.
    """
    coverage = {src.name: compressibility(src) for src in NATIVE_FILES}
    for name, (allowed, reason) in coverage.items():
        print(f"{'compress' if allowed else 'no':9} {name:45} {reason}")
    allowed_files = [corpus_path(n) for n, (ok, _) in coverage.items() if ok]
    # The corpus really exercises what the comparison is about.
    assert len(allowed_files) >= 30
    assert {read(p).original_encoding for p in allowed_files} == {
        (True, True),
        (False, True),
        (False, False),
    }
    # An icon image, and images under 32 pixels a side (PS3.5 sets no minimum size).
    for name in ("MR-SIEMENS-DICOM-WithOverlays.dcm", "SC_rgb_small_odd.dcm", "6154", "17106"):
        assert coverage[name] == (True, ""), name
    for allowed, reason in coverage.values():
        assert allowed == (reason == "")
        assert allowed or reason.startswith(("passthrough: ", "fallback: "))


def corpus_path(name: str) -> Path:
    (path,) = [p for p in NATIVE_FILES if p.name == name]
    return path


def test_vr_changed_by_the_writer_is_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification compares VRs: same bytes under another VR is not the same element."""
    src = tmp_path / "private.dcm"
    corpus.with_private_tags(corpus.testdata("CT_small.dcm"), src)
    tag = read(src).private_block(0x0029, "GATEWAY TEST").get_tag(0x02)  # OB
    real_dcmwrite = pydicom.dcmwrite

    def writes_un(f: Any, ds: Dataset, **kwargs: Any) -> None:
        ds[tag].VR = "UN"  # as a careless conversion would
        real_dcmwrite(f, ds, **kwargs)

    monkeypatch.setattr(transcode_module.pydicom, "dcmwrite", writes_un)
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        f"data element {pydicom.tag.Tag(tag)} (VR OB written as UN) changed",
    )


def test_private_un_stays_un_with_its_bytes(tmp_path: Path) -> None:
    """A private element received as UN (Explicit VR) keeps VR UN and its bytes; one
    received in Implicit VR that pydicom cannot look up is written as UN."""
    ds = read(corpus.testdata("CT_small.dcm"))
    block = ds.private_block(0x0029, "GATEWAY UN TEST", create=True)
    odd = bytes(range(1, 8))  # odd length: padded to 8 on writing by the sender
    block.add_new(0x01, "UN", odd + b"\0")
    block.add_new(0x02, "UN", b"\x01\x02\x03\x04")  # would be UL 0x04030201 if known
    tags = [block.get_tag(0x01), block.get_tag(0x02)]
    for ts, implicit in (("1.2.840.10008.1.2.1", False), ("1.2.840.10008.1.2", True)):
        src = tmp_path / f"un-{implicit}.dcm"
        ds.file_meta.TransferSyntaxUID = ts
        pydicom.dcmwrite(src, ds, implicit_vr=implicit, enforce_file_format=True)
        result, dst = run(src, tmp_path)
        assert result.outcome == "compressed", result.reason
        assert assert_faithful(src, dst)["elements"] > 5
        out = read(dst)
        for tag in tags:
            elem = out.get_item(tag, keep_deferred=True)
            assert elem is not None and elem.VR == "UN"
            assert elem.value == read(src).get_item(tag, keep_deferred=True).value

"""Images with an Icon Image Sequence (0088,0200): the icon is compressed with the image.

PS3.5 A.4: the Transfer Syntax covers the whole data set, so the icon's Pixel Data is
encapsulated JPEG 2000 Lossless too (see the module docstring of gateway.pipeline.transcode).
The real files are pydicom's only ones with an icon (PALETTE COLOR 64x64, OW); the
others are real uncompressed images given an icon of each common kind.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.pipeline.transcode import transcode

from .support import corpus
from .test_transcode import compressed, patch_encoder, run, siz, uses_mct

BIG = "1.2.840.10008.1.2.2"
REAL_ICONS = ["MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm"]
BASES = [
    "CT_small.dcm",  # 16-bit signed
    "MR_small.dcm",
    "SC_rgb.dcm",  # RGB -> YBR_RCT, the icon stays what it is
    "emri_small.dcm",  # multi-frame
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
]
KINDS = ["MONOCHROME2", "RGB", "RGB planar 1", "PALETTE COLOR", "MONOCHROME2 OW"]


def icon_pixels(kind: str, side: int = 64) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(len(kind) * side)
    shape = (side, side, 3) if kind.startswith("RGB") else (side, side)
    ramp = np.indices(shape).sum(axis=0) * 3
    return ((ramp + rng.integers(0, 40, size=shape)) % 256).astype(np.uint8)


def with_icon(
    src: Path,
    dst: Path,
    kind: str,
    *,
    pixels: np.ndarray[Any, Any] | None = None,
    **changes: Any,
) -> tuple[Path, np.ndarray[Any, Any]]:
    """*src* with an icon of *kind* added, written in *src*'s own encoding."""
    ds = pydicom.dcmread(src)
    implicit, little = ds.original_encoding
    arr = icon_pixels(kind) if pixels is None else pixels
    icon = Dataset()
    photometric = kind.split(" ")[0] if kind != "PALETTE COLOR" else kind
    icon.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    icon.PhotometricInterpretation = photometric
    planar = 1 if "planar 1" in kind else 0
    if arr.ndim == 3:
        icon.PlanarConfiguration = planar
    icon.Rows, icon.Columns = arr.shape[:2]
    icon.BitsAllocated, icon.BitsStored, icon.HighBit = 8, 8, 7
    icon.PixelRepresentation = 0
    word = ">u2" if not little else "<u2"
    if photometric == "PALETTE COLOR":
        for colour, shift in (("Red", 0), ("Green", 85), ("Blue", 170)):
            setattr(icon, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
            lut = ((np.arange(256) + shift) % 256).astype(word).tobytes()
            # pydicom writes OW bytes as given, so they are in the file's byte order.
            setattr(icon, f"{colour}PaletteColorLookupTableData", lut)
            icon[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    cells = np.moveaxis(arr, -1, 0) if planar else arr
    data = cells.tobytes()
    if kind.endswith(" OW"):
        if not little:  # OW is a stream of 16-bit words: big endian swaps each pair
            data = np.frombuffer(data, "<u2").astype(">u2").tobytes()
        icon.PixelData = data
        icon["PixelData"].VR = "OW"
    else:
        icon.PixelData = data
        icon["PixelData"].VR = "OB"
    for keyword, value in changes.items():
        setattr(icon, keyword, value)
    ds.IconImageSequence = Sequence([icon])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pydicom.dcmwrite(dst, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return dst, arr


def stored_icon(path: Path) -> np.ndarray[Any, Any]:
    """The icon's stored pixels as pydicom decodes them from the file, colour-by-pixel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    item = ds.IconImageSequence[0]
    arr, _ = get_decoder(ts).as_array(item, raw=True)
    return arr


def assert_icon_compressed(dst: Path, want: np.ndarray[Any, Any]) -> None:
    ds = pydicom.dcmread(dst)
    item = ds.IconImageSequence[0]
    elem = item["PixelData"]
    assert elem.VR == "OB" and elem.is_undefined_length
    data = item.PixelData
    bot_length = int.from_bytes(data[4:8], "little")
    assert parse_basic_offsets(data) == [0]
    (cs,) = generate_fragments(data[8 + bot_length :])
    spp = 3 if want.ndim == 3 else 1
    assert siz(cs) == [(8, False)] * spp
    assert not uses_mct(cs)  # the icon keeps its Photometric Interpretation
    if spp == 3:
        assert item.PlanarConfiguration == 0
    decoded, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(item, raw=True)
    assert np.array_equal(decoded, want)


# -- compressed ------------------------------------------------------------------------
@pytest.mark.parametrize("name", REAL_ICONS)
def test_real_palette_colour_icon(name: str, tmp_path: Path) -> None:
    src = corpus.testdata(name)
    original = stored_icon(src)
    assert original.shape == (64, 64)
    _, dst = compressed(src, tmp_path)
    assert_icon_compressed(dst, original)
    a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
    # Everything else in the icon item is the received bytes, LUTs included.
    item_a, item_b = a.IconImageSequence[0], b.IconImageSequence[0]
    assert set(item_a.keys()) == set(item_b.keys())
    for tag in list(item_a.keys()):
        if tag != 0x7FE00010:
            assert item_a.get_item(tag).VR == item_b.get_item(tag).VR, tag
            assert item_a.get_item(tag).value == item_b.get_item(tag).value, tag


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base", BASES)
def test_icon_on_real_image(base: str, kind: str, tmp_path: Path) -> None:
    src, arr = with_icon(corpus.testdata(base), tmp_path / "in.dcm", kind)
    assert np.array_equal(stored_icon(src), arr)  # the test file is what it should be
    _, dst = compressed(src, tmp_path)
    assert_icon_compressed(dst, arr)
    assert np.array_equal(stored_icon(dst), arr)


@pytest.mark.skipif(not shutil.which("gdcmconv"), reason="Debian libgdcm-tools not installed")
@pytest.mark.parametrize(
    ("base", "kind"),
    [
        ("MR-SIEMENS-DICOM-WithOverlays.dcm", None),
        ("SC_rgb.dcm", "RGB"),
        ("emri_small.dcm", "MONOCHROME2"),
        ("MR_small_bigendian.dcm", "PALETTE COLOR"),
    ],
)
def test_gdcm_decodes_image_and_icon(base: str, kind: str | None, tmp_path: Path) -> None:
    """GDCM, an independent reader, decompresses the result to the original pixels."""
    src = corpus.testdata(base)
    if kind is not None:
        src, _ = with_icon(src, tmp_path / "in.dcm", kind)
    _, dst = compressed(src, tmp_path)
    raw = tmp_path / "gdcm-raw.dcm"
    subprocess.run(["gdcmconv", "--raw", str(dst), str(raw)], check=True, capture_output=True)
    out = pydicom.dcmread(raw)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not out["PixelData"].is_undefined_length
    assert not out.IconImageSequence[0]["PixelData"].is_undefined_length
    assert np.array_equal(stored_icon(raw), stored_icon(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pydicom.dcmread(src).pixel_array
    got = out.pixel_array
    if out.PhotometricInterpretation == "YBR_RCT":  # GDCM leaves the name as it was
        got = pydicom.pixels.pixel_array(raw, raw=True)
    assert np.array_equal(got, want)


# -- not compressed --------------------------------------------------------------------
def test_icon_colour_model_not_allowed_in_j2k(tmp_path: Path) -> None:
    src, _ = with_icon(
        corpus.testdata("CT_small.dcm"), tmp_path / "in.dcm", "RGB",
        PhotometricInterpretation="YBR_FULL_422",
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == (
        "passthrough",
        "icon image 0: photometric interpretation YBR_FULL_422 with 3 samples",
    )


def test_icon_bits_above_bits_stored(tmp_path: Path) -> None:
    src, _ = with_icon(
        corpus.testdata("CT_small.dcm"), tmp_path / "in.dcm", "MONOCHROME2",
        BitsStored=6, HighBit=5,
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert result.outcome == "passthrough"
    assert result.reason.startswith("icon image 0: pixel cells use bits above Bits Stored 6")


def test_pixel_data_in_another_sequence(tmp_path: Path) -> None:
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    item = Dataset()
    item.PixelData = b"\0" * 64
    item["PixelData"].VR = "OB"
    block = ds.private_block(0x0029, "GATEWAY TEST", create=True)
    block.add_new(0x10, "SQ", Sequence([item]))
    src = tmp_path / "private-pixels.dcm"
    ds.save_as(src)
    result, _ = run(src, tmp_path)
    tag = pydicom.tag.Tag(block.get_tag(0x10))
    assert (result.outcome, result.reason) == (
        "passthrough",
        f"pixel data inside sequence {tag}, not an icon image",
    )


def test_icon_encoder_output_that_decodes_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = with_icon(corpus.testdata("CT_small.dcm"), tmp_path / "in.dcm", "MONOCHROME2")

    def lossy_for_icons(data: np.ndarray[Any, Any], kwargs: Any) -> Any:
        if data.shape[0] == 64:  # the icon; CT_small itself is 128x128
            data.flat[0] ^= 1
        return data, kwargs

    patch_encoder(monkeypatch, lossy_for_icons)
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        "icon image 0: decoded pixels differ from the original",
    )


def test_no_icon_path_unchanged(tmp_path: Path) -> None:
    # An Icon Image Sequence item without Pixel Data is an ordinary item.
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    empty = Dataset()
    empty.Rows = 64
    ds.IconImageSequence = Sequence([empty])
    src = tmp_path / "icon-no-pixels.dcm"
    ds.save_as(src)
    result = transcode(src, tmp_path / "out.dcm")
    assert result.outcome == "compressed", result.reason
    assert pydicom.dcmread(tmp_path / "out.dcm").IconImageSequence[0].Rows == 64

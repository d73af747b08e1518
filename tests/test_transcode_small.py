"""Images and icons under 32 pixels a side: encoded with imagecodecs, verified as usual.

pylibjpeg-openjpeg always uses 6 resolution levels, which OpenJPEG refuses for a side
under 32 pixels; PS3.5 sets no minimum size, so these go to imagecodecs (OpenJPEG too)
with as many levels as the smaller side allows.  Each result is checked here
independently of the stage's own verification (pydicom's decoding, element by element
comparison, the encapsulation walked, the codestream's SIZ and COD read), once by GDCM.
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
from pydicom.uid import ExplicitVRLittleEndian

from gateway.pipeline import transcode as transcode_module

from .support import corpus
from .test_transcode import (
    ELE,
    ILE,
    compressed,
    fragments,
    make_image,
    patch_encoder,
    run,
    siz,
    stored,
    uses_mct,
)
from .test_transcode_icon import assert_icon_compressed, icon_pixels, stored_icon, with_icon

BIG = "1.2.840.10008.1.2.2"
# pydicom's (and pydicom-data's) uncompressed images under 32 pixels a side: CR
# 12-bit MONOCHROME1, CT and MR signed 16-bit, RGB 3x3 in both byte orders.
PUBLIC_SMALL = [
    "6154", "6247", "17106", "4919", "6293", "2062",
    "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm",
]  # fmt: skip


def levels(codestream: bytes) -> int:
    """Wavelet decomposition levels (resolutions - 1) in the J2K COD segment."""
    pos = codestream.index(b"\xff\x52")
    return codestream[pos + 9]


def assert_codestreams(dst: Path, *, bits: int, signed: bool, spp: int, mct: bool) -> None:
    ds = pydicom.dcmread(dst, stop_before_pixels=True)
    _, frags = fragments(dst)
    assert len(frags) == int(ds.get("NumberOfFrames") or 1)
    for cs in frags:
        assert siz(cs) == [(bits, signed)] * spp
        assert uses_mct(cs) == mct
        # Never more levels than the smaller side allows (OpenJPEG's own limit; within
        # it imagecodecs keeps the lowest resolution at 8 pixels or more).
        assert 2 ** levels(cs) <= min(ds.Rows, ds.Columns)


# -- public files ----------------------------------------------------------------------
@pytest.mark.parametrize("name", PUBLIC_SMALL)
def test_public_small_file(name: str, tmp_path: Path) -> None:
    src = corpus.testdata(name)
    a = pydicom.dcmread(src, stop_before_pixels=True)
    assert min(a.Rows, a.Columns) < 32
    _, dst = compressed(src, tmp_path)
    assert_codestreams(
        dst,
        bits=a.BitsStored,
        signed=bool(a.PixelRepresentation),
        spp=a.SamplesPerPixel,
        mct=a.PhotometricInterpretation == "RGB",
    )


# -- synthetic -------------------------------------------------------------------------
@pytest.mark.parametrize("ts", [ELE, ILE, BIG])
def test_signed_12_of_16_bits(ts: str, tmp_path: Path) -> None:
    img = np.random.default_rng(1).integers(-2048, 2047, size=(20, 24), endpoint=True)
    img[0, :2] = -2048, 2047
    src = make_image(
        tmp_path / "s12.dcm", img, bits_allocated=16, bits_stored=12, signed=True,
        photometric="MONOCHROME2", ts=ts,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    assert_codestreams(dst, bits=12, signed=True, spp=1, mct=False)
    assert np.array_equal(stored(dst), img) and stored(dst).min() == -2048


@pytest.mark.parametrize(("bits_allocated", "bits_stored"), [(16, 6), (16, 9), (8, 5), (8, 8)])
@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_is_the_precision(
    bits_allocated: int, bits_stored: int, signed: bool, tmp_path: Path
) -> None:
    # 6 of 16 bits: imagecodecs would write precision 16 for 16-bit cells.
    if signed:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    img = np.random.default_rng(bits_stored).integers(low, high, size=(9, 17), endpoint=True)
    src = make_image(
        tmp_path / "bits.dcm", img, bits_allocated=bits_allocated, bits_stored=bits_stored,
        signed=signed, photometric="MONOCHROME2",
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    assert_codestreams(dst, bits=bits_stored, signed=signed, spp=1, mct=False)


@pytest.mark.parametrize(("planar", "bits", "ts"), [(0, 8, ELE), (1, 8, ELE), (1, 16, BIG)])
def test_rgb_becomes_ybr_rct(planar: int, bits: int, ts: str, tmp_path: Path) -> None:
    rgb = np.random.default_rng(planar).integers(0, (1 << bits) - 1, size=(12, 7, 3))
    src = make_image(
        tmp_path / "rgb.dcm", rgb, bits_allocated=bits, bits_stored=bits, signed=False,
        photometric="RGB", planar=planar, ts=ts,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    out = pydicom.dcmread(dst)
    assert (out.PhotometricInterpretation, out.PlanarConfiguration) == ("YBR_RCT", 0)
    assert_codestreams(dst, bits=bits, signed=False, spp=3, mct=True)
    assert np.array_equal(stored(dst), rgb)


def test_ybr_full_without_colour_transform(tmp_path: Path) -> None:
    ybr = np.random.default_rng(2).integers(0, 255, size=(16, 16, 3))
    src = make_image(
        tmp_path / "ybr.dcm", ybr, bits_allocated=8, bits_stored=8, signed=False,
        photometric="YBR_FULL", planar=1,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    assert pydicom.dcmread(dst).PhotometricInterpretation == "YBR_FULL"
    assert_codestreams(dst, bits=8, signed=False, spp=3, mct=False)


def test_palette_colour(tmp_path: Path) -> None:
    # A real PALETTE COLOR image cut to 16x20, its LUTs as they are.
    ds = pydicom.dcmread(corpus.testdata("OBXXXX1A.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    cut = np.ascontiguousarray(ds.pixel_array[100:116, 200:220])
    ds.Rows, ds.Columns = cut.shape
    ds.PixelData = cut.tobytes()
    src = tmp_path / "palette.dcm"
    ds.save_as(src)
    _, dst = compressed(src, tmp_path)
    assert pydicom.dcmread(dst).PhotometricInterpretation == "PALETTE COLOR"
    assert_codestreams(dst, bits=8, signed=False, spp=1, mct=False)
    assert np.array_equal(stored(dst), cut)


@pytest.mark.parametrize(
    ("shape", "photometric", "bits"),
    [((1, 40), "MONOCHROME2", 16), ((40, 1), "MONOCHROME1", 8), ((1, 1), "MONOCHROME2", 16),
     ((1, 5, 3), "RGB", 8), ((2, 3), "MONOCHROME2", 8)],
)  # fmt: skip
def test_strips_and_single_pixels(
    shape: tuple[int, ...], photometric: str, bits: int, tmp_path: Path
) -> None:
    img = np.random.default_rng(len(shape)).integers(0, (1 << bits) - 1, size=shape)
    src = make_image(
        tmp_path / "strip.dcm", img, bits_allocated=bits, bits_stored=bits, signed=False,
        photometric=photometric,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    spp = 3 if photometric == "RGB" else 1
    assert_codestreams(dst, bits=bits, signed=False, spp=spp, mct=spp == 3)
    assert np.array_equal(stored(dst), img)


def test_multiframe(tmp_path: Path) -> None:
    frames = np.random.default_rng(3).integers(0, 4095, size=(4, 8, 12))
    frames[2] = 0  # a blank frame among them
    src = make_image(
        tmp_path / "frames.dcm", frames, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2", frames=4, ts=BIG,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)  # one codestream per frame, offsets checked
    assert_codestreams(dst, bits=12, signed=False, spp=1, mct=False)
    assert np.array_equal(stored(dst), frames)


@pytest.mark.parametrize(("side", "want"), [(31, (1, 4)), (32, (1, 2)), (256, (5, 5))])
def test_levels_follow_the_smaller_side(side: int, want: tuple[int, int], tmp_path: Path) -> None:
    # At most OpenJPEG's default 5 levels (6 resolutions, what pydicom's encoder
    # always asks for), fewer where a side is too small for them.
    img = np.arange(side * side, dtype=np.int64).reshape(side, side) % 4096
    src = make_image(
        tmp_path / f"{side}.dcm", img, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2",
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    (cs,) = fragments(dst)[1]
    assert want[0] <= levels(cs) <= want[1]
    assert siz(cs) == [(12, False)]


# -- icons -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "kind", "side"),
    [
        ("CT_small.dcm", "MONOCHROME2", 16),  # a large image with a small icon
        ("MR_small_bigendian.dcm", "RGB planar 1", 16),
        ("SC_rgb.dcm", "PALETTE COLOR", 3),
        ("MR_small_implicit.dcm", "MONOCHROME2 OW", 31),
        ("17106", "RGB", 16),  # a small image with a small icon
        ("SC_rgb_small_odd.dcm", "MONOCHROME2", 1),
    ],
)
def test_small_icon(base: str, kind: str, side: int, tmp_path: Path) -> None:
    pixels = icon_pixels(kind, side=side)
    src, arr = with_icon(corpus.testdata(base), tmp_path / "in.dcm", kind, pixels=pixels)
    assert np.array_equal(stored_icon(src), arr)
    _, dst = compressed(src, tmp_path)
    assert_icon_compressed(dst, arr)
    ds = pydicom.dcmread(dst)
    (cs,) = fragments_of(ds.IconImageSequence[0].PixelData)
    assert 2 ** levels(cs) <= side


def fragments_of(data: bytes) -> list[bytes]:
    from pydicom.encaps import generate_fragments

    bot_length = int.from_bytes(data[4:8], "little")
    return list(generate_fragments(data[8 + bot_length :]))


# -- an independent decoder ------------------------------------------------------------
@pytest.mark.skipif(not shutil.which("gdcmconv"), reason="Debian libgdcm-tools not installed")
@pytest.mark.parametrize(("base", "kind"), [("17106", "RGB"), ("SC_rgb_small_odd.dcm", None)])
def test_gdcm_decodes_small_image_and_icon(base: str, kind: str | None, tmp_path: Path) -> None:
    """GDCM decompresses the imagecodecs codestreams to the original pixels."""
    src = corpus.testdata(base)
    if kind is not None:
        src, _ = with_icon(src, tmp_path / "in.dcm", kind, pixels=icon_pixels(kind, side=16))
    _, dst = compressed(src, tmp_path)
    raw = tmp_path / "gdcm-raw.dcm"
    subprocess.run(["gdcmconv", "--raw", str(dst), str(raw)], check=True, capture_output=True)
    out = pydicom.dcmread(raw)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not out["PixelData"].is_undefined_length
    # GDCM decodes YBR_RCT to RGB and leaves the name as it was: compare as stored.
    assert np.array_equal(stored(raw), stored(src))
    if kind is not None:
        assert not out.IconImageSequence[0]["PixelData"].is_undefined_length
        assert np.array_equal(stored_icon(raw), stored_icon(src))


# -- verification still decides --------------------------------------------------------
def test_encoder_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: Any, kwargs: Any) -> Any:
        raise RuntimeError("codec exploded")

    patch_encoder(monkeypatch, broken)
    result, _ = run(corpus.testdata("6154"), tmp_path)
    assert result.outcome == "fallback"
    assert result.reason.startswith("encoder error: RuntimeError: codec exploded")

    src, _ = with_icon(
        corpus.testdata("CT_small.dcm"), tmp_path / "in.dcm", "RGB",
        pixels=icon_pixels("RGB", side=8),
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert result.outcome == "fallback"
    assert result.reason.startswith("encoder error in icon image 0: RuntimeError")


def test_changed_pixels_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def one_pixel_off(data: np.ndarray[Any, Any], kwargs: Any) -> Any:
        data.flat[0] ^= 1
        return data, kwargs

    patch_encoder(monkeypatch, one_pixel_off)
    result, _ = run(corpus.testdata("SC_rgb_small_odd.dcm"), tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        "decoded pixels differ from the original",
    )


def test_wrong_signedness_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Signed cells handed over as unsigned: the codestream says unsigned, and the
    # header check refuses it before any decoder could reinterpret the values.
    def unsigned(data: np.ndarray[Any, Any], kwargs: Any) -> Any:
        return data.view(data.dtype.str.replace("i", "u")), kwargs

    patch_encoder(monkeypatch, unsigned)
    result, _ = run(corpus.testdata("17106"), tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        "codestream precision 16 signed=False, data set has Bits Stored 16 signed=True",
    )


def test_wrong_precision_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def sixteen_bits(data: np.ndarray[Any, Any], kwargs: Any) -> Any:
        return data, {**kwargs, "bitspersample": 16}

    patch_encoder(monkeypatch, sixteen_bits)
    result, _ = run(corpus.testdata("6154"), tmp_path)  # Bits Stored 12
    assert (result.outcome, result.reason) == (
        "fallback",
        "codestream precision 16 signed=False, data set has Bits Stored 12 signed=False",
    )


def test_no_size_reason_left() -> None:
    """No pydicom test file is refused for its size any more."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PUBLIC_SMALL:
            allowed, why = transcode_module.compressibility(corpus.testdata(name))
            assert allowed, why

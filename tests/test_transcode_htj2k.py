"""HTJ2K lossless (1.2.840.10008.1.2.4.201, and .202 RPCL): by OpenJPH, verified by OpenJPEG.

The same public files and generated images as the JPEG 2000 tests, each checked here
independently of the stage's own verification: pixels decoded by pydicom (its
pylibjpeg-openjpeg plugin), every data element compared, the encapsulation walked, and
each codestream's main header read (precision and sign equal to Bits Stored and Pixel
Representation, Part 15 in Rsiz and CAP, HT code blocks, the colour transform only for
RGB).  GDCM 3.0.21 (Debian bookworm's libgdcm-tools) does not know this transfer
syntax ("Could not read (pixmap)"), so it is not a decoder here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.pipeline import transcode as transcode_module

from .support import corpus
from .test_transcode import (
    assert_same_elements,
    compressed,
    fragments,
    images,
    make_image,
    run,
    siz,
    stored,
    uses_mct,
)
from .test_transcode_icon import assert_icon_compressed, stored_icon, with_icon

HT = "htj2k-lossless"
RPCL = "htj2k-lossless-rpcl"
BIG = "1.2.840.10008.1.2.2"
ILE = "1.2.840.10008.1.2"


def main_header(cs: bytes) -> dict[int, bytes]:
    """Main-header marker segments of a codestream, by marker (SIZ first)."""
    assert cs[:2] == b"\xff\x4f"
    pos, segments = 2, {}
    while cs[pos] == 0xFF and cs[pos + 1] != 0x90:
        length = int.from_bytes(cs[pos + 2 : pos + 4], "big")
        segments.setdefault(cs[pos + 1], cs[pos + 4 : pos + 2 + length])
        pos += 2 + length
    return segments


def assert_htj2k(
    dst: Path, *, bits: int, signed: bool, spp: int, mct: bool, rpcl: bool = False
) -> None:
    ds = pydicom.dcmread(dst, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == f"1.2.840.10008.1.2.4.{202 if rpcl else 201}"
    _, frags = fragments(dst)
    assert len(frags) == int(ds.get("NumberOfFrames") or 1)
    for cs in frags:
        header = main_header(cs)
        if rpcl:  # PS3.5 10.18
            assert header[0x52][1] == 2  # progression order RPCL
            assert 0x55 in header  # TLM
            levels = header[0x52][5]
            assert max(-(-ds.Rows // 2**levels), -(-ds.Columns // 2**levels)) <= 64
        assert int.from_bytes(header[0x51][:2], "big") & 0x4000  # Rsiz: Part 15
        assert 0x50 in header  # CAP
        cod = header[0x52]
        assert cod[8] & 0x40  # HT code blocks
        assert cod[9] == 1  # reversible 5/3
        assert siz(cs) == [(bits, signed)] * spp
        assert uses_mct(cs) == mct


# -- public files ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "bits", "signed", "spp", "mct"),
    [
        ("CT_small.dcm", 16, True, 1, False),  # signed 16-bit CT
        ("MR_small_implicit.dcm", 16, True, 1, False),
        ("MR_small_bigendian.dcm", 16, True, 1, False),
        ("MR2_UNCR.dcm", 12, False, 1, False),  # 12 of 16 bits, 1024x1024
        ("RG3_UNCR.dcm", 10, False, 1, False),  # CR, 10 of 16 bits
        ("emri_small.dcm", 12, False, 1, False),  # 10 frames
        ("SC_rgb.dcm", 8, False, 3, True),  # RGB -> YBR_RCT
        ("SC_rgb_expb_2frame.dcm", 8, False, 3, True),  # big endian, 2 frames
        ("SC_ybr_full_uncompressed.dcm", 8, False, 3, False),
        ("OBXXXX1A.dcm", 8, False, 1, False),  # PALETTE COLOR
        ("6154", 12, False, 1, False),  # small: CR 12-bit MONOCHROME1
        ("17106", 16, True, 1, False),  # small
        ("SC_rgb_small_odd.dcm", 8, False, 3, True),  # 3x3 RGB
    ],
)
@pytest.mark.parametrize("codec", [HT, RPCL])
def test_public_file(
    name: str, bits: int, signed: bool, spp: int, mct: bool, codec: str, tmp_path: Path
) -> None:
    src = corpus.testdata(name)
    a = pydicom.dcmread(src, stop_before_pixels=True)
    assert (a.BitsStored, bool(a.PixelRepresentation), a.SamplesPerPixel) == (bits, signed, spp)
    _, dst = compressed(src, tmp_path, codec)  # pixels, elements, offsets
    assert_htj2k(dst, bits=bits, signed=signed, spp=spp, mct=mct, rpcl=codec == RPCL)


def test_rgb_is_smaller_as_ybr_rct(tmp_path: Path) -> None:
    result, dst = compressed(corpus.testdata("US1_UNCR.dcm"), tmp_path, HT)
    assert pydicom.dcmread(dst, stop_before_pixels=True).PhotometricInterpretation == "YBR_RCT"
    assert result.size_out < result.size_in / 4


# -- generated images ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored"), [(16, 6), (16, 9), (16, 12), (16, 16), (8, 5), (8, 8)]
)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("ts", [ILE, BIG])
def test_bits_stored_is_the_precision(
    bits_allocated: int, bits_stored: int, signed: bool, ts: str, tmp_path: Path
) -> None:
    # OpenJPH writes the array's item size as the precision: the stage sets Bits Stored
    # in Ssiz and level-shifts unsigned cells itself.  Both ends of the range included.
    low, high = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (
        0, (1 << bits_stored) - 1)  # fmt: skip
    img = np.random.default_rng(bits_stored).integers(low, high, size=(40, 33), endpoint=True)
    img[0, :2] = low, high
    src = make_image(
        tmp_path / "in.dcm", img, bits_allocated=bits_allocated, bits_stored=bits_stored,
        signed=signed, photometric="MONOCHROME2", ts=ts,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path, HT)
    assert_htj2k(dst, bits=bits_stored, signed=signed, spp=1, mct=False)
    assert np.array_equal(stored(dst), img)


@pytest.mark.parametrize(
    ("shape", "photometric", "bits"),
    [((1, 1), "MONOCHROME2", 16), ((1, 40), "MONOCHROME2", 12), ((40, 1), "MONOCHROME1", 8),
     ((1, 5, 3), "RGB", 8), ((2, 3), "MONOCHROME2", 8), ((31, 33), "MONOCHROME2", 16)],
)  # fmt: skip
def test_small_images_and_strips(
    shape: tuple[int, ...], photometric: str, bits: int, tmp_path: Path
) -> None:
    # OpenJPH's 5 decomposition levels at any size: levels beyond a side leave empty
    # subbands (allowed by Part 1), which OpenJPEG decodes.
    img = np.random.default_rng(len(shape)).integers(0, (1 << bits) - 1, size=shape)
    src = make_image(
        tmp_path / "strip.dcm", img, bits_allocated=16 if bits > 8 else 8, bits_stored=bits,
        signed=False, photometric=photometric,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path, HT)
    spp = 3 if photometric == "RGB" else 1
    assert_htj2k(dst, bits=bits, signed=False, spp=spp, mct=spp == 3)
    assert np.array_equal(stored(dst), img)


def test_rgb_planar_configuration_1_multiframe_big_endian(tmp_path: Path) -> None:
    frames = np.random.default_rng(5).integers(0, 255, size=(3, 20, 36, 3))
    src = make_image(
        tmp_path / "rgb.dcm", frames, bits_allocated=8, bits_stored=8, signed=False,
        photometric="RGB", frames=3, planar=1, ts=BIG,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path, HT)
    assert_htj2k(dst, bits=8, signed=False, spp=3, mct=True)
    assert pydicom.dcmread(dst, stop_before_pixels=True).PlanarConfiguration == 0
    assert np.array_equal(stored(dst), frames)


# -- icons -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "kind"),
    [("CT_small.dcm", "MONOCHROME2"), ("MR_small_bigendian.dcm", "RGB planar 1"),
     ("SC_rgb.dcm", "PALETTE COLOR")],
)  # fmt: skip
def test_icon_gets_the_same_transfer_syntax(base: str, kind: str, tmp_path: Path) -> None:
    src, arr = with_icon(corpus.testdata(base), tmp_path / "in.dcm", kind)
    _, dst = compressed(src, tmp_path, HT)
    assert_icon_compressed(dst, arr)  # decoded with the data set's transfer syntax
    item = pydicom.dcmread(dst).IconImageSequence[0]
    (cs,) = fragments_of(item.PixelData)
    assert 0x50 in main_header(cs)  # the icon is HTJ2K too
    assert np.array_equal(stored_icon(dst), arr)


def test_real_palette_colour_icon(tmp_path: Path) -> None:
    src = corpus.testdata("MR-SIEMENS-DICOM-WithOverlays.dcm")
    original = stored_icon(src)
    _, dst = compressed(src, tmp_path, HT)
    assert_icon_compressed(dst, original)


def fragments_of(data: bytes) -> list[bytes]:
    from pydicom.encaps import generate_fragments

    bot_length = int.from_bytes(data[4:8], "little")
    return list(generate_fragments(data[8 + bot_length :]))


# -- the verification can fail ---------------------------------------------------------
def test_precision_left_at_the_item_size_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the Ssiz fix the codestream says 16 bits for Bits Stored 12 (and decodes
    # off by the level shift): the stage must refuse it, not upload it.
    monkeypatch.setattr(transcode_module, "_set_precision", lambda cs, bits, *, signed: cs)
    result, dst = run(corpus.testdata("MR2_UNCR.dcm"), tmp_path, HT)
    assert result.outcome == "fallback"
    assert "codestream precision 16" in result.reason and not dst.exists()


def test_a_part_1_codestream_is_not_htj2k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An OpenJPEG (Part 1) codestream under the HTJ2K transfer syntax decodes fine, but
    # is not what the transfer syntax promises: the header check refuses it.
    def part_1(ds: Any, *, mct: bool, rpcl: bool) -> Any:
        options = transcode_module._encoder_options(ds, mct=mct, numthreads=1)
        return lambda frame: transcode_module._encode_frame(
            frame, frame.dtype.newbyteorder("="), options
        )

    monkeypatch.setattr(transcode_module, "_htj2k_encoder", part_1)
    result, _ = run(corpus.testdata("CT_small.dcm"), tmp_path, HT)
    assert result.outcome == "fallback"
    assert "Rsiz" in result.reason


def test_an_htj2k_codestream_is_not_j2k() -> None:
    img = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    cs = transcode_module._set_precision(
        bytes(transcode_module.imagecodecs.htj2k_encode(img, reversible=True)), 16, signed=False
    )
    transcode_module._check_codestream(cs, 16, signed=False, mct=False, ht=True)
    with pytest.raises(transcode_module._NotCompressed, match="Rsiz"):
        transcode_module._check_codestream(cs, 16, signed=False, mct=False, ht=False)


def test_already_compressed_passes_through(tmp_path: Path) -> None:
    result, _ = run(corpus.testdata("JPEG2000.dcm"), tmp_path, HT)
    assert result.outcome == "passthrough" and "already compressed" in result.reason


# -- RPCL (1.2.840.10008.1.2.4.202) ----------------------------------------------------
@pytest.mark.parametrize(("shape", "levels"), [((1, 4100), 7), ((2100, 3), 6), ((64, 64), 5)])
def test_rpcl_levels_reach_a_base_resolution_of_64(
    shape: tuple[int, int], levels: int, tmp_path: Path
) -> None:
    img = np.random.default_rng(1).integers(0, 4095, size=shape)
    src = make_image(
        tmp_path / "wide.dcm", img, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2",
    )  # fmt: skip
    _, dst = compressed(src, tmp_path, RPCL)
    assert_htj2k(dst, bits=12, signed=False, spp=1, mct=False, rpcl=True)
    (cs,) = fragments(dst)[1]
    assert main_header(cs)[0x52][5] == levels
    assert cs.count(b"\xff\x90") == levels + 1  # a tile-part per resolution
    assert np.array_equal(stored(dst), img)


def test_rpcl_icon(tmp_path: Path) -> None:
    src, arr = with_icon(corpus.testdata("CT_small.dcm"), tmp_path / "in.dcm", "MONOCHROME2")
    _, dst = compressed(src, tmp_path, RPCL)
    assert_icon_compressed(dst, arr)
    (cs,) = fragments_of(pydicom.dcmread(dst).IconImageSequence[0].PixelData)
    assert 0x55 in main_header(cs)


def test_a_codestream_without_tlm_is_not_rpcl() -> None:
    img = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)
    plain = bytes(transcode_module.imagecodecs.htj2k_encode(img, reversible=True))
    transcode_module._check_codestream(plain, 16, signed=False, mct=False, ht=True)
    with pytest.raises(transcode_module._NotCompressed, match="TLM"):
        transcode_module._check_codestream(plain, 16, signed=False, mct=False, ht=True, rpcl=True)
    few = bytes(
        transcode_module.imagecodecs.htj2k_encode(img, reversible=True, tlm=True, resolutions=1)
    )
    with pytest.raises(transcode_module._NotCompressed, match="1 wavelet levels for 200x300"):
        transcode_module._check_codestream(few, 16, signed=False, mct=False, ht=True, rpcl=True)


# -- property --------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(images(), st.sampled_from([HT, RPCL]))
def test_round_trip_is_pixel_identical(image: dict[str, Any], codec: str) -> None:
    # Every side from 1 to 64, 2..16 Bits Stored, signed or not, colour, 1-3 frames,
    # every byte order; the same generator as the J2K property.
    arr = image["arr"]
    with tempfile.TemporaryDirectory() as tmp:
        params = {k: v for k, v in image.items() if k != "arr"}
        src = make_image(Path(tmp) / "in.dcm", arr, **params)
        dst = Path(tmp) / "out.dcm"
        result = transcode_module.transcode(src, dst, codec)
        event(result.outcome)
        rgb = image["photometric"] == "RGB"
        if image["bits_stored"] == 1:
            assert result.outcome == "passthrough" and "Bits Stored 1" in result.reason
        elif rgb and image["signed"]:
            assert (result.outcome, result.reason) == ("passthrough", "signed RGB")
        else:
            assert result.outcome == "compressed", result.reason
            assert np.array_equal(stored(dst), arr)
            assert_same_elements(src, dst, ts=result.transfer_syntax)
            spp = 3 if rgb else 1
            assert_htj2k(
                dst, bits=image["bits_stored"], signed=image["signed"], spp=spp, mct=rgb,
                rpcl=codec == RPCL,
            )  # fmt: skip
        assert dst.exists() == (result.outcome == "compressed")

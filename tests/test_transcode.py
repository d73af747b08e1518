"""The JPEG 2000 lossless stage, on pydicom's real test files and generated images.

Each compressed result is checked here independently of the stage's own verification:
pixels decoded by pydicom, every data element compared by value (and private and
Person Name elements byte for byte), the encapsulation walked fragment by fragment.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.pixels import pixel_array
from pydicom.uid import (
    SecondaryCaptureImageStorage,
    generate_uid,
)

from gateway.pipeline import transcode as transcode_module
from gateway.pipeline.transcode import TranscodeResult, transcode

from .support import corpus

J2K = "1.2.840.10008.1.2.4.90"
HTJ2K = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
CODEC_TS = {"j2k-lossless": J2K, "htj2k-lossless": HTJ2K, "htj2k-lossless-rpcl": HTJ2K_RPCL}
ELE = "1.2.840.10008.1.2.1"
ILE = "1.2.840.10008.1.2"
# What compressing may change; everything else must come back identical.
CHANGED = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration"}
WORDS = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
ICON_CHANGED = {"PixelData", "PlanarConfiguration"}
META_CHANGED = {
    "FileMetaInformationGroupLength",
    "TransferSyntaxUID",
    "ImplementationClassUID",
    "ImplementationVersionName",
}


# -- helpers ---------------------------------------------------------------------------
def run(src: Path, tmp_path: Path, codec: str = "j2k-lossless") -> tuple[TranscodeResult, Path]:
    dst = tmp_path / f"out-{src.name}"
    result = transcode(src, dst, codec)
    assert result.size_in == src.stat().st_size
    assert result.seconds >= 0
    if result.outcome == "compressed":
        assert result.reason == ""
        assert result.transfer_syntax == CODEC_TS[codec]
        assert result.size_out == dst.stat().st_size
    else:
        assert result.reason
        assert not dst.exists(), "dst must not be left behind"
        assert result.size_out == result.size_in
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert result.transfer_syntax == ts
    return result, dst


def compressed(
    src: Path, tmp_path: Path, codec: str = "j2k-lossless"
) -> tuple[TranscodeResult, Path]:
    result, dst = run(src, tmp_path, codec)
    assert result.outcome == "compressed", result.reason
    assert_pixels_equal(src, dst)
    assert_same_elements(src, dst, ts=result.transfer_syntax)
    assert_one_codestream_per_frame(dst)
    return result, dst


def stored(path: Path) -> np.ndarray[Any, Any]:
    """Stored values as integers: no colour conversion, no masking of unused bits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pixel_array(path, raw=True, correct_unused_bits=False)
    return arr


def assert_pixels_equal(src: Path, dst: Path) -> None:
    a, b = stored(src), stored(dst)
    assert a.shape == b.shape
    assert np.array_equal(a, b)


def _elements(ds: Dataset, path: str = "") -> Iterator[tuple[str, Any]]:
    for elem in ds:  # converts: compares values as pydicom decodes them
        where = f"{path}{elem.tag}"
        if elem.VR == "SQ":
            yield where, ("SQ", len(elem.value))
            for i, item in enumerate(elem.value):
                yield from _elements(item, f"{where}[{i}]")
        elif path.startswith("(0088,0200)[") and elem.keyword in ICON_CHANGED:
            continue  # an icon's pixels and layout, checked by test_transcode_icon
        elif elem.keyword not in CHANGED or path:
            yield where, (elem.VR, elem.value)


def assert_same_elements(src: Path, dst: Path, ts: str = J2K) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
        # Group lengths are retired (PS3.5 7.2) and not written by pydicom.
        got = {k: v for k, v in _elements(b)}
        want = {k: v for k, v in _elements(a) if not k.endswith("0000)")}
    assert got.keys() == want.keys()
    big = a.original_encoding[1] is False
    for key, (vr, value) in want.items():
        got_vr, got_value = got[key]
        if big and vr in WORDS and isinstance(value, bytes):
            # pydicom leaves OW/OF... values in the file's byte order: swap to compare.
            size = WORDS[vr]
            value = np.frombuffer(value, f">u{size}").astype(f"<u{size}").tobytes()
        assert got_value == value, key
        # Implicit VR originals only know the dictionary VR, and pydicom resolves
        # "US or SS" from Pixel Representation; private tags it cannot look up are UN.
        assert got_vr == vr or " or " in vr or "UN" in (vr, got_vr), key

    for kw in a.file_meta.dir():
        if kw not in META_CHANGED:
            assert b.file_meta[kw].value == a.file_meta[kw].value, kw
    assert b.file_meta.TransferSyntaxUID == ts
    assert b.SOPInstanceUID == a.SOPInstanceUID == b.file_meta.MediaStorageSOPInstanceUID
    assert b.get("LossyImageCompression") == a.get("LossyImageCompression")
    want_pi = "YBR_RCT" if a.PhotometricInterpretation == "RGB" else a.PhotometricInterpretation
    assert b.PhotometricInterpretation == want_pi
    if a.SamplesPerPixel == 3:
        assert b.PlanarConfiguration == 0  # PS3.5 8.2.4
    assert b.BitsStored == a.BitsStored and b.PixelRepresentation == a.PixelRepresentation


def fragments(dst: Path) -> tuple[list[int], list[bytes]]:
    ds = pydicom.dcmread(dst)
    assert ds["PixelData"].is_undefined_length and ds["PixelData"].VR == "OB"
    data = ds.PixelData
    offsets = parse_basic_offsets(data)
    bot_length = int.from_bytes(data[4:8], "little")
    return offsets, list(generate_fragments(data[8 + bot_length :]))


def assert_one_codestream_per_frame(dst: Path) -> None:
    ds = pydicom.dcmread(dst, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames") or 1)
    offsets, frags = fragments(dst)
    assert len(frags) == frames
    assert all(f.startswith(b"\xff\x4f\xff\x51") for f in frags)  # SOC + SIZ
    # The Basic Offset Table points at each frame's item (8-byte item header each).
    positions = np.cumsum([0] + [8 + len(f) for f in frags[:-1]]).tolist()
    assert offsets == positions


def siz(codestream: bytes) -> list[tuple[int, bool]]:
    """(precision, signed) of each component in a J2K SIZ segment."""
    components = int.from_bytes(codestream[40:42], "big")
    return [((s & 0x7F) + 1, bool(s & 0x80)) for s in codestream[42 : 42 + 3 * components : 3]]


def uses_mct(codestream: bytes) -> bool:
    pos = codestream.index(b"\xff\x52")  # COD
    return bool(codestream[pos + 8])


def make_image(
    path: Path,
    arr: np.ndarray[Any, Any],
    *,
    bits_allocated: int,
    bits_stored: int,
    signed: bool,
    photometric: str,
    frames: int = 1,
    planar: int = 0,
    ts: str = ELE,
    high_bit: int | None = None,
    pixel_bytes: bytes | None = None,
) -> Path:
    """A Secondary Capture instance holding exactly *arr* (or *pixel_bytes*)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.PatientName = "Test^Transcode"
    spp = 3 if arr.shape[-1] == 3 and photometric in ("RGB", "YBR_FULL") else 1
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = photometric
    if spp == 3:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = arr.shape[-3:-1] if spp == 3 else arr.shape[-2:]
    ds.BitsAllocated, ds.BitsStored = bits_allocated, bits_stored
    ds.HighBit = bits_stored - 1 if high_bit is None else high_bit
    ds.PixelRepresentation = int(signed)
    if pixel_bytes is None:
        cells = arr.astype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
        if spp == 3 and planar == 1:
            cells = np.moveaxis(cells, -1, -3)  # colour-by-plane, per frame
        big = ts == "1.2.840.10008.1.2.2"
        pixel_bytes = cells.astype(cells.dtype.newbyteorder(">" if big else "<")).tobytes()
    ds.PixelData = pixel_bytes + b"\0" * (len(pixel_bytes) % 2)
    ds["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    implicit = ts == ILE
    little = ts != "1.2.840.10008.1.2.2"
    pydicom.dcmwrite(path, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=True)
    return path


def rewrite(src: Path, dst: Path, ts: str | None = None, **changes: Any) -> Path:
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
    implicit = ds.file_meta.TransferSyntaxUID == ILE
    pydicom.dcmwrite(dst, ds, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return dst


# -- real data: compressed -------------------------------------------------------------
def test_ct_16bit_signed(tmp_path: Path) -> None:
    result, dst = compressed(corpus.testdata("CT_small.dcm"), tmp_path)
    assert result.size_out < result.size_in
    _, (cs,) = fragments(dst)
    assert siz(cs) == [(16, True)]
    assert not uses_mct(cs)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm"])
def test_mr(name: str, tmp_path: Path) -> None:
    compressed(corpus.testdata(name), tmp_path)


def test_big_endian(tmp_path: Path) -> None:
    # pydicom 3.0's Dataset.compress() alone gets this wrong (it hands the big endian
    # buffer to the encoder as little endian), and FileDataset.save_as() refuses it.
    src = corpus.testdata("MR_small_bigendian.dcm")
    _, dst = compressed(src, tmp_path)
    assert np.array_equal(stored(dst), stored(corpus.testdata("MR_small.dcm")))
    out = pydicom.dcmread(dst)
    assert out.original_encoding == (False, True)


@pytest.mark.parametrize("name", ["SC_rgb_expb_16bit.dcm", "SC_rgb_expb_2frame.dcm"])
def test_big_endian_colour(name: str, tmp_path: Path) -> None:
    compressed(corpus.testdata(name), tmp_path)


def test_multiframe_one_codestream_per_frame_with_offsets(tmp_path: Path) -> None:
    result, dst = compressed(corpus.testdata("emri_small.dcm"), tmp_path)
    offsets, frags = fragments(dst)
    assert len(frags) == 10 and len(offsets) == 10 and offsets[0] == 0
    assert all(siz(f) == [(12, False)] for f in frags)  # Bits Stored 12, not 16
    assert result.size_in / result.size_out > 1.5


def test_rgb_becomes_ybr_rct(tmp_path: Path) -> None:
    src = corpus.testdata("SC_rgb.dcm")
    _, dst = compressed(src, tmp_path)
    _, (cs,) = fragments(dst)
    assert uses_mct(cs) and siz(cs) == [(8, False)] * 3
    # Decoded without any colour processing the codestream is RGB again.
    assert np.array_equal(pixel_array(dst, raw=True), pydicom.dcmread(src).pixel_array)
    assert len(cs) < _size_with_rgb_kept(src, tmp_path)


def test_ultrasound_rgb(tmp_path: Path) -> None:
    src = corpus.testdata("US1_UNCR.dcm")
    result, _ = compressed(src, tmp_path)
    assert result.size_in / result.size_out > 5
    # The colour transform is what makes ultrasound small.
    assert result.size_out < 0.6 * _size_with_rgb_kept(src, tmp_path)


def _size_with_rgb_kept(src: Path, tmp_path: Path) -> int:
    """The same encoder and settings as the stage's, without the colour transform."""
    ds = pydicom.dcmread(src)
    options = transcode_module._encoder_options(ds, mct=False, numthreads=1)
    return len(transcode_module.imagecodecs.jpeg2k_encode(ds.pixel_array, **options))


def test_rgb_planar_configuration_1(tmp_path: Path) -> None:
    rgb = pydicom.dcmread(corpus.testdata("SC_rgb.dcm")).pixel_array
    src = make_image(
        tmp_path / "planar.dcm", rgb, bits_allocated=8, bits_stored=8, signed=False,
        photometric="RGB", planar=1,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    assert np.array_equal(pixel_array(dst, raw=True), rgb)
    assert pydicom.dcmread(dst).PlanarConfiguration == 0


def test_cr_large(tmp_path: Path) -> None:
    result, dst = compressed(corpus.testdata("RG1_UNCR.dcm"), tmp_path)
    assert result.size_in > 7_000_000
    assert result.size_in / result.size_out > 1.5
    _, (cs,) = fragments(dst)
    assert siz(cs) == [(15, False)]


@pytest.mark.parametrize("name", ["MR2_UNCR.dcm", "RG3_UNCR.dcm"])
def test_fewer_bits_stored(name: str, tmp_path: Path) -> None:
    compressed(corpus.testdata(name), tmp_path)


def test_palette_colour_8bit(tmp_path: Path) -> None:
    # Compressed as one 8-bit component; the LUTs are ordinary elements, kept as is.
    _, dst = compressed(corpus.testdata("OBXXXX1A.dcm"), tmp_path)
    assert pydicom.dcmread(dst).PhotometricInterpretation == "PALETTE COLOR"


def test_ybr_full_kept_as_ybr_full(tmp_path: Path) -> None:
    _, dst = compressed(corpus.testdata("SC_ybr_full_uncompressed.dcm"), tmp_path)
    _, (cs,) = fragments(dst)
    assert not uses_mct(cs)


def test_signed_with_negative_values(tmp_path: Path) -> None:
    ct = pydicom.dcmread(corpus.testdata("CT_small.dcm")).pixel_array.astype(np.int16) - 1200
    assert ct.min() < 0
    src = make_image(
        tmp_path / "neg.dcm", ct, bits_allocated=16, bits_stored=16, signed=True,
        photometric="MONOCHROME2",
    )  # fmt: skip
    compressed(src, tmp_path)

    twelve = np.clip(ct, -2048, 2047)
    src12 = make_image(
        tmp_path / "neg12.dcm", twelve, bits_allocated=16, bits_stored=12, signed=True,
        photometric="MONOCHROME2",
    )  # fmt: skip
    _, dst = compressed(src12, tmp_path)
    assert siz(fragments(dst)[1][0]) == [(12, True)]
    assert pydicom.dcmread(dst).pixel_array.min() < 0


def test_8bit_monochrome(tmp_path: Path) -> None:
    img = (np.arange(64 * 80) % 251).astype(np.uint8).reshape(64, 80)
    src = make_image(
        tmp_path / "mono8.dcm", img, bits_allocated=8, bits_stored=8, signed=False,
        photometric="MONOCHROME1",
    )  # fmt: skip
    compressed(src, tmp_path)


def test_private_tags_charset_and_sequences_kept(tmp_path: Path) -> None:
    src = tmp_path / "private.dcm"
    corpus.with_private_tags(corpus.testdata("CT_small.dcm"), src)
    ds = pydicom.dcmread(src)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Ærøskøbing=山田^太郎"
    ds.save_as(src)
    _, dst = compressed(src, tmp_path)
    a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
    block = b.private_block(0x0029, "GATEWAY TEST")
    private = [block.get_tag(e) for e in (0x01, 0x02, 0x03)]
    for tag in [0x00100010, 0x00080005, *private]:
        # The bytes as received, not a decode/encode round trip.
        assert b.get_item(tag).value == a.get_item(tag).value, hex(tag)
    assert b.get_item(private[1]).value == bytes(range(256))
    inner = b[private[2]].value[0]
    assert inner[inner.private_block(0x0031, "GATEWAY NESTED").get_tag(0x10)].value == 0xDEADBEEF


def test_implicit_vr_private_tags_kept(tmp_path: Path) -> None:
    src = tmp_path / "private.dcm"
    corpus.with_private_tags(corpus.testdata("MR_small_implicit.dcm"), src)
    rewrite(src, src, ts=ILE)
    assert pydicom.dcmread(src).original_encoding == (True, True)
    _, dst = compressed(src, tmp_path)
    a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
    tag = b.private_block(0x0029, "GATEWAY TEST").get_tag(0x02)
    assert b.get_item(tag).value == a.get_item(tag).value == bytes(range(256))


# -- passthrough -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "already lossy (1.2.840.10008.1.2.4.50)"),
        ("JPEG-lossy.dcm", "already lossy (1.2.840.10008.1.2.4.51)"),
        ("MR_small_jp2klossless.dcm", "already compressed (1.2.840.10008.1.2.4.90)"),
        ("MR_small_RLE.dcm", "already compressed (1.2.840.10008.1.2.5)"),
        ("MR_small_jpeg_ls_lossless.dcm", "already compressed (1.2.840.10008.1.2.4.80)"),
        ("test-SR.dcm", "no pixel data"),
        ("rtplan.dcm", "no pixel data"),
        ("image_dfl.dcm", "deflated data set"),
        ("SC_rgb_32bit.dcm", "Bits Allocated 32"),
        ("rtdose.dcm", "Bits Allocated 32"),
        ("liver.dcm", "Bits Allocated 1"),
        ("SC_ybr_full_422_uncompressed.dcm", "photometric interpretation YBR_FULL_422"),
    ],
)
def test_passthrough(name: str, reason: str, tmp_path: Path) -> None:
    result, _ = run(corpus.testdata(name), tmp_path)
    assert result.outcome == "passthrough"
    assert result.reason.startswith(reason)


def test_float_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(corpus.testdata("MR_small.dcm"))
    del ds.PixelData
    ds.FloatPixelData = np.zeros(64 * 64, dtype="<f4").tobytes()
    src = tmp_path / "float.dcm"
    ds.save_as(src)
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == ("passthrough", "float pixel data")


def test_signed_rgb_is_not_allowed_in_j2k(tmp_path: Path) -> None:
    img = np.zeros((32, 32, 3), dtype=np.int8)
    src = make_image(
        tmp_path / "srgb.dcm", img, bits_allocated=8, bits_stored=8, signed=True,
        photometric="RGB",
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == ("passthrough", "signed RGB")


def test_bits_above_bits_stored_are_not_dropped(tmp_path: Path) -> None:
    img = np.full((40, 40), 100, dtype=np.uint16)
    img[0, 0] = 0x1000 | 100  # bit 12 set with Bits Stored 12: an overlay, say
    src = make_image(
        tmp_path / "hi.dcm", img, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2",
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert result.outcome == "passthrough"
    assert "bits above Bits Stored 12" in result.reason


def test_signed_not_sign_extended_is_not_reinterpreted(tmp_path: Path) -> None:
    # -1 in 12 bits stored as 0x0FFF instead of 0xFFFF: pydicom's pixel_array
    # sign-extends it to -1, but the stored cell is not what J2K would give back.
    raw = np.full((40, 40), 0x0FFF, dtype="<u2").tobytes()
    src = make_image(
        tmp_path / "s12.dcm", np.zeros((40, 40)), bits_allocated=16, bits_stored=12,
        signed=True, photometric="MONOCHROME2", pixel_bytes=raw,
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert result.outcome == "passthrough"


def test_one_bit_stored(tmp_path: Path) -> None:
    # A noise-like 1-bit mask that pylibjpeg-openjpeg 2.6 encodes to a codestream
    # decoding to other values, without any error.
    mask = np.random.default_rng(0).integers(0, 1, size=(33, 60, 3), endpoint=True)
    src = make_image(
        tmp_path / "mask.dcm", mask, bits_allocated=8, bits_stored=1, signed=False,
        photometric="RGB",
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert result.outcome == "passthrough"
    assert result.reason.startswith("Bits Stored 1")


def test_high_bit_not_bits_stored_minus_one(tmp_path: Path) -> None:
    img = np.zeros((40, 40), dtype=np.uint16)
    src = make_image(
        tmp_path / "hb.dcm", img, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2", high_bit=15,
    )  # fmt: skip
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == ("passthrough", "High Bit 15 with Bits Stored 12")


# -- fallback --------------------------------------------------------------------------
def test_truncated_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:-100]
    src = tmp_path / "short.dcm"
    ds.save_as(src)
    result, _ = run(src, tmp_path)
    assert result.outcome == "fallback"
    assert result.reason == "pixel data is 32668 bytes, 32768 expected"


def test_not_dicom(tmp_path: Path) -> None:
    src = tmp_path / "junk.dcm"
    src.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)
    dst = tmp_path / "junk-out.dcm"
    result = transcode(src, dst)
    assert (result.outcome, result.transfer_syntax) == ("fallback", "")
    assert not dst.exists()

    src.write_bytes(b"not DICOM at all")
    result = transcode(src, dst)
    assert result.outcome == "fallback"
    assert result.reason.startswith("cannot read data set: InvalidDicomError")
    assert not dst.exists()


def test_missing_image_pixel_element(tmp_path: Path) -> None:
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    del ds.BitsStored
    src = tmp_path / "nobits.dcm"
    ds.save_as(src)
    result, _ = run(src, tmp_path)
    assert result.outcome == "fallback"
    assert result.reason.startswith("invalid Image Pixel module: AttributeError")


def patch_encoder(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Pass what the stage hands imagecodecs' J2K encoder through *change* first."""
    real = transcode_module.imagecodecs.jpeg2k_encode

    def patched(data: np.ndarray[Any, Any], **kwargs: Any) -> bytes:
        data, kwargs = change(data.copy(), kwargs)
        return real(data, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(transcode_module.imagecodecs, "jpeg2k_encode", patched)


def test_encoder_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: Any, kwargs: Any) -> Any:
        raise RuntimeError("codec exploded")

    patch_encoder(monkeypatch, broken)
    result, _ = run(corpus.testdata("CT_small.dcm"), tmp_path)
    assert result.outcome == "fallback"
    assert result.reason.startswith("encoder error: RuntimeError")
    assert "codec exploded" in result.reason


@pytest.mark.parametrize("name", ["emri_small.dcm", "CT_small.dcm"])  # 10 frames, 1 frame
def test_encoder_output_that_decodes_differently(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def lossy(data: np.ndarray[Any, Any], kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3 or name == "CT_small.dcm":  # one frame of several
            data.flat[0] ^= 1
        return data, kwargs

    patch_encoder(monkeypatch, lossy)
    result, _ = run(corpus.testdata(name), tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        "decoded pixels differ from the original",
    )


def _with_invalid_utf8_name(path: Path, ts: str) -> Path:
    ds = pydicom.dcmread(corpus.testdata("MR_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "MARKERXXXX"
    ds.file_meta.TransferSyntaxUID = ts
    big = ts == "1.2.840.10008.1.2.2"
    pydicom.dcmwrite(
        path, ds, implicit_vr=ts == ILE, little_endian=not big, enforce_file_format=True
    )
    path.write_bytes(path.read_bytes().replace(b"MARKERXXXX", b"Bad\xff\xfeNam\xc3("))
    return path


@pytest.mark.parametrize("ts", [ILE, ELE, "1.2.840.10008.1.2.2"])
def test_bytes_invalid_in_the_character_set_are_kept(ts: str, tmp_path: Path) -> None:
    # Implicit VR and big endian data sets must be rewritten as Explicit VR Little
    # Endian: the values are copied as received, never decoded and encoded again.
    src = _with_invalid_utf8_name(tmp_path / "name.dcm", ts)
    result, dst = run(src, tmp_path)
    assert result.outcome == "compressed", result.reason
    assert pydicom.dcmread(dst).get_item(0x00100010).value == b"Bad\xff\xfeNam\xc3("


def test_element_pydicom_would_reencode_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left to pydicom, an Implicit VR data set is decoded and encoded again, and bytes
    # invalid in the declared character set come back changed: verification sees it.
    monkeypatch.setattr(transcode_module, "_to_explicit_little", lambda ds, **kw: None)
    src = _with_invalid_utf8_name(tmp_path / "implicit.dcm", ILE)
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == ("fallback", "data element (0010,0010) changed")


def test_trailing_spaces_of_an_implicit_vr_original_are_kept(tmp_path: Path) -> None:
    # gdcm-US-ALOKA-16: Institution Name '*NO INFO NO INFO*      NO INFO          '
    # (pydicom would drop the trailing spaces when encoding it again).
    src = corpus.testdata("gdcm-US-ALOKA-16.dcm")
    _, dst = compressed(src, tmp_path)
    want = pydicom.dcmread(src).get_item(0x00080080).value
    assert want.endswith(b"      ")
    assert pydicom.dcmread(dst).get_item(0x00080080).value == want


def test_existing_dst_is_removed_when_not_compressed(tmp_path: Path) -> None:
    dst = tmp_path / "stale.dcm"
    dst.write_bytes(b"stale")
    result = transcode(corpus.testdata("rtplan.dcm"), dst)
    assert result.outcome == "passthrough" and not dst.exists()


def test_missing_source_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        transcode(tmp_path / "nope.dcm", tmp_path / "out.dcm")


# -- property --------------------------------------------------------------------------
@st.composite
def images(draw: st.DrawFn) -> dict[str, Any]:
    # Every side from 1 up: under 32 pixels imagecodecs encodes, from 32 on pylibjpeg.
    # (sampled_from: st.integers() favours its bounds)
    side = st.sampled_from([*range(1, 65), *range(32, 65)])
    rows, columns, frames = draw(side), draw(side), draw(st.integers(1, 3))
    bits_allocated = draw(st.sampled_from([8, 16]))
    bits_stored = draw(st.sampled_from(range(1, bits_allocated + 1)))
    colour = draw(st.booleans())
    # Signed colour is only checked to pass through; spend few examples on it.
    signed = draw(st.sampled_from([False, False, False, True] if colour else [False, True]))
    if signed:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    shape = (frames, rows, columns) + ((3,) if colour else ())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pattern = draw(st.sampled_from(["noise", "low", "high", "extremes", "gradient"]))
    if pattern == "noise":
        arr = rng.integers(low, high, size=shape, endpoint=True)
    elif pattern in ("low", "high"):
        arr = np.full(shape, low if pattern == "low" else high)
    elif pattern == "extremes":
        arr = rng.choice([low, high], size=shape)
    else:
        arr = np.linspace(low, high, num=int(np.prod(shape))).round().reshape(shape)
    arr = arr.astype(np.int64)
    if frames == 1:
        arr = arr[0]
    return {
        "arr": arr,
        "frames": frames,
        "bits_allocated": bits_allocated,
        "bits_stored": bits_stored,
        "signed": signed,
        "photometric": "RGB" if colour else draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"])),
        "planar": draw(st.sampled_from([0, 1])) if colour else 0,
        "ts": draw(st.sampled_from([ELE, ILE, "1.2.840.10008.1.2.2"])),
    }


@settings(max_examples=50, deadline=None)
@given(images())
def test_round_trip_is_pixel_identical(image: dict[str, Any]) -> None:
    arr = image["arr"]
    with tempfile.TemporaryDirectory() as tmp:
        params = {k: v for k, v in image.items() if k != "arr"}
        src = make_image(Path(tmp) / "in.dcm", arr, **params)
        dst = Path(tmp) / "out.dcm"
        result = transcode(src, dst)
        event(result.outcome)
        rgb = image["photometric"] == "RGB"
        if image["bits_stored"] == 1:
            assert result.outcome == "passthrough" and "Bits Stored 1" in result.reason
        elif rgb and image["signed"]:
            assert (result.outcome, result.reason) == ("passthrough", "signed RGB")
        elif result.outcome == "fallback" and image["bits_stored"] == 2 and rgb:
            # The encoder's output buffer is too small for incompressible 2-bit colour
            # ("only N bytes remaining in output buffer"): refused, never wrong.
            assert result.reason.startswith("encoder error:"), result.reason
        else:
            assert result.outcome == "compressed", result.reason
            assert np.array_equal(stored(dst), arr)
            assert_same_elements(src, dst)
            assert_one_codestream_per_frame(dst)
        assert dst.exists() == (result.outcome == "compressed")

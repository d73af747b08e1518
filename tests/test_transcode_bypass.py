"""Large J2K frames go through glymur with BYPASS (code-block style bit 0); small ones,
and all of them without glymur, through imagecodecs as before.  Either way the result
is verified by the stage, and read back here by pydicom with two decoders that are
not the encoder (pylibjpeg-openjpeg, Pillow) and by GDCM."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import glymur
import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array

from gateway.pipeline import transcode as transcode_module

from .support import corpus
from .test_transcode import compressed, fragments, make_image, siz, stored, uses_mct


def code_block_style(codestream: bytes) -> int:
    pos = codestream.index(b"\xff\x52")  # COD, in the main header
    return codestream[pos + 12]


def assert_decoders_agree(src: Path, dst: Path) -> None:
    """pydicom with Pillow (its own OpenJPEG build) decodes exactly the stored cells;
    :func:`compressed` already did with pylibjpeg-openjpeg."""
    want = stored(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pixel_array(dst, raw=True, decoding_plugin="pillow")
    assert got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.fixture
def glymur_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], int]]:
    """(shape, modesw) of each frame glymur encodes."""
    calls: list[tuple[tuple[int, ...], int]] = []
    real = glymur.Jp2k

    def recording(filename: str, data: np.ndarray[Any, Any], **kwargs: Any) -> Any:
        calls.append((data.shape, kwargs["modesw"]))
        return real(filename, data=data, **kwargs)

    monkeypatch.setattr(glymur, "Jp2k", recording)
    return calls


def test_large_radiograph_goes_through_bypass(
    tmp_path: Path, glymur_calls: list[tuple[tuple[int, ...], int]]
) -> None:
    src = corpus.testdata("RG1_UNCR.dcm")  # 1955 x 1841, Bits Stored 15
    result, dst = compressed(src, tmp_path)
    assert glymur_calls == [((1955, 1841), 1)]
    _, (cs,) = fragments(dst)
    assert code_block_style(cs) == 0x01  # BYPASS, no other mode switch
    assert siz(cs) == [(15, False)]  # Bits Stored as the precision, not glymur's 16
    assert result.size_in / result.size_out > 1.5
    assert_decoders_agree(src, dst)
    assert not list(tmp_path.glob("*.j2k")), "glymur's temp file must be removed"


def _large(
    tmp_path: Path, *, bits_allocated: int, bits_stored: int, signed: bool, photometric: str
) -> tuple[Path, np.ndarray[Any, Any]]:
    """A 1024 x 1024 image using its whole range, extremes included."""
    rng = np.random.default_rng(bits_stored)
    low = -(1 << (bits_stored - 1)) if signed else 0
    high = (1 << (bits_stored - 1)) if signed else (1 << bits_stored)
    shape = (1024, 1024, 3) if photometric in ("RGB", "YBR_FULL") else (1024, 1024)
    arr = rng.integers(low, high, size=shape, dtype=np.int32)
    # Smooth regions too, so code blocks have bit-planes both coded and bypassed.
    arr[:512, :512] = (
        low + (np.arange(512) % min(64, high - low))[:, None] if arr.ndim == 2 else low
    )
    arr.flat[0], arr.flat[-1] = low, high - 1
    path = make_image(
        tmp_path / f"large-{photometric}-{bits_stored}.dcm", arr,
        bits_allocated=bits_allocated, bits_stored=bits_stored, signed=signed,
        photometric=photometric,
    )  # fmt: skip
    return path, arr


@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored", "signed", "photometric"),
    [
        (16, 16, False, "MONOCHROME2"),
        (16, 12, False, "MONOCHROME2"),
        (16, 14, True, "MONOCHROME2"),
        (16, 16, True, "MONOCHROME1"),
        (16, 7, False, "MONOCHROME2"),  # 8-bit components, 7 of them stored
        (8, 8, False, "MONOCHROME2"),
        (8, 5, True, "MONOCHROME2"),
        (8, 8, False, "RGB"),  # colour transform: stored as YBR_RCT
        (8, 8, False, "YBR_FULL"),  # no colour transform
    ],
)
def test_bypass_keeps_precision_sign_and_pixels(
    bits_allocated: int,
    bits_stored: int,
    signed: bool,
    photometric: str,
    tmp_path: Path,
    glymur_calls: list[tuple[tuple[int, ...], int]],
) -> None:
    src, arr = _large(
        tmp_path, bits_allocated=bits_allocated, bits_stored=bits_stored, signed=signed,
        photometric=photometric,
    )  # fmt: skip
    _, dst = compressed(src, tmp_path)
    assert len(glymur_calls) == 1
    _, (cs,) = fragments(dst)
    assert code_block_style(cs) == 0x01
    components = 3 if arr.ndim == 3 else 1
    assert siz(cs) == [(bits_stored, signed)] * components
    assert uses_mct(cs) == (photometric == "RGB")
    assert np.array_equal(stored(dst), arr)
    assert_decoders_agree(src, dst)


def test_multiframe_large_frames_in_parallel(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    glymur_calls: list[tuple[tuple[int, ...], int]],
) -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 1 << 10, size=(3, 1024, 1024), dtype=np.uint16)
    src = make_image(
        tmp_path / "mf.dcm", arr, bits_allocated=16, bits_stored=10, signed=False,
        photometric="MONOCHROME2", frames=3,
    )  # fmt: skip
    monkeypatch.setattr(transcode_module, "_threads", lambda: 2)
    _, dst = compressed(src, tmp_path)
    assert len(glymur_calls) == 3
    _, frags = fragments(dst)
    assert [code_block_style(cs) for cs in frags] == [0x01] * 3
    assert [siz(cs) for cs in frags] == [[(10, False)]] * 3
    assert not list(tmp_path.glob("*.j2k"))


@pytest.mark.skipif(not shutil.which("gdcmconv"), reason="Debian libgdcm-tools not installed")
def test_gdcm_decodes_bypass(tmp_path: Path) -> None:
    """GDCM (what Orthanc's GDCM plugin decodes with) reads the BYPASS codestream."""
    src = corpus.testdata("MR2_UNCR.dcm")  # 1024 x 1024, Bits Stored 12
    _, dst = compressed(src, tmp_path)
    _, (cs,) = fragments(dst)
    assert code_block_style(cs) == 0x01
    raw = tmp_path / "gdcm-raw.dcm"
    subprocess.run(["gdcmconv", "--raw", str(dst), str(raw)], check=True, capture_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = pydicom.pixels.pixel_array(raw, raw=True)
    assert np.array_equal(got, stored(src))


@pytest.mark.parametrize("name", ["693_UNCR.dcm", "CT_small.dcm", "US1_UNCR.dcm"])
def test_small_frames_unchanged(
    name: str, tmp_path: Path, glymur_calls: list[tuple[tuple[int, ...], int]]
) -> None:
    """Under 1 MP BYPASS makes files larger (CT 512 x 512: 8.5 %): imagecodecs, as before."""
    _, dst = compressed(corpus.testdata(name), tmp_path)
    assert glymur_calls == []
    _, frags = fragments(dst)
    assert all(code_block_style(cs) == 0 for cs in frags)


@pytest.mark.parametrize(
    ("rows", "columns", "bypass"),
    [(1024, 1024, True), (1023, 1024, False), (4096, 256, True), (8192, 255, False)],
)
def test_bypass_threshold(rows: int, columns: int, bypass: bool, tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns, ds.BitsStored, ds.PixelRepresentation = rows, columns, 12, 0
    encoder = transcode_module._bypass_encoder(ds, mct=False, numthreads=1, scratch=tmp_path / "x")
    assert (encoder is not None) == bypass


def test_without_glymur_imagecodecs_encodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transcode_module, "_glymur", lambda: None)
    src = corpus.testdata("MR2_UNCR.dcm")
    _, dst = compressed(src, tmp_path)
    _, (cs,) = fragments(dst)
    assert code_block_style(cs) == 0
    assert siz(cs) == [(12, False)]


def test_glymur_missing_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    transcode_module._glymur.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "glymur", None)  # import glymur: ImportError
        with caplog.at_level(logging.WARNING, logger="gateway.pipeline.transcode"):
            assert transcode_module._glymur() is None
            assert transcode_module._glymur() is None
        assert len(caplog.records) == 1
        assert "without BYPASS" in caplog.records[0].getMessage()
    finally:
        transcode_module._glymur.cache_clear()


def test_libopenjp2_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """glymur without a loadable libopenjp2 reports OpenJPEG 0.0.0."""
    transcode_module._glymur.cache_clear()
    try:
        monkeypatch.setattr(glymur.version, "openjpeg_version", "0.0.0")
        monkeypatch.setattr(glymur.version, "openjpeg_version_tuple", (0, 0, 0))
        with caplog.at_level(logging.WARNING, logger="gateway.pipeline.transcode"):
            assert transcode_module._glymur() is None
        assert "libopenjp2 0.0.0" in caplog.text
        monkeypatch.undo()
        transcode_module._glymur.cache_clear()
        assert transcode_module._glymur() is glymur  # the real library again
    finally:
        transcode_module._glymur.cache_clear()


def test_precision_not_patched_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the Ssiz patch the codestream says 16 bits for Bits Stored 12: refused."""
    monkeypatch.setattr(transcode_module, "_set_precision", lambda cs, bits, *, signed: cs)
    dst = tmp_path / "out.dcm"
    result = transcode_module.transcode(corpus.testdata("MR2_UNCR.dcm"), dst)
    assert result.outcome == "fallback"
    assert "codestream precision 16" in result.reason
    assert not dst.exists()
    assert not list(tmp_path.glob("*.j2k"))


def test_encoder_error_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(filename: str, **kwargs: Any) -> None:
        Path(filename).write_bytes(b"half a codestream")
        raise glymur.lib.openjp2.OpenJPEGLibraryError("encoder exploded")

    monkeypatch.setattr(glymur, "Jp2k", fails)
    dst = tmp_path / "out.dcm"
    result = transcode_module.transcode(corpus.testdata("MR2_UNCR.dcm"), dst)
    assert result.outcome == "fallback"
    assert "encoder exploded" in result.reason
    assert not list(tmp_path.glob("*.j2k"))


@pytest.mark.parametrize(("style", "accepted"), [(0x00, True), (0x01, True), (0x03, False)])
def test_header_check_allows_exactly_bypass(style: int, accepted: bool, tmp_path: Path) -> None:
    """Other mode switches (here RESET with BYPASS) are Part 1 too, but not what the
    encoder was asked for: the header check refuses them."""
    path = tmp_path / "x.j2k"
    glymur.Jp2k(str(path), data=np.zeros((64, 64), np.uint16), modesw=style)
    cs = path.read_bytes()
    assert code_block_style(cs) == style
    check = transcode_module._check_codestream
    if accepted:
        check(cs, 16, signed=False, mct=False)
    else:
        with pytest.raises(transcode_module._NotCompressed, match="code-block style 0x03"):
            check(cs, 16, signed=False, mct=False)

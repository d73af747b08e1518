"""The J2K stage's threads: frames of a multi-frame instance in a thread pool, a single
frame with OpenJPEG's own threads.  Neither may change a byte of the result, and
independent decoders (pydicom with pylibjpeg-openjpeg, GDCM) read it back exactly."""

from __future__ import annotations

import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from gateway.pipeline import transcode as transcode_module

from .support import corpus
from .test_transcode import compressed, make_image, stored


def _multiframe(tmp_path: Path, frames: int = 12) -> Path:
    rng = np.random.default_rng(13)
    arr = rng.integers(0, 4096, size=(frames, 48, 40), dtype=np.uint16)
    return make_image(
        tmp_path / "mf.dcm", arr, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2", frames=frames,
    )  # fmt: skip


def _encode_with(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> tuple[bytes, list[tuple[int, int]]]:
    """The result with *threads* encoder threads, and (thread, numthreads) per call."""
    calls: list[tuple[int, int]] = []
    real = transcode_module.imagecodecs.jpeg2k_encode

    def recording(data: np.ndarray[Any, Any], **kwargs: Any) -> bytes:
        calls.append((threading.get_ident(), kwargs["numthreads"]))
        return real(data, **kwargs)  # type: ignore[no-any-return]

    with monkeypatch.context() as m:
        m.setattr(transcode_module, "_threads", lambda: threads)
        m.setattr(transcode_module.imagecodecs, "jpeg2k_encode", recording)
        out = tmp_path / f"t{threads}"
        out.mkdir()
        _, dst = compressed(src, out)
    return dst.read_bytes(), calls


@pytest.mark.parametrize("name", ["emri_small.dcm", "693_UNCR.dcm", "US1_UNCR.dcm", None])
def test_threads_do_not_change_a_byte(
    name: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _multiframe(tmp_path) if name is None else corpus.testdata(name)
    frames = int(pydicom.dcmread(src, stop_before_pixels=True).get("NumberOfFrames") or 1)
    serial, serial_calls = _encode_with(src, tmp_path, monkeypatch, threads=1)
    parallel, parallel_calls = _encode_with(src, tmp_path, monkeypatch, threads=4)
    assert parallel == serial
    assert len(serial_calls) == len(parallel_calls) == frames
    main = threading.get_ident()
    assert serial_calls == [(main, 1)] * frames
    if frames > 1:  # frames go to the pool, one OpenJPEG thread each
        assert all(ident != main and n == 1 for ident, n in parallel_calls)
    else:  # one frame: OpenJPEG's own threads
        assert parallel_calls == [(main, 4)]


@pytest.mark.skipif(not shutil.which("gdcmconv"), reason="Debian libgdcm-tools not installed")
@pytest.mark.parametrize("name", ["emri_small.dcm", "693_UNCR.dcm", "US1_UNCR.dcm", None])
def test_gdcm_decodes_threaded_results(
    name: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GDCM, an independent reader, decompresses what threads encoded, exactly."""
    src = _multiframe(tmp_path) if name is None else corpus.testdata(name)
    monkeypatch.setattr(transcode_module, "_threads", lambda: 4)
    _, dst = compressed(src, tmp_path)  # pydicom's pylibjpeg-openjpeg decodes it exactly
    raw = tmp_path / "gdcm-raw.dcm"
    subprocess.run(["gdcmconv", "--raw", str(dst), str(raw)], check=True, capture_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = stored(src)
        got = pydicom.pixels.pixel_array(raw, raw=True)
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_a_bad_frame_among_many_stops_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = transcode_module.imagecodecs.jpeg2k_encode

    def fails_once(data: np.ndarray[Any, Any], **kwargs: Any) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("codec exploded")
        return real(data, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(transcode_module, "_threads", lambda: 2)
    monkeypatch.setattr(transcode_module.imagecodecs, "jpeg2k_encode", fails_once)
    dst = tmp_path / "out.dcm"
    result = transcode_module.transcode(_multiframe(tmp_path, frames=200), dst)
    assert result.outcome == "fallback"
    assert result.reason == "encoder error: RuntimeError: codec exploded"
    assert not dst.exists()
    assert len(calls) < 200  # frames not started yet were dropped

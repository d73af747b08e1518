"""The J2K stage works frame by frame: the original's Pixel Data is never read whole,
at most a few frames are in flight, and each verified codestream is written as it
comes.  What it writes is what pydicom's ``encapsulate`` writes for the same
codestreams, and elements after Pixel Data are kept."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder

from gateway.pipeline import transcode as transcode_module

from .support import corpus
from .test_transcode import compressed, make_image, run
from .test_transcode_fidelity import NATIVE_FILES

CODECS = ["j2k-lossless", "htj2k-lossless"]
FRAMES = 96


def _multiframe(tmp_path: Path, frames: int = FRAMES, side: int = 128) -> Path:
    # Noise: the codestreams are about as large as the frames, so holding them all
    # would show as much as holding the original.
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 4096, size=(frames, side, side), dtype=np.uint16)
    return make_image(
        tmp_path / "mf.dcm", arr, bits_allocated=16, bits_stored=12, signed=False,
        photometric="MONOCHROME2", frames=frames,
    )  # fmt: skip


@pytest.mark.parametrize("codec", CODECS)
def test_a_multi_frame_instance_is_never_in_memory_whole(
    codec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python-side allocations (NumPy's included) stay far below the Pixel Data's size.

    tracemalloc counts exactly, so this is not a noisy figure: holding the original
    Pixel Data, the frame list or the encoded frames once makes the peak at least the
    size of the Pixel Data (about 22 MiB here before the stage worked frame by frame);
    frame by frame it is a few frames (each 32 KiB) and pydicom's parsing.  The
    codestreams kept to compare the written file with are capped (16 MiB, SHA-256
    beyond it); the cap is 256 KiB here, so these 3 MiB of codestreams go past it.
    """
    src = _multiframe(tmp_path)
    pixel_bytes = FRAMES * 128 * 128 * 2  # 3 MiB
    monkeypatch.setattr(transcode_module, "_threads", lambda: 2)
    monkeypatch.setattr(transcode_module, "_KEEP_BYTES", 256 * 1024)
    tracemalloc.start()
    try:
        result, _ = run(src, tmp_path, codec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.outcome == "compressed", result.reason
    assert peak < pixel_bytes / 4, f"peak {peak} bytes for {pixel_bytes} of pixel data"
    compressed(src, tmp_path, codec)  # and it is the complete, exact result


def test_frames_in_flight_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader is never more than threads + 1 frames ahead of the writer."""
    src = _multiframe(tmp_path, frames=40, side=32)
    threads = 3
    monkeypatch.setattr(transcode_module, "_threads", lambda: threads)
    lock = threading.Lock()
    read = written = ahead = 0
    real_read, real_write = transcode_module._stored_frames, transcode_module._write

    def counting_read(*args: Any) -> Any:
        frames = real_read(*args)  # now: it takes what it needs from the data set

        def counted() -> Any:
            nonlocal read, ahead
            for frame in frames:
                with lock:
                    read += 1
                    ahead = max(ahead, read - written)
                yield frame

        return counted()

    def counting_write(ds: Any, dst: Path, codestreams: Any, count: int) -> list[bytes]:
        def counted() -> Any:
            nonlocal written
            for cs in codestreams:
                yield cs
                with lock:
                    written += 1

        return real_write(ds, dst, counted(), count)  # type: ignore[no-any-return]

    monkeypatch.setattr(transcode_module, "_stored_frames", counting_read)
    monkeypatch.setattr(transcode_module, "_write", counting_write)
    compressed(src, tmp_path)
    assert (read, written) == (40, 40)
    assert 1 < ahead <= threads + 1


@pytest.mark.parametrize("name", ["emri_small.dcm", "US1_UNCR.dcm", "MR_small_bigendian.dcm"])
def test_pixel_data_is_what_encapsulate_writes(name: str, tmp_path: Path) -> None:
    """The hand-off from the encoder threads to the file writes the same bytes as
    pydicom's ``encapsulate`` (one fragment per frame, a Basic Offset Table)."""
    _, dst = compressed(corpus.testdata(name), tmp_path)
    ds = pydicom.dcmread(dst)
    frames = int(ds.get("NumberOfFrames") or 1)
    codestreams = list(generate_frames(ds.PixelData, number_of_frames=frames))
    assert ds.PixelData == encapsulate(codestreams)
    assert len(codestreams) == frames


def test_elements_after_pixel_data_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "padded.dcm"
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    ds.add_new(0xFFFCFFFC, "OB", b"\x01\x02" * 10)  # Data Set Trailing Padding
    ds.save_as(src, enforce_file_format=True)
    _, dst = compressed(src, tmp_path)
    out = pydicom.dcmread(dst)
    assert out[0xFFFCFFFC].value == b"\x01\x02" * 10
    assert list(out.keys())[-2:] == [0x7FE00010, 0xFFFCFFFC]


def test_a_truncated_deferred_pixel_data_is_a_fallback(tmp_path: Path) -> None:
    src = _multiframe(tmp_path, frames=8)
    data = src.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-1000])
    result, _ = run(truncated, tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        f"pixel data is {8 * 128 * 128 * 2 - 1000} bytes, {8 * 128 * 128 * 2} expected",
    )


def test_a_failing_frame_leaves_no_file_and_stops_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _multiframe(tmp_path, frames=40, side=32)
    monkeypatch.setattr(transcode_module, "_threads", lambda: 2)
    read = 0
    real_read = transcode_module._stored_frames

    def counting_read(*args: Any) -> Any:
        frames = real_read(*args)

        def counted() -> Any:
            nonlocal read
            for frame in frames:
                read += 1
                yield frame

        return counted()

    real_encode = transcode_module.imagecodecs.jpeg2k_encode
    calls = 0

    def fails_on_the_fifth(data: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("frame 5 exploded")
        return real_encode(data, **kwargs)

    monkeypatch.setattr(transcode_module, "_stored_frames", counting_read)
    monkeypatch.setattr(transcode_module.imagecodecs, "jpeg2k_encode", fails_on_the_fifth)
    result, _ = run(src, tmp_path)  # asserts no dst is left behind
    assert result.outcome == "fallback" and "frame 5 exploded" in result.reason
    assert read < 10


@pytest.mark.parametrize("keep", [0, 1 << 30])
def test_a_fragment_changed_after_writing_is_a_fallback(
    keep: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The written file is read back: a fragment that is not the verified codestream
    is refused, whether it is compared byte for byte or (beyond the cap) by SHA-256."""
    src = _multiframe(tmp_path, frames=6, side=32)
    monkeypatch.setattr(transcode_module, "_KEEP_BYTES", keep)
    real_verify = transcode_module._verify_elements

    def corrupting(src: Path, dst: Path, **kwargs: Any) -> None:
        data = bytearray(dst.read_bytes())
        frames = list(generate_frames(pydicom.dcmread(dst).PixelData, number_of_frames=6))
        at = bytes(data).index(frames[3]) + len(frames[3]) // 2
        data[at] ^= 0x01
        dst.write_bytes(bytes(data))
        real_verify(src, dst, **kwargs)

    monkeypatch.setattr(transcode_module, "_verify_elements", corrupting)
    result, _ = run(src, tmp_path)
    assert (result.outcome, result.reason) == (
        "fallback",
        "written frame 3 is not the verified codestream",
    )


@pytest.mark.parametrize("src", NATIVE_FILES, ids=lambda p: p.name)
def test_frames_read_by_offset_are_what_pydicom_decodes(src: Path) -> None:
    """Little endian frames are read straight from the file into arrays: each must be
    what pydicom's decoder yields for it, dtype and shape included."""
    ds = pydicom.dcmread(src, defer_size=transcode_module._DEFER_BYTES)
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        transcode_module._check_policy(ds)
    except transcode_module._NotCompressed:
        return  # not compressed: its frames are never read
    if transcode_module._little_endian_layout(ds, ts) is None:
        return  # read by pydicom's decoder itself
    options = {"raw": True, "correct_unused_bits": False}
    expected = [arr for arr, _ in get_decoder(ts).iter_array(pydicom.dcmread(src), **options)]
    try:
        frames = list(transcode_module._stored_frames(ds, src, ts))
    except transcode_module._NotCompressed as exc:
        assert "Bits Stored" in exc.reason
        return
    assert len(frames) == len(expected)
    for frame, reference in zip(frames, expected, strict=True):
        assert frame.dtype == reference.dtype.newbyteorder("=")
        assert frame.shape == reference.shape
        assert np.array_equal(frame, reference)

"""Test data: pydicom's test files (pydicom + pydicom-data) and instances made from them."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

# One file per transfer syntax storescu can send, plus a second where the first is
# not representative (multi-frame, colour).  Files without SOP UIDs or File Meta are
# not sendable by storescu and are left out.
BY_TRANSFER_SYNTAX = {
    "1.2.840.10008.1.2": ["MR_small_implicit.dcm", "rtplan.dcm"],
    "1.2.840.10008.1.2.1": ["CT_small.dcm", "SC_rgb_small_odd.dcm"],
    "1.2.840.10008.1.2.2": ["MR_small_bigendian.dcm", "SC_rgb_small_odd_big_endian.dcm"],
    "1.2.840.10008.1.2.1.99": ["image_dfl.dcm"],
    "1.2.840.10008.1.2.4.50": ["SC_rgb_small_odd_jpeg.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
    "1.2.840.10008.1.2.4.51": ["JPEG-lossy.dcm"],
    "1.2.840.10008.1.2.4.70": ["JPGLosslessP14SV1_1s_1f_8b.dcm"],
    "1.2.840.10008.1.2.4.80": ["MR_small_jpeg_ls_lossless.dcm"],
    "1.2.840.10008.1.2.4.81": ["JPEGLSNearLossless_08.dcm"],
    "1.2.840.10008.1.2.4.90": ["MR_small_jp2klossless.dcm", "emri_small_jpeg_2k_lossless.dcm"],
    "1.2.840.10008.1.2.4.91": ["JPEG2000.dcm"],
    "1.2.840.10008.1.2.5": ["MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"],
}

MULTI_FRAME = ["emri_small.dcm", "SC_rgb_rle_2frame.dcm", "emri_small_RLE.dcm"]
VENDOR_PRIVATE = ["MR-SIEMENS-DICOM-WithOverlays.dcm", "CT_small.dcm"]
CHARSET_FILES = [
    "chrArab.dcm", "chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrH31.dcm", "chrH32.dcm",
    "chrHbrw.dcm", "chrI2.dcm", "chrJapMulti.dcm", "chrKoreanMulti.dcm", "chrRuss.dcm",
    "chrX1.dcm", "chrX2.dcm",
]  # fmt: skip


def testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name}: not in pydicom's test data (install pydicom-data)")
    return Path(path)


def charset_file(name: str) -> Path:
    (path,) = get_charset_files(name)
    return Path(path)


def with_new_uids(src: Path, dst: Path, study: str | None = None) -> Dataset:
    """Copy *src* to *dst* with fresh SOP Instance / Series (and Study) UIDs."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return ds


def with_private_tags(src: Path, dst: Path) -> Dataset:
    """*src* with a private block holding text, binary and a nested private sequence."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0029, "GATEWAY TEST", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "OB", bytes(range(256)))
    inner = Dataset()
    inner_block = inner.private_block(0x0031, "GATEWAY NESTED", create=True)
    inner_block.add_new(0x10, "UL", 0xDEADBEEF)
    block.add_new(0x03, "SQ", Sequence([inner]))
    ds.save_as(dst, enforce_file_format=True)
    return ds

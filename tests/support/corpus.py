"""Test data: pydicom's test files (pydicom + pydicom-data) and instances made from them."""

from __future__ import annotations

from dataclasses import dataclass
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


# -- the conformance matrix corpus (issue 11) ------------------------------------------
#
# Public files from pydicom's test data and pydicom-data, sent by every SCU of
# tests/test_conformance_matrix.py and by tests/bench/conformance.py.  Each SCU gets
# its own copies (:func:`write_matrix_corpus`) in which only the SOP Instance UID (and
# its File Meta copy) is new, so one archive holds every SCU's instances.  A few
# entries are *rewritten copies* of public files, named in ``rewrite``: no public file
# of that kind exists (private SOP classes, some retired ones) or the public file lacks
# a Type 1 UID an archive needs.  The data set is otherwise the public file's.

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
RETIRED_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3"  # Ultrasound Multi-frame (Retired)
RETIRED_NM = "1.2.840.10008.5.1.4.1.1.5"  # Nuclear Medicine Image Storage (Retired)
RETIRED_XA_BIPLANE = "1.2.840.10008.5.1.4.1.1.12.3"  # X-Ray Angio Bi-Plane (Retired)
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # private: Siemens CSA Non-Image Storage
PHILIPS_PRIVATE = "1.3.46.670589.11.0.0.12.1"  # private: Philips MR Spectrum Storage
GE_PRIVATE = "1.2.840.113619.4.2"  # private: GE Private CT Image Storage


@dataclass(frozen=True)
class MatrixFile:
    """One corpus entry: a public file, what it exercises, and any documented rewrite."""

    name: str  # file name in pydicom's test data / pydicom-data / charset files
    features: str  # what it brings to the matrix (free text, shown in reports)
    sop_class: str = ""  # rewrite: SOP Class UID replaced by this one
    add_study_series: bool = False  # rewrite: the public file lacks Study/Series UIDs
    slow: bool = False  # large: only in the full (slow) run and the bench

    @property
    def label(self) -> str:
        suffix = f"@{self.sop_class}" if self.sop_class else ""
        return self.name + suffix

    @property
    def rewrite(self) -> str:
        parts = []
        if self.sop_class:
            parts.append(f"SOP Class UID -> {self.sop_class}")
        if self.add_study_series:
            parts.append("Study/Series Instance UIDs added")
        return "; ".join(parts)


_CHARSETS = {
    "chrArab.dcm": "ISO_IR 127 Arabic", "chrFren.dcm": "ISO_IR 100 French",
    "chrFrenMulti.dcm": "ISO_IR 100, multi-valued", "chrGerm.dcm": "ISO_IR 100 German",
    "chrGreek.dcm": "ISO_IR 126 Greek", "chrH31.dcm": "ISO 2022 IR 87 Japanese",
    "chrH32.dcm": "ISO 2022 IR 13 + IR 87 Japanese", "chrHbrw.dcm": "ISO_IR 138 Hebrew",
    "chrI2.dcm": "ISO 2022 IR 149 Korean", "chrJapMulti.dcm": "ISO 2022 IR 87, private tags",
    "chrJapMultiExplicitIR6.dcm": "ISO 2022 IR 6 + IR 87",
    "chrKoreanMulti.dcm": "ISO 2022 IR 149, no pixels", "chrRuss.dcm": "ISO_IR 144 Cyrillic",
    "chrX1.dcm": "ISO_IR 192 UTF-8", "chrX2.dcm": "GB18030 Chinese",
}  # fmt: skip

MATRIX: list[MatrixFile] = [
    # Explicit VR Little Endian
    MatrixFile("CT_small.dcm", "CT, signed 16 bit, private tags"),
    MatrixFile("MR_small.dcm", "MR 16 bit"),
    MatrixFile("MR_small_padded.dcm", "MR, padded values"),
    MatrixFile("SC_rgb.dcm", "RGB 8 bit"),
    MatrixFile("SC_rgb_16bit.dcm", "RGB 16 bit"),
    MatrixFile("SC_rgb_2frame.dcm", "RGB, 2 frames"),
    MatrixFile("SC_rgb_32bit.dcm", "RGB 32 bit (J2K cannot hold it)"),
    MatrixFile("SC_rgb_small_odd.dcm", "RGB, odd size under 32 px"),
    MatrixFile("SC_ybr_full_uncompressed.dcm", "YBR_FULL native"),
    MatrixFile("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422 native"),
    MatrixFile("emri_small.dcm", "enhanced MR, 10 frames"),
    MatrixFile("liver_1frame.dcm", "segmentation, 1 bit"),
    MatrixFile(
        "MR-SIEMENS-DICOM-WithOverlays.dcm", "Siemens MR: icon sequence, CSA private tags, overlays"
    ),
    MatrixFile("examples_overlay.dcm", "MR with icon sequence and overlay"),
    MatrixFile("examples_palette.dcm", "US palette colour"),
    MatrixFile("examples_rgb_color.dcm", "US RGB"),
    MatrixFile("color-pl.dcm", "Ultrasound Image Storage (Retired), RGB planar"),
    MatrixFile("color-px.dcm", "Ultrasound Image Storage (Retired), RGB by pixel"),
    MatrixFile("explicit_VR-UN.dcm", "explicit UN elements"),
    MatrixFile("reportsi.dcm", "Basic Text SR, no pixels"),
    MatrixFile("test-SR.dcm", "Comprehensive SR"),
    MatrixFile("waveform_ecg.dcm", "12-lead ECG waveform, private tags"),
    MatrixFile("6154", "CR from a DICOMDIR set, private tags"),
    MatrixFile("17106", "CT from a DICOMDIR set, private tags"),
    MatrixFile("4919", "MR from a DICOMDIR set"),
    MatrixFile("vlut_04.dcm", "VOI LUT sequence"),
    # Implicit VR Little Endian
    MatrixFile("MR_small_implicit.dcm", "MR, implicit VR"),
    MatrixFile("rtplan.dcm", "RT Plan, implicit VR, no pixels"),
    MatrixFile("rtdose.dcm", "RT Dose, 32 bit, 15 frames"),
    MatrixFile("rtdose_1frame.dcm", "RT Dose, 1 frame"),
    MatrixFile("SC_rgb_jpeg_dcmd.dcm", "RGB, implicit VR"),
    # Explicit VR Big Endian (retired syntax)
    MatrixFile("MR_small_bigendian.dcm", "MR, big endian"),
    MatrixFile("MR_small_expb.dcm", "MR, big endian"),
    MatrixFile("SC_rgb_expb.dcm", "RGB, big endian"),
    MatrixFile("SC_rgb_expb_16bit.dcm", "RGB 16 bit, big endian"),
    MatrixFile("SC_rgb_small_odd_big_endian.dcm", "RGB odd size, big endian"),
    MatrixFile("emri_small_big_endian.dcm", "10 frames, big endian"),
    MatrixFile("liver_expb_1frame.dcm", "segmentation 1 bit, big endian"),
    MatrixFile("rtdose_expb.dcm", "RT Dose 32 bit, big endian"),
    MatrixFile("ExplVR_BigEnd.dcm", "US RGB, big endian"),
    # Deflated Explicit VR Little Endian
    MatrixFile("image_dfl.dcm", "deflated"),
    # JPEG Baseline / Extended (lossy)
    MatrixFile("SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline YBR_FULL"),
    MatrixFile("SC_rgb_small_odd_jpeg.dcm", "JPEG baseline, odd size"),
    MatrixFile("SC_rgb_dcmtk_+eb+cy+np.dcm", "JPEG baseline YBR_FULL_422"),
    MatrixFile("SC_jpeg_no_color_transform.dcm", "JPEG baseline RGB"),
    MatrixFile("examples_ybr_color.dcm", "JPEG baseline, 30 frames, private tags"),
    MatrixFile("JPEG-lossy.dcm", "JPEG extended 12 bit"),
    MatrixFile("JPGExtended.dcm", "JPEG extended 12 bit"),
    # JPEG Lossless SV1
    MatrixFile("JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG lossless, US"),
    MatrixFile("SC_rgb_jpeg_gdcm.dcm", "JPEG lossless RGB"),
    # JPEG-LS
    MatrixFile("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless"),
    MatrixFile("emri_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless, 10 frames"),
    MatrixFile("JPEGLSNearLossless_08.dcm", "JPEG-LS near-lossless", add_study_series=True),
    MatrixFile("SC_rgb_jls_lossy_line.dcm", "JPEG-LS near-lossless RGB", add_study_series=True),
    # JPEG 2000
    MatrixFile("MR_small_jp2klossless.dcm", "J2K lossless"),
    MatrixFile("emri_small_jpeg_2k_lossless.dcm", "J2K lossless, 10 frames"),
    MatrixFile("GDCMJ2K_TextGBR.dcm", "J2K lossless YBR_RCT"),
    MatrixFile("JPEG2000.dcm", "J2K (lossy allowed)"),
    MatrixFile("SC_rgb_gdcm_KY.dcm", "J2K RGB"),
    MatrixFile("693_J2KI.dcm", "J2K irreversible"),
    # RLE Lossless
    MatrixFile("MR_small_RLE.dcm", "RLE"),
    MatrixFile("SC_rgb_rle.dcm", "RLE RGB"),
    MatrixFile("SC_rgb_rle_2frame.dcm", "RLE RGB, 2 frames"),
    MatrixFile("SC_rgb_rle_16bit.dcm", "RLE RGB 16 bit"),
    MatrixFile("emri_small_RLE.dcm", "RLE, 10 frames"),
    MatrixFile("rtdose_rle.dcm", "RLE RT Dose 32 bit"),
    MatrixFile("OBXXXX1A_rle.dcm", "RLE palette colour, private tags"),
    # Retired and private SOP classes: rewritten copies of public files
    MatrixFile("US1_J2KR.dcm", "retired US, J2K", sop_class=RETIRED_US),
    MatrixFile("SC_rgb_rle_2frame.dcm", "retired US multi-frame", sop_class=RETIRED_US_MULTIFRAME),
    MatrixFile("MR_small.dcm", "retired NM", sop_class=RETIRED_NM),
    MatrixFile("emri_small.dcm", "retired XA bi-plane", sop_class=RETIRED_XA_BIPLANE),
    MatrixFile("CT_small.dcm", "Siemens CSA Non-Image (private)", sop_class=SIEMENS_CSA_NON_IMAGE),
    MatrixFile("MR_small_implicit.dcm", "Philips private class", sop_class=PHILIPS_PRIVATE),
    MatrixFile("MR_small_bigendian.dcm", "GE private class", sop_class=GE_PRIVATE),
    # Character sets (pydicom's charset files)
    *(MatrixFile(name, f"character set {what}") for name, what in _CHARSETS.items()),
    # Large files: the full run and the bench only
    MatrixFile("693_UNCR.dcm", "CT 512x512", slow=True),
    MatrixFile("MR2_UNCR.dcm", "MR 1024x1024", slow=True),
    MatrixFile("US1_UNCR.dcm", "US RGB 640x480", slow=True),
    MatrixFile("RG1_UNCR.dcm", "CR MONOCHROME1 7 MB", slow=True),
    MatrixFile("OBXXXX1A.dcm", "US palette colour, private tags", slow=True),
    MatrixFile("OBXXXX1A_2frame.dcm", "US palette colour, 2 frames", slow=True),
    MatrixFile("OBXXXX1A_expb.dcm", "US palette colour, big endian", slow=True),
    MatrixFile("gdcm-US-ALOKA-16.dcm", "US palette 16 bit, implicit VR", slow=True),
    MatrixFile("gdcm-US-ALOKA-16_big.dcm", "US palette 16 bit, big endian", slow=True),
    MatrixFile("eCT_Supplemental.dcm", "enhanced CT, 2 frames", slow=True),
    MatrixFile("mlut_18.dcm", "modality LUT", slow=True),
    MatrixFile("JPEG2000_UNC.dcm", "SC 16 bit, private tags", slow=True),
    MatrixFile("JPEG-LL.dcm", "JPEG lossless 16 bit", slow=True),
    MatrixFile("MR2_J2KI.dcm", "J2K irreversible MR", slow=True),
    MatrixFile("color3d_jpeg_baseline.dcm", "JPEG baseline, 120 frames, 6 MB", slow=True),
]

#: Public files left out of the matrix, and why.  Everything in pydicom's test data and
#: pydicom-data with a SOP Instance UID and File Meta is either in MATRIX or here.
EXCLUDED = {
    **dict.fromkeys(
        ["no_meta.dcm", "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm",
         "OT-PAL-8-face.dcm", "rtstruct.dcm"],
        "no File Meta Information: no SCU can tell its transfer syntax",
    ),
    **dict.fromkeys(
        ["chrSQEncoding.dcm", "chrSQEncoding1.dcm", "empty_charset_LEI.dcm",
         "nested_priv_SQ.dcm", "priv_SQ.dcm", "no_meta_group_length.dcm",
         "meta_missing_tsyntax.dcm", "UN_sequence.dcm", "DICOMDIR", "DICOMDIR-bigEnd",
         "DICOMDIR-empty.dcm", "DICOMDIR-implicit", "DICOMDIR-nooffset",
         "DICOMDIR-nopatient", "DICOMDIR-reordered"],
        "fragment or media directory, no SOP Class/Instance UID: not a storable instance",
    ),
    "emri_small_jpeg_2k_lossless_too_short.dcm": "deliberately truncated",
    "MR_truncated.dcm": "deliberately truncated pixel data",
    "rtplan_truncated.dcm": "deliberately truncated",
    "badVR.dcm": "deliberately invalid VR value (Number of Frames '1A')",
    "bad_sequence.dcm": "deliberately malformed sequence",
    "JPEG2000-embedded-sequence-delimiter.dcm": "deliberately malformed encapsulation",
    "J2K_pixelrep_mismatch.dcm": "deliberately inconsistent Pixel Representation vs codestream",
    "reportsi_with_empty_number_tags.dcm": "pydicom parser test (empty IS/DS), same SR as reportsi",
    "IM000000..IM00001D": "DICOMDIR stubs: CT class without pixel data",
    "JPEGLSNearLossless_16.dcm": "same as JPEGLSNearLossless_08.dcm at 16 bit; no Study/Series",
    "SC_rgb_jls_lossy_sample.dcm": "same as SC_rgb_jls_lossy_line.dcm; no Study/Series",
    "other duplicates": (
        "further variants of files already in MATRIX (SC_rgb_dcmtk_*, SC_rgb_expb_*, "
        "*_2frame, RG3_*, MR2_J2KR, 693_J2KR, US1_J2KI, ...): same encoder and layout"
    ),
}  # fmt: skip


#: Public files the test archive itself refuses, with or without the gateway: posted
#: unmodified to Orthanc 1.10.1 + DICOMweb 1.7 over STOW-RS they get HTTP 400 and
#: FailedSOPSequence 0xC000 ("STOW-RS: Missing a mandatory tag in incoming DICOM
#: file" in Orthanc's log), although they carry every UID.  The matrix expects them to
#: end ``failed`` with the archive's reason, never silently lost.
ARCHIVE_REFUSES = {
    "explicit_VR-UN.dcm": "Orthanc's STOW-RS refuses the public file (missing mandatory tag)",
    "rtdose_rle.dcm": "Orthanc's STOW-RS refuses the public file (missing mandatory tag)",
}


def matrix_files(*, full: bool) -> list[MatrixFile]:
    return [f for f in MATRIX if full or not f.slow]


def source_path(entry: MatrixFile) -> Path:
    if entry.name in _CHARSETS:
        return charset_file(entry.name)
    return testdata(entry.name)


@dataclass(frozen=True)
class CorpusCopy:
    entry: MatrixFile
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str


def write_matrix_corpus(directory: Path, *, full: bool) -> list[CorpusCopy]:
    """One copy of each corpus entry in *directory*, each with a fresh SOP Instance UID.

    Only the SOP Instance UID (and Media Storage SOP Instance UID) changes, plus the
    rewrite an entry names; every other element keeps its VR and bytes.  The copy, not
    the public file, is what an SCU sends and what the archive's copy is compared with.
    """
    directory.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, entry in enumerate(matrix_files(full=full)):
        ds = pydicom.dcmread(source_path(entry))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if entry.sop_class:
            ds.SOPClassUID = entry.sop_class
            ds.file_meta.MediaStorageSOPClassUID = entry.sop_class
        if entry.add_study_series:
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
        path = directory / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        copies.append(
            CorpusCopy(entry, path, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                       str(ds.file_meta.TransferSyntaxUID))
        )  # fmt: skip
    return copies

"""JPEG 2000 lossless transcoding of one spooled instance, verified before it is used.

:func:`transcode` is a pure function of its paths and codec, run in a worker process
by the pipeline.  It either writes a complete JPEG 2000 Lossless (1.2.840.10008.1.2.4.90)
copy of *src* to *dst* (or, as configured, High-Throughput JPEG 2000 Lossless:
1.2.840.10008.1.2.4.201, or .202 with the RPCL options; see **HTJ2K** below) and
returns outcome ``"compressed"``, or leaves no *dst* and says why the original should
be uploaded as it is:

* ``"passthrough"``: by policy, before any encoding: already compressed, no pixel
  data, a pixel format J2K lossless cannot hold exactly.
* ``"fallback"``: the input is malformed, a codec or write failed, or the result did
  not verify.  Bad input never raises; every such case ends here with a reason.

**Verification.**  Each codestream is checked before it is written: it
decodes, with pylibjpeg-openjpeg (another build and binding of OpenJPEG than the
encoder's), to the same integers as the original's stored pixel cells (compared as
stored, *without* masking the bits above Bits Stored, so noise or overlays in those
bits are never silently dropped), and its main header has the original's precision
and signedness.  The written file is then read back: its Pixel Data must be exactly
those codestreams, one per frame (compared byte for byte, or by SHA-256 beyond 16 MiB
of codestreams, which are not kept), and every other data element, at every sequence
depth, must have the same value bytes as received (byte-swapped where a big endian
original requires it).
With an Explicit VR original, each element keeps the VR written in the file
(an Implicit VR original has none; the copy then carries the dictionary's VR, or UN
for private tags pydicom does not know).  What may change is listed in
:data:`_CHANGED_BY_COMPRESSION` (:data:`_ICON_CHANGED` in each icon) and the File
Meta Information's Transfer Syntax and Implementation identifiers.  Lossy Image
Compression (0028,2110) is not set: JPEG 2000 lossless is not lossy (PS3.3 C.7.6.1.1.5).

**What is compressed.**  Native (Implicit/Explicit VR Little Endian, Explicit VR Big
Endian) data sets whose top-level Pixel Data has Bits Allocated 8 or 16, Bits Stored
2..Bits Allocated with High Bit = Bits Stored - 1, any number of rows and columns, and
one of MONOCHROME1/2 (signed or unsigned), PALETTE COLOR, RGB or YBR_FULL (unsigned):
the combinations PS3.5 Table 8.2.4-1 allows for 1.2.840.10008.1.2.4.90.  RGB is stored
as YBR_RCT (the reversible colour transform: ultrasound comes out at less than half the
size it has with RGB kept); colour is written with Planar Configuration 0 as PS3.5
8.2.4 requires; PALETTE COLOR is one component and its LUTs stay as they are.

**Encoder.**  OpenJPEG through imagecodecs: reversible 5/3 wavelet, one raw J2K
codestream per frame (PS3.5 A.4.4: no JP2 wrapper), one tile, Bits Stored as the
precision, 6 resolutions where both sides allow it (what pydicom's pylibjpeg-openjpeg
encoder writes, byte for byte), fewer for smaller images (see
:func:`_encoder_options`), encapsulated one fragment per frame with a Basic Offset
Table, as pydicom's ``encapsulate`` does (:func:`_write`).  Every core is used on
every image size: the frames of a multi-frame instance are encoded in a thread pool
(imagecodecs lets go of the interpreter lock), a single frame with OpenJPEG's own
encoder threads, while the calling thread verifies the codestreams already done.
Frames of a megapixel or more are encoded by OpenJPEG through glymur instead, with
the BYPASS code-block style, which costs a third less CPU to encode and verify there
(:func:`_bypass_encoder`); imagecodecs without glymur.

**HTJ2K.**  JPEG 2000 Part 15 codestreams (PS3.5 8.2.14: the same Photometric
Interpretations, so the same policy and RGB as YBR_RCT) encoded by OpenJPH through
imagecodecs, and verified exactly like J2K but decoded by OpenJPEG (pylibjpeg-openjpeg),
another implementation; the header check also requires Part 15 in Rsiz and CAP and HT
code blocks, and for .202 RPCL order, TLM markers and a lowest resolution of at most
64 pixels a side (PS3.5 10.18).  OpenJPH takes any image size.  See
:func:`_encode_htj2k` for how Bits Stored below 8 or 16 becomes the precision.

**Icon images.**  The Transfer Syntax applies to the whole data set (PS3.5 A.4;
PS3.10 7.2: it cannot change inside it).  Read that way, every Pixel Data
(7FE0,0010), an icon's included, is encoded with it (CP-165, which brought the Icon
Image Sequence into composite images, starts from that reading).  Readers also meet
native icons inside compressed data sets (DCMTK keeps one native if it was received
so, and tells the two apart by the Value Length), but the encoding that conforms
under any reading is encapsulated JPEG 2000 for the icon too.  So an icon is
compressed with the image (keeping its Photometric Interpretation, without the
colour transform: icons are a few KB; colour with Planar Configuration 0), and
verified like it.  An instance whose icon cannot be compressed passes through whole:
never a J2K data set with a native icon.

**Byte for byte.**  Implicit VR and big endian originals are rewritten as Explicit
VR Little Endian from the received value bytes (swapped per VR for big endian), not
decoded and encoded again by pydicom, which would drop trailing spaces, change bytes
not valid in the character set, and leave OW/OF/OL/OD/OV values in big endian order.

Everything else passes through:

* encapsulated transfer syntaxes: never decoded and re-encoded, lossy or not;
* Deflated Explicit VR Little Endian: the data set is compressed as a whole already,
  images in it are rare, and recompressing would mean inflating and rewriting it;
* no Pixel Data (SR, PDF, RT Plan...), Float or Double Float Pixel Data;
* Bits Allocated 1 (packed bits) or more than 16, and Bits Stored 1:
  pylibjpeg-openjpeg 2.6 fails on some 1-bit images and silently mis-encodes others;
* YBR_FULL_422 and other colour models J2K lossless does not allow, signed colour;
* an icon image (an item of the top-level Icon Image Sequence (0088,0200)) that
  could not itself be compressed by these rules, e.g. a YBR_FULL_422 one, and Pixel
  Data nested anywhere else (a private sequence, an icon below the top level), which
  PS3.3 does not define;
* pixel cells with bits set above Bits Stored (overlays, noise), which J2K drops.

**Memory.**  Frame by frame, whatever the instance's size: the original is read
with its Pixel Data deferred, and its frames are read from the file one at a time
(:func:`_stored_frames`); at most one frame more than there are
encoder threads is in flight (the frame, its codestream, and the one decoded for
verification), and each verified codestream is written to the file as it comes
(:func:`_write`); up to 16 MiB of them are kept for the read-back comparison,
only the SHA-256 of the rest.  A single large frame is held once, plus
its decoded copy and OpenJPEG's own buffers (and, through glymur, its offset copy
and the codestream read back from the temp file).  Reading the result back does not load
its Pixel Data: it is compared one fragment at a time.  Other values over 64 KiB are
read from the file when they are written or compared.  Nothing is cached between
calls.  A 300 MB, 572-frame instance peaks at about 80 MiB in its encoder process
(``tests/bench/transcode.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import itertools
import logging
import os
import signal
import struct
import time
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
from openjpeg.utils import decode as openjpeg_decode
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import BaseTag, ItemTag, SequenceDelimiterTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pydicom.valuerep import AMBIGUOUS_VR

log = logging.getLogger(__name__)


class TranscodeOutcome(StrEnum):
    """What became of an instance (kept in the queue row's ``transcode_outcome``)."""

    COMPRESSED = "compressed"  # the J2K copy is written
    PASSTHROUGH = "passthrough"  # not compressed, by policy: the original goes up
    FALLBACK = "fallback"  # could not be compressed: the original goes up


#: ``upload.compression`` values that compress, and the transfer syntax each writes.
CODECS: dict[str, UID] = {
    "j2k-lossless": JPEG2000Lossless,
    "htj2k-lossless": HTJ2KLossless,
    "htj2k-lossless-rpcl": HTJ2KLosslessRPCL,
}
_HTJ2K = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL})
#: PS3.5 10.18: with RPCL, the lowest resolution is at most this many pixels a side.
_RPCL_BASE = 64

_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
# Transfer syntaxes that are lossy by definition; the other encapsulated ones may be
# lossless (or, like 1.2.840.10008.1.2.4.91, either), so they are only "compressed".
_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless}
_LOSSY_PREFIXES = ("1.2.840.10008.1.2.4.10",)  # MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265

# (Photometric Interpretation, Samples per Pixel) -> signed allowed (PS3.5 8.2.4-1).
_PHOTOMETRIC = {
    ("MONOCHROME1", 1): True,
    ("MONOCHROME2", 1): True,
    ("PALETTE COLOR", 1): False,
    ("RGB", 3): False,
    ("YBR_FULL", 3): False,
}

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = {0x7FE00008: "Float Pixel Data", 0x7FE00009: "Double Float Pixel Data"}
_EXTENDED_OFFSETS = {0x7FE00001, 0x7FE00002}
_PHOTOMETRIC_TAG = 0x00280004
_PLANAR_TAG = 0x00280006
_ICON_SEQUENCE = 0x00880200
#: Elements of an Icon Image Sequence item compression rewrites; checked on their own.
_ICON_CHANGED = frozenset({_PIXEL_DATA, _PLANAR_TAG})
#: Top-level elements compression rewrites; each is checked on its own instead.
_CHANGED_BY_COMPRESSION = frozenset(
    {_PIXEL_DATA, _PHOTOMETRIC_TAG, _PLANAR_TAG, *_EXTENDED_OFFSETS}
)
#: File Meta elements rewritten for the new file (PS3.10 7.1: the implementation
#: identifiers name the writer of the file, which is now this gateway's pydicom).
_META_CHANGED = {0x00020000, 0x00020010, 0x00020012, 0x00020013}

# Value sizes of the VRs whose bytes depend on the byte order.
_SWAP_SIZE = {
    "US": 2, "SS": 2, "OW": 2, "AT": 2,
    "UL": 4, "SL": 4, "FL": 4, "OL": 4, "OF": 4,
    "FD": 8, "OD": 8, "SV": 8, "UV": 8, "OV": 8,
}  # fmt: skip
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Large values of the original are read from the file only when they are compared,
# so the verification pass does not hold a second copy of the Pixel Data.
_DEFER_BYTES = 64 * 1024
#: Written codestreams kept to compare the file with, up to this many bytes per
#: instance; beyond it only their SHA-256 (see :func:`_write`).
_KEEP_BYTES = 16 * 1024 * 1024
_REASON_MAX = 300

#: J2K frames this large (pixels, and each side at least :data:`_BYPASS_MIN_SIDE`)
#: are encoded with the BYPASS code-block style (:func:`_bypass_encoder`).  Measured
#: per frame, encode plus verify, CPU time: a 1955x1841 CR 1100 -> 766 ms and 2 %
#: smaller, a 1024x1024 MR 181 -> 146 ms and 0.7 % smaller, but a 512x512 CT, though
#: 45 -> 29 ms, 8.5 % larger: so smaller frames keep the default code-block style.
_BYPASS_MIN_PIXELS = 1024 * 1024
#: Every frame that takes BYPASS then gets 6 resolutions (as from imagecodecs).
_BYPASS_MIN_SIDE = 256
#: COD code-block style (ISO/IEC 15444-1 Table A.19): bit 0, selective arithmetic
#: coding bypass; bit 6 (Part 15), HT code blocks.
_CBLK_BYPASS = 0x01
_CBLK_HT = 0x40


#: Encoder processes run at this niceness (absolute, not added to the gateway's own
#: gateway.dicom.receivers.GATEWAY_NICENESS): the receivers and the uploader come first.
ENCODER_NICENESS = 10
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class TranscodeResult:
    outcome: TranscodeOutcome
    reason: str  # why not compressed; "" when compressed
    transfer_syntax: str  # of the file to upload
    size_in: int
    size_out: int  # == size_in unless compressed
    seconds: float


class _NotCompressed(Exception):
    def __init__(self, outcome: TranscodeOutcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


def _passthrough(reason: str) -> _NotCompressed:
    return _NotCompressed(TranscodeOutcome.PASSTHROUGH, reason)


def _fallback(reason: str) -> _NotCompressed:
    return _NotCompressed(TranscodeOutcome.FALLBACK, reason)


@contextlib.contextmanager
def _stage(what: str) -> Iterator[None]:
    """Turn anything pydicom, NumPy or OpenJPEG raise on bad data into a fallback.

    Malformed input surfaces as almost any exception type (KeyError, struct.error,
    RuntimeError from the codec, MemoryError for absurd dimensions...), and one bad
    instance must not take the compression stage down with it.
    """
    try:
        yield
    except _NotCompressed:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:_REASON_MAX]  # pydicom's are multi-line
        raise _fallback(f"{what}: {type(exc).__name__}: {detail}".rstrip(": ")) from exc


def transcode(src: Path, dst: Path, codec: str = "j2k-lossless") -> TranscodeResult:
    """Write a verified JPEG 2000 Lossless copy of *src* to *dst*, or say why not.

    *codec* is a key of :data:`CODECS`: ``"htj2k-lossless"`` writes High-Throughput
    JPEG 2000 (Lossless Only) instead, ``"htj2k-lossless-rpcl"`` its RPCL variant,
    verified the same way.

    *dst* exists afterwards only when the outcome is ``"compressed"``; it is complete
    and closed, and the caller fsyncs and renames it.  Raises only for an unreadable
    *src* path (OSError) and programming errors.
    """
    start = time.perf_counter()
    ts_out = CODECS[codec]  # KeyError: a programming error, config validates it
    size_in = src.stat().st_size
    ts_in = ""
    try:
        # pydicom reports odd but readable data as warnings; verification decides what
        # matters, and the worker's stderr should not fill up with them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _stage("cannot read data set"):
                # Pixel Data (and any other large value) stays in the file: it is
                # read frame by frame while the frames are encoded.
                ds = pydicom.dcmread(src, defer_size=_DEFER_BYTES)
                ts_in = str(ds.file_meta.get("TransferSyntaxUID", ""))
            _compress(ds, src, dst, ts_out)
        size_out = dst.stat().st_size
        return TranscodeResult(
            TranscodeOutcome.COMPRESSED, "", ts_out, size_in, size_out, time.perf_counter() - start
        )
    except _NotCompressed as nc:
        dst.unlink(missing_ok=True)
        return TranscodeResult(
            nc.outcome, nc.reason, ts_in, size_in, size_in, time.perf_counter() - start
        )
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


def init_encoder_process() -> None:
    """Process-pool initializer of the pipeline's encoder processes (gateway.pipeline.jobs).

    The encoder dies with the gateway, yields the CPU to it, and loads the codecs
    before its first instance.  It is here, not with the pipeline, so a spawned
    encoder imports only this module (NumPy, pydicom, the codecs), not the
    pipeline's (aiohttp and the rest): half the start-up CPU, 15 MiB less each.
    """
    _die_with_parent()
    with contextlib.suppress(OSError):
        os.setpriority(
            os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), ENCODER_NICENESS)
        )
    _load_codecs()


def _die_with_parent() -> None:
    """A worker whose gateway was SIGKILLed exits too, instead of living on and
    writing into a spool the next start already reconciled."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _load_codecs() -> None:
    """Load what a first transcode would load on first use (imagecodecs' codec
    modules, pylibjpeg-openjpeg, pydicom's native pixel decoder) with a tiny image."""
    img = np.zeros((16, 16), np.uint16)
    with contextlib.suppress(Exception):  # a real instance will say what is wrong
        openjpeg_decode(imagecodecs.jpeg2k_encode(img, level=0, codecformat="J2K", numthreads=1))
        openjpeg_decode(imagecodecs.htj2k_encode(img, reversible=True))
        get_decoder(ExplicitVRLittleEndian)
    _glymur()


@functools.cache
def _glymur() -> Any:
    """glymur, the OpenJPEG binding that can set BYPASS, or None (said once per process).

    Imported here, not with the module: only encoder processes need it (it brings
    lxml and Pillow, about 9 MiB).  glymur finds Debian's libopenjp2 (package
    libopenjp2-7) through ctypes; without it, or with one older than 2.4 (which
    glymur cannot write with), large J2K frames are encoded by imagecodecs like the
    others, without BYPASS: the same verified result, 2 % larger and slower.  glymur
    also reads a ``glymurrc`` naming the library from the working directory (the
    gateway's state directory under systemd, writable only by the gateway) or
    $XDG_CONFIG_HOME.
    """
    try:
        with warnings.catch_warnings():
            # glymur warns (and leaves the library unset) when libopenjp2 fails to load.
            warnings.simplefilter("ignore")
            import glymur

            version = tuple(glymur.version.openjpeg_version_tuple)
    except Exception as exc:  # ImportError, or anything a broken install raises
        log.warning("glymur unavailable (%s): J2K without BYPASS", exc)
        return None
    if version < (2, 4):
        log.warning(
            "libopenjp2 %s not found or older than 2.4 for glymur: J2K without BYPASS",
            glymur.version.openjpeg_version,
        )
        return None
    return glymur


def compressibility(src: Path) -> tuple[bool, str]:
    """Whether :func:`transcode` would try to compress *src*, and if not, why.

    The policy checks only, without encoding: ``(True, "")`` means the instance is
    one PS3.5 lets this stage store as JPEG 2000 Lossless, and :func:`transcode` only
    falls back from it on an encoder or verification failure.  The pixel data is
    decoded (bits above Bits Stored are a policy question), so this costs about a
    tenth of a transcode.  Raises only for an unreadable *src* path.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with _stage("cannot read data set"):
                ds = pydicom.dcmread(src, defer_size=_DEFER_BYTES)
            ts, _ = _check_policy(ds)
            for _frame in _stored_frames(ds, src, ts):
                pass  # each frame is checked for bits above Bits Stored as it is read
    except _NotCompressed as nc:
        return False, f"{nc.outcome}: {nc.reason}"
    return True, ""


@dataclass(frozen=True)
class _Icon:
    """An Icon Image Sequence item with Pixel Data, and its stored pixel cells."""

    index: int
    original: np.ndarray[Any, Any]


def _check_policy(ds: Dataset) -> tuple[UID, list[_Icon]]:
    """The policy checks that need no pixel of the image itself (its icons are small
    and decoded here); the image's frames are checked for bits above Bits Stored as
    :func:`_stored_frames` reads them."""
    ts = _check_transfer_syntax(ds)
    with _stage("invalid Image Pixel module"):
        icon_indexes = _check_pixel_module(ds)
    icons = []
    for index in icon_indexes:
        item = ds[_ICON_SEQUENCE].value[index]
        with _stage(f"cannot decode original icon image {index}"):
            arr = _stored_pixels(item, ts)
        _check_unused_bits(item, arr, where=f"icon image {index}: ")
        icons.append(_Icon(index, arr))
    return ts, icons


def _compress(ds: Dataset, src: Path, dst: Path, ts_out: UID) -> None:
    ts, icons = _check_policy(ds)

    # PS3.5 A.4: the Transfer Syntax applies to the whole data set, so an icon's
    # Pixel Data is encapsulated JPEG 2000 too; it keeps its Photometric
    # Interpretation (no colour transform: icons are tiny, and fewer elements change).
    encoded_icons: dict[int, list[bytes]] = {}
    for icon in icons:
        encoded_icons[icon.index] = _compress_icon(
            ds[_ICON_SEQUENCE].value[icon.index], icon.original, index=icon.index, ts_out=ts_out
        )
    del icons

    # Read before anything below changes the data set: the frames are decoded as
    # stored, in native byte order and colour-by-pixel whatever the original's byte
    # order and Planar Configuration.
    frames = _stored_frames(ds, src, ts)
    count = _frame_count(ds)
    rgb = ds.PhotometricInterpretation == "RGB"
    if rgb:
        # Both encoders apply the reversible colour transform when asked to (mct); the
        # data set then says YBR_RCT.
        ds.PhotometricInterpretation = "YBR_RCT"
    if ds.SamplesPerPixel == 3:
        # The reference frames are colour-by-pixel whatever the original layout.
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ts_out
    _read_deferred(ds, src)
    implicit, little = ds.original_encoding
    if implicit or not little:
        with _stage("cannot convert to Explicit VR Little Endian"):
            _to_explicit_little(ds, implicit=bool(implicit), big=not little, ancestors=[])
    meta: FileMetaDataset = ds.file_meta
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]

    codestreams = _encode_verified(
        ds, frames, count, mct=rgb, stage="encoder error", where="", ts_out=ts_out, scratch=dst
    )
    try:
        written = _write(ds, dst, codestreams, count)
    finally:
        # On an error: the encoder threads stop, the input file is closed.
        codestreams.close()
        frames.close()
    _verify_elements(
        src,
        dst,
        was_rgb=rgb,
        written=written,
        icons={index: _kept(encoded) for index, encoded in encoded_icons.items()},
    )


def _read_deferred(ds: Dataset, src: Path) -> None:
    """Read the deferred values of *ds* other than Pixel Data as the bytes stored in
    *src*: pydicom would read and convert a deferred value when writing it, which
    re-encodes it (and for a big endian original would not swap OW).  Only top-level
    values are deferred (pydicom reads sequence items whole)."""
    for tag in _tags(ds):
        if tag == _PIXEL_DATA:
            continue
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None:
            ds[tag] = elem._replace(value=_raw_bytes(elem, src))


def _to_explicit_little(
    ds: Dataset, *, implicit: bool, big: bool, ancestors: list[Dataset]
) -> None:
    """Make *ds* and its items write every value with the bytes as received.

    J2K is Explicit VR Little Endian.  Left to itself, pydicom converts an Implicit
    VR or big endian data set by decoding each value and encoding it again, which
    changes bytes (trailing spaces of a string dropped, values not valid in the
    character set) and, for OW/OF/OL/OD/OV, does not swap the byte order at all.
    Instead each raw element gets its VR (as written, or the one pydicom picks for
    Implicit VR: the dictionary's, UN for an unknown private tag) and its received
    bytes, byte-swapped per VR for a big endian original, so the writer copies them.
    Pixel Data is left alone: it is replaced by the encapsulated frames.
    """
    for tag in _tags(ds):
        if tag == _PIXEL_DATA:
            continue
        if _is_sequence(ds, tag):
            for item in ds[tag].value:
                _to_explicit_little(item, implicit=implicit, big=big, ancestors=[ds, *ancestors])
            continue
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement):
            # Already decoded (read by the checks above): pydicom encodes it again,
            # which the element comparison checks like every other value.
            if elem.VR in AMBIGUOUS_VR:
                correct_ambiguous_vr_element(elem, ds, True, [ds, *ancestors])
            continue
        vr = elem.VR
        if vr is None:
            converted = convert_raw_data_element(elem, ds=ds)
            vr = str(converted.VR)
            if vr == "SQ":  # a private sequence pydicom knows by its creator
                ds[tag] = converted
                for item in converted.value:
                    _to_explicit_little(
                        item, implicit=implicit, big=big, ancestors=[ds, *ancestors]
                    )
                continue
            if vr in AMBIGUOUS_VR:
                # "US or SS" and the like: decided by other elements; numbers come
                # out of pydicom's round trip unchanged.
                ds[tag] = converted
                correct_ambiguous_vr_element(converted, ds, True, [ds, *ancestors])
                continue
        value = elem.value
        if big and value and vr in _SWAP_SIZE:
            value = _byteswap(bytes(value), _SWAP_SIZE[vr])
        ds[tag] = elem._replace(VR=vr, value=value, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True)


def _compress_icon(
    item: Dataset, original: np.ndarray[Any, Any], *, index: int, ts_out: UID
) -> list[bytes]:
    if int(item.SamplesPerPixel) == 3:
        item.PlanarConfiguration = 0
    where = f"icon image {index}: "
    frames = original if _frame_count(item) > 1 else original[np.newaxis]
    encoded = list(
        _encode_verified(
            item,
            iter(frames),
            len(frames),
            mct=False,
            stage=f"encoder error in icon image {index}",
            where=where,
            ts_out=ts_out,
        )
    )
    _encapsulate(item, encoded)
    return encoded


def _frame_count(ds: Dataset) -> int:
    # pydicom would take a 0 or empty Number of Frames as 1; _check_image refuses it.
    return int(ds.NumberOfFrames) if "NumberOfFrames" in ds else 1


def _stored_frames(ds: Dataset, src: Path, ts: UID) -> Generator[np.ndarray[Any, Any]]:
    """The stored pixel cells of *ds*'s Pixel Data, read from *src* one frame at a time.

    Each frame is an array of integers as stored (not masked to Bits Stored, no colour
    conversion), in native byte order and colour-by-pixel whatever the original's
    byte order and Planar Configuration, and is checked for bits set above Bits
    Stored (:func:`_check_unused_bits`).  Each frame is read from the file where the
    deferred Pixel Data value is, so the whole value is never in memory: little
    endian frames straight into an array (:func:`_read_little_endian`), others
    (big endian, colour-by-plane) by pydicom's native decoder.  The layout is taken
    from *ds* now, before the caller changes its Photometric Interpretation or
    Planar Configuration.
    """
    with _stage("cannot decode original pixels"):
        elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
        vr = elem.VR or ("OW" if int(ds.BitsAllocated) > 8 else "OB")  # implicit VR
        options = as_pixel_options(
            ds, transfer_syntax_uid=ts, pixel_keyword="PixelData", pixel_vr=vr
        )
        value, offset = elem.value, 0
        if isinstance(elem, RawDataElement) and elem.value is None:  # deferred
            offset = elem.value_tell
            if (available := src.stat().st_size - offset) < elem.length:
                raise _fallback(f"pixel data is {max(0, available)} bytes, {elem.length} expected")
        layout = _little_endian_layout(ds, ts)
    if layout is not None:
        return _read_little_endian(ds, src, value, offset, *layout)
    return _read_frames(ds, src, ts, value, offset, options)


def _read_frames(
    ds: Dataset, src: Path, ts: UID, value: bytes | None, offset: int, options: dict[str, Any]
) -> Generator[np.ndarray[Any, Any]]:
    with contextlib.ExitStack() as stack:
        with _stage("cannot decode original pixels"):
            source: Any = value
            if value is None:
                source = stack.enter_context(open(src, "rb"))
                source.seek(offset)
            decoded = get_decoder(ts).iter_array(
                source, raw=True, correct_unused_bits=False, **options
            )
        while True:
            with _stage("cannot decode original pixels"):
                item = next(decoded, None)
            if item is None:
                return
            _check_unused_bits(ds, item[0])
            yield item[0]


def _little_endian_layout(
    ds: Dataset, ts: UID
) -> tuple[np.dtype[Any], tuple[int, ...], int] | None:
    """The dtype, shape and number of the frames of *ds* where its cells are stored
    exactly as that array (little endian, 8 or 16 bits, one sample or colour-by-pixel),
    else None: pydicom's decoder then reads the frames (big endian, colour-by-plane)."""
    spp = int(ds.SamplesPerPixel)
    if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or (
        spp != 1 and ds.get("PlanarConfiguration") != 0
    ):
        return None
    signed = "i" if ds.PixelRepresentation else "u"
    dtype = np.dtype(f"<{signed}{int(ds.BitsAllocated) // 8}")
    shape = (int(ds.Rows), int(ds.Columns)) + ((spp,) if spp > 1 else ())
    return dtype, shape, _frame_count(ds)


def _read_little_endian(
    ds: Dataset,
    src: Path,
    value: bytes | None,
    offset: int,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    count: int,
) -> Generator[np.ndarray[Any, Any]]:
    """The *count* frames of *ds* read from *src* at *offset* straight into arrays (or views
    on *value* when it was not deferred): what pydicom's decoder yields for them
    (``tests/test_transcode_stream.py`` compares the two), without its extra copy
    of each frame, which costs a few milliseconds on a 7 MB radiograph."""
    size = dtype.itemsize * int(np.prod(shape))
    with contextlib.ExitStack() as stack:
        f = None
        if value is None:
            with _stage("cannot decode original pixels"):
                f = stack.enter_context(open(src, "rb", buffering=0))
                f.seek(offset)
        for index in range(count):
            if f is None:
                with _stage("cannot decode original pixels"):
                    frame = np.frombuffer(value or b"", dtype, int(np.prod(shape)), index * size)
                frame = frame.reshape(shape)
            else:
                frame = np.empty(shape, dtype)
                with _stage("cannot decode original pixels"):
                    read = f.readinto(frame.data.cast("B"))
                if read != size:
                    raise _fallback(f"pixel data ends in frame {index}")
            _check_unused_bits(ds, frame)
            yield frame


def _threads() -> int:
    """Encoder threads for one image: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _encoder_options(ds: Dataset, *, mct: bool, numthreads: int) -> dict[str, Any]:
    """imagecodecs (OpenJPEG) settings for the frames of *ds*: lossless Part 1.

    Reversible 5/3 wavelet, raw codestream (codecformat J2K: PS3.5 A.4.4, no JP2
    wrapper), one tile, one quality layer, Bits Stored as the precision, signed when
    Pixel Representation is 1; *mct* applies the reversible colour transform (RGB
    stored as YBR_RCT).  Resolutions: OpenJPEG's default of 6 (what pydicom's
    pylibjpeg-openjpeg encoder always asks for: the codestreams are the same bytes),
    fewer where a side is under 2**5 pixels, which OpenJPEG refuses 6 for: then the
    most it allows for the smaller side, 2**(resolutions-1) <= side, at least 1 (no
    wavelet decomposition at all for a 1xN image); imagecodecs lowers it further to
    keep the lowest resolution 8 pixels or more (one level for 16x16).  PS3.5 sets
    no minimum size.  *numthreads* are OpenJPEG's own threads for one frame.
    """
    return {
        "level": 0,
        "codecformat": "J2K",
        "reversible": True,
        "bitspersample": int(ds.BitsStored),
        "resolutions": max(1, min(6, min(int(ds.Rows), int(ds.Columns)).bit_length())),
        "mct": mct,
        "planar": False,  # colour-by-pixel, as the reference frames are
        "numthreads": numthreads,
    }


def _encode_frame(
    frame: np.ndarray[Any, Any], dtype: np.dtype[Any], options: dict[str, Any]
) -> bytes:
    # imagecodecs writes the array's item size as the precision unless bitspersample
    # fits in that item (9..16 for a 16-bit array), and reads the array in native byte
    # order whatever its dtype says: it gets native 8-bit cells for Bits Stored <= 8
    # (the policy made sure the values fit), 16-bit ones otherwise.  A copy only
    # where the original differs (big endian, 8 bits stored in 16).
    data = np.ascontiguousarray(frame, dtype=dtype)
    return bytes(imagecodecs.jpeg2k_encode(data, **options))


def _frame_encoder(
    ds: Dataset, *, mct: bool, ts_out: UID, numthreads: int, scratch: Path | None = None
) -> Callable[[np.ndarray[Any, Any]], bytes]:
    """What encodes one frame of *ds* to *ts_out*: OpenJPEG or OpenJPH.

    J2K frames of :data:`_BYPASS_MIN_PIXELS` or more go through glymur with BYPASS
    (:func:`_bypass_encoder`) when *scratch* (a path of the encoder's own, whose
    name the temp files extend) is given and glymur is available; the others, and
    all of them otherwise, through imagecodecs.
    """
    if ts_out in _HTJ2K:
        return _htj2k_encoder(ds, mct=mct, rpcl=ts_out == HTJ2KLosslessRPCL)
    if scratch is not None and (
        bypass := _bypass_encoder(ds, mct=mct, numthreads=numthreads, scratch=scratch)
    ):
        return bypass
    bits_stored = int(ds.BitsStored)
    signed = bool(ds.PixelRepresentation)
    dtype = np.dtype(f"{'i' if signed else 'u'}{1 if bits_stored <= 8 else 2}")
    options = _encoder_options(ds, mct=mct, numthreads=numthreads)
    return partial(_encode_frame, dtype=dtype, options=options)


def _encode_verified(
    ds: Dataset,
    frames: Iterable[np.ndarray[Any, Any]],
    count: int,
    *,
    mct: bool,
    stage: str,
    where: str,
    ts_out: UID = JPEG2000Lossless,
    scratch: Path | None = None,
) -> Generator[bytes]:
    """One verified codestream per frame of *ds* (*count* of them, stored cells
    *frames*), in order, as each is ready.

    The frames of a multi-frame instance are encoded in a thread pool (imagecodecs
    releases the interpreter lock while OpenJPEG or OpenJPH runs), at most one more
    than there are threads at a time, so only a few frames and their codestreams are
    in memory whatever the instance's size; a single J2K frame is encoded with
    OpenJPEG's own threads.  Meanwhile this thread checks each codestream's main
    header (:func:`_check_codestream`) and decodes it with pylibjpeg-openjpeg (for
    J2K another build and binding of OpenJPEG than the encoder's, for HTJ2K another
    implementation) to exactly the frame's stored cells.  The written file is then
    checked to hold these very codestreams (:func:`_verify_pixels`).
    """
    ht = ts_out in _HTJ2K
    rpcl = ts_out == HTJ2KLosslessRPCL
    bits_stored = int(ds.BitsStored)
    signed = bool(ds.PixelRepresentation)
    threads = _threads()
    parallel = count > 1 and threads > 1
    encode = _frame_encoder(
        ds, mct=mct, ts_out=ts_out, numthreads=1 if parallel else threads, scratch=scratch
    )

    def verified(cs: bytes, reference: np.ndarray[Any, Any]) -> bytes:
        _check_codestream(cs, bits_stored, signed=signed, mct=mct, ht=ht, rpcl=rpcl, where=where)
        with _stage(f"{where}cannot decode result"):
            # As stored: a YBR_RCT codestream decodes to RGB inside OpenJPEG
            # already, and YBR_FULL is compared without any conversion.
            decoded = openjpeg_decode(cs)
        if decoded.shape != reference.shape or not np.array_equal(decoded, reference):
            raise _fallback(f"{where}decoded pixels differ from the original")
        return cs

    if not parallel:
        for reference in frames:
            with _stage(stage):
                cs = encode(reference)
            yield verified(cs, reference)
        return
    pending: deque[tuple[Future[bytes], np.ndarray[Any, Any]]] = deque()
    with ThreadPoolExecutor(threads) as pool:
        try:
            for reference in frames:
                pending.append((pool.submit(encode, reference), reference))
                if len(pending) > threads:
                    future, oldest = pending.popleft()
                    with _stage(stage):
                        cs = future.result()
                    yield verified(cs, oldest)
            while pending:
                future, oldest = pending.popleft()
                with _stage(stage):
                    cs = future.result()
                yield verified(cs, oldest)
        finally:
            # On an error, frames not started yet are dropped, not encoded for nothing.
            for future, _ in pending:
                future.cancel()


def _bypass_encoder(
    ds: Dataset, *, mct: bool, numthreads: int, scratch: Path
) -> Callable[[np.ndarray[Any, Any]], bytes] | None:
    """What encodes one large frame of *ds* to J2K with BYPASS, by OpenJPEG through
    glymur; None for frames under :data:`_BYPASS_MIN_PIXELS` or without glymur.

    BYPASS (code-block style bit 0, ``opj_compress -M 1``, JPEG 2000 Part 1) codes
    the lower bit-planes of each code block raw instead of through the arithmetic
    coder: still lossless, about a third less CPU to encode and decode on large
    images, and slightly smaller there (see :data:`_BYPASS_MIN_PIXELS`).  Otherwise
    what :func:`_encoder_options` asks imagecodecs for: reversible 5/3, a raw
    codestream, one tile, one layer, the same resolutions, *mct* for RGB, colour by
    pixel.  imagecodecs does not expose the mode switches; glymur does (``modesw``).

    glymur writes unsigned 8- or 16-bit components only.  So, as for HTJ2K, Bits
    Stored B below that and signed cells get the coefficients a native B-bit encoder
    codes, and Ssiz is then set to B and the sign (:func:`_set_precision`): OpenJPEG
    level-shifts an unsigned P-bit component by 2**(P-1) before coding, so each cell
    goes in offset by 2**(P-1) less the shift a B-bit component takes (2**(B-1)
    unsigned, none signed) and comes out of the shift as exactly what a B-bit encoder
    codes; the decoder applies the B-bit shift again.  As with HTJ2K, only QCD's
    bound on magnitude bit-planes is larger than a native encoder's.

    glymur writes to a file: *scratch* plus a frame number and ``.j2k``, in the
    spool's ``tmp/`` beside the output (the encoder's own, writable under the
    service's sandbox; the start-up clean-up removes what a killed encoder leaves),
    removed as soon as it is read.  OpenJPEG's thread count is a glymur-wide
    setting, set here for this instance: an encoder process does one at a time.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows * columns < _BYPASS_MIN_PIXELS or min(rows, columns) < _BYPASS_MIN_SIDE:
        return None
    glymur = _glymur()
    if glymur is None:
        return None
    bits_stored = int(ds.BitsStored)
    signed = bool(ds.PixelRepresentation)
    size = 1 if bits_stored <= 8 else 2
    cells_dtype = np.dtype(f"{'i' if signed else 'u'}{size}")
    written = np.dtype(f"u{size}")
    offset = written.type((1 << (8 * size - 1)) - (0 if signed else 1 << (bits_stored - 1)))
    resolutions = _encoder_options(ds, mct=mct, numthreads=numthreads)["resolutions"]
    with contextlib.suppress(RuntimeError):  # a libopenjp2 built without threads
        glymur.set_option("lib.num_threads", numthreads)
    numbers = itertools.count()

    def encode(frame: np.ndarray[Any, Any]) -> bytes:
        # A copy (never the reference frame itself); the policy made sure every value
        # fits Bits Stored.  Signed cells wrap to offset binary.
        cells = np.array(frame, dtype=cells_dtype, order="C").view(written)
        cells += offset
        path = scratch.with_name(f"{scratch.name}.{next(numbers)}.j2k")
        path.unlink(missing_ok=True)  # glymur would read an existing file
        try:
            glymur.Jp2k(
                os.fspath(path), data=cells, numres=resolutions, modesw=_CBLK_BYPASS, mct=mct
            )
            cs = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
        if bits_stored != 8 * size or signed:
            cs = _set_precision(cs, bits_stored, signed=signed)
        return cs

    return encode


def _htj2k_encoder(
    ds: Dataset, *, mct: bool, rpcl: bool
) -> Callable[[np.ndarray[Any, Any]], bytes]:
    """What encodes one frame of *ds* to HTJ2K, by OpenJPH (imagecodecs' ``htj2k_encode``).

    Reversible 5/3 wavelet with OpenJPH's defaults (5 decomposition levels, 64x64
    HT code blocks, RPCL), a raw codestream without the JPH wrapper; *mct* applies
    the reversible colour transform (RGB stored as YBR_RCT).  OpenJPH takes any image
    size, 1x1 included: levels beyond the image's size leave empty subbands, which
    Part 1 allows, and the verification decodes them with OpenJPEG.

    *rpcl* meets what 1.2.840.10008.1.2.4.202 adds (PS3.5 10.18): RPCL progression
    (OpenJPH's own), enough levels for a lowest resolution of at most 64 pixels a
    side, and TLM markers, here with one tile-part per resolution so the markers
    give the resolution breakpoints.

    imagecodecs offers no precision option: Ssiz is the array's item size (8 or 16)
    and its signedness.  So for Bits Stored B below that, each codestream's Ssiz is
    set to B afterwards (:func:`_set_precision`), which needs the coded coefficients
    to be the same ones a B-bit encoder would code.  Signed cells are coded as they
    are (no level shift for signed components).  Unsigned cells are level-shifted
    here, by 2**(B-1) as the standard does for a B-bit unsigned component, and coded
    as signed, which OpenJPH does not shift again; the decoder then adds 2**(B-1)
    back, as the B-bit Ssiz tells it to.  The only difference left to a native B-bit
    encoder is a larger bound on magnitude bit-planes in QCD and CAP, which is an
    upper bound a decoder reads and does not require to be tight.  Verification then
    decodes every codestream with OpenJPEG, a different implementation.
    """
    bits_stored = int(ds.BitsStored)
    signed = bool(ds.PixelRepresentation)
    size = 1 if bits_stored <= 8 else 2
    shift = not signed and bits_stored < 8 * size
    dtype = np.dtype(f"{'i' if signed or shift else 'u'}{size}")
    options: dict[str, Any] = {}
    if rpcl:
        levels = max(5, _rpcl_levels(int(ds.Rows), int(ds.Columns)))
        # imagecodecs passes "resolutions" to OpenJPH as the number of decompositions.
        options = {
            "resolutions": levels,
            "tlm": True,
            "tilepart": imagecodecs.HTJ2K.TILEPART.RESOLUTIONS,
        }

    def encode(frame: np.ndarray[Any, Any]) -> bytes:
        if shift:
            # The policy made sure every value fits Bits Stored, so the cast to the
            # signed type of the same size is exact, and so is the shift.
            cells = np.array(frame, dtype=dtype, order="C")
            cells -= 1 << (bits_stored - 1)
        else:
            cells = np.ascontiguousarray(frame, dtype=dtype)
        cs = bytes(
            imagecodecs.htj2k_encode(
                cells,
                reversible=True,
                rgb=mct,
                planar=False,  # colour-by-pixel, as the reference frames are
                **options,
            )
        )
        if bits_stored != 8 * size:
            cs = _set_precision(cs, bits_stored, signed=signed)
        return cs

    return encode


def _rpcl_levels(rows: int, columns: int) -> int:
    """Fewest wavelet levels that bring both sides to :data:`_RPCL_BASE` or less."""
    levels = 0
    while -(-max(rows, columns) // (1 << levels)) > _RPCL_BASE:
        levels += 1
    return levels


def _set_precision(cs: bytes, bits: int, *, signed: bool) -> bytes:
    """*cs* with every component's Ssiz (precision and sign) set to *bits*, *signed*."""
    if cs[:4] != b"\xff\x4f\xff\x51":
        raise _fallback("encoder did not write a JPEG 2000 codestream")
    components = int.from_bytes(cs[40:42], "big")
    out = bytearray(cs)
    for c in range(components):
        out[42 + 3 * c] = (bits - 1) | (0x80 if signed else 0)
    return bytes(out)


def _encapsulate(ds: Dataset, frames: list[bytes]) -> None:
    """Store *frames* as encapsulated Pixel Data (PS3.5 A.4) with a Basic Offset Table."""
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


@dataclass(frozen=True)
class _Written:
    """What one fragment of the written Pixel Data must hold: the verified codestream
    (*hashed* False), or its SHA-256 (*hashed*: beyond :data:`_KEEP_BYTES`)."""

    value: bytes
    hashed: bool

    def matches(self, fragment: bytes) -> bool:
        return (hashlib.sha256(fragment).digest() if self.hashed else fragment) == self.value


def _padded(cs: bytes) -> bytes:
    """*cs* as a fragment holds it: one zero pads an odd length (PS3.5 A.4)."""
    return cs + b"\0" if len(cs) % 2 else cs


def _kept(codestreams: Iterable[bytes]) -> list[_Written]:
    return [_Written(_padded(cs), hashed=False) for cs in codestreams]


def _write(ds: Dataset, dst: Path, codestreams: Iterator[bytes], count: int) -> list[_Written]:
    """Write *ds* to *dst* as Explicit VR Little Endian, its Pixel Data the *count*
    *codestreams* encapsulated as they come (PS3.5 A.4: one fragment per frame, a
    Basic Offset Table), and return what each fragment must hold when read back: the
    codestream itself while those kept are within :data:`_KEEP_BYTES`, its SHA-256
    beyond (so a large multi-frame instance's codestreams are not all kept).

    pydicom writes the data set up to Pixel Data (:func:`pydicom.dcmwrite`) and the
    elements after it (:func:`pydicom.filewriter.write_dataset`, e.g. Data Set
    Trailing Padding); Pixel Data itself is written here with pydicom's own tag and
    length writers, one item per codestream as it is verified, so the codestreams are
    never all in memory; the Basic Offset Table is reserved and filled in at the end.
    This is what :func:`pydicom.encaps.encapsulate` writes for the same codestreams,
    byte for byte; the file is read back by pydicom's parser to check it
    (:func:`_verify_elements`).
    """
    tail = Dataset()
    for tag in _tags(ds):
        if tag > _PIXEL_DATA:
            tail[tag] = ds.get_item(tag)
            del ds[tag]
    tail.set_original_encoding(False, True)
    if _PIXEL_DATA in ds:
        del ds[_PIXEL_DATA]
    written: list[_Written] = []
    kept = 0
    with open(dst, "wb") as f:
        with _stage("cannot write output"):
            # save_as() refuses to change byte order; dcmwrite() does it when asked.
            pydicom.dcmwrite(f, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
            fp = DicomFileLike(f)
            fp.is_little_endian, fp.is_implicit_VR = True, False
            fp.write_tag(Tag(_PIXEL_DATA))
            fp.write(b"OB\0\0")
            fp.write_UL(_UNDEFINED_LENGTH)
            fp.write_tag(ItemTag)  # the Basic Offset Table: filled in below
            fp.write_UL(4 * count)
            table = f.tell()
            f.write(bytes(4 * count))
            first = f.tell()
        offsets = []
        for cs in codestreams:
            with _stage("cannot write output"):
                offsets.append(f.tell() - first)
                fp.write_tag(ItemTag)
                fp.write_UL(len(cs) + len(cs) % 2)
                f.write(cs)
                if len(cs) % 2:  # a fragment has even length: one zero pads it
                    f.write(b"\0")
                if kept + len(cs) <= _KEEP_BYTES:
                    kept += len(cs)
                    written.append(_Written(_padded(cs), hashed=False))
                else:
                    written.append(_Written(hashlib.sha256(_padded(cs)).digest(), hashed=True))
        if len(offsets) != count:
            raise _fallback(f"{len(offsets)} frames decoded, {count} expected")
        if offsets and offsets[-1] > 0xFFFFFFFF:
            raise _fallback("encapsulated pixel data too large for a Basic Offset Table")
        with _stage("cannot write output"):
            fp.write_tag(SequenceDelimiterTag)
            fp.write_UL(0)
            if len(tail):
                write_dataset(fp, tail)
            f.seek(table)
            f.write(struct.pack(f"<{count}I", *offsets))
    return written


# -- policy ----------------------------------------------------------------------------
def _check_transfer_syntax(ds: Dataset) -> UID:
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if ts in _NATIVE:
        return ts
    if not ts:
        raise _fallback("no Transfer Syntax UID in the File Meta Information")
    if ts == DeflatedExplicitVRLittleEndian:
        raise _passthrough(f"deflated data set, not recompressed ({ts})")
    if ts in _LOSSY or ts.startswith(_LOSSY_PREFIXES):
        raise _passthrough(f"already lossy ({ts})")
    if ts.is_transfer_syntax:
        raise _passthrough(f"already compressed ({ts})")
    raise _passthrough(f"unknown transfer syntax ({ts})")


def _check_pixel_module(ds: Dataset) -> list[int]:
    """Check the top-level image and each icon image; return the icons' item indexes."""
    for tag, name in _FLOAT_PIXEL_DATA.items():
        if tag in ds:
            raise _passthrough(f"{name.lower()}")
    if _PIXEL_DATA not in ds:
        raise _passthrough("no pixel data")
    if _EXTENDED_OFFSETS & set(_tags(ds)):
        raise _passthrough("Extended Offset Table with native pixel data")
    icons = _icon_indexes(ds)
    _check_image(ds, where="")
    for index in icons:
        item = ds[_ICON_SEQUENCE].value[index]
        where = f"icon image {index}: "
        if any(tag in item for tag in (*_FLOAT_PIXEL_DATA, *_EXTENDED_OFFSETS)):
            raise _passthrough(f"{where}float pixel data or Extended Offset Table")
        if item["PixelData"].is_undefined_length:
            raise _fallback(f"{where}encapsulated pixel data in a native data set")
        _check_image(item, where=where)
    return icons


def _icon_indexes(ds: Dataset) -> list[int]:
    """Items of the top-level Icon Image Sequence with Pixel Data.

    Pixel Data anywhere else below the top level (a private sequence, an icon in a
    nested item) is not a place PS3.3 defines, so the instance passes through.
    """
    icons = []
    for tag in _tags(ds):
        if not _is_sequence(ds, tag):
            continue
        for index, item in enumerate(ds[tag].value):
            if _PIXEL_DATA in item:
                if tag != _ICON_SEQUENCE:
                    raise _passthrough(f"pixel data inside sequence {tag}, not an icon image")
                icons.append(index)
            if where := _nested_pixel_data(item):
                raise _passthrough(f"pixel data inside sequence {where}, not an icon image")
    return icons


def _check_image(ds: Dataset, *, where: str) -> None:
    """The Image Pixel module of *ds* (the data set or an icon item) fits J2K lossless."""
    pi = str(ds.PhotometricInterpretation).strip()
    spp = int(ds.SamplesPerPixel)
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation)
    if (pi, spp) not in _PHOTOMETRIC:
        raise _passthrough(f"{where}photometric interpretation {pi} with {spp} samples")
    if bits_allocated not in (8, 16):
        raise _passthrough(f"{where}Bits Allocated {bits_allocated}")
    if not 1 <= bits_stored <= bits_allocated:
        raise _fallback(f"{where}Bits Stored {bits_stored} with Bits Allocated {bits_allocated}")
    if bits_stored == 1:
        # pylibjpeg-openjpeg 2.6 fails on, or worse silently mis-encodes, some 1-bit
        # images (noise-like masks): verification would catch it, but it is known.
        raise _passthrough(f"{where}Bits Stored 1, not reliably lossless in the encoder")
    high_bit = ds.get("HighBit")
    if high_bit is not None and int(high_bit) != bits_stored - 1:
        # Pixel cells not aligned to bit 0: J2K would keep only the low bits.
        raise _passthrough(f"{where}High Bit {high_bit} with Bits Stored {bits_stored}")
    if signed not in (0, 1):
        raise _fallback(f"{where}Pixel Representation {signed}")
    if signed and not _PHOTOMETRIC[(pi, spp)]:
        raise _passthrough(f"{where}signed {pi}")
    if spp == 3 and ds.get("PlanarConfiguration") not in (0, 1):
        raise _fallback(f"{where}Planar Configuration {ds.get('PlanarConfiguration')}")

    rows, columns = int(ds.Rows), int(ds.Columns)
    # pydicom would take a 0 or empty Number of Frames as 1; that is not ours to fix.
    frames = _frame_count(ds)
    if rows < 1 or columns < 1 or frames < 1:
        raise _fallback(f"{where}{rows}x{columns} pixels, {frames} frames")
    expected = rows * columns * spp * frames * bits_allocated // 8
    # The value's length, without reading a deferred value from the file.
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.length == _UNDEFINED_LENGTH:
        raise _fallback(f"{where}encapsulated pixel data in a native data set")
    if isinstance(elem, RawDataElement) and elem.value is None:  # deferred
        actual = elem.length
    else:
        actual = len(elem.value or b"")
    if actual not in (expected, expected + expected % 2):
        raise _fallback(f"{where}pixel data is {actual} bytes, {expected} expected")


def _tags(ds: Dataset) -> list[BaseTag]:
    # Not ``for elem in ds``: iterating a Dataset converts every raw element.
    return list(ds.keys())


def _nested_pixel_data(ds: Dataset) -> str:
    """Where Pixel Data is inside a sequence of *ds* ("" if nowhere)."""
    for tag in _tags(ds):
        if _is_sequence(ds, tag):
            for item in ds[tag].value:
                if _PIXEL_DATA in item:
                    return str(tag)
                if where := _nested_pixel_data(item):
                    return f"{tag}/{where}"
    return ""


def _is_sequence(ds: Dataset, tag: Any) -> bool:
    """Whether *tag* holds a sequence, without converting any other raw element.

    Converting a raw element decodes its value, and a converted element is written
    re-encoded instead of byte for byte, so only sequences are touched.
    """
    elem = ds.get_item(tag, keep_deferred=True)
    if elem is None:
        return False
    vr = elem.VR
    if vr is None and isinstance(elem, RawDataElement):  # implicit VR
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            vr = "SQ" if elem.length == _UNDEFINED_LENGTH else "UN"
    if vr == "UN" and elem.length == _UNDEFINED_LENGTH:
        return True  # PS3.5 6.2.2: undefined-length UN is a sequence
    return bool(vr == "SQ")


def _stored_pixels(ds: Dataset, ts: UID) -> np.ndarray[Any, Any]:
    """The stored pixel cells as integers, unmasked and without colour conversion."""
    options: dict[str, Any] = {"view_only": True, "correct_unused_bits": False}
    arr, _ = get_decoder(ts).as_array(ds, raw=True, **options)
    return arr


def _check_unused_bits(ds: Dataset, original: np.ndarray[Any, Any], *, where: str = "") -> None:
    bits_stored = int(ds.BitsStored)
    if bits_stored == int(ds.BitsAllocated):
        return
    if ds.PixelRepresentation:
        low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low, high = 0, (1 << bits_stored) - 1
    if original.size and (original.min() < low or original.max() > high):
        raise _passthrough(
            f"{where}pixel cells use bits above Bits Stored {bits_stored} "
            "(overlay or noise J2K cannot keep)"
        )


# -- verification ----------------------------------------------------------------------
def _verify_pixels(out: Dataset, written: list[_Written], path: Path, *, where: str = "") -> None:
    """*out* (the result read from *path*, or one of its icon items) holds the
    codestreams that were *written*.

    Each of those codestreams was decoded and compared with the original's frame
    before it was written (:func:`_encode_verified`); here the file's encapsulated
    Pixel Data must parse, by pydicom, to as many frames, each the same bytes (or,
    for those not kept, the same SHA-256).  A deferred value is read from the file
    one fragment at a time.
    """
    elem = out.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in out else None
    if not isinstance(elem, RawDataElement) or elem.length != _UNDEFINED_LENGTH or elem.VR != "OB":
        raise _fallback(f"{where}result pixel data is not encapsulated")
    frames = int(out.get("NumberOfFrames") or 1)
    if frames != len(written):
        raise _fallback(f"{where}result has {frames} frames, {len(written)} encoded")
    with contextlib.ExitStack() as stack, _stage(f"{where}cannot parse result"):
        if elem.value is None:  # deferred: read it where it is in the file
            f = stack.enter_context(open(path, "rb"))
            f.seek(elem.value_tell)
            buffer: Any = f
        else:
            buffer = bytes(elem.value)
        fragments = generate_frames(buffer, number_of_frames=frames)
        for index, expected in enumerate(written):
            frame = next(fragments, None)
            if frame is None or not expected.matches(frame):
                raise _fallback(f"{where}written frame {index} is not the verified codestream")
        if next(fragments, None) is not None:
            raise _fallback(f"{where}result has more codestreams than {frames} frames")


def _verify_icons(out: Dataset, icons: dict[int, list[_Written]], path: Path) -> None:
    items = out[_ICON_SEQUENCE].value if icons else []
    for index, written in icons.items():
        if index >= len(items):
            raise _fallback(f"icon image {index} missing from the result")
        _verify_pixels(items[index], written, path, where=f"icon image {index}: ")


def _check_codestream(
    cs: bytes,
    bits_stored: int,
    *,
    signed: bool,
    mct: bool,
    ht: bool = False,
    rpcl: bool = False,
    where: str = "",
) -> None:
    """Check the J2K main header: precision, signedness, the colour transform, and
    which part of JPEG 2000 the codestream needs.

    Other decoders trust these over the data set (PS3.5 8.2.4), so a codestream that
    decodes right here but says e.g. 16 bits for Bits Stored 12 is not accepted.  A
    1.2.840.10008.1.2.4.90 codestream must be Part 1 only: no CAP marker, no HT code
    blocks, which a Part 1 decoder cannot read, and of the code-block mode switches
    only BYPASS (Part 1 too; the large frames' encoder sets it).  An HTJ2K one
    (PS3.5 8.2.14, Part 15) says so in Rsiz and CAP and uses HT code blocks.  Either
    way the wavelet must be the reversible 5/3 one.  With *rpcl* (1.2.840.10008.1.2.4.202,
    PS3.5 10.18) the progression must be RPCL, TLM markers present, and the lowest
    resolution at most 64 pixels a side.
    """
    if cs[:4] != b"\xff\x4f\xff\x51" or len(cs) < 42:
        raise _fallback(f"{where}result is not a JPEG 2000 codestream")
    siz_len = int.from_bytes(cs[4:6], "big")
    rsiz = int.from_bytes(cs[6:8], "big")
    if bool(rsiz & 0x4000) != ht:  # Rsiz bit 14: Part 15 capabilities (CAP) in use
        raise _fallback(f"{where}codestream Rsiz {rsiz:#06x} for {'HTJ2K' if ht else 'J2K'}")
    components = int.from_bytes(cs[40:42], "big")
    ssiz = cs[42 : 42 + 3 * components : 3]
    if len(ssiz) != components:
        raise _fallback(f"{where}truncated JPEG 2000 header")
    for s in ssiz:
        if (s & 0x7F) + 1 != bits_stored or bool(s & 0x80) != signed:
            raise _fallback(
                f"{where}codestream precision {(s & 0x7F) + 1} signed={bool(s & 0x80)}, "
                f"data set has Bits Stored {bits_stored} signed={signed}"
            )
    pos = 2 + 2 + siz_len
    cap = tlm = False
    cod = -1
    while pos + 4 <= len(cs) and cs[pos] == 0xFF:
        marker = cs[pos + 1]
        if marker == 0x90:  # SOT: tile data starts, the main header is over
            break
        if marker == 0x50:  # CAP: extended capabilities (Part 15 for HTJ2K)
            cap = True
        elif marker == 0x55:  # TLM: tile-part lengths
            tlm = True
        elif marker == 0x52 and cod < 0:
            cod = pos
        pos += 2 + int.from_bytes(cs[pos + 2 : pos + 4], "big")
    if cod < 0 or cod + 14 > len(cs):
        raise _fallback(f"{where}no COD marker in the JPEG 2000 main header")
    if cap != ht:
        raise _fallback(f"{where}codestream CAP marker {'missing' if ht else 'present'}")
    # SGcod: progression, layers (2 bytes), multiple component transform; SPcod:
    # decomposition levels, code-block width and height, code-block style, wavelet.
    if bool(cs[cod + 8]) != mct:
        raise _fallback(f"{where}codestream colour transform {bool(cs[cod + 8])}, expected {mct}")
    # Code-block style: HT code blocks for HTJ2K; for J2K none, or BYPASS only
    # (:func:`_bypass_encoder`), not the other mode switches.
    style = cs[cod + 12]
    if bool(style & _CBLK_HT) != ht or (not ht and style & ~_CBLK_BYPASS):
        raise _fallback(f"{where}codestream code-block style {style:#04x}")
    if cs[cod + 13] != 1:
        raise _fallback(f"{where}codestream wavelet is not the reversible 5/3 one")
    if rpcl:
        # SIZ: image extent (Xsiz, Ysiz) less its offset (XOsiz, YOsiz).
        width = int.from_bytes(cs[8:12], "big") - int.from_bytes(cs[16:20], "big")
        height = int.from_bytes(cs[12:16], "big") - int.from_bytes(cs[20:24], "big")
        if cs[cod + 5] != 2:  # SGcod progression order: 2 is RPCL
            raise _fallback(f"{where}codestream progression order {cs[cod + 5]} is not RPCL")
        if not tlm:
            raise _fallback(f"{where}codestream has no TLM marker")
        if cs[cod + 9] < _rpcl_levels(height, width):
            raise _fallback(
                f"{where}codestream has {cs[cod + 9]} wavelet levels for {width}x{height}"
            )


def _verify_elements(
    src: Path,
    dst: Path,
    *,
    was_rgb: bool,
    written: list[_Written],
    icons: dict[int, list[_Written]],
) -> None:
    """The written file holds the verified codestreams (*written*, and the icons'
    per item index) and every other element as received (see the module docstring)."""
    with _stage("cannot read result"):
        out = pydicom.dcmread(dst, defer_size=_DEFER_BYTES)
    _verify_pixels(out, written, dst)
    _verify_icons(out, icons, dst)
    with _stage("cannot read data sets to compare"):
        orig = pydicom.dcmread(src, defer_size=_DEFER_BYTES)
    swap = not orig.original_encoding[1]  # big endian original

    for tag in _tags(orig.file_meta):
        if tag not in _META_CHANGED and out.file_meta.get(tag) != orig.file_meta[tag]:
            raise _fallback(f"File Meta element {tag} changed")
    # dcmwrite(enforce_file_format=True) adds a missing File Meta Information Version.
    added = set(_tags(out.file_meta)) - set(_tags(orig.file_meta)) - {0x00020001}
    if extra := added - _META_CHANGED:
        raise _fallback(f"File Meta elements added: {sorted(extra)}")

    expected_pi = "YBR_RCT" if was_rgb else str(orig.PhotometricInterpretation)
    if out.PhotometricInterpretation != expected_pi:
        raise _fallback(f"Photometric Interpretation {out.PhotometricInterpretation}")
    expected_planar = 0 if orig.SamplesPerPixel == 3 else orig.get("PlanarConfiguration")
    if out.get("PlanarConfiguration") != expected_planar:
        raise _fallback(f"Planar Configuration {out.get('PlanarConfiguration')}")
    for index in icons:
        item_a, item_b = orig[_ICON_SEQUENCE].value[index], out[_ICON_SEQUENCE].value[index]
        planar = 0 if item_a.SamplesPerPixel == 3 else item_a.get("PlanarConfiguration")
        if item_b.get("PlanarConfiguration") != planar:
            raise _fallback(f"icon image {index}: Planar Configuration changed")

    with _stage("cannot compare data elements"):
        diff = _diff_datasets(
            orig,
            out,
            src=(src, dst),
            swap=swap,
            # Implicit VR originals have no VR to keep: the copy has the dictionary's.
            explicit=not orig.original_encoding[0],
            path="",
            skip=_CHANGED_BY_COMPRESSION,
            icons=frozenset(icons),
        )
    if diff:
        raise _fallback(f"data element {diff} changed")


def _diff_datasets(
    a: Dataset,
    b: Dataset,
    *,
    src: tuple[Path, Path],
    swap: bool,
    explicit: bool,
    path: str,
    skip: frozenset[int] = frozenset(),
    icons: frozenset[int] = frozenset(),
) -> str:
    """The first element whose VR or value differs between *a* (original) and *b*.

    "" when none does.  The VR is the one written in the file; with an *explicit* VR
    original it must be the same (a private OB must not come back as UN, nor an UN
    as its dictionary VR).  *icons* are the items of the top-level Icon Image
    Sequence whose Pixel Data was compressed; :data:`_ICON_CHANGED` is skipped in
    them.  Group lengths are not compared: pydicom does not write them (retired,
    PS3.5 7.2).
    """
    tags_a = {t for t in _tags(a) if t.element != 0 and t not in skip}
    tags_b = {t for t in _tags(b) if t.element != 0 and t not in skip}
    if tags_a != tags_b:
        return f"{path}{sorted(tags_a ^ tags_b)[0]} (present in one only)"
    for tag in sorted(tags_a):
        where = f"{path}{tag}"
        elem_a = a.get_item(tag, keep_deferred=True)
        elem_b = b.get_item(tag, keep_deferred=True)
        # Implicit VR items inside an explicit VR file (an undefined-length UN
        # sequence) have no VR either.
        if explicit and elem_a.VR is not None and elem_a.VR != elem_b.VR:
            return f"{where} (VR {elem_a.VR} written as {elem_b.VR})"
        if _is_sequence(b, tag) or _is_sequence(a, tag):
            seq_a, seq_b = a[tag].value, b[tag].value
            if len(seq_a) != len(seq_b):
                return f"{where} ({len(seq_a)} vs {len(seq_b)} items)"
            for i, (item_a, item_b) in enumerate(zip(seq_a, seq_b, strict=True)):
                changed = _ICON_CHANGED if tag == _ICON_SEQUENCE and i in icons else frozenset()
                if d := _diff_datasets(
                    item_a,
                    item_b,
                    src=src,
                    swap=swap,
                    explicit=explicit,
                    path=f"{where}[{i}]",
                    skip=changed,
                ):
                    return d
            continue
        if isinstance(elem_a, RawDataElement) and isinstance(elem_b, RawDataElement):
            bytes_a = _raw_bytes(elem_a, src[0])
            bytes_b = _raw_bytes(elem_b, src[1])
            vr = elem_b.VR or ""
            if swap and vr in _SWAP_SIZE:
                bytes_a = _byteswap(bytes_a, _SWAP_SIZE[vr])
            # pydicom pads an odd-length value to even length; nothing else may change.
            if bytes_a != bytes_b and not (
                len(bytes_a) % 2 and bytes_b[:-1] == bytes_a and bytes_b[-1:] in (b" ", b"\0")
            ):
                return where
        elif a[tag] != b[tag]:
            return where
    return ""


def _raw_bytes(elem: RawDataElement, path: Path) -> bytes:
    if elem.value is not None:
        return bytes(elem.value)
    if elem.length == 0:
        return b""
    if elem.length == _UNDEFINED_LENGTH:
        raise _fallback(f"{elem.tag}: deferred value of undefined length")
    # A deferred top-level value: read exactly the stored bytes, unconverted.
    with open(path, "rb") as f:
        f.seek(elem.value_tell)
        data = f.read(elem.length)
    if len(data) != elem.length:
        raise _fallback(f"{elem.tag}: truncated value in {os.fspath(path)}")
    return data


def _byteswap(data: bytes, size: int) -> bytes:
    if len(data) % size:
        return data  # cannot be a valid value; the comparison will say so
    return np.frombuffer(data, dtype=f">u{size}").astype(f"<u{size}").tobytes()

"""What the DIMSE acceptor offers and prefers: the tables the receiver negotiates with
and the Conformance Statement (``dicom-gateway conformance``) is generated from.

**Transfer syntax preference.**  pynetdicom's acceptor takes, for each proposed
presentation context, the first transfer syntax of *our* list that the requestor
proposed.  So the order of :data:`TRANSFER_SYNTAX_GROUPS` decides what a modality
sends, and it is chosen so that no choice loses information:

1. the lossless compressed syntaxes: the SCU sends its compressed pixel data as it
   holds it, bit for bit, and nothing is decoded on the receive path;
2. Explicit VR Little Endian, Explicit VR Big Endian, then Deflated Explicit VR: every
   element keeps its VR, private ones included.  Deflated is lossless too, but an SCU
   that holds the data set uncompressed (pynetdicom proposes Deflated by default)
   would deflate it just for us, and a deflated data set is uploaded as is, never
   recompressed to JPEG 2000; a context proposing only Deflated still gets it;
3. the lossy or possibly lossy compressed syntaxes.  They come *after* Explicit VR:
   when one context proposes ``[lossy, Explicit]``, picking the lossy one may make an
   SCU that holds raw pixels compress them lossily for us, whereas an SCU whose image
   is already lossy can send it in Explicit VR by decompressing it, which loses
   nothing more (and a context that proposes only the lossy syntax still gets it);
4. every other transfer syntax pydicom knows (referenced-pixel JPIP, SMPTE ST 2110,
   retired JPEG processes, JPEG XL ...);
5. Implicit VR Little Endian, last: it drops every element's VR, and private elements
   then arrive as ``UN``.  It is still accepted when it is all a context proposes.

**SOP classes.**  As a Storage SCP the gateway accepts every standard storage SOP
class (pynetdicom's list and every other one in pydicom's UID dictionary), every
retired one, and (unless
``dimse.storage_sop_classes`` restricts it to a list) any private or unknown SOP
class, which is then treated as a storage SOP class.  The storage contexts of an
association are built when its A-ASSOCIATE-RQ arrives (:func:`storage_contexts`),
from the abstract syntaxes it proposes, each with the same preference order.

pynetdicom dispatches a C-STORE of a class it does not know (retired, private) only
with its documented ``_config.UNRESTRICTED_STORAGE_SERVICE`` switch, and with that
switch on it negotiates such contexts by taking the *requestor's* first transfer
syntax, whatever it is.  gateway/dicom/patches.py turns the switch on for the dispatch and
makes that negotiation the ordinary one over our supported contexts
(tests/test_negotiation.py and tests/test_patches.py fail if pynetdicom changes that
seam).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    StorageCommitmentPushModel,
    Verification,
)

from ..config import is_valid_uid


@dataclass(frozen=True)
class SyntaxGroup:
    """Transfer syntaxes that rank together, with the reason for their rank."""

    title: str
    why: str
    uids: tuple[UID, ...]


def _by_uid(uids: Iterable[UID]) -> tuple[UID, ...]:
    return tuple(sorted(set(uids), key=lambda u: [int(p) for p in u.split(".")]))


def _uids(*values: str) -> tuple[UID, ...]:
    return tuple(UID(v) for v in values)


_LOSSLESS = _uids(
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
    "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
    "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
)
_LOSSY = _uids(
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.100.1",
    "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile / High Level
    "1.2.840.10008.1.2.4.101.1",
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 ...
    "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103",
    "1.2.840.10008.1.2.4.103.1",
    "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.104.1",
    "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106",
    "1.2.840.10008.1.2.4.106.1",
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile
)
#: In pydicom's UID dictionary as transfer syntaxes but no encoding of a data set on
#: the network (a MIME or XML encoding, a file format).
_NOT_NETWORK_SYNTAXES = _uids(
    "1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"
)


def _known_transfer_syntaxes() -> tuple[UID, ...]:
    """Every network transfer syntax pydicom knows, in UID order."""
    known = {UID(u) for u in AllTransferSyntaxes}
    known |= {UID(u) for u, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax"}
    return _by_uid(known - set(_NOT_NETWORK_SYNTAXES))


def _other_syntaxes() -> tuple[UID, ...]:
    ranked = {*_LOSSLESS, *_LOSSY, ExplicitVRLittleEndian, ExplicitVRBigEndian}
    ranked.add(DeflatedExplicitVRLittleEndian)
    ranked.add(ImplicitVRLittleEndian)
    return tuple(u for u in _known_transfer_syntaxes() if u not in ranked)


#: The preference order, best first: the one table both the receiver and the
#: Conformance Statement use.
TRANSFER_SYNTAX_GROUPS: tuple[SyntaxGroup, ...] = (
    SyntaxGroup(
        "Lossless compressed",
        "the SCU's own lossless pixel encoding is kept as sent, bit for bit",
        _LOSSLESS,
    ),
    SyntaxGroup(
        "Explicit VR",
        "every element keeps its VR, private elements included. Deflated comes last of"
        " them: the same data set, but an SCU holding it uncompressed would deflate it just"
        " for us, and the gateway cannot then recompress its pixels to JPEG 2000",
        (ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian),
    ),
    SyntaxGroup(
        "Lossy or possibly lossy compressed",
        "after Explicit VR: preferring them could make an SCU that holds raw pixels"
        " compress them lossily; an already lossy image sent in Explicit VR loses"
        " nothing more. Accepted when the context proposes nothing better",
        _LOSSY,
    ),
    SyntaxGroup(
        "Other transfer syntaxes pydicom knows",
        "referenced pixel data (JPIP), video and audio streams, retired JPEG processes:"
        " accepted only when the context proposes nothing better",
        _other_syntaxes(),
    ),
    SyntaxGroup(
        "Implicit VR Little Endian",
        "last: it drops every element's VR, and private elements arrive as UN."
        " Accepted when it is all a context proposes",
        (ImplicitVRLittleEndian,),
    ),
)

#: Transfer syntaxes of storage contexts, best first.
STORAGE_TRANSFER_SYNTAXES: tuple[UID, ...] = tuple(
    uid for group in TRANSFER_SYNTAX_GROUPS for uid in group.uids
)

#: Transfer syntaxes of the Verification, Modality Worklist and MPPS contexts, best
#: first: no pixel data, so only the native encodings; Explicit before Implicit for
#: the same reason as above (a worklist item's private elements keep their VR).
SERVICE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

#: Transfer syntaxes the gateway proposes as an SCU (MPPS forwarding, the upstream
#: worklist query), best first, in one context.
SCU_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Non-storage SOP classes the gateway accepts as SCP (its MWL and MPPS only when
#: the gateway runs them, which it always does as an appliance).
VERIFICATION = UID(Verification)
MODALITY_WORKLIST_FIND = UID(ModalityWorklistInformationFind)
MPPS = UID(ModalityPerformedProcedureStep)
STORAGE_COMMITMENT = UID(StorageCommitmentPushModel)
#: Its well-known SOP Instance (PS3.4 J.3.2), the one instance every N-ACTION names.
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")

#: Registered SOP classes whose name says "Storage" but that are not stored by C-STORE.
_NOT_STORAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR, media only)
        "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
        "1.2.840.10008.1.20.2",  # Storage Commitment Pull Model (Retired)
    }
)


def _registered_storage_classes(retired: bool) -> list[UID]:
    return [
        UID(uid)
        for uid, (name, kind, _info, status, _kw) in UID_dictionary.items()
        if kind == "SOP Class"
        and "Storage" in name
        and (status == "Retired") == retired
        and uid not in _NOT_STORAGE_CLASSES
    ]


#: Standard storage SOP classes: pynetdicom's Storage Service Class list and the other
#: registered storage classes (Hanging Protocol, Color Palette, implant templates,
#: DICOS, DICONDE ...).
STANDARD_STORAGE_CLASSES: tuple[UID, ...] = _by_uid(
    [UID(str(cx.abstract_syntax)) for cx in AllStoragePresentationContexts]
    + _registered_storage_classes(retired=False)
)


def _retired_storage_classes() -> tuple[UID, ...]:
    standard = set(STANDARD_STORAGE_CLASSES)
    return _by_uid(u for u in _registered_storage_classes(retired=True) if u not in standard)


#: Retired storage SOP classes (pydicom's UID dictionary): older US, NM, XA units.
RETIRED_STORAGE_CLASSES: tuple[UID, ...] = _retired_storage_classes()
KNOWN_STORAGE_CLASSES: frozenset[UID] = frozenset(
    STANDARD_STORAGE_CLASSES + RETIRED_STORAGE_CLASSES
)


def is_private_or_unknown(uid: str) -> bool:
    """A SOP class UID not in pydicom's UID dictionary (a vendor's, or a newer one)."""
    return uid not in UID_dictionary


def accepts_storage_class(uid: str, only: Iterable[str] = ()) -> bool:
    """Is *uid* accepted as a storage SOP class?  *only* (``dimse.storage_sop_classes``)
    restricts to a list; empty accepts every known storage class and any private or
    unknown one."""
    listed = frozenset(only)
    if listed:
        return uid in listed
    return uid in KNOWN_STORAGE_CLASSES or is_private_or_unknown(uid)


def storage_contexts(
    proposed: Iterable[str], only: Iterable[str] = ()
) -> list[PresentationContext]:
    """The storage contexts to support for an association that proposes the abstract
    syntaxes *proposed*: each accepted class once, with the preference order."""
    listed = tuple(only)
    contexts = []
    for uid in dict.fromkeys(proposed):
        if is_valid_uid(uid) and accepts_storage_class(uid, listed):
            cx = PresentationContext()
            cx.abstract_syntax = UID(uid)
            cx.transfer_syntax = list(STORAGE_TRANSFER_SYNTAXES)
            contexts.append(cx)
    return contexts

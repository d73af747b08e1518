"""What each archive's STOW-RS answers mean: one :class:`ArchiveProfile` per
``upload.archive`` ("generic", "orthanc", "dcm4chee", "google", "azure", "aws").

PS3.18 10.5.3 leaves the meaning of most FailureReason / WarningReason values to each
archive's conformance statement, and the archives differ where it matters to an edge
box that re-sends after a crash or a timeout: whether a re-sent instance is reported
as "already stored", refused as a conflict, or silently kept (or replaced); which of
their own codes are a verdict on the instance and which are a busy moment; how large a
request may be.  A profile writes down what the vendor's documentation or source
says, with its address, and says so where something could not be confirmed.

Each profile classifies a FailureReason as

* ``duplicate``: the archive says it already holds an instance with this UID.  That
  counts as stored only once the archive's copy has been compared with ours (WADO-RS
  metadata, :func:`identity_differences`; see gateway/pipeline/jobs.py);
* ``retry``: a busy or broken moment at the archive, sent again with backoff;
* ``fail``: a verdict on the instance, which becomes ``failed`` with the reason.

Verification is by the archive's WADO-RS instance metadata compared with the spool
copy's identifying attributes.  Size and sha256 would be stronger, but none of these
archives is documented to expose a digest of the stored file over DICOMweb (dcm4chee
keeps one, in private attributes, of its own possibly coerced file), so no profile
uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the config reads PROFILES: no pydicom in every process for that
    from pydicom.dataset import Dataset

Verdict = Literal["duplicate", "retry", "fail"]

#: PS3.18 Table I.2-1 (Store Instances Response Warning Reason) and PS3.4 Table B.2-1:
#: https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_I.2.html
STANDARD_WARNINGS: Mapping[int, str] = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}

#: PS3.18 Table I.2-2 (Failure Reason) and the PS3.7 Annex C general statuses
#: (https://dicom.nema.org/medical/dicom/current/output/chtml/part07/chapter_C.html):
#: 0111 Duplicate SOP Instance, 0212 Mistyped argument; 0213 Resource limitation is
#: PS3.3 C.14.1.1's (storage commitment).
STANDARD_FAILURES: Mapping[int, str] = {
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance (already stored)",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}

#: 0xA7xx: "Refused: out of resources" (PS3.18 Table I.2-2) -- a busy moment.
_OUT_OF_RESOURCES = (0xA700, 0xA7FF)

#: Attributes compared to verify that the archive's copy of a UID is ours: identity,
#: patient and geometry, which an archive that re-indexes or transcodes keeps as they
#: were (a transfer syntax, a re-encoded name or a coerced date may legitimately
#: differ, so those are not compared).
IDENTITY_KEYWORDS = (
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)


@dataclass(frozen=True)
class ArchiveProfile:
    """The known STOW-RS semantics of one kind of archive (see the module doc)."""

    name: str
    title: str
    #: The documents and source this profile follows.
    sources: tuple[str, ...]
    #: FailureReasons that mean "an instance with this UID is already stored".
    duplicate_codes: frozenset[int] = frozenset({0x0111})
    #: FailureReasons that are a verdict on the instance even inside a retryable range.
    permanent_codes: frozenset[int] = frozenset({0x0212})
    #: FailureReasons worth retrying, besides 0xA7xx (out of resources).
    retryable_codes: frozenset[int] = frozenset({0x0110, 0x0213})
    #: WarningReason (and the archive's own) names, besides PS3.18's.
    warning_names: Mapping[int, str] = field(default_factory=dict)
    #: FailureReason names, besides PS3.18's (for the operator's reason text).
    failure_names: Mapping[int, str] = field(default_factory=dict)
    #: The largest STOW-RS request body the archive takes (None: none documented).
    max_request_bytes: int | None = None
    #: The largest single instance (None: none documented beyond the request's).
    max_instance_bytes: int | None = None
    #: How long the archive lets one store transaction run before it ends it (None:
    #: none documented).  Batches are cut so that one fits in 90 % of it at
    #: ``upload.min_bytes_per_second``; a single larger instance still goes alone.
    max_request_seconds: float | None = None
    #: Whether a re-sent instance with the same UIDs replaces the stored one: True,
    #: False, or None when that depends on the archive's own configuration.
    replaces_existing: bool | None = False
    #: How an "already stored" answer is checked (the only one: see the module doc).
    verification: Literal["wado-rs-metadata"] = "wado-rs-metadata"
    #: Verify also an instance the archive reports *stored* when it had been sent
    #: before (a crash or timeout after the archive had it): for archives that keep or
    #: file away a conflicting re-send silently instead of refusing it.
    verify_resends: bool = False
    #: A duplicate answer for an instance the archive then has no metadata of (HTTP
    #: 404): "retry" (the answer may precede the index), or "fail" where the same code
    #: also means a refusal of the content (Google's 0x0110).
    duplicate_absent: Literal["retry", "fail"] = "retry"
    #: A re-send it reports stored (``verify_resends``) that it then has no metadata of:
    #: "retry", or "fail" where that means it holds the UIDs twice (Orthanc).
    resend_absent: Literal["retry", "fail"] = "retry"
    #: What a 404 on the check means here, for the operator (empty: nothing known).
    absent_hint: str = ""
    #: What could not be confirmed from the sources, said rather than guessed.
    unconfirmed: str = ""

    def verdict(self, code: int | None) -> Verdict:
        """What a FailureReason means here (None: the archive gave none; retried)."""
        if code is None:
            return "retry"
        if code in self.duplicate_codes:
            return "duplicate"
        if code in self.permanent_codes:
            return "fail"
        if code in self.retryable_codes or _OUT_OF_RESOURCES[0] <= code <= _OUT_OF_RESOURCES[1]:
            return "retry"
        return "fail"

    def failure_name(self, code: int) -> str:
        name = self.failure_names.get(code) or STANDARD_FAILURES.get(code)
        if name:
            return name
        if _OUT_OF_RESOURCES[0] <= code <= _OUT_OF_RESOURCES[1]:
            return "out of resources"
        if 0xA900 <= code <= 0xA9FF:
            return "data set does not match SOP class"
        if 0xC000 <= code <= 0xCFFF:
            return "cannot understand"
        return "failure"

    def warning_name(self, code: int) -> str:
        return self.warning_names.get(code) or STANDARD_WARNINGS.get(code) or "warning"

    def request_budget(
        self, batch_max_bytes: int, batch_max_instances: int, min_bytes_per_second: int = 0
    ) -> int:
        """Bytes of instances one request may carry: ``upload.batch_max_bytes``, or
        less when the archive's request limit (less the multipart framing) is lower, or
        when its transaction time limit at *min_bytes_per_second* allows less."""
        budget = batch_max_bytes
        if self.max_request_bytes is not None:
            framing = MULTIPART_PART_OVERHEAD * batch_max_instances
            budget = min(budget, self.max_request_bytes - framing)
        if self.max_request_seconds is not None and min_bytes_per_second > 0:
            budget = min(budget, int(0.9 * self.max_request_seconds * min_bytes_per_second))
        return max(1, budget)

    def too_large(self, size: int) -> str | None:
        """Why an instance of *size* bytes cannot go to this archive at all, or None."""
        limit = self.max_instance_bytes
        if limit is not None and size > limit:
            return (
                f"{size} bytes exceed the largest instance {self.title} takes ({limit} bytes,"
                f" upload.archive = {self.name!r}); not sent"
            )
        limit = self.max_request_bytes
        if limit is not None and size + MULTIPART_PART_OVERHEAD > limit:
            return (
                f"{size} bytes exceed the largest STOW-RS request {self.title} takes"
                f" ({limit} bytes, upload.archive = {self.name!r}); not sent"
            )
        return None


#: A generous bound for one part's boundary and headers in the multipart body.
MULTIPART_PART_OVERHEAD = 512

_PS3_18 = "https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_10.5.html"
_PS3_18_I2 = "https://dicom.nema.org/medical/dicom/current/output/chtml/part18/sect_I.2.html"

#: Any PS3.18 archive: the standard's codes only.  0x0110 (processing failure) stays
#: retryable, as a general failure says nothing about the instance; 0x0212 (mistyped
#: argument) is permanent; 0x0111 is verified.  No limits are assumed.
GENERIC = ArchiveProfile(
    name="generic",
    title="a PS3.18 STOW-RS archive",
    sources=(_PS3_18, _PS3_18_I2,
             "https://dicom.nema.org/medical/dicom/current/output/chtml/part07/chapter_C.html"),
)  # fmt: skip

#: Orthanc with its DICOMweb plugin (as observed with Orthanc 1.10.1 and plugin 1.7 in
#: tests/support/archive.py, and in the Orthanc configuration reference).  The plugin lists a
#: re-sent instance as stored whether or not it differs: with ``OverwriteInstances``
#: (default false) Orthanc keeps the old copy and drops the new one silently, with
#: true the new one replaces it.  So a re-send is verified against the metadata
#: (``verify_resends``).  A ReceivedInstanceFilter that refuses an instance makes the
#: plugin stop reading the request: the rest of the batch is in no sequence, and is
#: retried as unconfirmed.  The same UIDs with another Patient ID are stored as a
#: second instance (Orthanc's identifiers hash the Patient ID with the UIDs), after
#: which WADO-RS answers 404 for them: a checked re-send then fails (``resend_absent``).
ORTHANC = ArchiveProfile(
    name="orthanc",
    title="Orthanc (DICOMweb plugin)",
    sources=(
        "https://orthanc.uclouvain.be/book/plugins/dicomweb.html",
        "https://orthanc.uclouvain.be/hg/orthanc/file/default/OrthancServer/Resources/"
        "Configuration.json (OverwriteInstances)",
        "tests/support/archive.py (observed STOW-RS answers of Orthanc 1.10.1, DICOMweb 1.7)",
    ),
    replaces_existing=None,
    verify_resends=True,
    resend_absent="fail",
    absent_hint=(
        "Orthanc keys instances by Patient ID too, so it holds these UIDs under another"
        " Patient ID as well, and WADO-RS cannot tell them apart (observed with Orthanc"
        " 1.10.1, either OverwriteInstances)"
    ),
    unconfirmed="No request or instance size limit of Orthanc's HTTP server is documented.",
)

#: dcm4chee-arc-light.  Its own codes (StoreService.java) 0xA770-0xA779 sit inside the
#: standard's "out of resources" range but are verdicts: A771 subsequent occurrence of
#: a rejected object, A777 Patient ID missing, A778 conflicting Patient ID, A779
#: conflicting patient attributes, and the rejection-note refusals A772-A776.  A770
#: (rejection note already received) is a duplicate.  A duplicate under the default
#: overwrite policy NEVER (or from another source, or with an equal digest) is ignored
#: by StoreServiceEJB.updateDB ("Ignore received Instance") without an exception, so
#: StowRS lists it in ReferencedSOPSequence as stored: a conflicting re-send looks like
#: success, hence ``verify_resends``.  C409 (Study Instance UID differs from the
#: request's) and C499 (not a DICOM stream) are Cxxx, permanent; 0xB000 is the only
#: warning (off by default).
DCM4CHEE = ArchiveProfile(
    name="dcm4chee",
    title="dcm4chee-arc-light",
    sources=(
        "https://github.com/dcm4che/dcm4chee-arc-light/blob/master/dcm4chee-arc-store/src/"
        "main/java/org/dcm4chee/arc/store/StoreService.java",
        "https://github.com/dcm4che/dcm4chee-arc-light/blob/master/dcm4chee-arc-store/src/"
        "main/java/org/dcm4chee/arc/store/impl/StoreServiceEJB.java (updateDB)",
        "https://github.com/dcm4che/dcm4chee-arc-light/blob/master/dcm4chee-arc-stow/src/"
        "main/java/org/dcm4chee/arc/stow/StowRS.java",
        "https://dcm4chee-arc-cs.readthedocs.io/en/latest/networking/specs/stow-rs/"
        "stow-rs.html (and stow-rs-error-response-status-return-reasons.csv)",
    ),
    duplicate_codes=frozenset({0x0111, 0xA770}),
    permanent_codes=frozenset({0x0212, 0x0124, *range(0xA771, 0xA77A)}),
    failure_names={
        0xA770: "rejection note already received",
        0xA771: "subsequent occurrence of a rejected object",
        0xA772: "rejection failed: no such instance",
        0xA773: "rejection failed: class-instance conflict",
        0xA774: "rejection failed: already rejected",
        0xA775: "rejection for retention policy expired not allowed",
        0xA776: "retention period of the study not yet expired",
        0xA777: "Patient ID missing in the object",
        0xA778: "conflicting Patient ID: differs from the study's earlier objects",
        0xA779: "conflicting patient attributes",
        0xA922: "missing bulk data",
        0xC409: "Study Instance UID differs from the accepted one",
        0xC499: "not a (valid) DICOM stream",
        0x0124: "storage denied",
    },
    replaces_existing=None,
    verify_resends=True,
    unconfirmed=(
        "The size limit is the hosting server's ('restricted to size supported by the"
        " hosting DCM4CHEE ARCHIVE'); none is assumed.  The overwrite policy is the"
        " archive's configuration (NEVER by default), so whether a re-send replaces"
        " the stored copy is not known here."
    ),
)

#: Google Cloud Healthcare API.  Its conformance statement and quotas page document
#: the Store transaction (no request size limit, a timeout after one hour; 30 minutes
#: in a later revision).  Google's own pages do not document the duplicate answer;
#: issue reports do: an identical re-upload succeeds, the same UIDs with other bytes
#: get HTTP 409 with FailureReason 0x0110 (272) and a private FailureDetail
#: (0009,0097) "An instance already exists in this DICOM Store with the same
#: Study/Series/SOPInstance UID, but the DICOM files differ (checksum mismatch)".
#: 0x0110 with 409 also answers invalid DICOM, so 0x0110 is verified like a duplicate,
#: and fails when the store holds no instance under the UID (``duplicate_absent``).
GOOGLE = ArchiveProfile(
    name="google",
    title="Google Cloud Healthcare API",
    sources=(
        "https://cloud.google.com/healthcare-api/docs/dicom (Store transaction)",
        "https://cloud.google.com/healthcare-api/quotas (DICOM request size limit)",
        "https://github.com/GoogleCloudPlatform/healthcare-api-dicom-fuse/issues/20",
        "https://github.com/dcmjs-org/dcmjs/issues/249",
        "https://github.com/GoogleCloudPlatform/nodejs-docs-samples/issues/3502",
    ),
    duplicate_codes=frozenset({0x0110, 0x0111}),
    retryable_codes=frozenset({0x0213}),
    failure_names={0x0110: "processing failure, or other bytes stored under this UID"},
    duplicate_absent="fail",
    absent_hint="0x0110 without a stored instance is a refusal of the content",
    # Quotas and limits: "Store transaction: Unlimited" in size, but a store
    # transaction "times out if the operation exceeds 30 minutes" (one hour in an older
    # version of the page: the shorter is taken).
    max_request_seconds=1800.0,
    unconfirmed=(
        "The 409/0x0110 duplicate answer comes from issue reports, not Google's"
        " documentation.  The request size is unlimited; the transaction time limit"
        " is given as 30 minutes and, in an older version of the page, one hour."
    ),
)

#: Azure Health Data Services DICOM service (v1 and v2 conformance statements, and its
#: source, microsoft/dicom-server).  FailureReason 45070 (0xB00E) is "already stored"
#: (delete first to replace); 45071 (0xB00F) is an instance being created by another
#: request or an earlier attempt not cleaned up yet: retried.  43264 (0xA900,
#: validation failed) and 43265 (0xA901, study UID differs from the request's) are
#: permanent, 272 (0x0110) is its processing failure (retried, as generic).  An entry
#: it cannot read gets a FailedSOPSequence item without SOP UIDs
#: (StoreResponseBuilder.AddFailure with no dataset).  v2 stores an instance whose
#: non-required attributes fail validation, with WarningReason 45063 (0xB007) or 1 and
#: a FailedAttributesSequence of ErrorComments.  Requests are limited to 4 GB.
AZURE = ArchiveProfile(
    name="azure",
    title="Azure DICOM service",
    sources=(
        "https://learn.microsoft.com/azure/healthcare-apis/dicom/"
        "dicom-services-conformance-statement-v2 (Store, failure and warning codes)",
        "https://learn.microsoft.com/azure/healthcare-apis/dicom/"
        "dicom-services-conformance-statement",
        "https://github.com/microsoft/dicom-server/blob/main/src/Microsoft.Health.Dicom.Core/"
        "Features/Store/FailureReasonCodes.cs (and WarningReasonCodes.cs,"
        " StoreResponseBuilder.cs, StoreService.cs)",
    ),
    duplicate_codes=frozenset({0x0111, 0xB00E}),
    permanent_codes=frozenset({0x0212, 0xA900, 0xA901}),
    retryable_codes=frozenset({0x0110, 0x0213, 0xB00F}),
    warning_names={
        0xB007: "data set does not match SOP class (Azure 45063)",
        0x0001: "data set has validation warnings (Azure 1)",
    },
    failure_names={
        0xA900: "the instance failed validation (Azure 43264)",
        0xA901: "Study Instance UID differs from the request's (Azure 43265)",
        0xB00E: "already stored (Azure 45070)",
        0xB00F: "being created by another request, or an earlier attempt is not cleaned"
        " up yet (Azure 45071)",
        0x0110: "processing failure (Azure 272)",
    },
    max_request_bytes=4_000_000_000,
    max_instance_bytes=4_000_000_000,
    unconfirmed=(
        "43266 is in neither conformance statement nor FailureReasonCodes.cs; an"
        " unknown code is permanent.  '4GB' is taken as 4,000,000,000 bytes."
    ),
)

#: AWS HealthImaging StoreDICOM (its STOW-RS).  At most 1 GB of DICOM data per
#: request.  Data whose metadata conflicts with an existing primary image set is
#: stored in a non-primary image set rather than refused, so a conflicting re-send
#: succeeds silently; GetDICOMInstanceMetadata reads primary image sets only, which is
#: what verification of a re-send compares (``verify_resends``).  Warnings: PS3.18's,
#: and its own 0xB1xx.
AWS = ArchiveProfile(
    name="aws",
    title="AWS HealthImaging",
    sources=(
        "https://docs.aws.amazon.com/healthimaging/latest/devguide/dicomweb-storing.html",
        "https://docs.aws.amazon.com/healthimaging/latest/devguide/"
        "dicomweb-retrieve-instance-metadata.html",
        "https://docs.aws.amazon.com/healthimaging/latest/devguide/reference-warning-codes.html",
    ),
    warning_names={
        0xB100: "transcoding exception: pixel data stored as a blob",
        0xB110: "frames extraction failure",
        0xB111: "frame number mismatch",
    },
    max_request_bytes=1_000_000_000,
    verify_resends=True,
    unconfirmed=(
        "The HTTP status of a request over 1 GB and how an identical re-send is"
        " answered are not documented; '1GB' is taken as 1,000,000,000 bytes."
    ),
)

PROFILES: dict[str, ArchiveProfile] = {p.name: p for p in (GENERIC, ORTHANC, DCM4CHEE, GOOGLE,
                                                           AZURE, AWS)}  # fmt: skip


def profile(name: str) -> ArchiveProfile:
    """The profile of ``upload.archive`` *name* (KeyError for an unknown one; the
    config refuses those)."""
    return PROFILES[name]


# -- verification -------------------------------------------------------------------------

#: DICOM JSON tags (PS3.18 Annex F) of IDENTITY_KEYWORDS.
_IDENTITY_TAGS = {
    "SOPClassUID": "00080016",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "PatientID": "00100020",
    "InstanceNumber": "00200013",
    "Rows": "00280010",
    "Columns": "00280011",
    "NumberOfFrames": "00280008",
}


def _normalized(keyword: str, value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join("" if v is None else str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \0")
    if keyword == "NumberOfFrames" and text == "":
        return "1"  # absent means one frame
    if keyword in ("InstanceNumber", "Rows", "Columns", "NumberOfFrames"):
        try:
            return str(int(float(text)))
        except ValueError:
            return text
    return text


def identity_of_dataset(ds: Dataset) -> dict[str, str]:
    """The identifying attributes of our spool copy (read by pydicom)."""
    return {k: _normalized(k, ds.get(k)) for k in IDENTITY_KEYWORDS}


def identity_of_json(obj: dict[str, Any]) -> dict[str, str]:
    """The identifying attributes of the archive's copy, from its WADO-RS metadata (one
    DICOM JSON object: ``{"00100020": {"vr": "LO", "Value": ["X"]}, ...}``).  Read by
    hand, without validating values an archive may hold as they came."""
    identity = {}
    for keyword, tag in _IDENTITY_TAGS.items():
        element = obj.get(tag)
        value = element.get("Value") if isinstance(element, dict) else None
        identity[keyword] = _normalized(keyword, value if isinstance(value, list) else None)
    return identity


def identity_differences(ours: Mapping[str, str], theirs: Mapping[str, str]) -> list[str]:
    """Which identifying attributes of the archive's copy differ from ours, as
    ``"PatientID archive 'X' vs ours 'Y'"`` (empty: the same instance)."""
    return [
        f"{keyword} archive {theirs.get(keyword, '')!r} vs ours {ours.get(keyword, '')!r}"
        for keyword in IDENTITY_KEYWORDS
        if ours.get(keyword, "") != theirs.get(keyword, "")
    ]

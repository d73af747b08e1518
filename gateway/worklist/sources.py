"""Worklist cache sources besides the upstream MWL SCP: a UPS-RS worklist and a drop folder.

UPS-RS (PS3.18 11.9, Search Transaction): ``GET {worklist.ups_url}/workitems`` for the
SCHEDULED workitems from the expiry cutoff on, over the archive's mutual TLS (the
``[upload]`` ca_file/client_cert/client_key) and with the ``[upload.auth]`` request
credentials (gateway.auth; an HTTP 401 gets fresh ones and one more try), paged with
``limit``/``offset`` while the server says there is more (HTTP 206, or a
``Warning: 299 ... additional results`` header).  Each workitem is turned into an MWL
item by the UPS to MWL mapping of PS3.17 (see :func:`ups_to_mwl`).

Drop folder (``worklist.drop_folder``): a technician adds entries by hand as DICOM JSON
(``*.json``: one object or an array, each object one MWL item) or as DICOM files the way
DCMTK ``wlmscpfs`` keeps them (``*.wl``).  Only regular files directly in the folder are
read; dotfiles and editor or temp files are not.  A file is parsed again only when its
size or modification time changes; a file that cannot be used is logged once, named in
the source's last error, and skipped, and the other files still load.

Both produce plain data sets; :mod:`gateway.worklist.service` owns the cache.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiohttp
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .. import auth as auth_module
from ..auth import AuthError
from ..config import Config
from ..https import http_hint, ssl_context

T = TypeVar("T")

log = logging.getLogger(__name__)

UPS_SOURCE = "ups-rs"
DROP_SOURCE = "drop-folder"

UPS_PAGE = 500
_UPS_MAX_PAGES = 1000  # a server that keeps saying "more" must not loop us forever
_UPS_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=30)

# CID 29 (Acquisition Modality): a DCM code with one of these values names a modality.
_MODALITIES = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DX",
    "ECG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO",
    "LEN", "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF",
    "OPV", "OSS", "OT", "PLAN", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
    "RTIMAGE", "RTPLAN", "RTRECORD", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF",
    "STAIN", "TG", "US", "VA", "XA", "XC",
})  # fmt: skip
# Patient, visit and request attributes that mean the same in a UPS and an MWL item.
_COPIED = [
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientSex", "PatientWeight", "PatientSize", "MedicalAlerts", "Allergies",
    "PregnancyStatus", "PatientComments", "AdmissionID", "ReferringPhysicianName",
    "StudyInstanceUID", "AccessionNumber", "IssuerOfAccessionNumberSequence",
]  # fmt: skip
# From the first Referenced Request Sequence item (the order this step belongs to).
_FROM_REQUEST = [
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyInstanceUID",
    "RequestedProcedureID", "RequestedProcedureDescription", "RequestedProcedureCodeSequence",
    "ReasonForTheRequestedProcedure", "RequestingPhysician",
]  # fmt: skip
_PRIORITY = {"HIGH": "HIGH", "MEDIUM": "MEDIUM", "LOW": "LOW"}


class SourceError(Exception):
    """A refresh that failed as a whole: the source's cached items are kept."""


# --- UPS to MWL -----------------------------------------------------------------------


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _modality(ups: Dataset) -> str:
    """Modality (0008,0060) when the server gives it, else a CID 29 code it names."""
    direct = _text(ups, "Modality")
    if direct:
        return direct
    for keyword in (
        "ScheduledStationClassCodeSequence",
        "ScheduledProtocolCodeSequence",
        "ScheduledWorkitemCodeSequence",
    ):
        for code in ups.get(keyword) or []:
            value = _text(code, "CodeValue")
            if _text(code, "CodingSchemeDesignator") == "DCM" and value in _MODALITIES:
                return value
    return ""


def ups_to_mwl(ups: Dataset) -> Dataset:
    """The MWL item for one UPS workitem (PS3.17, UPS and MWL attribute mapping).

    Scheduled Procedure Step Start DateTime splits into the step's Start Date and Time
    (an offset from UTC is dropped: times are site local, as in the matching); the
    Scheduled Station Name Code Sequence gives the station AE title (Code Value) and
    name (Code Meaning); the accession number and requested procedure come from the
    Referenced Request Sequence; the workitem's own UID is kept as the step's
    Scheduled Procedure Step ID only when it fits (SH, 16 characters).
    """
    mwl = Dataset()
    request = _first(ups, "ReferencedRequestSequence")
    for keyword in _COPIED:
        if keyword in ups:
            setattr(mwl, keyword, ups[keyword].value)
    for keyword in _FROM_REQUEST:
        if request is not None and keyword in request and not _text(mwl, keyword):
            setattr(mwl, keyword, request[keyword].value)
    priority = _PRIORITY.get(_text(ups, "ScheduledProcedureStepPriority"))
    if priority:
        mwl.RequestedProcedurePriority = priority

    step = Dataset()
    modality = _modality(ups)
    if modality:
        step.Modality = modality
    station = _first(ups, "ScheduledStationNameCodeSequence")
    if _text(station, "CodeValue"):
        step.ScheduledStationAETitle = _text(station, "CodeValue")[:16]
    if _text(station, "CodeMeaning"):
        step.ScheduledStationName = _text(station, "CodeMeaning")[:16]
    start = _text(ups, "ScheduledProcedureStepStartDateTime")
    digits = start.split("+")[0].split("-")[0]
    if len(digits) >= 8:
        step.ScheduledProcedureStepStartDate = digits[:8]
        if len(digits) > 8:
            step.ScheduledProcedureStepStartTime = digits[8:]
    performer = _first(ups, "ScheduledHumanPerformersSequence")
    if _text(performer, "HumanPerformerName"):
        assert performer is not None
        step.ScheduledPerformingPhysicianName = performer.HumanPerformerName
    if _text(ups, "ProcedureStepLabel"):
        step.ScheduledProcedureStepDescription = _text(ups, "ProcedureStepLabel")[:64]
    location = _first(ups, "ScheduledStationGeographicLocationCodeSequence")
    if _text(location, "CodeMeaning"):
        step.ScheduledProcedureStepLocation = _text(location, "CodeMeaning")[:16]
    uid = _text(ups, "SOPInstanceUID")
    if uid and len(uid) <= 16:
        step.ScheduledProcedureStepID = uid
    if "ScheduledWorkitemCodeSequence" in ups:
        step.ScheduledProtocolCodeSequence = Sequence(list(ups.ScheduledWorkitemCodeSequence))
    if _text(ups, "CommentsOnTheScheduledProcedureStep"):
        step.CommentsOnTheScheduledProcedureStep = ups.CommentsOnTheScheduledProcedureStep
    mwl.ScheduledProcedureStepSequence = Sequence([step])
    return mwl


def from_dicom_json(obj: Any) -> Dataset:
    """One DICOM JSON object as a data set, ready to be answered in any character set.

    DICOM JSON is Unicode, whatever Specific Character Set it names: an item with text
    beyond ASCII is marked UTF-8 (ISO_IR 192) so it goes out as it came in.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a DICOM JSON object, got {type(obj).__name__}")
    ds = Dataset.from_json(obj)
    if not json.dumps(obj, ensure_ascii=False).isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


# --- UPS-RS client --------------------------------------------------------------------


@dataclass(frozen=True)
class UpsAnswer:
    workitems: list[Dataset]
    problems: list[str]  # workitems that were skipped, and why


def _tls_hint(exc: BaseException) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return f"the UPS-RS server's certificate is not trusted ({text}); check upload.ca_file"
    if any(s in text.upper() for s in ("CERTIFICATE", "ALERT", "HANDSHAKE")):
        return (
            f"TLS with the UPS-RS server failed ({text}): the server may have refused this "
            "box's certificate; check upload.client_cert/client_key"
        )
    return f"TLS with the UPS-RS server failed: {text}"


def _more_pages(status: int, headers: Any) -> bool:
    # PS3.18 8.3.4.4 (Warning 299 "additional results"); older editions answered 206.
    warnings = headers.getall("Warning", []) if hasattr(headers, "getall") else []
    return status == 206 or any("additional result" in w.lower() for w in warnings)


class UpsClient:
    """Search a UPS-RS worklist for the scheduled workitems (one session per refresh)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.url = config.worklist.ups_url.rstrip("/") + "/workitems"
        self.auth = auth_module.shared(config.upload)

    async def scheduled(self, from_date: str) -> UpsAnswer:
        try:
            ctx = ssl_context(self.config.upload)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot load the TLS files from [upload]: {exc}") from exc
        connector = aiohttp.TCPConnector(ssl=ctx, limit=2)
        async with aiohttp.ClientSession(connector=connector, timeout=_UPS_TIMEOUT) as session:
            workitems: list[Dataset] = []
            problems: list[str] = []
            offset = 0
            for _ in range(_UPS_MAX_PAGES):
                page, more = await self._page(session, from_date, offset)
                for number, obj in enumerate(page, start=offset):
                    try:
                        workitems.append(from_dicom_json(obj))
                    except (ValueError, TypeError, KeyError, AttributeError) as exc:
                        problems.append(f"workitem #{number}: not valid DICOM JSON: {exc}")
                if not more or not page:
                    return UpsAnswer(workitems, problems)
                offset += len(page)
            raise SourceError(f"the UPS-RS server still had more after {_UPS_MAX_PAGES} pages")

    async def _page(
        self, session: aiohttp.ClientSession, from_date: str, offset: int
    ) -> tuple[list[Any], bool]:
        params = {
            "ProcedureStepState": "SCHEDULED",
            "ScheduledProcedureStepStartDateTime": f"{from_date}-",
            "includefield": "all",
            "limit": str(UPS_PAGE),
            "offset": str(offset),
        }
        headers = {"Accept": "application/dicom+json"}
        url = auth_module.query_url(self.url, params)
        try:
            reply = await self.auth.send(session, "GET", url, headers=headers)
            body = reply.body
            status, more = reply.status, _more_pages(reply.status, reply.headers)
        except AuthError as exc:
            raise SourceError(f"{exc} (fix: {exc.fix})") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise SourceError(_tls_hint(exc.certificate_error)) from exc
        except aiohttp.ClientSSLError as exc:
            raise SourceError(_tls_hint(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            raise SourceError(f"cannot connect to the UPS-RS server: {exc.os_error}") from exc
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            # With TLS 1.3 the server checks our certificate after our side of the
            # handshake is done: a refusal arrives as an alert on the first read, or,
            # from a server that sends no alert, as a reset or a silent close.
            if "alert" in str(exc).lower():
                raise SourceError(_tls_hint(exc)) from exc
            raise SourceError(
                f"the UPS-RS server dropped the connection without answering ({exc!r}), "
                "as a server that refuses this box's client certificate does under TLS "
                "1.3: check upload.client_cert/client_key are signed by a CA it trusts"
            ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SourceError(f"request to the UPS-RS server failed: {exc!r}") from exc
        if status == 204:
            return [], False
        if status not in (200, 206):
            raise SourceError(
                http_hint("the UPS-RS server", status, body, self.auth,
                          reply.headers.get("WWW-Authenticate", ""), reply.reason)
            )  # fmt: skip
        try:
            page = json.loads(body)
        except ValueError as exc:
            raise SourceError(f"the UPS-RS server's answer is not JSON: {exc}") from exc
        if not isinstance(page, list):
            raise SourceError("the UPS-RS server's answer is not a JSON array of workitems")
        return page, more


# --- drop folder ----------------------------------------------------------------------

_SUFFIXES = (".json", ".wl")
# Editors and copy tools write these next to the real file; they are never entries.
_TEMP_SUFFIXES = ("~", ".swp", ".swo", ".swx", ".tmp", ".part", ".bak")


def is_entry_name(name: str) -> bool:
    lower = name.lower()
    return (
        not name.startswith((".", "#", "~"))
        and lower.endswith(_SUFFIXES)
        and not lower.endswith(_TEMP_SUFFIXES)
    )


def _check_item(ds: Dataset) -> Dataset:
    if not ds.get("ScheduledProcedureStepSequence"):
        raise ValueError("no Scheduled Procedure Step Sequence: not a worklist item")
    ds.to_json_dict()  # decodes every element now, so a bad value fails here, not later
    return ds


def read_entry_file(path: Path) -> list[Dataset]:
    """The worklist items in one drop-folder file; raises if any of them is unusable."""
    if path.name.lower().endswith(".json"):
        try:
            value = json.loads(path.read_bytes())
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
        objects = value if isinstance(value, list) else [value]
        items = []
        for number, obj in enumerate(objects):
            try:
                items.append(_check_item(from_dicom_json(obj)))
            except Exception as exc:
                where = f"item #{number}: " if isinstance(value, list) else ""
                raise ValueError(f"{where}{exc}") from exc
        return items
    # force: wlmscpfs also serves files written without a File Meta header (dump2dcm -F).
    ds = pydicom.dcmread(path, force=True)
    if "file_meta" in ds.__dict__:
        del ds.file_meta
    if not ds.get("ScheduledProcedureStepSequence") and ds.preamble is None:
        raise ValueError("not a DICOM file (no DICM prefix), nor a worklist item")
    return [_check_item(ds)]


@dataclass
class _Seen(Generic[T]):
    signature: tuple[int, int]
    items: list[T]
    error: str | None


@dataclass
class DropScan(Generic[T]):
    changed: bool
    items: list[T]  # what convert() made of each item, in file-name order
    errors: list[str] = field(default_factory=list)  # "name: reason", one per bad file


class DropFolder(Generic[T]):
    """Remembers what each file held, so an unchanged file is neither re-read nor re-logged.

    What is remembered is *convert(file name, index in file, item)*: gateway.worklist.service
    keeps the cache row, not the parsed dataset, so a folder of thousands of items does
    not leave millions of small objects for every full garbage collection to walk (a
    pause of about 0.4 s for 10,000 items).
    """

    def __init__(self, folder: Path, convert: Callable[[str, int, Dataset], T]) -> None:
        self.folder = folder
        self._convert = convert
        self._seen: dict[str, _Seen[T]] = {}
        self._scanned = False

    def _entries(self) -> Iterator[tuple[str, tuple[int, int]]]:
        with os.scandir(self.folder) as it:
            for entry in it:
                if not is_entry_name(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                yield entry.name, (st.st_mtime_ns, st.st_size)

    def scan(self) -> DropScan[T]:
        """Read new and changed files (blocking: run it in a thread)."""
        try:
            present = dict(self._entries())
        except OSError as exc:
            raise SourceError(f"cannot read the drop folder {self.folder}: {exc}") from exc
        changed = not self._scanned or present.keys() != self._seen.keys()
        self._scanned = True
        for name in self._seen.keys() - present.keys():
            del self._seen[name]
        for name, signature in present.items():
            seen = self._seen.get(name)
            if seen is not None and seen.signature == signature:
                continue
            changed = True
            items: list[T] = []
            try:
                for index, ds in enumerate(read_entry_file(self.folder / name)):
                    items.append(self._convert(name, index, ds))
                error = None
            except Exception as exc:  # a hand-made file can be wrong in any way; skip it
                items, error = [], f"{name}: {exc}"
                log.warning("worklist drop folder: skipping %s", error)
            self._seen[name] = _Seen(signature, items, error)
        scan: DropScan[T] = DropScan(changed, [])
        for name in sorted(self._seen):
            seen = self._seen[name]
            scan.items.extend(seen.items)
            if seen.error:
                scan.errors.append(seen.error)
        return scan

"""Presentation context negotiation with real SCUs: the transfer syntax preference of
gateway.dicom.negotiation (never one that loses information), and every storage SOP class
(standard, retired, private, unknown) unless ``dimse.storage_sop_classes`` restricts.

Peers: DCMTK storescu (its defaults, ``-xi``, and ``-xf`` with a profile written here)
and pynetdicom as a requestor.  The accepted syntax is read where it matters: the
queue row's ``transfer_syntax`` and the spooled file's own File Meta.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pynetdicom.acse
import pytest
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    Verification,
)

from gateway.dicom import negotiation, patches
from gateway.dicom.negotiation import STORAGE_TRANSFER_SYNTAXES, TRANSFER_SYNTAX_GROUPS

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import GatewayProcess
from .support.peers import PROPOSE_FLAG, StoreResult, storescu, transfer_syntax_of

ULTRASOUND_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"
MADE_UP_PRIVATE = "1.2.826.0.1.3680043.9.7433.1.99.42"  # an invented vendor class
LOSSY = next(g for g in TRANSFER_SYNTAX_GROUPS if g.title.startswith("Lossy")).uids


# -- the table ---------------------------------------------------------------------------
def test_table_ranks_every_transfer_syntax_pydicom_knows_once() -> None:
    assert len(set(STORAGE_TRANSFER_SYNTAXES)) == len(STORAGE_TRANSFER_SYNTAXES)
    assert set(AllTransferSyntaxes) <= set(STORAGE_TRANSFER_SYNTAXES)
    assert STORAGE_TRANSFER_SYNTAXES[-1] == ImplicitVRLittleEndian
    rank = STORAGE_TRANSFER_SYNTAXES.index
    explicit = rank(ExplicitVRLittleEndian)
    assert rank(ExplicitVRBigEndian) == explicit + 1
    # Deflated: after the native ones (the pipeline cannot recompress it to J2K).
    assert rank(DeflatedExplicitVRLittleEndian) == explicit + 2
    # Lossless compressed (as sent) first, lossy ones after Explicit VR.
    for uid in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201",
                "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                "1.2.840.10008.1.2.5"):  # fmt: skip
        assert rank(UID(uid)) < explicit, uid
    for uid in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.100",
                "1.2.840.10008.1.2.4.107"):  # fmt: skip
        assert rank(UID(uid)) > explicit + 2, uid
    assert all(rank(uid) > explicit + 2 for uid in LOSSY)


def test_services_prefer_explicit_vr() -> None:
    services = negotiation.SERVICE_TRANSFER_SYNTAXES
    assert services[0] == ExplicitVRLittleEndian and services[-1] == ImplicitVRLittleEndian


def test_retired_and_private_classes_are_storage_classes() -> None:
    assert ULTRASOUND_RETIRED in negotiation.RETIRED_STORAGE_CLASSES
    assert "1.2.840.10008.5.1.4.1.1.5" in negotiation.RETIRED_STORAGE_CLASSES  # NM (Retired)
    # Registered storage classes beyond pynetdicom's Storage Service list.
    assert "1.2.840.10008.5.1.4.38.1" in negotiation.STANDARD_STORAGE_CLASSES  # Hanging Protocol
    assert "1.2.840.10008.5.1.4.1.1.501.1" in negotiation.STANDARD_STORAGE_CLASSES  # DICOS CT
    for not_stored in ("1.2.840.10008.1.20.1", "1.2.840.10008.1.20.2", "1.2.840.10008.1.3.10"):
        assert not negotiation.accepts_storage_class(not_stored)  # commitment, DICOMDIR
    for uid in (ULTRASOUND_RETIRED, SIEMENS_CSA_NON_IMAGE, MADE_UP_PRIVATE, CTImageStorage):
        assert negotiation.accepts_storage_class(uid)
        assert not negotiation.accepts_storage_class(uid, [str(ModalityPerformedProcedureStep)])
    # A known class of another service (Q/R FIND) is not taken for storage.
    assert not negotiation.accepts_storage_class("1.2.840.10008.5.1.4.1.2.2.1")


def test_pynetdicom_seam_is_still_there() -> None:
    """patches.install() replaces what ACSE calls with the unrestricted switch on."""
    patches.install()
    from pynetdicom import _config
    from pynetdicom.presentation import negotiate_as_acceptor

    assert _config.UNRESTRICTED_STORAGE_SERVICE is True
    assert pynetdicom.acse.negotiate_unrestricted is negotiate_as_acceptor  # type: ignore[attr-defined]
    source = Path(pynetdicom.acse.__file__).read_text()
    assert "negotiate_unrestricted(" in source, "pynetdicom no longer calls it: revisit install()"


# -- a real gateway ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    g = GatewayProcess(tmp_path_factory.mktemp("negotiation"), upload={"compression": "none"})
    g.start()
    yield g
    assert g.stop() == 0, g.log


def _row(gw: GatewayProcess, sop_uid: str) -> dict[str, object]:
    rows = gw.rows("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    assert len(rows) == 1, f"expected one queue row for {sop_uid}:\n{gw.log[-2000:]}"
    return dict(rows[0])


def _stored_syntax(gw: GatewayProcess, sop_uid: str) -> str:
    """The accepted syntax, from the queue row, checked against the spooled file."""
    row = _row(gw, sop_uid)
    assert transfer_syntax_of(gw.spool / str(row["path"])) == row["transfer_syntax"]
    return str(row["transfer_syntax"])


def _profile(path: Path, sop_class: str, syntaxes: list[str]) -> list[str]:
    """storescu ``-xf`` arguments proposing one context: *sop_class* with *syntaxes*."""
    lines = ["[[TransferSyntaxes]]", "[Proposed]"]
    lines += [f"TransferSyntax{i} = {ts}" for i, ts in enumerate(syntaxes, 1)]
    lines += [
        "[[PresentationContexts]]",
        "[Contexts]",
        f"PresentationContext1 = {sop_class}\\Proposed",
    ]
    lines += ["[[Profiles]]", "[OneContext]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "OneContext"]


def _with_private_tags(tmp_path: Path, name: str = "CT_small.dcm") -> tuple[Path, pydicom.Dataset]:
    path = tmp_path / "private.dcm"
    ds = corpus.with_private_tags(corpus.testdata(name), path)
    return path, ds


@pytest.mark.parametrize(
    "proposed",
    [
        ["LittleEndianExplicit", "LittleEndianImplicit"],
        ["LittleEndianImplicit", "LittleEndianExplicit"],
        ["LittleEndianImplicit", "BigEndianExplicit", "LittleEndianExplicit"],
        # Lossy first: taking it would make storescu compress the raw pixels lossily.
        ["JPEGBaseline", "LittleEndianExplicit"],
    ],
    ids=["explicit-implicit", "implicit-explicit", "implicit-big-explicit", "jpeg-explicit"],
)
def test_one_context_gets_explicit_vr(
    gw: GatewayProcess, tmp_path: Path, proposed: list[str]
) -> None:
    path, ds = _with_private_tags(tmp_path)
    extra = _profile(tmp_path / "storescu.cfg", "CTImageStorage", proposed)
    result = storescu(gw.port, [path], extra=extra)
    assert result.statuses == ["Success"], result.output
    assert _stored_syntax(gw, ds.SOPInstanceUID) == ExplicitVRLittleEndian
    # The point of it: private elements keep their VR (as UN they would be lost).
    stored = pydicom.dcmread(gw.spool / str(_row(gw, ds.SOPInstanceUID)["path"]))
    block = stored.private_block(0x0029, "GATEWAY TEST")
    assert (block[0x01].VR, block[0x01].value) == ("LO", "private text")
    assert block[0x02].VR == "OB"


def test_storescu_defaults_get_explicit_vr(gw: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "mr.dcm"
    ds = corpus.with_new_uids(corpus.testdata("MR_small_implicit.dcm"), path)
    result = storescu(gw.port, [path])  # proposes Explicit LE, Explicit BE, Implicit LE
    assert result.statuses == ["Success"], result.output
    assert _stored_syntax(gw, ds.SOPInstanceUID) == ExplicitVRLittleEndian


def test_implicit_only_is_still_accepted(gw: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ds = corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    result = storescu(gw.port, [path], extra=["-xi"])
    assert result.statuses == ["Success"], result.output
    assert _stored_syntax(gw, ds.SOPInstanceUID) == ImplicitVRLittleEndian


@pytest.mark.parametrize(
    ("name", "combine"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", False),
        ("MR_small_jpeg_ls_lossless.dcm", True),
        ("MR_small_RLE.dcm", False),
        ("MR_small_RLE.dcm", True),
        ("emri_small_jpeg_2k_lossless.dcm", True),
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", True),
        ("image_dfl.dcm", False),
        # Lossy in a context of its own (storescu's default): kept as sent.
        ("JPEG2000.dcm", False),
        ("SC_rgb_small_odd_jpeg.dcm", False),
    ],
)
def test_compressed_file_is_kept_as_sent(
    gw: GatewayProcess, tmp_path: Path, name: str, combine: bool
) -> None:
    """storescu proposes the file's syntax and the uncompressed ones, in separate
    contexts or (``+C``) in one; either way the gateway takes the file's own."""
    path = tmp_path / name
    ds = corpus.with_new_uids(corpus.testdata(name), path)
    sent = transfer_syntax_of(path)
    extra = [PROPOSE_FLAG[sent], *(["+C"] if combine else [])]
    result = storescu(gw.port, [path], extra=extra)
    assert result.statuses == ["Success"], result.output
    assert _stored_syntax(gw, ds.SOPInstanceUID) == sent


def test_deflated_with_explicit_in_one_context_gets_explicit(
    gw: GatewayProcess, tmp_path: Path
) -> None:
    """[Deflated, Explicit, ...] in one context: Explicit VR, the same data set, and one
    the pipeline can compress to JPEG 2000 (pynetdicom proposes Deflated by default)."""
    path = tmp_path / "dfl.dcm"
    ds = corpus.with_new_uids(corpus.testdata("image_dfl.dcm"), path)
    result = storescu(gw.port, [path], extra=["-xd", "+C"])
    assert result.statuses == ["Success"], result.output
    assert _stored_syntax(gw, ds.SOPInstanceUID) == ExplicitVRLittleEndian


def test_lossless_compressed_preferred_in_one_context(gw: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "jls.dcm"
    ds = corpus.with_new_uids(corpus.testdata("MR_small_jpeg_ls_lossless.dcm"), path)
    extra = _profile(
        tmp_path / "storescu.cfg", "MRImageStorage", ["LittleEndianImplicit", "JPEGLSLossless"]
    )
    result = storescu(gw.port, [path], extra=extra)
    assert result.statuses == ["Success"], result.output
    assert _stored_syntax(gw, ds.SOPInstanceUID) == JPEGLSLossless


def _accepted(gw: GatewayProcess, contexts: list[object]) -> list[tuple[str, str]]:
    ae = AE(ae_title="PYNETSCU")
    ae.requested_contexts = contexts  # type: ignore[assignment]
    assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        ordered = sorted(assoc.accepted_contexts, key=lambda cx: cx.context_id or 0)
        return [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in ordered]
    finally:
        assoc.release()


def test_pynetdicom_implicit_then_explicit_gets_explicit(gw: GatewayProcess) -> None:
    both = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    classes = [
        CTImageStorage, Verification, ModalityWorklistInformationFind,
        ModalityPerformedProcedureStep, ULTRASOUND_RETIRED, SIEMENS_CSA_NON_IMAGE,
    ]  # fmt: skip
    accepted = _accepted(gw, [build_context(uid, both) for uid in classes])
    assert accepted == [(str(uid), ExplicitVRLittleEndian) for uid in classes]


def test_receiver_negotiates_with_the_table(gw: GatewayProcess) -> None:
    """The association takes, from any proposal, the best syntax of the table: each
    context proposes the table from rank k on, worst first, and must get rank k."""
    table = list(STORAGE_TRANSFER_SYNTAXES)
    for start in range(0, len(table), 40):  # at most 128 contexts per association
        ranks = range(start, min(start + 40, len(table)))
        contexts = [build_context(CTImageStorage, table[k:][::-1]) for k in ranks]
        accepted = _accepted(gw, contexts)
        assert [ts for _, ts in accepted] == [table[k] for k in ranks]


# -- every storage class -----------------------------------------------------------------
def _as_class(tmp_path: Path, sop_class: str, name: str = "CT_small.dcm") -> tuple[Path, str]:
    ds = pydicom.dcmread(corpus.testdata(name))
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / f"{sop_class}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def _send_class(port: int, tmp_path: Path, path: Path, sop_class: str) -> StoreResult:
    """storescu proposing *sop_class*: ``-R`` (the file's own classes) for a class
    DCMTK knows, a ``-xf`` profile for one it does not (it refuses those with -R)."""
    if sop_class in (MADE_UP_PRIVATE, SIEMENS_CSA_NON_IMAGE):
        both = ["LittleEndianImplicit", "LittleEndianExplicit"]
        return storescu(port, [path], extra=_profile(tmp_path / "scu.cfg", sop_class, both))
    return storescu(port, [path], extra=["-R"])


@pytest.mark.parametrize(
    "sop_class",
    [ULTRASOUND_RETIRED, SIEMENS_CSA_NON_IMAGE, MADE_UP_PRIVATE],
    ids=["us-retired", "siemens-csa", "made-up-private"],
)
def test_retired_and_private_classes_are_stored(
    gw: GatewayProcess, tmp_path: Path, sop_class: str
) -> None:
    path, sop_uid = _as_class(tmp_path, sop_class)
    result = _send_class(gw.port, tmp_path, path, sop_class)
    assert result.statuses == ["Success"], result.output
    row = _row(gw, sop_uid)
    assert row["sop_class_uid"] == sop_class
    assert _stored_syntax(gw, sop_uid) == ExplicitVRLittleEndian


def test_restricted_to_a_list(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    only = [str(CTImageStorage), SIEMENS_CSA_NON_IMAGE]
    g = gateway_factory(dimse={"storage_sop_classes": only})
    listed, listed_uid = _as_class(tmp_path, SIEMENS_CSA_NON_IMAGE)
    ct = tmp_path / "ct.dcm"
    ct_uid = str(corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct).SOPInstanceUID)
    assert _send_class(g.port, tmp_path, listed, SIEMENS_CSA_NON_IMAGE).acknowledged == 1
    assert storescu(g.port, [ct]).statuses == ["Success"]
    mr = tmp_path / "mr.dcm"
    corpus.with_new_uids(corpus.testdata("MR_small.dcm"), mr)
    for sop_class, path in [
        (ULTRASOUND_RETIRED, _as_class(tmp_path, ULTRASOUND_RETIRED)[0]),
        (MADE_UP_PRIVATE, _as_class(tmp_path, MADE_UP_PRIVATE)[0]),
        ("1.2.840.10008.5.1.4.1.1.4", mr),
    ]:
        refused = _send_class(g.port, tmp_path, path, sop_class)
        assert refused.statuses == [], refused.output
        # Refused at association: the one context, or the one for this class.
        said = refused.output.lower()
        assert "no acceptable presentation contexts" in said or (
            "no presentation context for" in said
        ), refused.output
    assert {r["sop_instance_uid"] for r in g.rows()} == {listed_uid, ct_uid}

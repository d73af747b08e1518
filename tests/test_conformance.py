"""The Conformance Statement (docs/conformance.md) is what ``dicom-gateway conformance``
prints, and it states the tables the receiver really negotiates and answers with."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from pynetdicom import AE, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    Verification,
)

from gateway.dicom import dimse_status, negotiation, receive

from .support.gateway_proc import GatewayProcess

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "conformance.md"


def _generated() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "conformance"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def test_docs_conformance_md_is_the_generated_statement() -> None:
    assert DOC.read_text() == _generated(), (
        "docs/conformance.md differs from the code's tables: run "
        "`dicom-gateway conformance > docs/conformance.md` and commit it"
    )


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def _uids(text: str) -> list[str]:
    return re.findall(r"^\| [^|]*\| [^|]*\| `([0-9.]+)` \|", text, flags=re.M)


def test_statement_lists_the_preference_order_and_classes() -> None:
    doc = DOC.read_text()
    storage = _section(doc, "Storage SOP classes, in order of preference", "Verification, Modal")
    assert _uids(storage) == list(negotiation.STORAGE_TRANSFER_SYNTAXES)
    services = _section(
        doc, "Verification, Modality Worklist, MPPS and Storage Commitment (no", "As SCU the"
    )
    assert _uids(services) == list(negotiation.SERVICE_TRANSFER_SYNTAXES)
    for uid in negotiation.STANDARD_STORAGE_CLASSES + negotiation.RETIRED_STORAGE_CLASSES:
        assert f"| `{uid}` |" in doc, uid
    assert "1.2.840.10008.5.1.4.1.1.6`" in doc  # Ultrasound Image Storage (Retired)


def test_every_status_the_store_handler_answers_is_stated() -> None:
    """Each status constant C-STORE can answer (read from receive.py's code) has a row."""
    tree = ast.parse(Path(receive.__file__).read_text())
    used = {
        node.args[0].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("StoreOutcome", "_Refusal")
        and node.args
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id.isupper()  # a status constant, not a pass-through variable
    }
    assert used >= {
        "SUCCESS", "STORE_OUT_OF_RESOURCES", "STORE_DATASET_MISMATCH", "STORE_UNDECODABLE"
    }  # fmt: skip
    doc = DOC.read_text()
    for name in used:
        code = getattr(dimse_status, name)
        assert code in receive.STORE_STATUSES, name
        assert f"| 0x{code:04X} | {receive.STORE_STATUSES[code][0]} |" in doc, name


def _accepted(port: int, sop_class: str, proposals: list[list[str]]) -> list[str]:
    """The syntax a running gateway accepts for each of *proposals* (one context each)."""
    ae = AE(ae_title="CONFORMANCE")
    ae.requested_contexts = [build_context(sop_class, p) for p in proposals]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
    assert assoc.is_established
    try:
        ordered = sorted(assoc.accepted_contexts, key=lambda cx: cx.context_id or 0)
        return [str(cx.transfer_syntax[0]) for cx in ordered]
    finally:
        assoc.release()


def test_the_running_gateway_negotiates_what_the_statement_says(gateway: GatewayProcess) -> None:
    """Each context proposes the statement's list from rank k on, worst first: the
    gateway must pick rank k.  So the order on the wire is the order in the document."""
    doc = DOC.read_text()
    storage = _uids(_section(doc, "Storage SOP classes, in order of preference", "Verification"))
    services = _uids(
        _section(
            doc, "Verification, Modality Worklist, MPPS and Storage Commitment (no", "As SCU the"
        )
    )
    cases = [(str(CTImageStorage), storage), ("1.2.840.10008.5.1.4.1.1.6", storage)]
    cases += [("1.3.12.2.1107.5.9.1", storage)]
    cases += [(str(uid), services) for uid in (Verification, ModalityWorklistInformationFind)]
    cases += [(str(ModalityPerformedProcedureStep), services)]
    for sop_class, order in cases:
        for start in range(0, len(order), 40):  # at most 128 contexts per association
            ranks = range(start, min(start + 40, len(order)))
            proposals = [order[k:][::-1] for k in ranks]
            got = _accepted(gateway.port, sop_class, proposals)
            assert got == [order[k] for k in ranks], sop_class

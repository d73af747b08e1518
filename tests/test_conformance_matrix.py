"""Issue 11, Done when 1: the real-SCU matrix.

The public corpus (tests/support/corpus.py ``MATRIX``) goes through four independent SCUs with
their default proposals (tests/support/scus.py) into one real gateway that compresses and
uploads to the real archive (Orthanc + DICOMweb behind nginx mTLS); each archive copy
is compared with what was sent, element by element, VR included
(tests/support/conformance.py).  Each SCU also sends to a reference DCMTK storescp, so what an
SCU cannot send by its own defaults is reported and not counted against the gateway.

The whole run happens once per module; the tests below each judge one criterion for
one SCU, so a failure names the SCU, the criterion and every corpus file that fails
it.  The full table is written to test-artifacts/conformance-matrix.md.  The large
files run only under ``-m slow`` (:func:`test_full_corpus`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from .support import corpus, scus
from .support.conformance import MatrixRun, Outcome, markdown, run_matrix

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MatrixRun]:
    run = run_matrix(tmp_path_factory.mktemp("matrix"), full=False)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "conformance-matrix.md").write_text(markdown(run))
    yield run


def _listing(outcomes: list[Outcome], why: dict[int, str]) -> str:
    return "\n".join(f"  {outcomes[i].copy.entry.label}: {reason}" for i, reason in why.items())


def test_corpus_is_diverse() -> None:
    entries = corpus.matrix_files(full=False)
    files = [corpus.source_path(e) for e in entries]
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets}
    charsets = {str(ds.get("SpecificCharacterSet", "")) for ds in datasets} - {""}
    assert len(entries) >= 60
    assert len(syntaxes) >= 10, syntaxes
    assert len(charsets) >= 10, charsets
    assert "1.2.840.10008.1.2.2" in syntaxes  # big endian
    assert any("IconImageSequence" in ds for ds in datasets)
    assert any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets)
    assert any(ds.get("PhotometricInterpretation") == "RGB" for ds in datasets)
    assert any(any(t.is_private for t in ds.keys()) for ds in datasets)  # noqa: SIM118
    classes = {e.sop_class for e in entries} | {str(ds.SOPClassUID) for ds in datasets}
    assert corpus.RETIRED_US in classes and corpus.SIEMENS_CSA_NON_IMAGE in classes
    # Every public file is accounted for: in the matrix or excluded with a reason.
    assert all(reason for reason in corpus.EXCLUDED.values())


@pytest.mark.parametrize("scu", scus.SCUS)
def test_scu_sends_most_of_the_corpus(matrix: MatrixRun, scu: str) -> None:
    """The harness itself: each SCU really sent data (to the reference receiver)."""
    outcomes = matrix.for_scu(scu)
    sent = sum(o.sent_by_scu for o in outcomes)
    assert sent >= len(outcomes) // 3, [r.output[-2000:] for r in matrix.runs[scu]]


@pytest.mark.parametrize("scu", scus.SCUS)
def test_every_instance_is_stored(matrix: MatrixRun, scu: str) -> None:
    """What the SCU can send (the reference SCP took it) reaches the archive."""
    outcomes = matrix.for_scu(scu)
    why = {}
    for i, o in enumerate(outcomes):
        if (o.sent_by_scu or o.wire_ts) and not o.stored and not o.archive_refuses_the_original:
            why[i] = o.failure()
    assert not why, f"{scu}: {len(why)} instances not stored:\n" + _listing(outcomes, why)


@pytest.mark.parametrize("scu", scus.SCUS)
def test_no_explicit_vr_downgraded_to_implicit(matrix: MatrixRun, scu: str) -> None:
    outcomes = matrix.for_scu(scu)
    why = {}
    for i, o in enumerate(outcomes):
        downgraded = o.wire_ts and UID(o.wire_ts).is_implicit_VR
        if downgraded and not UID(o.copy.transfer_syntax).is_implicit_VR:
            why[i] = f"{o.copy.transfer_syntax} sent as Implicit VR (reference: {o.reference_ts})"
    assert not why, f"{scu}: {len(why)} explicit-VR instances arrived as Implicit VR:\n" + (
        _listing(outcomes, why)
    )


@pytest.mark.parametrize("scu", scus.SCUS)
def test_archive_copy_is_identical_element_by_element(matrix: MatrixRun, scu: str) -> None:
    """0 lost VRs, 0 changed private values, 0 other changed values, pixels identical."""
    outcomes = matrix.for_scu(scu)
    why = {}
    compared = 0
    for i, o in enumerate(outcomes):
        if o.comparison is None:
            continue
        compared += 1
        if o.comparison.problems:
            kinds = {p.kind for p in o.comparison.problems}
            why[i] = "; ".join(
                f"{sum(p.kind == k for p in o.comparison.problems)} {k} "
                f"(first {next(p for p in o.comparison.problems if p.kind == k)})"
                for k in sorted(kinds)
            )
    assert compared > 0
    assert not why, f"{scu}: {len(why)} of {compared} archive copies differ:\n" + _listing(
        outcomes, why
    )


@pytest.mark.parametrize("scu", scus.SCUS)
def test_icon_images_reach_the_archive_as_jpeg2000(matrix: MatrixRun, scu: str) -> None:
    """Issue 11 point 4: images with an Icon Image Sequence are compressed too.

    The bench (tests/bench/conformance.py) reports coverage of the whole corpus.
    """
    outcomes = matrix.for_scu(scu)
    why = {}
    for i, o in enumerate(outcomes):
        icon = "icon" in o.copy.entry.features
        native = o.wire_ts and not UID(o.wire_ts).is_compressed
        if icon and native and o.stored and o.archive_ts != "1.2.840.10008.1.2.4.90":
            why[i] = f"{o.transcode_outcome}: {o.transcode_reason}"
    assert not why, f"{scu}: icon-sequence images not compressed:\n" + _listing(outcomes, why)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_full_corpus(tmp_path: Path) -> None:
    """Every criterion above on the full corpus, large files included."""
    run = run_matrix(tmp_path, full=True, settle_timeout=900)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "conformance-matrix-full.md").write_text(markdown(run))
    failures = [f"{o.scu} {o.copy.entry.label}: {o.failure()}" for o in run.outcomes if o.failure()]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)

"""The chaos soak (issue 12): storescu keeps sending while the archive misbehaves.

A real gateway uploads to :class:`tests.support.chaos_archive.ChaosArchive` (a fault-injecting
TLS proxy in front of a real Orthanc + DICOMweb) while two DCMTK storescu loops send
new instances and identical and changed re-sends of the same UIDs.  See
:mod:`tests.support.chaos_soak` for what is checked all the while and at the end.

``CHAOS_SECONDS`` sets the duration of the chaos (default 600 s), ``CHAOS_SEED``
replays a run's random choices (not its timing), ``CHAOS_FAULTS=forward,stall,...``
draws only those archive faults (names in :class:`tests.support.chaos_archive.Fault`).
``make bench`` runs a longer one as ``tests/bench/chaos.py``.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from .support import chaos_soak, corpus


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_chaos_soak(tmp_path: Path) -> None:
    seconds = chaos_soak.seconds_from_env(600.0)
    report = chaos_soak.run(
        tmp_path, seconds, chaos_soak.seed_from_env(), faults=chaos_soak.faults_from_env()
    )
    details = report.details()
    print(details)
    # THE assertion: each violation is a broken promise (the gateway exited, C-ECHO
    # went unanswered, an acknowledged instance is neither in the archive with its
    # last content nor failed with a reason, a row points at a missing file).
    assert report.violations == [], details
    assert report.drained, details
    # The soak must have tested something: acknowledged sends of each kind, and the
    # archive must have answered with faults as well as with Orthanc's answers.
    acked = {s.kind for s in report.sends if s.acknowledged}
    assert acked == {"new", "identical", "changed"}, details
    assert report.in_archive > 0, details
    if chaos_soak.faults_from_env() is None:
        assert len(report.archive_answers) >= 6, details
    assert report.orthanc_restarts >= 1, details
    assert report.echoes_ok >= seconds / 2, details


# -- the soak's own judgement, checked quickly (these run in `make test`) ----------------


def _send(n: int, status: str, started: float, ended: float) -> chaos_soak.Send:
    return chaos_soak.Send(n, "1.2.3", "changed", Path(f"{n}.dcm"), f"m{n}", 1, started, ended,
                           status)  # fmt: skip


def test_last_content_is_any_send_no_acknowledged_send_followed() -> None:
    a = _send(1, "Success", 0.0, 1.0)
    b = _send(2, "Success", 2.0, 3.0)  # started after a ended: a is superseded
    c = _send(3, "no response", 2.5, 4.0)  # overlaps b, unacknowledged: may have landed
    d = _send(4, "not sent", 5.0, 6.0)  # never reached the gateway
    assert chaos_soak._possibly_last([a, b, c, d]) == [b, c]
    # Concurrent acknowledged sends (two associations) are both acceptable.
    e = _send(5, "Success", 2.2, 2.8)
    assert chaos_soak._possibly_last([a, b, e]) == [b, e]


def test_compare_sees_other_marker_and_other_pixels(tmp_path: Path) -> None:
    ds = pydicom.dcmread(corpus.testdata("CT_small.dcm"))
    block = ds.private_block(chaos_soak.PRIVATE_GROUP, chaos_soak.PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", "send 1")
    sent = tmp_path / "sent.dcm"
    ds.save_as(sent, enforce_file_format=True)
    assert chaos_soak._compare(pydicom.dcmread(sent), sent) == []
    other = pydicom.dcmread(sent)
    other.private_block(chaos_soak.PRIVATE_GROUP, chaos_soak.PRIVATE_CREATOR)[0x10].value = "x"
    pixels = bytearray(other.PixelData)
    pixels[0] ^= 1
    other.PixelData = bytes(pixels)
    assert chaos_soak._compare(other, sent) == ["private marker 'x'", "PixelData bytes differ"]

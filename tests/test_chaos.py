"""The chaos soak (issue 12): storescu keeps sending while the archive misbehaves.

A real gateway uploads to :class:`tests.chaos_archive.ChaosArchive` (a fault-injecting
TLS proxy in front of a real Orthanc + DICOMweb) while two DCMTK storescu loops send
new instances and identical and changed re-sends of the same UIDs.  See
:mod:`tests.chaos_soak` for what is checked all the while and at the end.

``CHAOS_SECONDS`` sets the duration of the chaos (default 600 s), ``CHAOS_SEED``
replays a run's random choices (not its timing), ``CHAOS_FAULTS=forward,stall,...``
draws only those archive faults (names in :class:`tests.chaos_archive.Fault`).
``make bench`` runs a longer one as ``tests/bench/chaos.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import chaos_soak


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

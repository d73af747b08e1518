"""C-FIND matching rules (PS3.4 C.2.2.2) used by the worklist cache."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.worklist.match import find, matches, response


def _item(**kw: object) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = kw.get("name", "Dvořák^Zdeněk")
    ds.PatientID = kw.get("pid", "P1")
    ds.StudyInstanceUID = "1.2.3"
    steps = []
    for modality, station, day, tm in kw.get(  # type: ignore[attr-defined]
        "steps", [("CT", "CT1", "20261124", "081500")]
    ):
        step = Dataset()
        step.Modality = modality
        step.ScheduledStationAETitle = station
        step.ScheduledProcedureStepStartDate = day
        step.ScheduledProcedureStepStartTime = tm
        steps.append(step)
    ds.ScheduledProcedureStepSequence = Sequence(steps)
    return ds


def _query(step: dict[str, str] | None = None, **top: str) -> Dataset:
    q = Dataset()
    for key, value in top.items():
        setattr(q, key, value)
    if step is not None:
        s = Dataset()
        for key, value in step.items():
            setattr(s, key, value)
        q.ScheduledProcedureStepSequence = Sequence([s])
    return q


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (_query(PatientName=""), True),  # universal
        (_query(PatientName="Dvořák^Zdeněk"), True),
        (_query(PatientName="dvořák^zdeněk"), True),  # PN: case-insensitive
        (_query(PatientName="Dvo*"), True),
        (_query(PatientName="dvo*"), True),
        (_query(PatientName="Dvo?ák*"), True),
        (_query(PatientName="Dvo"), False),  # single value is exact
        (_query(PatientName="*ZDENĚK"), True),
        (_query(PatientID="P1"), True),
        (_query(PatientID="p1"), False),  # LO: case-sensitive
        (_query(PatientID="P*"), True),
        (_query(StudyInstanceUID="1.2.9\\1.2.3"), True),  # list of UIDs
        (_query(StudyInstanceUID="1.2.9\\1.2.4"), False),
        (_query({"Modality": "CT"}), True),
        (_query({"Modality": "MR"}), False),
        (_query({"ScheduledStationAETitle": "CT1", "Modality": "CT"}), True),
        (_query({"ScheduledStationAETitle": "CT1", "Modality": "MR"}), False),
        (_query({"ScheduledProcedureStepStartDate": "20261124"}), True),
        (_query({"ScheduledProcedureStepStartDate": "20261120-20261130"}), True),
        (_query({"ScheduledProcedureStepStartDate": "20261125-"}), False),
        (_query({"ScheduledProcedureStepStartDate": "-20261124"}), True),
        (_query({"ScheduledProcedureStepStartTime": "0800-0900"}), True),
        (_query({"ScheduledProcedureStepStartTime": "081501-"}), False),
        (_query({"ScheduledProcedureStepStartTime": "081500.000000"}), True),
        (_query({}), True),  # empty sequence item: universal
        (_query(SpecificCharacterSet="ISO_IR 100", PatientName="Dvo*"), True),  # not a key
    ],
)
def test_rules(query: Dataset, expected: bool) -> None:
    assert matches(_item(), query) is expected


def test_missing_attribute_only_matches_universally() -> None:
    item = _item()
    del item.PatientID
    assert matches(item, _query(PatientID=""))
    assert not matches(item, _query(PatientID="P1"))


def test_any_sequence_item_may_match_and_only_matching_ones_return() -> None:
    item = _item(steps=[("CT", "CT1", "20261124", "0800"), ("MR", "MR1", "20261125", "0900")])
    query = _query({"Modality": "MR", "ScheduledStationAETitle": ""}, PatientName="")
    (answer,) = find([item], query)
    (step,) = answer.ScheduledProcedureStepSequence
    assert step.Modality == "MR" and step.ScheduledStationAETitle == "MR1"
    assert set(step.dir()) == {"Modality", "ScheduledStationAETitle"}


def test_response_has_exactly_the_return_keys() -> None:
    query = _query({"Modality": ""}, PatientName="", AccessionNumber="")
    answer = response(_item(), query)
    assert set(answer.dir()) == {
        "SpecificCharacterSet", "PatientName", "AccessionNumber", "ScheduledProcedureStepSequence",
    }  # fmt: skip
    assert answer.AccessionNumber in (None, "")  # asked for, item has none: empty
    assert str(answer.PatientName) == "Dvořák^Zdeněk"
    assert answer.SpecificCharacterSet == "ISO_IR 192"


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E,
                                      exclude_characters="*?\\^="), min_size=1, max_size=20),
       st.text(alphabet="abcXYZ", min_size=0, max_size=5))  # fmt: skip
def test_prefix_wildcard_property(value: str, prefix: str) -> None:
    item = _item(name=value)
    assert matches(item, _query(PatientName=value))
    assert matches(item, _query(PatientName="*"))
    expected = value.casefold().startswith(prefix.casefold())
    assert matches(item, _query(PatientName=prefix + "*")) is expected

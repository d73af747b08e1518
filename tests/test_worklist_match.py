"""Modality Worklist C-FIND matching (gateway.worklist.match), PS3.4 C.2.2.2."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from gateway.worklist.match import find, matches, response

UID = "1.2.826.0.1.3680043.2.1143.1"

CT_STEP: dict[str, Any] = {
    "Modality": "CT",
    "ScheduledStationAETitle": "CT1",
    "ScheduledProcedureStepStartDate": "20261124",
    "ScheduledProcedureStepStartTime": "081500",
    "ScheduledPerformingPhysicianName": "House^Gregory",
    "ScheduledProcedureStepID": "SPS1",
    "ScheduledProcedureStepDescription": "Thorax",
    "ScheduledProtocolCodeSequence": [{"CodeValue": "X1", "CodingSchemeDesignator": "99L"}],
}
MR_STEP: dict[str, Any] = {
    "Modality": "MR",
    "ScheduledStationAETitle": "MR1",
    "ScheduledProcedureStepStartDate": "20261125",
    "ScheduledProcedureStepStartTime": "0900",
    "ScheduledProcedureStepID": "SPS2",
}


def ds(**attrs: Any) -> Dataset:
    """A data set from keywords; a list of dicts makes a sequence.

    Validation is off because queries legitimately hold values that are invalid for
    the VR ("C?" in a CS, a range in a DA), and pytest turns pydicom's warning into
    an error.
    """
    out = Dataset()
    for keyword, value in attrs.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        vr = dictionary_VR(tag)
        if vr == "SQ":
            value = Sequence([ds(**sub) for sub in value])
        out.add(DataElement(tag, vr, value, validation_mode=config.IGNORE))
    return out


def item(**overrides: Any) -> Dataset:
    attrs: dict[str, Any] = {
        "SpecificCharacterSet": "ISO_IR 192",
        "PatientName": "Dvořák^Zdeněk",
        "PatientID": "P1",
        "PatientBirthDate": "19700101",
        "PatientWeight": "70",
        "AccessionNumber": "A100",
        "StudyInstanceUID": UID,
        "RequestedProcedureID": "RP1",
        "RequestedProcedureDescription": "CT Thorax",
        "ScheduledProcedureStepSequence": [CT_STEP],
    }
    attrs.update(overrides)
    return ds(**{k: v for k, v in attrs.items() if v is not None})  # None: leave it out


def query(step: dict[str, Any] | None = None, **top: Any) -> Dataset:
    if step is not None:
        top["ScheduledProcedureStepSequence"] = [step]
    return ds(**top)


def case(q: Dataset, expected: bool, id: str) -> Any:
    return pytest.param(q, expected, id=id)


def sps(**keys: Any) -> Dataset:
    return query(keys)


UNIVERSAL = [
    case(query(PatientName=""), True, "empty PN"),
    case(query(ReferringPhysicianName=""), True, "empty key the item lacks"),
    case(query(ReferringPhysicianName="*"), True, "lone * on an attribute the item lacks"),
    case(query(ScheduledProcedureStepSequence=[]), True, "sequence without item"),
    case(sps(), True, "sequence with an empty item"),
    case(sps(Modality="", ScheduledStationAETitle=""), True, "sequence of return keys"),
    case(query(ScheduledProcedureStepStartDate="*"), True, "lone * in a DA"),
    case(query(PatientID="**"), True, "only asterisks"),
    case(query(), True, "empty identifier"),
]
SINGLE_VALUE = [
    case(query(PatientID="P1"), True, "LO exact"),
    case(query(PatientID="p1"), False, "LO is case-sensitive"),
    case(query(PatientID="P"), False, "LO is not a prefix match"),
    case(query(PatientID=" P1 "), True, "LO padding is not significant"),
    case(query(AccessionNumber="A100"), True, "SH exact"),
    case(query(AccessionNumber="A10"), False, "SH shorter"),
    case(sps(Modality="CT"), True, "CS exact"),
    case(sps(Modality="ct"), False, "CS is case-sensitive"),
    case(sps(Modality="MR"), False, "CS other"),
    case(query(PatientName="Dvořák^Zdeněk"), True, "PN exact"),
    case(query(PatientName="DVOŘÁK^ZDENĚK"), True, "PN upper case"),
    case(query(PatientName="dvořák^zdeněk"), True, "PN lower case"),
    case(query(PatientName="Dvořák^Zdeněk^^^"), True, "PN trailing empty components"),
    case(query(PatientName="Dvořák"), False, "PN ^ is literal: family name alone"),
    case(query(PatientName="Zdeněk^Dvořák"), False, "PN components swapped"),
    case(query(PatientName="Dvorak^Zdenek"), False, "PN is accent-sensitive"),
    case(query(PatientWeight="70.0"), True, "DS compares as a number"),
    case(query(PatientWeight="71"), False, "DS other number"),
    case(query(AccessionNumber='""'), False, "empty value matching, item has one"),
    case(query(ReferringPhysicianName='""'), True, "empty value matching, item lacks it"),
]
WILDCARD = [
    case(query(PatientName="Dvo*"), True, "PN family-name prefix"),
    case(query(PatientName="dvo*"), True, "PN wildcard ignores case"),
    case(query(PatientName="DVOŘ*"), True, "PN wildcard ignores case beyond ASCII"),
    case(query(PatientName="Dvx*"), False, "PN other prefix"),
    case(query(PatientName="Dvo?ák^*"), True, "PN ? is one character"),
    case(query(PatientName="Dvořák^Zdeně?"), True, "PN trailing ?"),
    case(query(PatientName="Dvořák^Zdeně??"), False, "PN ? is exactly one character"),
    case(query(PatientName="*zdeněk"), True, "PN suffix"),
    case(query(PatientName="*^Zd"), False, "PN suffix must reach the end"),
    case(query(PatientName="D*k^*k"), True, "PN several stars"),
    case(query(PatientID="P*"), True, "LO prefix"),
    case(query(PatientID="p*"), False, "LO wildcard is case-sensitive"),
    case(query(PatientID="?1"), True, "LO ?"),
    case(query(PatientID="??1"), False, "LO ? too many"),
    case(query(AccessionNumber="A1*0"), True, "SH inner star"),
    case(query(RequestedProcedureDescription="*Thorax"), True, "LO suffix"),
    case(query(RequestedProcedureDescription="*thorax"), False, "LO suffix case"),
    case(sps(Modality="C?"), True, "CS ?"),
    case(sps(Modality="M*"), False, "CS other prefix"),
    case(sps(ScheduledStationAETitle="CT*"), True, "AE prefix"),
    case(sps(ScheduledStationAETitle="MR*"), False, "AE other prefix"),
    case(sps(ScheduledPerformingPhysicianName="house*"), True, "PN in the step"),
    case(query(StudyInstanceUID="1.2.*"), False, "no wildcards on UI"),
    case(query(PatientBirthDate="1970*"), False, "no wildcards on DA"),
]
DATE_RANGE = [
    case(sps(ScheduledProcedureStepStartDate="20261124"), True, "single date"),
    case(sps(ScheduledProcedureStepStartDate="20261123"), False, "other date"),
    case(sps(ScheduledProcedureStepStartDate="20261120-20261130"), True, "inside A-B"),
    case(sps(ScheduledProcedureStepStartDate="20261124-20261124"), True, "A-B on one day"),
    case(sps(ScheduledProcedureStepStartDate="20261125-20261130"), False, "after A-B"),
    case(sps(ScheduledProcedureStepStartDate="20261101-20261123"), False, "before A-B"),
    case(sps(ScheduledProcedureStepStartDate="20261124-"), True, "A- inclusive"),
    case(sps(ScheduledProcedureStepStartDate="20261125-"), False, "A- later"),
    case(sps(ScheduledProcedureStepStartDate="-20261124"), True, "-B inclusive"),
    case(sps(ScheduledProcedureStepStartDate="-20261123"), False, "-B earlier"),
    case(sps(ScheduledProcedureStepStartDate="20261130-20261120"), False, "reversed range"),
    case(sps(ScheduledProcedureStepStartDate="20261120 - 20261130"), True, "spaced range"),
    case(sps(ScheduledProcedureStepStartDate="2026.11.24"), True, "ACR-NEMA date"),
    case(sps(ScheduledProcedureStepStartDate="tomorrow"), False, "malformed date"),
    case(sps(ScheduledProcedureStepStartDate="20261124\\20261125"), True, "list of dates"),
]
TIME_RANGE = [  # the CT step starts at 081500
    case(sps(ScheduledProcedureStepStartTime="081500"), True, "single time"),
    case(sps(ScheduledProcedureStepStartTime="081500.000000"), True, "with fraction"),
    case(sps(ScheduledProcedureStepStartTime="0815"), True, "HHMM spans the minute"),
    case(sps(ScheduledProcedureStepStartTime="08"), True, "HH spans the hour"),
    case(sps(ScheduledProcedureStepStartTime="081501"), False, "other second"),
    case(sps(ScheduledProcedureStepStartTime="0800-0900"), True, "inside HHMM range"),
    case(sps(ScheduledProcedureStepStartTime="0816-0900"), False, "after the start"),
    case(sps(ScheduledProcedureStepStartTime="-0815"), True, "-B includes its minute"),
    case(sps(ScheduledProcedureStepStartTime="-0814"), False, "-B earlier"),
    case(sps(ScheduledProcedureStepStartTime="081500-"), True, "A- inclusive"),
    case(sps(ScheduledProcedureStepStartTime="081501-"), False, "A- later"),
    case(sps(ScheduledProcedureStepStartTime="081459.999999-081500.000001"), True, "tight"),
    case(sps(ScheduledProcedureStepStartTime="08:15:00"), True, "ACR-NEMA colons"),
    case(sps(ScheduledProcedureStepStartTime="2200-0900"), False, "crossing midnight"),
    case(sps(ScheduledProcedureStepStartTime="2500"), False, "malformed time"),
]
UID_LIST = [
    case(query(StudyInstanceUID=UID), True, "single UID"),
    case(query(StudyInstanceUID=f"1.2.9\\{UID}"), True, "second of a list"),
    case(query(StudyInstanceUID=f"{UID}\\1.2.9"), True, "first of a list"),
    case(query(StudyInstanceUID="1.2.9\\1.2.8"), False, "not in the list"),
    case(query(StudyInstanceUID=UID[:-1]), False, "a prefix is not a UID"),
]
SEQUENCE = [
    case(sps(Modality="CT", ScheduledStationAETitle="CT1"), True, "all step keys match"),
    case(sps(Modality="CT", ScheduledStationAETitle="MR1"), False, "one step key fails"),
    case(sps(ScheduledProcedureStepID="SPS1", Modality=""), True, "key and return key"),
    case(sps(ScheduledProtocolCodeSequence=[{"CodeValue": "X1"}]), True, "nested sequence"),
    case(sps(ScheduledProtocolCodeSequence=[{"CodeValue": "X2"}]), False, "nested, no match"),
    case(
        query(PatientID="P1", ScheduledProcedureStepSequence=[{"Modality": "MR"}]),
        False,
        "top matches, step does not",
    ),
]
NOT_KEYS = [
    case(query(SpecificCharacterSet="ISO_IR 100", PatientName="Dvo*"), True, "charset"),
    case(query(TimezoneOffsetFromUTC="+0100", PatientID="P1"), True, "timezone offset"),
]


@pytest.mark.parametrize(
    ("q", "expected"),
    UNIVERSAL + SINGLE_VALUE + WILDCARD + DATE_RANGE + TIME_RANGE + UID_LIST + SEQUENCE + NOT_KEYS,
)
def test_rule(q: Dataset, expected: bool) -> None:
    assert matches(item(), q) is expected
    assert len(list(find([item()], q))) == int(expected)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        case(query(PatientName=""), True, "universal"),
        case(query(PatientName="*"), True, "lone star"),
        case(query(PatientName="?*"), False, "wildcard needs a value"),
        case(query(PatientName="x"), False, "single value"),
        case(sps(), True, "empty sequence item"),
        case(sps(Modality=""), True, "return keys only"),
        case(sps(Modality="CT"), False, "step key, no steps"),
    ],
)
def test_item_lacking_the_attribute(q: Dataset, expected: bool) -> None:
    # K.2.2.1.1.1: an unknown value fails every matching key; only universal keys pass.
    bare = item(PatientName=None, ScheduledProcedureStepSequence=None)
    assert matches(bare, q) is expected
    assert matches(item(PatientName="", ScheduledProcedureStepSequence=[]), q) is expected


@pytest.mark.parametrize(
    ("value", "q", "expected"),
    [
        ("081500.5", "081500.4-081500.6", True),
        ("081500.5", "081500.6-", False),
        ("081500.5", "081500", True),  # 081500 spans its second
        ("0815", "081500", True),  # an item's short time is its first instant
        ("0815", "081501-", False),
        ("235959.999999", "23-", True),
        ("", "0800-0900", False),
        ("nonsense", "-2359", False),
    ],
)
def test_item_time_precision(value: str, q: str, expected: bool) -> None:
    step = {**CT_STEP, "ScheduledProcedureStepStartTime": value}
    stored = item(ScheduledProcedureStepSequence=[step])
    assert matches(stored, sps(ScheduledProcedureStepStartTime=q)) is expected


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("20261124070000+0000-20261124073000+0000", True),  # 08:15+01:00 is 07:15 UTC
        ("20261124080000+0000-20261124090000+0000", False),  # offsets are honoured
        ("20261124081500-0500", False),  # one instant, 13:15 UTC
        ("20261124071500+0000", True),
        ("20261124", True),  # no offset in the query: wall-clock time, the whole day
        ("2026-2027", True),  # a range, not 2026 at offset -20:27
        ("202611-", True),
        ("20261125-", False),
        ("-202611240815", True),
    ],
)
def test_datetime_range(q: str, expected: bool) -> None:
    timed = item(AcquisitionDateTime="20261124081500+0100")
    assert matches(timed, query(AcquisitionDateTime=q)) is expected


def test_two_steps_only_the_second_matches() -> None:
    two = item(ScheduledProcedureStepSequence=[CT_STEP, MR_STEP])
    q = sps(Modality="MR", ScheduledProcedureStepStartDate="20261125", ScheduledStationAETitle="")
    assert matches(two, q)
    (answer,) = find([two], q)
    (step,) = answer.ScheduledProcedureStepSequence  # the CT step is not returned
    assert step.Modality == "MR" and step.ScheduledStationAETitle == "MR1"
    assert set(step.keys()) == set(q.ScheduledProcedureStepSequence[0].keys())
    # All keys of the query item must hold in one and the same step.
    assert not matches(two, sps(Modality="MR", ScheduledProcedureStepStartDate="20261124"))
    assert not matches(two, sps(Modality="US"))


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (sps(ScheduledStationAETitle="CT2"), True),
        (sps(ScheduledStationAETitle="*2"), True),
        (sps(ScheduledStationAETitle="CT3"), False),
        (sps(Modality="MR\\CT"), True),  # a multi-valued key: any of its values
        (sps(Modality="MR\\US"), False),
        (query(OtherPatientIDs="OLD7"), True),
        (query(OtherPatientIDs="OLD*"), True),
        (query(OtherPatientIDs="NEW*"), False),
    ],
)
def test_multi_valued_item_attribute(q: Dataset, expected: bool) -> None:
    step = {**CT_STEP, "ScheduledStationAETitle": ["CT1", "CT2"]}
    multi = item(ScheduledProcedureStepSequence=[step], OtherPatientIDs=["X1", "OLD7"])
    assert matches(multi, q) is expected


def test_trailing_empty_name_components_from_the_ris() -> None:
    ris = item(PatientName="DOE^JOHN^^^")
    assert matches(ris, query(PatientName="doe^john"))
    assert matches(ris, query(PatientName="DOE^JOHN^"))
    assert not matches(ris, query(PatientName="DOE^JOHN^X"))


def test_private_keys_are_not_matched_and_not_invented() -> None:
    q = query(PatientID="P1")
    q.private_block(0x0099, "ACME 1.0", create=True).add_new(0x01, "LO", "x")
    assert matches(item(), q)
    answer = response(item(), q)
    assert not any(elem.tag.is_private for elem in answer)


# --- character sets: values arrive decoded, each side with its own charset -----------


def wire(dataset: Dataset) -> Dataset:
    """Encode as the SCU would and decode as the SCP does (implicit VR little endian)."""
    raw = encode(dataset, True, True)
    assert raw is not None
    return decode(io.BytesIO(raw), True, True)


CZECH = wire(item(SpecificCharacterSet="ISO_IR 192", PatientName="Dvořák^Zdeněk"))
GERMAN = wire(item(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen", PatientID="P2"))


@pytest.mark.parametrize(
    ("charset", "name", "czech", "german"),
    [
        ("ISO_IR 192", "Dvo*", True, False),
        ("ISO_IR 192", "dvořák*", True, False),
        ("ISO_IR 192", "DVOŘÁK^ZDENĚK", True, False),
        ("ISO_IR 192", "Mül*", False, True),  # UTF-8 query, Latin-1 item
        ("ISO_IR 100", "Mül*", False, True),
        ("ISO_IR 100", "müller*", False, True),
        ("ISO_IR 100", "MÜLLER^JÜRGEN", False, True),
        ("ISO_IR 100", "*^J?rgen", False, True),
        (None, "Dvo*", True, False),  # default repertoire query, UTF-8 item
        ("ISO_IR 192", "Mul*", False, False),  # an umlaut is not a plain u
        ("ISO_IR 192", "*", True, True),
    ],
)
def test_character_sets(charset: str | None, name: str, czech: bool, german: bool) -> None:
    q = query(PatientName=name, PatientID="")
    if charset is not None:
        q.SpecificCharacterSet = charset
    q = wire(q)
    assert (matches(CZECH, q), matches(GERMAN, q)) == (czech, german)


def test_response_keeps_decoded_values_and_the_item_charset() -> None:
    q = wire(query(SpecificCharacterSet="ISO_IR 192", PatientName="*", PatientID=""))
    czech, german = find([CZECH, GERMAN], q)
    assert (czech.SpecificCharacterSet, str(czech.PatientName)) == ("ISO_IR 192", "Dvořák^Zdeněk")
    assert (german.SpecificCharacterSet, str(german.PatientName)) == ("ISO_IR 100", "Müller^Jürgen")
    # Each answer encodes in its own character set and reads back the same.
    assert str(wire(german).PatientName) == "Müller^Jürgen"
    assert str(wire(czech).PatientName) == "Dvořák^Zdeněk"


# --- return keys ---------------------------------------------------------------------


def test_response_has_exactly_the_query_keys() -> None:
    step_keys = {
        "Modality": "",
        "ScheduledStationAETitle": "",
        "ScheduledProcedureStepStartDate": "20261124",
        "ScheduledPerformingPhysicianName": "",
        "CommentsOnTheScheduledProcedureStep": "",  # the step lacks it
    }
    q = query(
        step_keys,
        SpecificCharacterSet="ISO_IR 100",
        PatientName="",
        PatientID="P1",
        AccessionNumber="",
        ReferringPhysicianName="",  # the item lacks it
        PatientSize="",  # the item lacks it; DS
    )
    answer = response(item(), q)
    assert set(answer.keys()) == set(q.keys())
    assert answer.SpecificCharacterSet == "ISO_IR 192"  # the item's, not the query's
    assert str(answer.PatientName) == "Dvořák^Zdeněk" and answer.PatientID == "P1"
    assert answer.AccessionNumber == "A100"
    assert answer.ReferringPhysicianName == "" and answer.PatientSize is None
    assert "StudyInstanceUID" not in answer and "PatientBirthDate" not in answer
    (step,) = answer.ScheduledProcedureStepSequence
    assert set(step.dir()) == set(step_keys)
    assert (step.Modality, step.ScheduledStationAETitle) == ("CT", "CT1")
    assert str(step.ScheduledPerformingPhysicianName) == "House^Gregory"
    assert step.CommentsOnTheScheduledProcedureStep == ""
    assert [elem.VR for elem in answer] == [elem.VR for elem in q]


def test_response_nested_sequence_keys_only() -> None:
    q = sps(Modality="", ScheduledProtocolCodeSequence=[{"CodeValue": ""}])
    (step,) = response(item(), q).ScheduledProcedureStepSequence
    (code,) = step.ScheduledProtocolCodeSequence
    assert set(code.dir()) == {"CodeValue"} and code.CodeValue == "X1"


@pytest.mark.parametrize("q", [query(ScheduledProcedureStepSequence=[]), sps()])
def test_empty_query_sequence_returns_the_whole_sequence(q: Dataset) -> None:
    # C.2.2.2.6: no item, or an empty one, asks for the entire sequence.
    stored = item(ScheduledProcedureStepSequence=[CT_STEP, MR_STEP])
    answer = response(stored, q)
    assert answer.ScheduledProcedureStepSequence == stored.ScheduledProcedureStepSequence
    answer.ScheduledProcedureStepSequence[0].Modality = "XX"  # a copy, not the cache's
    assert stored.ScheduledProcedureStepSequence[0].Modality == "CT"


def test_response_for_missing_sequence_and_charset() -> None:
    bare = item(SpecificCharacterSet=None, ScheduledProcedureStepSequence=None)
    q = query({"Modality": ""}, SpecificCharacterSet="ISO_IR 192", PatientID="")
    answer = response(bare, q)
    assert set(answer.dir()) == {"PatientID", "ScheduledProcedureStepSequence"}
    assert len(answer.ScheduledProcedureStepSequence) == 0


def test_response_values_are_copies() -> None:
    stored = item(OtherPatientIDs=["X1", "X2"])
    answer = response(stored, query(OtherPatientIDs="", PatientName=""))
    answer.OtherPatientIDs.append("X3")
    assert list(stored.OtherPatientIDs) == ["X1", "X2"]


def test_find_yields_matching_items_in_order() -> None:
    items = [
        item(PatientID="P1"),
        item(PatientID="P2", ScheduledProcedureStepSequence=[MR_STEP]),
        item(PatientID="P3"),
    ]
    answers = find(items, sps(Modality="CT", ScheduledProcedureStepID=""))
    assert iter(answers) is answers  # lazy: the SCP can stop on C-CANCEL
    assert [a.get("PatientID") for a in answers] == [None, None]
    answers = find(items, query({"Modality": "CT"}, PatientID=""))
    assert [a.PatientID for a in answers] == ["P1", "P3"]
    assert list(find([], query(PatientID=""))) == []


# --- properties ----------------------------------------------------------------------

# Printable ASCII without the wildcards, the value separator "\" and "=" (which would
# make a multi-group PN): everything else is a literal character, "^" included.
_ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="*?\\=")
# Trailing padding and trailing empty name components carry no meaning (PS3.5 6.2), so
# values are generated without them. A query of two quotation marks is empty value
# matching, so no query can ask for the literal value '""'.
_NAMES = st.text(_ASCII, min_size=1, max_size=30).map(lambda s: s.rstrip("^ "))
_IDS = st.text(_ASCII, min_size=1, max_size=30).map(lambda s: s.strip(" "))
_NAMES, _IDS = (values.filter(lambda s: s != '""') for values in (_NAMES, _IDS))
_PREFIXES = st.text(_ASCII, max_size=4) | st.sampled_from(["", "a", "A", "Ab", "x^"])


@settings(max_examples=150, deadline=None)
@given(value=_NAMES, prefix=_PREFIXES)
def test_person_name_property(value: str, prefix: str) -> None:
    stored = item(PatientName=value)
    assert matches(stored, query(PatientName=value))
    assert matches(stored, query(PatientName="*"))
    expected = value.lower().startswith(prefix.lower())  # PN ignores case
    assert matches(stored, query(PatientName=prefix + "*")) is expected


@settings(max_examples=150, deadline=None)
@given(value=_IDS, prefix=_PREFIXES)
def test_long_string_property(value: str, prefix: str) -> None:
    stored = item(PatientID=value)
    assert matches(stored, query(PatientID=value))
    assert matches(stored, query(PatientID="*"))
    expected = value.startswith(prefix.lstrip(" "))  # LO is case-sensitive
    assert matches(stored, query(PatientID=prefix + "*")) is expected


def test_query_off_the_wire_with_a_step() -> None:
    # Implicit VR: the sequence and the range are recognised from the dictionary.
    step = {"Modality": "CT", "ScheduledProcedureStepStartDate": "20261124-"}
    q = wire(query(step, PatientID=""))
    mr_only = wire(item(PatientID="P3", ScheduledProcedureStepSequence=[MR_STEP]))
    answers = list(find([CZECH, mr_only, GERMAN], q))
    assert [a.PatientID for a in answers] == ["P1", "P2"]
    for answer in answers:
        (returned,) = answer.ScheduledProcedureStepSequence
        assert set(returned.dir()) == set(step)

"""Modality Worklist C-FIND matching (PS3.4 C.2.2.2, K.2.2.1): a pure engine, no I/O.

An item is one worklist entry as stored: patient, visit and requested-procedure
attributes at top level and a Scheduled Procedure Step Sequence. A query is the
C-FIND identifier. Both arrive decoded by pydicom, each with its own Specific
Character Set, so values are compared as ``str`` and a UTF-8 query matches a
Latin-1 item and the reverse.

Rules, per key of the query:

* empty value, or a value of only ``*``: universal match, even when the item lacks
  the attribute (C.2.2.2.3, and the note to C.2.2.2.4). A lone ``*`` is accepted for
  every VR because modalities send it in date fields too;
* UI: list of UID matching, the item matches if it equals any listed UID;
* DA, TM, DT: single value or range ``A-B``, ``A-``, ``-B``. A value of lower
  precision than the full form stands for the whole span it names: as a lower
  bound it starts at its first instant, as an upper bound (or a single value) it
  ends at its last, so ``0800-0900`` includes 09:00:30 and ``0815`` matches
  08:15:42. An item value is the instant its digits name. Ranges crossing
  midnight match nothing (C.2.2.2.5.2 does not support them). DT compares in UTC
  when both sides carry an offset and as wall-clock time otherwise;
* AE, CS, LO, LT, PN, SH, ST, UC, UR, UT (and VRs the engine has no rule for): ``*``
  matches any run of characters, ``?`` exactly one; without wildcards, single value
  matching. Both are case-sensitive except for PN, which ignores case (C.2.2.2.1
  allows it and modality keyboards differ), in literal and wildcard matching
  alike. ``^`` and ``=`` in a PN are literal characters; only trailing empty
  components are dropped, so ``DOE^JOHN^^^`` from a RIS equals ``DOE^JOHN``;
* integer and decimal VRs compare as numbers, so ``1`` equals ``1.0``;
* SQ: the query's (single) item is matched against each of the item's sequence
  items, and any one matching all its keys is enough (C.2.2.2.6). A query
  sequence with no item, or with an empty item, is universal and returns the
  whole sequence;
* a multi-valued item attribute matches if any of its values does; a multi-valued
  query key (other than UI, where it is the standard list) matches if any of its
  values does;
* a query value of two quotation marks (``""``) matches only items where the
  attribute is absent or empty (empty value matching: recent PS3.4 editions give
  QUOTATION MARK a meaning in keys).

Scheduled Procedure Step Start Date and Start Time are matched independently,
each against its own value or range: combined date-time matching (C.2.2.2.5.4)
applies only when agreed by extended negotiation, which the MWL SCP does not
offer. So ``20261124-20261125`` with ``0800-1200`` selects mornings of both days,
not one span from the 24th 08:00 to the 25th 12:00.

Never compared: Specific Character Set (C.2.2.2: it only says how values are
encoded) and, by our choice, Timezone Offset From UTC (item and query times are both
taken as site local time), File Meta and group length elements, and private
elements, which a worklist item from the RIS has no meaningful value for.
"""

from __future__ import annotations

import calendar
import copy
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

__all__ = ["find", "matches", "response"]

_SPECIFIC_CHARACTER_SET = 0x00080005
_NOT_KEYS = frozenset({_SPECIFIC_CHARACTER_SET, 0x00080201})  # 0x00080201: Timezone Offset

_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_NO_WILDCARD_VRS = (
    _RANGE_VRS | _NUMERIC_VRS | {"UI", "AS", "AT", "OB", "OD", "OF", "OL", "OV", "OW"}
)
# PS3.5 6.2: leading and trailing spaces are padding for these; for the text VRs only
# trailing ones are.
_STRIP_BOTH_VRS = _RANGE_VRS | _NUMERIC_VRS | {"AE", "AS", "CS", "LO", "SH", "UI"}
_EMPTY_VALUE_QUERY = '""'

_Test = Callable[[DataElement | None], bool]


def _not_a_key(tag: BaseTag) -> bool:
    return tag in _NOT_KEYS or tag.group == 0x0002 or tag.element == 0 or tag.is_private


def _rule_vr(elem: DataElement) -> str:
    """The VR whose matching rule applies; a query decoded as UN still gets its rule."""
    vr = elem.VR
    if vr == "UN" or " or " in vr:
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return "UN"
        # "US or SS", "OB or OW": both halves share a matching rule.
        vr = vr.split(" or ")[0]
    return vr


def _texts(value: Any, vr: str) -> list[str]:
    """The values of an element as strings, padding removed; [] when it has none."""
    if value is None:
        return []
    if isinstance(value, bytes):
        # A UN element: its backslashes still separate values.
        raw: list[Any] = value.decode("latin-1").split("\\")
    elif isinstance(value, (list, MultiValue)):
        raw = list(value)
    else:
        raw = [value]
    out = []
    for v in raw:
        s = str(v)
        s = s.strip(" \x00") if vr in _STRIP_BOTH_VRS else s.rstrip(" \x00")
        out.append(_canonical_pn(s) if vr == "PN" else s)
    return out


def _canonical_pn(name: str) -> str:
    # PS3.5 6.2: trailing empty components and groups may be omitted, so they carry no
    # meaning; a RIS that writes "DOE^JOHN^^^" means "DOE^JOHN".
    groups = [group.rstrip("^ ") for group in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _present(elem: DataElement | None, vr: str) -> list[str]:
    # K.2.2.1.1.1: an item whose value is unknown (zero length) matches no matching key.
    if elem is None:
        return []
    return [t for t in _texts(elem.value, vr) if t]


# --- DA, TM, DT ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Instant:
    wall: datetime  # naive: the value's own digits
    offset: timedelta | None  # DT only: the value's offset from UTC, when it gives one

    def not_after(self, other: _Instant) -> bool:
        if self.offset is not None and other.offset is not None:
            return self.wall - self.offset <= other.wall - other.offset
        return self.wall <= other.wall


_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # the dots: ACR-NEMA dates still seen
_TM = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?"
)


def _instant(parts: tuple[str | None, ...], last: bool) -> datetime | None:
    """Year..fraction digits to a datetime; absent parts filled to the first or last instant."""
    year, month, day, hour, minute, second, fraction = parts
    try:
        y = int(year or "0")  # always given: DA and DT require it, TM passes a fixed day
        mo = int(month) if month else (12 if last else 1)
        d = int(day) if day else (calendar.monthrange(y, mo)[1] if last else 1)
        h = int(hour) if hour else (23 if last else 0)
        mi = int(minute) if minute else (59 if last else 0)
        s = min(int(second), 59) if second else (59 if last else 0)  # 60: a leap second
        us = int((fraction or "").ljust(6, "9" if last else "0"))
        return datetime(y, mo, d, h, mi, s, us)
    except ValueError:  # month 13, Feb 30, hour 24, ...
        return None


def _parse_instant(text: str, vr: str, last: bool) -> _Instant | None:
    if vr == "DA":
        m = _DA.fullmatch(text)
        parts: tuple[str | None, ...] = (*m.groups(), None, None, None, None) if m else ()
    elif vr == "TM":
        m = _TM.fullmatch(text)
        parts = ("1900", "01", "01", *m.groups()) if m else ()  # a fixed day: never a bound
    else:
        m = _DT.fullmatch(text)
        parts = m.groups()[:7] if m else ()
    if m is None:
        return None
    wall = _instant(parts, last)
    if wall is None:
        return None
    offset = None
    if vr == "DT" and m.group(8):
        offset = timedelta(hours=int(m.group(9)), minutes=int(m.group(10)))
        offset = -offset if m.group(8) == "-" else offset
    return _Instant(wall, offset)


_Bounds = tuple[_Instant | None, _Instant | None]


def _parse_bounds(text: str, vr: str) -> _Bounds | None:
    """``A-B``, ``A-``, ``-B`` or a single value as inclusive bounds; None if malformed."""
    text = text.replace(" ", "")  # PS3.4 writes "<date1> - <date2>"
    if vr != "DT":
        if "-" not in text:
            return _single_bounds(text, vr)
        low, _, high = text.partition("-")
        return _range_bounds(low, high, vr)
    # In DT a "-" also opens a UTC offset. Take the first split that gives two valid,
    # ordered bounds ("2026-2027"); failing that, the value is a single DT
    # ("20261124-0500": year 0500 would precede the low bound).
    for i, ch in enumerate(text):
        if ch == "-":
            bounds = _range_bounds(text[:i], text[i + 1 :], vr)
            if bounds is not None and _ordered(bounds):
                return bounds
    return _single_bounds(text, vr)


def _single_bounds(text: str, vr: str) -> _Bounds | None:
    low, high = _parse_instant(text, vr, last=False), _parse_instant(text, vr, last=True)
    return (low, high) if low is not None and high is not None else None


def _range_bounds(low_text: str, high_text: str, vr: str) -> _Bounds | None:
    low = _parse_instant(low_text, vr, last=False) if low_text else None
    high = _parse_instant(high_text, vr, last=True) if high_text else None
    if (low_text and low is None) or (high_text and high is None):
        return None
    return low, high


def _ordered(bounds: _Bounds) -> bool:
    low, high = bounds
    return low is None or high is None or low.not_after(high)


def _range_test(texts: list[str], vr: str) -> _Test:
    all_bounds = [b for b in (_parse_bounds(t, vr) for t in texts) if b is not None]

    def test(elem: DataElement | None) -> bool:
        for have in _present(elem, vr):
            at = _parse_instant(have, vr, last=False)
            if at is None:
                continue
            for low, high in all_bounds:
                if (low is None or low.not_after(at)) and (high is None or at.not_after(high)):
                    return True
        return False

    return test


# --- text, numbers, UIDs ------------------------------------------------------------


def _wildcard(pattern: str, fold_case: bool) -> re.Pattern[str]:
    pattern = re.sub(r"\*+", "*", pattern)  # "**" adds nothing but backtracking
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if fold_case else 0))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _value_test(wanted: str, vr: str) -> Callable[[str], bool]:
    wild = vr not in _NO_WILDCARD_VRS and ("*" in wanted or "?" in wanted)
    if wild:
        rx = _wildcard(wanted, fold_case=vr == "PN")
        return lambda have: rx.fullmatch(have) is not None
    if vr == "PN":
        # The same case folding as the wildcard regex, so that a literal and a wildcard
        # query never disagree about case (C.2.2.2.4 asks for that consistency).
        literal = re.compile(re.escape(wanted), re.DOTALL | re.IGNORECASE)
        return lambda have: literal.fullmatch(have) is not None
    number = _number(wanted) if vr in _NUMERIC_VRS else None
    if number is not None:
        return lambda have: _number(have) == number
    return lambda have: have == wanted


def _text_test(texts: list[str], vr: str) -> _Test:
    tests = [_value_test(t, vr) for t in texts]

    def test(elem: DataElement | None) -> bool:
        return any(t(have) for have in _present(elem, vr) for t in tests)

    return test


def _uid_test(texts: list[str]) -> _Test:
    wanted = frozenset(texts)

    def test(elem: DataElement | None) -> bool:
        return any(have in wanted for have in _present(elem, "UI"))

    return test


def _empty_value_test(vr: str) -> _Test:
    def test(elem: DataElement | None) -> bool:
        return not _present(elem, vr)

    return test


def _element_test(q: DataElement) -> _Test | None:
    """The test one non-sequence query key puts to the item's element; None: universal."""
    vr = _rule_vr(q)
    texts = [t for t in _texts(q.value, vr) if t]
    if not texts or any(set(t) == {"*"} for t in texts):
        return None
    if texts == [_EMPTY_VALUE_QUERY]:
        return _empty_value_test(vr)
    if vr == "UI":
        return _uid_test(texts)
    if vr in _RANGE_VRS:
        return _range_test(texts, vr)
    return _text_test(texts, vr)


# --- the compiled query -------------------------------------------------------------


class _Matcher:
    """A query compiled once, so that find() parses it once for the whole worklist."""

    def __init__(self, query: Dataset) -> None:
        self._tests: list[tuple[BaseTag, _Test]] = []
        # Query sequences whose item has keys; the others ask for the whole sequence.
        self.nested: dict[BaseTag, _Matcher] = {}
        for q in query:
            if _not_a_key(q.tag):
                continue
            if q.VR == "SQ":
                # C.2.2.2.6 allows one item only; a second one has no defined meaning.
                first = q.value[0] if len(q.value) else None
                if first is None or len(first) == 0:
                    continue
                inner = _Matcher(first)
                self.nested[q.tag] = inner
                if inner._tests:
                    self._tests.append((q.tag, _sequence_test(inner)))
                continue
            test = _element_test(q)
            if test is not None:
                self._tests.append((q.tag, test))

    def __call__(self, item: Dataset) -> bool:
        return all(test(item.get(tag)) for tag, test in self._tests)


def _sequence_test(inner: _Matcher) -> _Test:
    def test(elem: DataElement | None) -> bool:
        if elem is None or elem.VR != "SQ" or not elem.value:
            return False
        return any(inner(sub) for sub in elem.value)

    return test


def _element(tag: BaseTag, vr: str, value: Any) -> DataElement:
    """A response element holding *value*, or a copy where the item's could be changed.

    str, bytes and PersonName are immutable, so only a multi-value list is copied: a
    deep copy of every value costs more than all the matching.
    """
    if isinstance(value, (list, MultiValue)):
        value = list(value)
    # The values were validated when the item was stored; a RIS value pydicom finds
    # unusual (a lower-case CS) must not turn every answer into a warning.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _shape(item: Dataset, query: Dataset, matcher: _Matcher, top: bool) -> Dataset:
    out = Dataset()
    if top and _SPECIFIC_CHARACTER_SET in item:
        # The values below stay decoded; the SCP encodes them in this character set.
        charset = item[_SPECIFIC_CHARACTER_SET]
        out.add(_element(charset.tag, "CS", charset.value))
    for q in query:
        tag = q.tag
        if tag == _SPECIFIC_CHARACTER_SET or tag.group == 0x0002 or tag.element == 0:
            continue
        have = item.get(tag)
        if q.VR == "SQ":
            subs = list(have.value) if have is not None and have.VR == "SQ" else []
            inner = matcher.nested.get(tag)
            if inner is None:  # no item, or an empty one: the whole sequence (C.2.2.2.6)
                seq = Sequence([copy.deepcopy(sub) for sub in subs])
            else:  # only the matching items, each with only the requested keys
                shape = q.value[0]
                seq = Sequence([_shape(sub, shape, inner, top=False) for sub in subs if inner(sub)])
            out.add(_element(tag, "SQ", seq))
        elif have is not None:
            out.add(_element(tag, have.VR, have.value))
        elif not tag.is_private:  # a private key we don't hold is better left out than blank
            vr = _rule_vr(q)
            out.add(_element(tag, vr, empty_value_for_VR(vr)))
    return out


def matches(item: Dataset, query: Dataset) -> bool:
    """True if the worklist *item* matches every matching key of the C-FIND *query*."""
    return _Matcher(query)(item)


def response(item: Dataset, query: Dataset) -> Dataset:
    """The C-FIND response identifier for *item*: exactly the query's keys, at every level.

    Values come from the item (empty when it lacks them), still decoded; the item's
    Specific Character Set is included when it has one. A query sequence with keys
    returns only the item's sequence items that match them.
    """
    return _shape(item, query, _Matcher(query), top=True)


def find(items: Iterable[Dataset], query: Dataset) -> Iterator[Dataset]:
    """Responses for the matching items, in order; the query is compiled once."""
    matcher = _Matcher(query)
    for item in items:
        if matcher(item):
            yield _shape(item, query, matcher, top=True)

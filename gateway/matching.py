"""C-FIND attribute matching (PS3.4 C.2.2.2) for the Modality Worklist cache.

Values are compared as pydicom decoded them (each side with its own Specific
Character Set), so a UTF-8 query matches a Latin-1 item and the reverse.

* empty query value: universal match;
* UI: list of UIDs, matches any;
* DA, TM, DT: single value or range ``A-B``, ``A-``, ``-B``;
* text with ``*`` / ``?``: wildcard match; otherwise single value match;
  PN compares without regard to case (the standard allows it, and modality
  keyboards differ);
* SQ: the query's item is matched against each of the item's sequence items; any
  one matching all its keys is enough;
* a multi-valued item attribute matches if any value does.

Date and time of the Scheduled Procedure Step are matched independently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

_NOT_KEYS = {0x00080005}  # Specific Character Set describes the query, it is not a key


def _empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, (list, MultiValue)) and not value)


def _values(value: Any) -> list[str]:
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _wildcard(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


def _normal_time(value: str) -> str:
    # HH[MM[SS[.F{1,6}]]] -> HHMMSS.FFFFFF so that strings compare as times.
    value = value.replace(":", "")
    whole, _, fraction = value.partition(".")
    return whole.ljust(6, "0") + "." + fraction.ljust(6, "0")


def _in_range(vr: str, query: str, value: str) -> bool:
    def norm(v: str) -> str:
        return _normal_time(v) if vr == "TM" else v.strip()

    if "-" not in query:
        return norm(query) == norm(value)
    low, _, high = query.partition("-")
    v = norm(value)
    return (not low or norm(low) <= v) and (not high or v <= norm(high))


def _element_matches(q: DataElement, item_elem: DataElement | None) -> bool:
    if _empty(q.value):
        return True
    if item_elem is None or _empty(item_elem.value):
        return False
    if q.VR == "SQ":
        query_items = list(q.value)
        if not query_items or len(query_items[0]) == 0:
            return True
        return any(matches(candidate, query_items[0]) for candidate in item_elem.value)
    wanted = _values(q.value)
    have = _values(item_elem.value)
    if q.VR == "UI":
        return any(h in wanted for h in have)
    if q.VR in ("DA", "TM", "DT"):
        return any(_in_range(q.VR, wanted[0], h) for h in have)
    pattern = wanted[0]
    if "*" in pattern or "?" in pattern:
        rx = _wildcard(pattern, case_insensitive=q.VR == "PN")
        return any(rx.fullmatch(h) for h in have)
    if q.VR == "PN":
        return any(h.casefold() == pattern.casefold() for h in have)
    return any(h == pattern for h in have)


def matches(item: Dataset, query: Dataset) -> bool:
    """True if *item* matches every matching key in *query*."""
    for q in query:
        if q.tag in _NOT_KEYS or q.tag.group == 0x0002:
            continue
        if not _element_matches(q, item.get(q.tag)):
            return False
    return True


def response(item: Dataset, query: Dataset) -> Dataset:
    """The identifier to return: exactly the query's keys, filled from *item*."""
    out = Dataset()
    if "SpecificCharacterSet" in item:
        out.SpecificCharacterSet = item.SpecificCharacterSet
    for q in query:
        if q.tag in _NOT_KEYS:
            continue
        have = item.get(q.tag)
        if q.VR == "SQ":
            shape = q.value[0] if len(q.value) else Dataset()
            chosen = [
                response(i, shape)
                for i in (have.value if have is not None else [])
                if matches(i, shape)
            ]
            out.add_new(q.tag, "SQ", Sequence(chosen))
        elif have is None:
            out.add_new(q.tag, q.VR, None)
        else:
            out.add_new(q.tag, have.VR, have.value)
    return out


def find(items: Iterable[Dataset], query: Dataset) -> Iterator[Dataset]:
    for item in items:
        if matches(item, query):
            yield response(item, query)

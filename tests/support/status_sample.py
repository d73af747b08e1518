"""Status documents for tests: a healthy sample to vary, the JSON key tree a document
type implies, and the way back from ``/api/status`` JSON to a document."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from gateway.web.status_doc import (
    ArchiveStatus,
    CertificateStatus,
    CommitmentStatus,
    ConfigSummary,
    DiskStatus,
    Health,
    MppsStatus,
    QueueStatus,
    SpoolStatus,
    StatusDoc,
    UploadsStatus,
    WarningsStatus,
)

T = TypeVar("T")


def sample_doc(**changes: Any) -> StatusDoc:
    """A healthy gateway's document; ``section__field=value`` changes one field of a
    section, ``section=value`` a whole one (health is left as it is: judge it)."""
    doc = StatusDoc(
        version="test",
        boot_id="b",
        started_at="2026-01-01T00:00:00+00:00",
        uptime_seconds=1.0,
        snapshot_age_seconds=0.1,
        queue=QueueStatus(
            pending=0, received=0, compressing=0, pending_upload=0, uploading=0, failed=0,
            done=0, done_today=0, by_state={}, oldest_pending_at=None, oldest_pending_ts=None,
            oldest_pending_age_seconds=None,
        ),
        archive=ArchiveStatus(
            url="https://archive.example", state="reachable", reachable=True,
            last_success_at=None, last_success_ts=None, last_error=None, last_error_at=None,
        ),
        uploads=UploadsStatus(
            paused=False, limit_bytes_per_second=0, window_open=True, windows=(),
            window_changes_at=None, priority_aets=(),
        ),
        associations_active=0,
        throughput=(),
        modalities=(),
        failed=(),
        retrying=(),
        warnings=WarningsStatus(count=0, recent=()),
        recent_errors=(),
        disk=DiskStatus(
            free_bytes=10**10, total_bytes=10**11, spool_bytes=0, min_free_bytes=10**9,
            below_watermark=False,
        ),
        spool=SpoolStatus(dir="/spool", problem=None),
        certificate=CertificateStatus(
            path=None, not_after=None, not_after_ts=None, days_left=400, warning=False,
            error=None,
        ),
        worklist=(),
        mpps=MppsStatus(
            pending=0, sending=0, failed=0, oldest_pending_at=None, failed_messages=(),
            forwarding_to=None, oldest_pending_ts=None,
        ),
        commitment=CommitmentStatus(
            waiting=0, due=0, reporting=0, reported=0, some_failed=0, oldest_unreported_at=None,
            oldest_unreported_ts=None, oldest_unreported_age_seconds=None, undelivered=(),
        ),
        studies=(),
        config=ConfigSummary(
            source="<test>", ae_title="DICOMGW", dimse="0.0.0.0:11112", allowed_aets=(),
            remote_aes=(),
            spool_dir="/spool", min_free_bytes=10**9, database="/spool/q.sqlite3",
            dicomweb_url="https://archive.example", client_cert="", client_key="",
            upload_auth="mtls", compression="j2k-lossless", concurrent_requests=2,
            retention_keep_bytes=0, worklist_upstream="", web="127.0.0.1:8080", web_auth=(),
            heartbeat_url="",
        ),
        snapshot_error=None,
        components={},
        health=Health(state="ok", reasons=()),
    )  # fmt: skip
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            value = dataclasses.replace(getattr(doc, section), **{name: value})
        doc = dataclasses.replace(doc, **{section: value})
    return doc


def key_tree(tp: Any) -> Any:
    """The JSON that values of type *tp* become, as a tree: an object's keys in order,
    ``[item]`` for an array, ``{"*": value}`` for an object keyed by names, and a type
    name (``"str"``, ``"int"``, ``"number"``, ``"bool"``; ``"|null"`` when it may be
    missing) at the leaves."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {f.name: key_tree(hints[f.name]) for f in dataclasses.fields(tp)}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{key_tree(inner)}|null"
    if origin is tuple:
        return [key_tree(args[0])]
    if origin in (dict, Mapping):
        return {"*": key_tree(args[1])}
    if origin is Literal:
        return key_tree(type(args[0]))
    return {str: "str", int: "int", float: "number", bool: "bool"}[tp]


def from_json(tp: type[T], value: Any) -> T:
    """*value* (JSON as ``/api/status`` returns it) as a *tp*; an AssertionError when
    a key is missing or extra, or a value is not of its field's type."""
    return typing.cast(T, _from_json(tp, value, tp.__name__))


def _from_json(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        assert isinstance(value, dict), (where, value)
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        assert list(value) == names, (where, "keys differ", list(value), names)
        return tp(**{n: _from_json(hints[n], value[n], f"{where}.{n}") for n in names})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_json(inner, value, where)
    if origin is tuple:
        assert isinstance(value, list), (where, value)
        return tuple(_from_json(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        assert isinstance(value, dict), (where, value)
        return {k: _from_json(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        assert value in args, (where, value, args)
        return value
    if tp is float:
        assert type(value) in (int, float), (where, value)
        return value
    assert type(value) is tp, (where, value, tp)
    return value

"""Timestamps as the database keeps them: UTC, ISO 8601 with microseconds.

Every table stores times as this text, so they sort and compare as text in SQL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def utc_in(seconds: float) -> str:
    """The time *seconds* from now (negative: ago)."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="microseconds")

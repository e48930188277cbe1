"""Times between their wire form (timezone-aware datetimes) and the epoch milliseconds the processors
and stored state count in."""

from __future__ import annotations

from datetime import UTC, datetime


def from_ms(at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC)


def to_ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)

"""Raw events as producers send them to `POST /v1/events` (DESIGN §4).

The models validate shape and bounds only. Attribution rules (tag syntax,
aliases, user-id rules) live in `ledger.tags`, because an invalid tag is
recorded on the ledger row, not refused at the door.

Bounds keep every accepted value inside what the pipeline can carry (DESIGN §9.7):
- times are not before EARLIEST_EVENT_TIME; with a validation context from
  `time_bounds(now, max_future_skew_s)` they are not more than the skew after
  `now` either. The caller brings `now` (the API its receive time, the worker
  its clock), so the schema reads no clock;
- `reported_cost_usd` is at most MAX_REPORTED_COST_USD, and every number in
  `usage` at most MAX_USAGE_COUNT: a cost, or a token count times a price, then
  stays far inside ClickHouse's Decimal(38, 12) and the budgets' 28-digit
  Decimal arithmetic, even summed over millions of calls.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

EventKind = Literal["request", "usage", "completed"]

MAX_BATCH_EVENTS = 1000
MAX_ID_CHARS = 256
MAX_HEADERS = 100
MAX_HEADER_VALUE_CHARS = 8192
MAX_METADATA_KEYS = 200

_ID_PATTERN = r"^[A-Za-z0-9._:\-/]+$"

EARLIEST_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_REPORTED_COST_USD = Decimal(1_000_000_000)  # one call; the largest real ones cost dollars
MAX_USAGE_COUNT = 10_000_000_000  # tokens of one call: a thousand times the largest context windows


def time_bounds(now: datetime, max_future_skew_s: float) -> dict[str, Any]:
    """The validation context that refuses event times more than `max_future_skew_s` after `now`:
    `RawEvent.model_validate(data, context=time_bounds(...))`."""
    return {"latest_event_time": now + timedelta(seconds=max_future_skew_s)}


# In a validation context: the data was decoded by orjson, which reads an integer outside 64 bits as a
# float, so no integer walk is needed (the worker's check of each event it reads).
DECODED_BY_ORJSON = "decoded_by_orjson"


class RawEvent(BaseModel):
    """One producer event: a request, its usage, or both at once (`completed`)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    kind: EventKind
    request_id: str = Field(min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_PATTERN)
    event_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_PATTERN)
    occurred_at: datetime | None = None
    received_at: datetime | None = None
    model: str | None = Field(default=None, max_length=256)
    provider: str | None = Field(default=None, max_length=128)
    headers: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None
    user: str | int | None = None
    body: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    latency_ms: float | None = Field(default=None, ge=0, le=86_400_000)
    status: str | None = Field(default=None, max_length=64)
    http_status: int | None = Field(default=None, ge=100, le=599)
    reported_cost_usd: Decimal | None = Field(
        default=None, ge=0, le=MAX_REPORTED_COST_USD, max_digits=30, decimal_places=12
    )

    @field_validator("occurred_at", "received_at")
    @classmethod
    def _time_bounded(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamp must carry a time zone, e.g. 2026-11-22T10:00:00Z")
        if value < EARLIEST_EVENT_TIME:
            raise ValueError(f"must not be before {EARLIEST_EVENT_TIME:%Y-%m-%dT%H:%M:%SZ}")
        latest = (info.context or {}).get("latest_event_time")
        if latest is not None and value > latest:
            raise ValueError(
                f"is more than the allowed clock skew in the future (latest {latest:%Y-%m-%dT%H:%M:%SZ})"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _headers_bounded(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        for name, header_value in value.items():
            if len(header_value) > MAX_HEADER_VALUE_CHARS:
                raise ValueError(f"header {name!r} is longer than {MAX_HEADER_VALUE_CHARS} characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata has more than {MAX_METADATA_KEYS} keys")
        return value

    @field_validator("metadata", "body", "usage", "user")
    @classmethod
    def _integers_fit_64_bits(cls, value: Any, info: ValidationInfo) -> Any:
        if info.context and info.context.get(DECODED_BY_ORJSON):
            return value
        if value is not None and not _fits_64_bits(value):
            raise ValueError("integers must fit in 64 bits (from -2**63 to 2**64 - 1)")
        return value

    @field_validator("usage")
    @classmethod
    def _counts_bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not _numbers_at_most(value, MAX_USAGE_COUNT):
            raise ValueError(f"token counts must be at most {MAX_USAGE_COUNT:,}")
        return value


def _fits_64_bits(value: Any, depth: int = 0) -> bool:
    """Every integer inside fits in 64 bits (what Kafka messages and ClickHouse can carry)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if depth > 64:
        return False
    if isinstance(value, dict):
        return all(_fits_64_bits(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_fits_64_bits(v, depth + 1) for v in value)
    return True


def _numbers_at_most(value: Any, limit: int, depth: int = 0) -> bool:
    """Every number inside is at most `limit` in size."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return abs(value) <= limit
    if depth > 64:
        return False
    if isinstance(value, dict):
        return all(_numbers_at_most(v, limit, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_numbers_at_most(v, limit, depth + 1) for v in value)
    return True


class EventBatch(BaseModel):
    """`{"events": [...]}`: up to MAX_BATCH_EVENTS events in one request."""

    model_config = ConfigDict(extra="forbid")

    events: list[RawEvent] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)

"""The attributed, priced record: one row per call in `spend_records` (DESIGN §8)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.columns import UInt16, UInt32, UInt64

PriceSource = Literal["catalog", "override", "reported", "unpriced"]
PRICE_SOURCES: tuple[PriceSource, ...] = ("catalog", "override", "reported", "unpriced")

# How the record was assembled from raw events.
JoinKind = Literal["completed", "joined", "usage_only", "request_only"]


class AttributedRecord(BaseModel):
    """A call, attributed to canonical dimensions and priced. Money is Decimal USD."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    request_id: str
    occurred_at: datetime
    received_at: datetime
    app_id: str = ""
    app_name: str = ""
    app_version: str = ""
    user_id: str = ""
    session_id: str = ""
    tenant_id: str = ""
    team: str = ""
    project: str = ""
    environment: str = ""
    feature: str = ""
    region: str = ""
    tags: list[str] = Field(default_factory=list)
    invalid_tags: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    provider: str = ""
    model: str = ""
    input_tokens: UInt64 = 0
    output_tokens: UInt64 = 0
    cache_read_tokens: UInt64 = 0
    cache_write_tokens: UInt64 = 0
    cost_usd: Decimal | None = None
    input_cost_usd: Decimal | None = None
    output_cost_usd: Decimal | None = None
    reported_cost_usd: Decimal | None = None
    price_source: PriceSource = "unpriced"
    status: str = "success"
    http_status: UInt16 | None = None
    latency_ms: UInt32 | None = None
    join_kind: JoinKind = "completed"


class Reject(BaseModel):
    """A message that could not be processed, with the reason (lands in `spend_rejects`)."""

    source_topic: str
    partition: int
    offset: int
    reason: str
    payload: str
    rejected_at: datetime

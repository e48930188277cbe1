"""Budget wire contracts (DESIGN §6-7): definitions on `spend.budgets` (forwarded into `spend.tag-spend`
as `TagSpend`; the spend bundles there are in schemas.bundles), block state on `spend.budget-blocks`,
alerts on `spend.budget-alerts`.

Money is Decimal USD, sent as a JSON string so no digit is lost; times are ISO-8601 UTC.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.columns import UInt8

WindowMode = Literal["calendar", "sliding"]
# The percents of `max_budget` that alert when a budget names none (100, the block, always alerts).
DEFAULT_ALERT_THRESHOLDS: tuple[int, ...] = (50, 80, 95)
BudgetSource = Literal["tag", "app_limit"]
BlockChange = Literal["update", "blocked", "unblocked", "deleted"]


class BudgetDefinition(BaseModel):
    """Value on `spend.budgets` (key: the tag). A tombstone deletes the budget."""

    model_config = ConfigDict(frozen=True)

    tag: str
    max_budget_usd: Decimal | None = None
    soft_budget_usd: Decimal | None = None
    budget_duration: str
    window: WindowMode = "calendar"
    alert_thresholds: list[UInt8] = Field(default_factory=lambda: list(DEFAULT_ALERT_THRESHOLDS))
    source: BudgetSource = "tag"
    description: str | None = None
    created_at: datetime
    updated_at: datetime
    # Named alert destinations (configured in the environment: their URLs are secrets) that get this
    # budget's alerts besides the default ones.
    alert_destinations: list[str] = Field(default_factory=list)
    # For a `user:uh_…` budget: the fingerprint of the USER_ID_HMAC_KEY its id was made with, so a
    # rotated key is noticed instead of the budget silently matching no one.
    user_key_id: str | None = None


class TagSpend(BaseModel):
    """A budget definition forwarded from `spend.budgets` into `spend.tag-spend` (key: the tag), so
    definitions and spend arrive in order per tag (schemas.bundles). None: the budget was deleted."""

    type: Literal["budget"]
    definition: BudgetDefinition | None = None


class BlockSignal(BaseModel):
    """Value on `spend.budget-blocks` (key: the tag): the latest state of the tag's budget."""

    tag: str
    blocked: bool
    spend_usd: Decimal
    max_budget_usd: Decimal | None
    window_start: datetime
    window_end: datetime
    updated_at: datetime
    change: BlockChange = "update"
    soft_budget_usd: Decimal | None = None
    thresholds_fired: list[int] = Field(default_factory=list)
    block_ends_at: datetime | None = None
    soft_budget_fired: bool = False
    # The `updated_at` of the definition this state was decided under (a write's answer waits for it).
    definition_updated_at: datetime | None = None


class BudgetAlert(BaseModel):
    """Value on `spend.budget-alerts` (key: the tag). `alert_id` is the same for a re-sent alert."""

    alert_id: str
    tag: str
    kind: Literal["threshold", "soft_budget", "projected"]
    threshold_pct: UInt8 | None
    spend_usd: Decimal
    max_budget_usd: Decimal | None
    soft_budget_usd: Decimal | None = None
    window_start: datetime
    window_end: datetime
    at: datetime
    # "projected": the window's spend at the current rate, and when the budget would run out.
    projected_spend_usd: Decimal | None = None
    exhausted_at: datetime | None = None
    # Named destinations of this budget (besides the default ones); see docs/budgets.md.
    destinations: list[str] = Field(default_factory=list)

"""The producer SDK: send spend events without hand-building JSON.

    from spendledger.sdk import SpendClient, instrument, track, track_context

    spend = SpendClient("http://127.0.0.1:8000", api_key="sl_prod_…")
    client = instrument(openai.OpenAI(), spend, app_id="support-bot")

    with track_context(user_id=user.id, team="support"):
        client.chat.completions.create(model="gpt-4o", messages=[...])

See docs/sdk.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spendledger.sdk.capture import BudgetExceededError, instrument
from spendledger.sdk.client import (
    AsyncSpendClient,
    ClientStats,
    EventSink,
    MemoryClient,
    SpendClient,
    completed_event,
)
from spendledger.sdk.context import Attribution, current_attribution, propagate, track, track_context

if TYPE_CHECKING:
    from spendledger.guard import BudgetGuard

__all__ = [
    "AsyncSpendClient",
    "Attribution",
    "BudgetExceededError",
    "ClientStats",
    "EventSink",
    "MemoryClient",
    "SpendClient",
    "SpendLedgerMiddleware",
    "budget_guard",
    "completed_event",
    "current_attribution",
    "instrument",
    "propagate",
    "track",
    "track_context",
]


def budget_guard(
    kafka_bootstrap: str | None = None, *, topic_prefix: str | None = None, wait_s: float = 10.0
) -> BudgetGuard:
    """A started `BudgetGuard` that has read `spend.budget-blocks` to its end (or waited `wait_s`).

    Its settings are the server's `SPENDLEDGER_*` variables a guard needs (`GuardSettings`:
    `KAFKA_BOOTSTRAP`, `TOPIC_PREFIX`, `KAFKA_SECURITY`, `USER_ID_HMAC_KEY`, `MAX_TAGS`); the
    arguments given override the first two. Check `guard.staleness_s` to decide whether to fail open
    when it is None or large.
    """
    from spendledger.guard import BudgetGuard, GuardSettings

    overrides: dict[str, Any] = {}
    if kafka_bootstrap is not None:
        overrides["kafka_bootstrap"] = kafka_bootstrap
    if topic_prefix is not None:
        overrides["topic_prefix"] = topic_prefix
    guard = BudgetGuard.from_settings(GuardSettings(**overrides)).start()
    guard.wait_ready(wait_s)
    return guard


def __getattr__(name: str) -> Any:
    if name == "SpendLedgerMiddleware":  # imported on use: it pulls in the tag rules
        from spendledger.sdk.asgi import SpendLedgerMiddleware

        return SpendLedgerMiddleware
    raise AttributeError(name)

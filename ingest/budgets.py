"""Budget endpoints (DESIGN §7): LiteLLM-style tag budgets, AnyAPI-style app limits, the gateway check.

Definitions are published to the compacted `spend.budgets` topic (a tombstone
deletes); the API reads that topic back into a view, so every API instance
knows every budget. `spend` is summed from `spend_records` over the budget's
current window; `blocked` comes from `spend.budget-blocks`, as a gateway sees it.
Money in these responses is a JSON number written with every digit (never a float).
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from ingest.errors import BudgetsUnavailable, Conflict, Forbidden, InvalidBudget, NotFound
from ingest.exact import ExactJSONResponse
from ingest.publisher import EventPublisher
from ledger.budgets import Duration, Window, calendar_window, rule_of
from ledger.errors import BudgetError
from ledger.tags import AttributionPolicy, normalize
from schemas.budgets import BudgetDefinition, WindowMode
from spendledger.guard import BudgetGuard, CompactedView

CREDITS_PER_USD = Decimal(100)
LIMIT_DURATIONS = {"daily": "1d", "weekly": "7d", "monthly": "1mo"}
Thresholds = Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(max_length=10)]
Money = Annotated[Decimal, Field(ge=0, max_digits=26, decimal_places=12)]


class SpendReader(Protocol):
    """Spend as the ledger holds it (ClickHouse in production)."""

    def spend(self, tag: str, start: datetime, end: datetime) -> Decimal: ...

    def app_name(self, app_id: str) -> str: ...


@dataclass
class BudgetServices:
    registry: CompactedView[BudgetDefinition]
    guard: BudgetGuard
    spend: SpendReader
    tz: tzinfo
    policy: AttributionPolicy
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)


class _BudgetFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    max_budget: Money | None = None
    soft_budget: Money | None = None
    budget_duration: str | None = Field(default=None, max_length=16)
    alert_thresholds: Thresholds | None = None


class TagNew(_BudgetFields):
    window: WindowMode = "calendar"
    description: str | None = Field(default=None, max_length=1024)


class TagUpdate(_BudgetFields):
    window: WindowMode | None = None


class TagDelete(BaseModel):
    name: str = Field(min_length=1, max_length=256)


class AppLimit(BaseModel):
    app_id: str = Field(min_length=1, max_length=128)
    limit_type: Literal["daily", "weekly", "monthly"]
    limit_amount: Money = Field(description="credits; 100 credits = $1")
    alert_thresholds: Thresholds = Field(default_factory=lambda: [50, 80, 95])


class CheckRequest(BaseModel):
    """The attribution of the call about to be made, as an event would carry it."""

    headers: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    tags: list[str] | None = Field(default=None, max_length=100)


def canonical_tag(name: str, policy: AttributionPolicy) -> str:
    """A budget name as the ledger writes the tag (`env:prod` -> `env:production`, `department:x` -> `team:x`)."""
    attribution = normalize(metadata=[{"tags": [name]}], policy=policy)
    if attribution.invalid:
        reason = attribution.invalid[0].split("|")[0]
        raise InvalidBudget(f"{name!r} is not a valid tag ({reason})")
    tags = attribution.tags
    if len(tags) != 1:
        raise InvalidBudget(f"{name!r} cannot carry a budget: session ids and app names are not budget tags")
    return tags[0]


def build_definition(
    tag: str,
    *,
    max_budget: Decimal | None,
    soft_budget: Decimal | None,
    duration: str | None,
    thresholds: list[int] | None,
    window: WindowMode,
    now: datetime,
    previous: BudgetDefinition | None = None,
    source: Literal["tag", "app_limit"] = "tag",
    description: str | None = None,
) -> BudgetDefinition:
    if not duration:
        raise InvalidBudget(
            "budget_duration is required: how often the budget resets, e.g. '1d', '30d', '1mo'"
        )
    if max_budget is not None and soft_budget is not None and soft_budget > max_budget:
        raise InvalidBudget("soft_budget must not be above max_budget")
    definition = BudgetDefinition(
        tag=tag,
        max_budget_usd=max_budget,
        soft_budget_usd=soft_budget,
        budget_duration=duration.strip(),
        window=window,
        alert_thresholds=sorted(set(thresholds if thresholds is not None else [50, 80, 95])),
        source=source,
        description=description if description is not None else previous.description if previous else None,
        created_at=previous.created_at if previous else now,
        updated_at=now,
    )
    try:
        rule_of(definition)
    except BudgetError as exc:
        raise InvalidBudget(str(exc)) from exc
    return definition


def create_router(
    services: BudgetServices,
    publisher: EventPublisher,
    topic: str,
    *,
    require_manage: Any,
    require_read: Any,
    require_check: Any,
) -> APIRouter:
    router = APIRouter()
    registry, guard = services.registry, services.guard
    Admin = Annotated[Any, Depends(require_manage)]
    Reader = Annotated[Any, Depends(require_read)]
    Caller = Annotated[Any, Depends(require_check)]

    def require_current() -> None:
        if registry.staleness_s is None:
            raise BudgetsUnavailable(
                "budgets are still being read from Kafka; retry shortly", retry_after_s=2
            )

    def existing(name: str) -> tuple[str, BudgetDefinition]:
        tag = canonical_tag(name, services.policy)
        definition = registry.get(tag)
        if definition is None:
            raise NotFound(f"no budget for tag {tag!r}", {"tag": tag})
        return tag, definition

    async def save(definition: BudgetDefinition | None, tag: str) -> None:
        value = definition.model_dump_json().encode() if definition else None
        await publisher.publish(topic, [(tag.encode(), value)])
        registry.put(tag, definition)

    def current_window(definition: BudgetDefinition, now: datetime) -> Window:
        now_ms = int(now.timestamp() * 1000)
        signal = guard.view.get(definition.tag)
        if definition.window == "calendar" and signal is not None:
            start, end = (
                int(signal.window_start.timestamp() * 1000),
                int(signal.window_end.timestamp() * 1000),
            )
            rule_window = rule_of(definition).window_at(now_ms, services.tz)
            if end > now_ms and end - start == rule_window.end_ms - rule_window.start_ms:
                return Window(start, end)  # the budget agent's window (it may run ahead on event time)
        return rule_of(definition).window_at(now_ms, services.tz)

    async def info(definition: BudgetDefinition) -> dict[str, Any]:
        now = services.clock()
        window = current_window(definition, now)
        start, end = _dt(window.start_ms), _dt(window.end_ms)
        spend = await asyncio.to_thread(services.spend.spend, definition.tag, start, end)
        signal = guard.view.get(definition.tag)
        decision = guard.check([definition.tag])
        return {
            "name": definition.tag,
            "max_budget": definition.max_budget_usd,
            "soft_budget": definition.soft_budget_usd,
            "budget_duration": definition.budget_duration,
            "window": definition.window,
            "alert_thresholds": definition.alert_thresholds,
            "spend": spend,
            "window_start": start,
            "budget_reset_at": end,
            "blocked": not decision.allowed,
            "blocked_until": (signal.block_ends_at or signal.window_end)
            if not decision.allowed and signal
            else None,
            "thresholds_fired": signal.thresholds_fired if signal else [],
            "source": definition.source,
            "description": definition.description,
            "created_at": definition.created_at,
            "updated_at": definition.updated_at,
        }

    @router.post("/tag/new", response_class=ExactJSONResponse, responses={409: {}, 422: {}})
    async def tag_new(body: TagNew, _: Admin) -> ExactJSONResponse:
        """Create a tag budget (LiteLLM-compatible). `max_budget` USD; `budget_duration` `Ns|Nm|Nh|Nd|Nmo`."""
        require_current()
        tag = canonical_tag(body.name, services.policy)
        if registry.get(tag) is not None:
            raise Conflict(f"tag {tag!r} already has a budget; change it with POST /tag/update", {"tag": tag})
        definition = build_definition(
            tag,
            max_budget=body.max_budget,
            soft_budget=body.soft_budget,
            duration=body.budget_duration,
            thresholds=body.alert_thresholds,
            window=body.window,
            now=services.clock(),
            description=body.description,
        )
        await save(definition, tag)
        return ExactJSONResponse(await info(definition))

    @router.get("/tag/info", response_class=ExactJSONResponse, responses={404: {}})
    async def tag_info(
        _: Reader, names: Annotated[str, Query(min_length=1, description="comma-separated tag names")]
    ) -> ExactJSONResponse:
        """Budget, spend in the current window, reset time and block state, keyed by tag name."""
        require_current()
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        found: dict[str, Any] = {}
        missing = []
        for name in wanted:
            tag = canonical_tag(name, services.policy)
            definition = registry.get(tag)
            if definition is None:
                missing.append(tag)
            else:
                found[tag] = await info(definition)
        if missing:
            raise NotFound(f"no budget for {', '.join(missing)}", {"unknown": missing})
        return ExactJSONResponse(found)

    @router.get("/tag/list", response_class=ExactJSONResponse)
    async def tag_list(_: Reader) -> ExactJSONResponse:
        """Every tag budget, as `/tag/info` describes it, sorted by tag."""
        require_current()
        definitions = sorted(registry.items())
        return ExactJSONResponse([await info(definition) for _, definition in definitions])

    @router.post("/tag/update", response_class=ExactJSONResponse, responses={404: {}, 422: {}})
    async def tag_update(body: TagUpdate, _: Admin) -> ExactJSONResponse:
        """Change any of a budget's fields; the others stay. A raised budget lifts its block."""
        require_current()
        tag, old = existing(body.name)
        sent = body.model_fields_set
        definition = build_definition(
            tag,
            max_budget=body.max_budget if "max_budget" in sent else old.max_budget_usd,
            soft_budget=body.soft_budget if "soft_budget" in sent else old.soft_budget_usd,
            duration=body.budget_duration if "budget_duration" in sent else old.budget_duration,
            thresholds=body.alert_thresholds if "alert_thresholds" in sent else old.alert_thresholds,
            window=body.window or old.window,
            now=services.clock(),
            previous=old,
            source=old.source,
        )
        await save(definition, tag)
        return ExactJSONResponse(await info(definition))

    @router.post("/tag/delete", responses={404: {}})
    async def tag_delete(body: TagDelete, _: Admin) -> dict[str, Any]:
        """Delete a budget (its spend stays in the ledger); a block on it lifts."""
        require_current()
        tag, _definition = existing(body.name)
        await save(None, tag)
        return {"deleted": [tag]}

    @router.post("/v1/limits/app", response_class=ExactJSONResponse, responses={422: {}})
    async def set_app_limit(body: AppLimit, _: Admin) -> ExactJSONResponse:
        """Set (or replace) an app's spending limit in credits (100 = $1): a budget on the tag `app:<app_id>`."""
        require_current()
        tag = _app_tag(body.app_id, services.policy)
        definition = build_definition(
            tag,
            max_budget=body.limit_amount / CREDITS_PER_USD,
            soft_budget=None,
            duration=LIMIT_DURATIONS[body.limit_type],
            thresholds=body.alert_thresholds,
            window="calendar",
            now=services.clock(),
            previous=registry.get(tag),
            source="app_limit",
        )
        await save(definition, tag)
        window = current_window(definition, services.clock())
        return ExactJSONResponse(
            {
                "success": True,
                "app_id": body.app_id,
                "tag": tag,
                "limit_type": body.limit_type,
                "limit_amount": body.limit_amount,
                "alert_thresholds": definition.alert_thresholds,
                "window_start": _dt(window.start_ms),
                "window_end": _dt(window.end_ms),
            }
        )

    @router.get("/v1/usage/app/{app_id}/current", response_class=ExactJSONResponse)
    async def app_usage(app_id: str, _: Reader) -> ExactJSONResponse:
        """Usage in the current limit window, in credits (100 = $1); the calendar month when no limit is set."""
        require_current()
        tag = _app_tag(app_id, services.policy)
        definition = registry.get(tag)
        limit_type = _limit_type(definition.budget_duration) if definition else None
        now = services.clock()
        if definition is not None:
            window = current_window(definition, now)
        else:
            window = calendar_window(Duration(1, "mo"), int(now.timestamp() * 1000), services.tz)
        start, end = _dt(window.start_ms), _dt(window.end_ms)
        spend, name = await asyncio.gather(
            asyncio.to_thread(services.spend.spend, tag, start, end),
            asyncio.to_thread(services.spend.app_name, app_id),
        )
        usage = spend * CREDITS_PER_USD
        limit = (
            definition.max_budget_usd * CREDITS_PER_USD
            if definition and definition.max_budget_usd is not None
            else None
        )
        percent = (usage * 100 / limit).quantize(Decimal("0.01")) if limit else None
        return ExactJSONResponse(
            {
                "app_id": app_id,
                "app_name": name,
                "current_usage": usage,
                "limit": limit,
                "usage_percent": percent,
                "limit_type": limit_type,
                "window_start": start,
                "window_end": end,
                "blocked": not guard.check([tag]).allowed,
            }
        )

    @router.post("/v1/check", responses={503: {}})
    async def check(body: CheckRequest, key: Caller) -> dict[str, Any]:
        """May a call with this attribution go ahead? Answered from memory, like an embedded BudgetGuard.
        A bound producer key asks only about what it may claim (403 otherwise, as its events would get)."""
        if guard.staleness_s is None:
            raise BudgetsUnavailable(
                "block state is still being read from Kafka; retry shortly", retry_after_s=1
            )
        attribution = normalize(
            headers=body.headers,
            metadata=[body.metadata, {"tags": body.tags or []}],
            users=[body.user],
            policy=services.policy,
        )
        binding = getattr(key, "binding", None)
        if binding is not None and binding.bound:
            problem = binding.violation(attribution)
            if problem is not None:
                raise Forbidden(
                    f"{problem[1]}; a bound key checks only what it may claim", {"field": problem[0]}
                )
        return guard.check(attribution.tags).to_dict()

    return router


def _app_tag(app_id: str, policy: AttributionPolicy) -> str:
    tag = canonical_tag(f"app:{app_id}", policy)
    if tag != f"app:{app_id}":
        raise InvalidBudget(f"app_id {app_id!r} is not a valid app id")
    return tag


def _limit_type(duration: str) -> str | None:
    return {v: k for k, v in LIMIT_DURATIONS.items()}.get(duration)


def _dt(at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC)

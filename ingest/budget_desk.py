"""The budget desk behind the budget endpoints (DESIGN §7): LiteLLM-style tag budgets, AnyAPI-style app
limits, the gateway check. `ingest.budgets` routes HTTP to it.

Definitions are published to the compacted `spend.budgets` topic (a tombstone
deletes); the API reads that topic back into a view, so every API instance
knows every budget. `spend`, `blocked` and the thresholds fired come from one
source, the budget agent's latest signal on `spend.budget-blocks` (what a
gateway's guard enforces); `ledger_spend` is the same window summed from
`spend_records`, for reconciliation. A write waits (briefly) for the agent to
apply it, so its answer already shows the new budget's state.
Money in these responses is a JSON number written with every digit (never a float).
"""

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from ingest.errors import BudgetsUnavailable, Conflict, Forbidden, InvalidBudget, NotFound
from ingest.publisher import EventPublisher
from ledger.budgets import (
    Duration,
    Window,
    budget_keys,
    calendar_window,
    describe_window,
    model_key,
    parse_duration,
    project,
    rule_of,
)
from ledger.errors import BudgetError
from ledger.pricing import PriceBook, normalize_provider
from ledger.tags import AttributionPolicy, normalize
from schemas.budgets import DEFAULT_ALERT_THRESHOLDS, BlockSignal, BudgetDefinition, WindowMode
from schemas.times import from_ms, to_ms
from spendledger.guard import BudgetGuard, CompactedView

CREDITS_PER_USD = Decimal(100)
LIMIT_DURATIONS = {"daily": "1d", "weekly": "7d", "monthly": "1mo"}
Thresholds = Annotated[list[Annotated[int, Field(ge=1, le=100)]], Field(max_length=10)]
Money = Annotated[Decimal, Field(ge=0, max_digits=26, decimal_places=12)]
# Credits are a hundredth of a dollar: 10 places of credits are the 12 of USD the ledger stores.
Credits = Annotated[Decimal, Field(ge=0, max_digits=26, decimal_places=10)]
Destinations = Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]], Field(max_length=10)]
_HASHED_USER = re.compile(r"^uh_[0-9a-f]{32}$")


# A tag and a window [start, end) of its spend.
SpendWindow = tuple[str, datetime, datetime]


class SpendReader(Protocol):
    """Spend as the ledger holds it (ClickHouse in production)."""

    def spend(self, tag: str, start: datetime, end: datetime) -> Decimal: ...

    def spends(self, windows: Sequence[SpendWindow]) -> dict[SpendWindow, Decimal]:
        """`spend` of each window, in one query: a listing costs one query, not one per budget."""
        ...

    def app_name(self, app_id: str) -> str: ...


@dataclass
class BudgetServices:
    registry: CompactedView[BudgetDefinition]
    guard: BudgetGuard
    spend: SpendReader
    tz: tzinfo
    policy: AttributionPolicy
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # How long a write waits for the budget agent to apply it before answering with the ledger's figure.
    answer_wait_s: float = 3.0
    # Alert destination names configured in the environment (a budget may name only these).
    alert_destinations: frozenset[str] = frozenset()
    # Names a call's model and provider as the ledger will (for /v1/check's `model:`/`provider:` keys).
    prices: PriceBook = field(default_factory=PriceBook)


class _BudgetFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    max_budget: Money | None = None
    soft_budget: Money | None = None
    budget_duration: str | None = Field(default=None, max_length=16)
    alert_thresholds: Thresholds | None = None
    alert_destinations: Destinations | None = None


class TagNew(_BudgetFields):
    window: WindowMode = "calendar"
    description: str | None = Field(default=None, max_length=1024)
    # LiteLLM's: the models a tag may be routed to. Not a budget: refused when given (see tag_new).
    models: list[str] | None = Field(default=None, max_length=1000)


class TagInfoRequest(BaseModel):
    """LiteLLM's `POST /tag/info` body."""

    names: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1, max_length=100)


class TagUpdate(_BudgetFields):
    window: WindowMode | None = None


class TagDelete(BaseModel):
    name: str = Field(min_length=1, max_length=256)


class AppLimit(BaseModel):
    app_id: str = Field(min_length=1, max_length=128)
    limit_type: Literal["daily", "weekly", "monthly"]
    limit_amount: Credits = Field(description="credits; 100 credits = $1 (at most 10 decimal places)")
    alert_thresholds: Thresholds = Field(default_factory=lambda: list(DEFAULT_ALERT_THRESHOLDS))


class CheckRequest(BaseModel):
    """The attribution of the call about to be made, as an event would carry it."""

    headers: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    tags: list[str] | None = Field(default=None, max_length=100)
    model: str | None = Field(default=None, max_length=256, description="checked against `model:` budgets")
    provider: str | None = Field(
        default=None, max_length=128, description="checked against `provider:` budgets"
    )


def canonical_tag(name: str, policy: AttributionPolicy) -> str:
    """A budget name as the ledger writes the tag (`env:prod` -> `env:production`, `department:x` -> `team:x`).

    `model:openai/gpt-4o` (or `model:GPT-4o`) is `model:gpt-4o` and `provider:OpenAI` is
    `provider:openai`: the keys every call's spend counts for (`ledger.budgets.budget_keys`). With USER_ID_HMAC_KEY set, `user:<id>` is hashed as the
    ledger hashes user ids, and a name already hashed (`user:uh_…`, as reports show it) stays as it is."""
    key, sep, value = name.strip().partition(":")
    if sep and key.strip().lower() == "model" and value.strip():
        name = model_key(value)
    elif sep and key.strip().lower() == "provider" and value.strip():
        name = f"provider:{normalize_provider(value)}"
    elif sep and key.strip().lower() == "user" and _HASHED_USER.match(value.strip()):
        if policy.user_id_hmac_key is None:
            raise InvalidBudget(
                f"{name!r} is a hashed user id, but USER_ID_HMAC_KEY is not set: the ledger stores user ids as sent"
            )
        return f"user:{value.strip()}"
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
    destinations: list[str] | None = None,
    known_destinations: frozenset[str] = frozenset(),
    user_key_id: str | None = None,
) -> BudgetDefinition:
    if not duration:
        raise InvalidBudget(
            "budget_duration is required: how often the budget resets, e.g. '1d', '30d', '1mo'"
        )
    if max_budget is not None and soft_budget is not None and soft_budget > max_budget:
        raise InvalidBudget("soft_budget must not be above max_budget")
    if destinations is None:
        destinations = previous.alert_destinations if previous else []
    unknown = sorted(set(destinations) - set(known_destinations))
    if unknown:
        raise InvalidBudget(
            f"unknown alert destinations {unknown}: configure them in SPENDLEDGER_ALERT_DESTINATIONS first",
            {"field": "alert_destinations", "unknown": unknown},
        )
    definition = BudgetDefinition(
        tag=tag,
        max_budget_usd=max_budget,
        soft_budget_usd=soft_budget,
        budget_duration=duration.strip(),
        window=window,
        alert_thresholds=sorted(set(thresholds if thresholds is not None else DEFAULT_ALERT_THRESHOLDS)),
        source=source,
        description=description if description is not None else previous.description if previous else None,
        created_at=previous.created_at if previous else now,
        updated_at=now,
        alert_destinations=sorted(set(destinations)),
        user_key_id=user_key_id if tag.startswith("user:") else None,
    )
    try:
        rule_of(definition)
    except BudgetError as exc:
        raise InvalidBudget(str(exc)) from exc
    return definition


class BudgetDesk:
    """The budget endpoints' work, without HTTP: each method takes a request's body and returns its answer,
    or raises the `ingest.errors` refusal the app maps to a status. It reads `services` at each call (a
    test may swap the clock or the policy)."""

    def __init__(self, services: BudgetServices, publisher: EventPublisher, topic: str) -> None:
        self.services = services
        self._publisher = publisher
        self._topic = topic

    def require_current(self) -> None:
        if self.services.registry.staleness_s is None:
            raise BudgetsUnavailable(
                "budgets are still being read from Kafka; retry shortly", retry_after_s=2
            )

    def lookup(self, name: str) -> tuple[str, BudgetDefinition | None]:
        """The budget of a name: under its canonical tag, or under the exact name (a `model:`/`provider:`
        budget created before those names were made canonical)."""
        registry = self.services.registry
        tag = canonical_tag(name, self.services.policy)
        definition = registry.get(tag)
        if definition is None and registry.get(name.strip()) is not None:
            return name.strip(), registry.get(name.strip())
        return tag, definition

    def existing(self, name: str) -> tuple[str, BudgetDefinition]:
        tag, definition = self.lookup(name)
        if definition is None:
            raise NotFound(f"no budget for tag {tag!r}", {"tag": tag})
        return tag, definition

    def window(self, definition: BudgetDefinition, now: datetime) -> Window:
        """The budget's window now, from the wall clock (never from event times)."""
        return rule_of(definition).window_at(to_ms(now), self.services.tz)

    async def create(self, body: TagNew) -> dict[str, Any]:
        self.require_current()
        if body.models:
            raise InvalidBudget(
                "models restricts which models a tag may be routed to, which a gateway does, not the ledger; "
                "for a budget on a model, create one named 'model:<model>'",
                {"field": "models"},
            )
        tag = canonical_tag(body.name, self.services.policy)
        if self.services.registry.get(tag) is not None:
            raise Conflict(f"tag {tag!r} already has a budget; change it with POST /tag/update", {"tag": tag})
        definition = build_definition(
            tag,
            max_budget=body.max_budget,
            soft_budget=body.soft_budget,
            duration=body.budget_duration,
            thresholds=body.alert_thresholds,
            window=body.window,
            now=self.services.clock(),
            description=body.description,
            destinations=body.alert_destinations,
            known_destinations=self.services.alert_destinations,
            user_key_id=key_fingerprint(self.services.policy),
        )
        await self.save(tag, definition)
        return await self.info(definition)

    async def update(self, body: TagUpdate) -> dict[str, Any]:
        self.require_current()
        tag, old = self.existing(body.name)
        sent = body.model_fields_set
        definition = build_definition(
            tag,
            max_budget=body.max_budget if "max_budget" in sent else old.max_budget_usd,
            soft_budget=body.soft_budget if "soft_budget" in sent else old.soft_budget_usd,
            duration=body.budget_duration if "budget_duration" in sent else old.budget_duration,
            thresholds=body.alert_thresholds if "alert_thresholds" in sent else old.alert_thresholds,
            window=body.window or old.window,
            now=self.services.clock(),
            previous=old,
            source=old.source,
            destinations=body.alert_destinations if "alert_destinations" in sent else None,
            known_destinations=self.services.alert_destinations,
            user_key_id=old.user_key_id,  # the id was hashed when the budget was created
        )
        await self.save(tag, definition)
        return await self.info(definition)

    async def delete(self, body: TagDelete) -> dict[str, Any]:
        self.require_current()
        tag, _definition = self.existing(body.name)
        await self.save(tag, None)
        return {"deleted": [tag]}

    async def save(self, tag: str, definition: BudgetDefinition | None) -> None:
        """Publish the definition (None: a tombstone) and wait until the budget agent has applied it."""
        value = definition.model_dump_json().encode() if definition else None
        await self._publisher.publish(self._topic, [(tag.encode(), value)])
        self.services.registry.put(tag, definition)
        if definition is not None:
            await self._applied(definition)

    async def _applied(self, definition: BudgetDefinition) -> None:
        """Wait (at most `answer_wait_s`) until the budget agent has applied this definition."""
        deadline = time.monotonic() + self.services.answer_wait_s
        while time.monotonic() < deadline:
            signal = self.services.guard.view.get(definition.tag)
            if signal is not None and signal.definition_updated_at == definition.updated_at:
                return
            await asyncio.sleep(0.05)

    async def info(self, definition: BudgetDefinition) -> dict[str, Any]:
        return (await self.describe([definition]))[0]

    async def infos(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The named budgets, keyed by tag; NotFound names every name without one."""
        self.require_current()
        found: dict[str, BudgetDefinition] = {}
        missing = []
        for name in names:
            tag, definition = self.lookup(name)
            if definition is None:
                missing.append(tag)
            else:
                found.setdefault(tag, definition)
        answers = await self.describe(list(found.values()))
        if missing:
            raise NotFound(f"no budget for {', '.join(missing)}", {"unknown": missing})
        return dict(zip(found, answers, strict=True))

    async def listing(self) -> list[dict[str, Any]]:
        """Every budget, sorted by tag."""
        self.require_current()
        return await self.describe([definition for _, definition in sorted(self.services.registry.items())])

    async def describe(self, definitions: list[BudgetDefinition]) -> list[dict[str, Any]]:
        """`/tag/info`'s answer for each budget, at one instant, with one query for all their ledger spends."""
        now = self.services.clock()
        windows = [self.window(definition, now) for definition in definitions]
        keys = [
            (d.tag, from_ms(w.start_ms), from_ms(w.end_ms)) for d, w in zip(definitions, windows, strict=True)
        ]
        ledger = await asyncio.to_thread(self.services.spend.spends, keys) if keys else {}
        return [
            self._answer(definition, window, ledger[key], now)
            for definition, window, key in zip(definitions, windows, keys, strict=True)
        ]

    def _answer(
        self, definition: BudgetDefinition, window: Window, ledger_spend: Decimal, now: datetime
    ) -> dict[str, Any]:
        signal = agent_view(definition, self.services.guard.view.get(definition.tag), window)
        state = budget_state(definition, signal, ledger_spend, from_ms(window.end_ms))
        projection = (
            project(state.spend, definition.max_budget_usd, window, to_ms(now))
            if definition.window == "calendar"
            else None
        )
        duration = parse_duration(definition.budget_duration)
        answer: dict[str, Any] = {
            "name": definition.tag,
            "max_budget": definition.max_budget_usd,
            "soft_budget": definition.soft_budget_usd,
            "budget_duration": definition.budget_duration,
            "window": definition.window,
            "window_rule": describe_window(duration, definition.window, self.services.tz),
            "alert_thresholds": definition.alert_thresholds,
            "alert_destinations": definition.alert_destinations,
            "spend": state.spend,
            "spend_source": state.source,
            "ledger_spend": ledger_spend,
            "window_start": from_ms(window.start_ms),
            "budget_reset_at": from_ms(window.end_ms),
            "blocked": state.blocked,
            "blocked_until": state.blocked_until,
            "thresholds_fired": state.thresholds_fired,
            "soft_budget_alerted": state.soft_budget_alerted,
            "projected_spend": projection.spend if projection else None,
            "projected_exhausted_at": from_ms(projection.exhausted_at_ms)
            if projection and projection.exhausted_at_ms is not None
            else None,
            "evaluated_at": state.evaluated_at,
            "source": definition.source,
            "description": definition.description,
            "created_at": definition.created_at,
            "updated_at": definition.updated_at,
        }
        if definition.user_key_id is not None and definition.user_key_id != key_fingerprint(
            self.services.policy
        ):
            answer["warning"] = (
                "this user budget's id was hashed with another USER_ID_HMAC_KEY: it matches no new spend; "
                "delete it and create it again with the user's id"
            )
        return answer

    async def set_app_limit(self, body: AppLimit) -> dict[str, Any]:
        self.require_current()
        tag = _app_tag(body.app_id, self.services.policy)
        previous = self.services.registry.get(tag)
        if previous is not None and previous.source != "app_limit":
            raise Conflict(
                f"{tag!r} already has a budget from /tag/new (max_budget {previous.max_budget_usd} USD per "
                f"{previous.budget_duration}); change it with POST /tag/update, or delete it first",
                {"tag": tag, "source": previous.source},
            )
        definition = build_definition(
            tag,
            max_budget=body.limit_amount / CREDITS_PER_USD,
            soft_budget=None,
            duration=LIMIT_DURATIONS[body.limit_type],
            thresholds=body.alert_thresholds,
            window="calendar",
            now=self.services.clock(),
            previous=previous,
            source="app_limit",
            known_destinations=self.services.alert_destinations,
        )
        await self.save(tag, definition)
        window = self.window(definition, self.services.clock())
        return {
            "success": True,
            "app_id": body.app_id,
            "tag": tag,
            "limit_type": body.limit_type,
            "limit_amount": body.limit_amount,
            "alert_thresholds": definition.alert_thresholds,
            "window_start": from_ms(window.start_ms),
            "window_end": from_ms(window.end_ms),
        }

    async def app_usage(self, app_id: str) -> dict[str, Any]:
        self.require_current()
        services = self.services
        tag = _app_tag(app_id, services.policy)
        definition = services.registry.get(tag)
        now = services.clock()
        if definition is not None:
            window = self.window(definition, now)
        else:
            window = calendar_window(Duration(1, "mo"), to_ms(now), services.tz)
        start, end = from_ms(window.start_ms), from_ms(window.end_ms)
        spend, name = await asyncio.gather(
            asyncio.to_thread(services.spend.spend, tag, start, end),
            asyncio.to_thread(services.spend.app_name, app_id),
        )
        usage = spend * CREDITS_PER_USD
        max_budget = definition.max_budget_usd if definition else None
        limit = max_budget * CREDITS_PER_USD if max_budget is not None else None
        return {
            "app_id": app_id,
            "app_name": name,
            "current_usage": usage,
            "limit": limit,
            "usage_percent": (usage * 100 / limit).quantize(Decimal("0.01")) if limit else None,
            "limit_type": _limit_type(definition.budget_duration) if definition else None,
            "window_start": start,
            "window_end": end,
            "blocked": not services.guard.check([tag]).allowed,
        }

    def check(self, body: CheckRequest, binding: Any) -> dict[str, Any]:
        """The guard's decision for the call's budget keys; a bound key (`binding`) asks only what it may claim."""
        guard = self.services.guard
        if guard.staleness_s is None:
            raise BudgetsUnavailable(
                "block state is still being read from Kafka; retry shortly", retry_after_s=1
            )
        attribution = normalize(
            headers=body.headers,
            metadata=[body.metadata, {"tags": body.tags or []}],
            users=[body.user],
            policy=self.services.policy,
        )
        if binding is not None and binding.bound:
            problem = binding.violation(attribution)
            if problem is not None:
                raise Forbidden(
                    f"{problem[1]}; a bound key checks only what it may claim", {"field": problem[0]}
                )
        provider, model = self.services.prices.resolve(body.model, body.provider)
        return guard.check(budget_keys(attribution.tags, model, provider)).to_dict()


@dataclass(frozen=True)
class BudgetState:
    """What an answer says of a budget's spend and block, from one source."""

    spend: Decimal
    source: Literal["budget_agent", "ledger"]
    blocked: bool
    blocked_until: datetime | None
    thresholds_fired: list[int]
    soft_budget_alerted: bool
    evaluated_at: datetime | None


def budget_state(
    definition: BudgetDefinition, signal: BlockSignal | None, ledger_spend: Decimal, window_end: datetime
) -> BudgetState:
    """The agent's state when it speaks for this budget and window (`agent_view`); otherwise the ledger's
    figure, judged the agent's way (blocked at the max, until the window ends)."""
    if signal is not None:
        blocked_until = (signal.block_ends_at or signal.window_end) if signal.blocked else None
        return BudgetState(
            signal.spend_usd,
            "budget_agent",
            signal.blocked,
            blocked_until,
            signal.thresholds_fired,
            signal.soft_budget_fired,
            signal.updated_at,
        )
    blocked = definition.max_budget_usd is not None and ledger_spend >= definition.max_budget_usd
    return BudgetState(ledger_spend, "ledger", blocked, window_end if blocked else None, [], False, None)


def agent_view(
    definition: BudgetDefinition, signal: BlockSignal | None, window: Window
) -> BlockSignal | None:
    """The budget agent's latest signal, when it is about this budget in this window."""
    if signal is None or signal.change == "deleted":
        return None
    if signal.definition_updated_at is not None:
        if signal.definition_updated_at != definition.updated_at:
            return None  # decided under another version of the budget
    elif signal.max_budget_usd != definition.max_budget_usd:
        return None
    start, end = to_ms(signal.window_start), to_ms(signal.window_end)
    if definition.window == "sliding":
        # The window moves each minute; the agent's is current if it ended at most a minute ago.
        return (
            signal
            if end - start == window.end_ms - window.start_ms and end >= window.end_ms - 60_000
            else None
        )
    return signal if (start, end) == (window.start_ms, window.end_ms) else None


def key_fingerprint(policy: AttributionPolicy) -> str | None:
    """A fingerprint of the HMAC key user ids are hashed with (never the key)."""
    key = policy.user_id_hmac_key
    return hashlib.sha256(b"spendledger-user-key:" + key).hexdigest()[:12] if key else None


def _app_tag(app_id: str, policy: AttributionPolicy) -> str:
    tag = canonical_tag(f"app:{app_id}", policy)
    if tag != f"app:{app_id}":
        raise InvalidBudget(f"app_id {app_id!r} is not a valid app id")
    return tag


def _limit_type(duration: str) -> str | None:
    return {v: k for k, v in LIMIT_DURATIONS.items()}.get(duration)

"""From a joined call to one attributed, priced ledger record."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from ledger.errors import JoinError
from ledger.join import JoinedCall, RawEventDict
from ledger.pricing import Price, PriceBook, split_model_ref
from ledger.tags import AttributionPolicy, CanonicalAttribution, normalize
from ledger.usage import TokenUsage, parse_usage
from schemas.records import AttributedRecord


@dataclass(frozen=True)
class Attributor:
    """Everything attribution needs, built once per process."""

    policy: AttributionPolicy
    prices: PriceBook

    def record(self, call: JoinedCall) -> AttributedRecord:
        """Attribute and price one call. Raises LedgerError for a call that cannot be recorded."""
        events = [e for e in (call.request, call.usage) if e is not None]
        if not events:
            raise JoinError("a joined call carries no event")
        billing = call.usage or call.request
        assert billing is not None  # noqa: S101 - events is non-empty
        event_id = billing.get("event_id")
        if not event_id:
            raise JoinError("event has no event_id")

        attribution = canonical_attribution(events, self.policy)

        occurred_at = _first_time(e.get("occurred_at") for e in events)
        received_at = min(
            (_time(e["received_at"]) for e in events if e.get("received_at")), default=occurred_at
        )
        model = _first(e.get("model") or _body(e).get("model") for e in (call.usage, call.request) if e)
        provider = _first(e.get("provider") for e in (call.usage, call.request) if e)
        reported = billing.get("reported_cost_usd")
        reported_cost = Decimal(str(reported)) if reported is not None else None

        unknown_usage = call.join_kind == "request_only" or (
            billing.get("usage") is None and billing.get("status") == "incomplete"
        )
        if unknown_usage:
            # No usage ever came (or a stream was cut before the provider reported any):
            # the cost is unknown, not zero.
            usage = TokenUsage()
            status = "incomplete"
            provider_id, model_ref = split_model_ref(model or "", provider)
            price = Price(None, None, None, "unpriced", provider_id or "", model_ref)
        else:
            usage = parse_usage(billing.get("usage"))
            status = billing.get("status") or "success"
            price = self.prices.price(
                model=model, provider=provider, usage=usage, at=occurred_at, reported_cost_usd=reported_cost
            )
        latency = billing.get("latency_ms")
        return AttributedRecord(
            event_id=event_id,
            request_id=call.request_id,
            occurred_at=occurred_at,
            received_at=received_at,
            **attribution.columns(),
            tags=attribution.tags,
            invalid_tags=attribution.invalid,
            metadata=attribution.metadata,
            provider=price.provider,
            model=price.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            cost_usd=price.cost_usd,
            input_cost_usd=price.input_cost_usd,
            output_cost_usd=price.output_cost_usd,
            reported_cost_usd=reported_cost,
            price_source=price.price_source,
            status=status,
            http_status=billing.get("http_status"),
            latency_ms=round(latency) if latency is not None else None,
            join_kind=call.join_kind,
        )


def canonical_attribution(events: list[RawEventDict], policy: AttributionPolicy) -> CanonicalAttribution:
    """The attribution of a call from its events (a request and its usage, or one completed event):
    headers (the first event's value wins), metadata objects and users of all of them."""
    headers: dict[str, str] = {}
    for event in events:
        for name, value in (event.get("headers") or {}).items():
            headers.setdefault(name, value)
    return normalize(
        headers=headers,
        metadata=[m for e in events for m in _metadata_sources(e)],
        users=[u for e in events for u in (e.get("user"), _body(e).get("user"))],
        policy=policy,
    )


def _body(event: RawEventDict) -> dict[str, Any]:
    body = event.get("body")
    return body if isinstance(body, dict) else {}


def _metadata_sources(event: RawEventDict) -> Iterator[dict[str, Any] | None]:
    yield event.get("metadata")
    meta = _body(event).get("metadata")
    yield meta if isinstance(meta, dict) else None


def _first(values: Any) -> Any:
    for value in values:
        if value:
            return value
    return None


def _time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _first_time(values: Any) -> datetime:
    value = _first(values)
    if value is None:
        raise JoinError("event has no occurred_at")
    return _time(value)

"""Pricing: the genai-prices catalog (bundled data, no network), price overrides, reported cost.

Order of precedence for one call:
1. a price override in force at the event's time (negotiated or self-hosted prices) -> `override`;
2. the catalog price in force at the event's time -> `catalog`;
3. the cost the gateway reported -> `reported`;
4. otherwise `cost_usd` is None and `price_source` is `unpriced` (never $0).

Money is Decimal USD, rounded half-even to 12 decimal places (the ClickHouse
column is Decimal(38, 12)).
"""

from __future__ import annotations

import bisect
import copy
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from genai_prices import Usage as CatalogUsage
from genai_prices import data_snapshot
from genai_prices.types import TieredPrices

from ledger.errors import PriceFileError
from ledger.usage import TokenUsage

USD_QUANTUM = Decimal("1e-12")
MTOK = Decimal(1_000_000)

PROVIDER_ALIASES: dict[str, str] = {
    "gemini": "google",
    "google_ai_studio": "google",
    "vertex": "google",
    "vertex_ai": "google",
    "bedrock": "aws",
    "aws_bedrock": "aws",
    "azure_openai": "azure",
    "xai": "x-ai",
    "grok": "x-ai",
    "mistralai": "mistral",
    "together_ai": "together",
    "fireworks_ai": "fireworks",
}


@dataclass(frozen=True)
class PriceOverride:
    """A price that wins over the catalog for one model from `effective_from` (inclusive) to `effective_to` (exclusive)."""

    model: str
    provider: str | None
    effective_from: datetime
    effective_to: datetime | None
    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    cache_read_usd_per_mtok: Decimal | None = None
    cache_write_usd_per_mtok: Decimal | None = None

    def active(self, at: datetime) -> bool:
        return self.effective_from <= at and (self.effective_to is None or at < self.effective_to)

    def cost(self, usage: TokenUsage) -> tuple[Decimal, Decimal]:
        """(input cost, output cost); cached tokens at their own rate, or the input rate if none is set."""
        read_rate = self.cache_read_usd_per_mtok
        write_rate = self.cache_write_usd_per_mtok
        input_cost = (
            usage.uncached_input_tokens * self.input_usd_per_mtok
            + usage.cache_read_tokens * (self.input_usd_per_mtok if read_rate is None else read_rate)
            + usage.cache_write_tokens * (self.input_usd_per_mtok if write_rate is None else write_rate)
        ) / MTOK
        return input_cost, usage.output_tokens * self.output_usd_per_mtok / MTOK


@dataclass(frozen=True)
class Price:
    """The priced outcome of one call."""

    cost_usd: Decimal | None
    input_cost_usd: Decimal | None
    output_cost_usd: Decimal | None
    price_source: str
    provider: str
    model: str


def usd(value: Decimal) -> Decimal:
    """Round to the ledger's precision (12 decimal places, half-even)."""
    return value.quantize(USD_QUANTUM)


def split_model_ref(model: str, provider: str | None) -> tuple[str | None, str]:
    """`openai/gpt-4o` -> (`openai`, `gpt-4o`); a prefix that is not a provider stays part of the model."""
    model = model.strip()
    explicit = normalize_provider(provider) if provider else None
    prefix, sep, rest = model.partition("/")
    if sep and rest:
        prefix_provider = normalize_provider(prefix)
        if explicit is None and prefix_provider in _catalog_provider_ids():
            return prefix_provider, rest
        if explicit is not None and prefix_provider == explicit:
            return explicit, rest
    return explicit, model


def normalize_provider(provider: str) -> str:
    lowered = provider.strip().lower()
    return PROVIDER_ALIASES.get(lowered, lowered)


def _catalog_provider_ids() -> frozenset[str]:
    global _PROVIDER_IDS
    if _PROVIDER_IDS is None:
        _PROVIDER_IDS = frozenset(p.id for p in data_snapshot.get_snapshot().providers)
    return _PROVIDER_IDS


_PROVIDER_IDS: frozenset[str] | None = None


class PriceBook:
    """Prices calls. Catalog look-ups are cached per (provider, model): pricing is cheap per event."""

    def __init__(self, overrides: Iterable[PriceOverride] = ()) -> None:
        self._overrides: dict[tuple[str | None, str], list[PriceOverride]] = {}
        for override in overrides:
            key = (override.provider, override.model.lower())
            self._overrides.setdefault(key, []).append(override)
        for group in self._overrides.values():
            group.sort(key=lambda o: o.effective_from, reverse=True)
        self._catalog: dict[tuple[str | None, str], Any] = {}
        self._linear: dict[int, tuple[Any, BandedPrice | None]] = {}

    def _override(self, provider: str | None, model: str, at: datetime) -> PriceOverride | None:
        for key in ((provider, model.lower()), (None, model.lower())):
            for override in self._overrides.get(key, ()):
                if override.active(at):
                    return override
        return None

    def _catalog_model(self, provider: str | None, model: str) -> Any:
        key = (provider, model)
        if key not in self._catalog:
            found = None
            # A provider the catalog does not know (e.g. self-hosted) is never guessed at.
            if provider is None or provider in _catalog_provider_ids():
                try:
                    found = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
                except LookupError:
                    found = None
            self._catalog[key] = found
        return self._catalog[key]

    def resolve(self, model: str | None, provider: str | None) -> tuple[str, str]:
        """(provider, model) as `price` names a call's, found without usage or time: an override's
        provider, else the catalog's, else the one given or prefixed."""
        provider_id, model_ref = split_model_ref(model or "", provider)
        if not model_ref:
            return provider_id or "", ""
        if provider_id is None:
            for (override_provider, name), _ in self._overrides.items():
                if name == model_ref.lower() and override_provider:
                    return override_provider, model_ref
            found = self._catalog_model(None, model_ref)
            if found is not None:
                return found[0].id, model_ref
        return provider_id or "", model_ref

    def price(
        self,
        *,
        model: str | None,
        provider: str | None,
        usage: TokenUsage,
        at: datetime,
        reported_cost_usd: Decimal | None = None,
    ) -> Price:
        """Price one call at its event time `at`."""
        provider_id, model_ref = split_model_ref(model or "", provider)
        override = self._override(provider_id, model_ref, at) if model_ref else None
        if override is not None:
            input_cost, output_cost = override.cost(usage)
            return Price(
                usd(input_cost + output_cost),
                usd(input_cost),
                usd(output_cost),
                "override",
                provider_id or override.provider or "",
                model_ref,
            )
        found = self._catalog_model(provider_id, model_ref) if model_ref else None
        if found is not None:
            catalog_provider, catalog_model = found
            total, input_cost, output_cost = self._catalog_cost(catalog_model.get_prices(at), usage)
            return Price(
                usd(total), usd(input_cost), usd(output_cost), "catalog", catalog_provider.id, model_ref
            )
        if reported_cost_usd is not None:
            return Price(usd(reported_cost_usd), None, None, "reported", provider_id or "", model_ref)
        return Price(None, None, None, "unpriced", provider_id or "", model_ref)

    def _catalog_cost(self, model_price: Any, usage: TokenUsage) -> tuple[Decimal, Decimal, Decimal]:
        """(total, input, output) cost: by the linear form when the price has one, else by the catalog."""
        cached = self._linear.get(id(model_price))
        if cached is None:  # keep the price object alive with its id
            cached = self._linear[id(model_price)] = (model_price, BandedPrice.of(model_price))
        banded = cached[1]
        counts = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
        if banded is not None and counts[2] + counts[3] <= counts[0]:
            return banded.cost(counts)
        return catalog_cost(model_price, counts)


Counts = tuple[int, int, int, int]  # input (cached included), output, cache read, cache write tokens


def catalog_cost(model_price: Any, counts: Counts) -> tuple[Decimal, Decimal, Decimal]:
    """(total, input, output) cost as the genai-prices catalog computes it."""
    result = model_price.calc_price(
        CatalogUsage(
            input_tokens=counts[0],
            output_tokens=counts[1],
            cache_read_tokens=counts[2],
            cache_write_tokens=counts[3],
        )
    )
    return result["total_price"], result["input_price"], result["output_price"]


@dataclass(frozen=True)
class LinearPrice:
    """A catalog price with no tiers is linear in the token counts: per (total, input, output) cost,
    a fixed part plus a USD-per-million rate for each count. The rates are read off the catalog's own
    calculation and checked against it, so this is the catalog's result, only without its
    per-call unit bookkeeping (most of the worker's time per event, measured)."""

    fixed: tuple[Decimal, Decimal, Decimal]
    rates: tuple[Counts, ...]  # per count: (total, input, output) USD per million

    PROBES: ClassVar[tuple[Counts, ...]] = (
        (1_234_567, 7_654_321, 234_567, 34_567),
        (1, 3, 0, 1),
        (10, 0, 10, 0),
    )

    @classmethod
    def of(cls, model_price: Any) -> LinearPrice | None:
        if any(isinstance(v, TieredPrices) for v in vars(model_price).values()):
            return None
        try:
            fixed = catalog_cost(model_price, (0, 0, 0, 0))
            million = [catalog_cost(model_price, c) for c in _UNIT_COUNTS]
        except (ValueError, ArithmeticError, LookupError):
            return None  # the catalog refuses some usage shapes: leave them all to it
        # A cache count comes with as many input tokens, so its rate is what it adds to theirs.
        rates = tuple(
            tuple(m[k] - (million[0] if i >= 2 else fixed)[k] for k in range(3))
            for i, m in enumerate(million)
        )
        linear = cls(fixed, rates)  # type: ignore[arg-type]
        try:
            if any(linear.cost(c) != catalog_cost(model_price, c) for c in cls.PROBES):
                return None
        except (ValueError, ArithmeticError, LookupError):
            return None
        return linear

    def cost(self, counts: Counts) -> tuple[Decimal, Decimal, Decimal]:
        r = self.rates
        return tuple(  # type: ignore[return-value]
            self.fixed[k]
            + (counts[0] * r[0][k] + counts[1] * r[1][k] + counts[2] * r[2][k] + counts[3] * r[3][k]) / MTOK
            for k in range(3)
        )


@dataclass(frozen=True)
class BandedPrice:
    """A catalog price, tiered or not, as one LinearPrice per band of input tokens.

    A tiered price ("cliff" pricing) applies a tier's rate to the WHOLE call once its input tokens
    exceed the tier's start, so between two tier starts the price is linear. Each band's linear
    form is read off the price with its tiers resolved for that band, and checked against the
    catalog's own calculation of the tiered price inside the band (at both of its ends)."""

    starts: tuple[int, ...]  # tier starts, ascending: band k holds input tokens in (starts[k-1], starts[k]]
    bands: tuple[LinearPrice, ...]

    @classmethod
    def of(cls, model_price: Any) -> BandedPrice | None:
        tiered = {k: v for k, v in vars(model_price).items() if isinstance(v, TieredPrices)}
        if not tiered:
            linear = LinearPrice.of(model_price)
            return cls((), (linear,)) if linear is not None else None
        starts = tuple(sorted({tier.start for v in tiered.values() for tier in v.tiers}))
        bands = []
        for k in range(len(starts) + 1):
            low = starts[k - 1] + 1 if k else 0  # the fewest input tokens of the band
            flat = copy.copy(model_price)
            flat.__dict__.update({key: _tier_price(v, low) for key, v in tiered.items()})
            linear = LinearPrice.of(flat)
            if linear is None:
                return None
            high = starts[k] if k < len(starts) else low + 5_000_000
            for inputs in (low, high):
                for counts in ((inputs, 0, 0, 0), (inputs, 1_234, inputs // 3, inputs // 5)):
                    try:
                        if linear.cost(counts) != catalog_cost(model_price, counts):
                            return None
                    except (ValueError, ArithmeticError, LookupError):
                        return None
            bands.append(linear)
        return cls(starts, tuple(bands))

    def cost(self, counts: Counts) -> tuple[Decimal, Decimal, Decimal]:
        return self.bands[bisect.bisect_left(self.starts, counts[0])].cost(counts)


def _tier_price(price: TieredPrices, input_tokens: int) -> Decimal:
    """The rate of a tiered price for a call with this many input tokens (as genai-prices picks it)."""
    for tier in reversed(price.tiers):
        if input_tokens > tier.start:
            return tier.price
    return price.base


# One million of each count; a cache count comes with as many input tokens (it is part of them).
_UNIT_COUNTS: tuple[Counts, ...] = (
    (1_000_000, 0, 0, 0),
    (0, 1_000_000, 0, 0),
    (1_000_000, 0, 1_000_000, 0),
    (1_000_000, 0, 0, 1_000_000),
)


def parse_price_overrides(text: str) -> tuple[PriceOverride, ...]:
    """Parse a TOML price-override file: `[[price]]` tables (see docs/pricing.md).

    Every problem is reported at once, with the entry it belongs to.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceFileError(f"price file is not valid TOML: {exc}") from exc
    entries = data.get("price", [])
    if not isinstance(entries, list):
        raise PriceFileError("price file must contain [[price]] tables")
    problems: list[str] = []
    overrides: list[PriceOverride] = []
    for index, entry in enumerate(entries):
        try:
            overrides.append(_override_from(entry))
        except (PriceFileError, KeyError, TypeError) as exc:
            problems.append(f"price #{index + 1}: {exc}")
    if problems:
        raise PriceFileError("; ".join(problems))
    return tuple(overrides)


def _override_from(entry: Mapping[str, Any]) -> PriceOverride:
    def money(key: str, required: bool = True) -> Decimal | None:
        raw = entry.get(key)
        if raw is None:
            if required:
                raise PriceFileError(f"{key} is required")
            return None
        try:
            value = Decimal(str(raw))
        except InvalidOperation as exc:
            raise PriceFileError(f"{key} is not a number: {raw!r}") from exc
        if value < 0 or not value.is_finite():
            raise PriceFileError(f"{key} must be a non-negative number")
        return value

    def moment(key: str) -> datetime | None:
        raw = entry.get(key)
        if raw is None:
            return None
        value = raw if isinstance(raw, datetime) else _parse_time(str(raw), key)
        if value.tzinfo is None:
            raise PriceFileError(f"{key} must carry a time zone (e.g. 2026-01-01T00:00:00Z)")
        return value

    model = entry.get("model")
    if not isinstance(model, str) or not model.strip():
        raise PriceFileError("model is required")
    provider = entry.get("provider")
    start = moment("effective_from")
    if start is None:
        raise PriceFileError("effective_from is required")
    end = moment("effective_to")
    if end is not None and end <= start:
        raise PriceFileError("effective_to must be after effective_from")
    input_rate = money("input_usd_per_mtok")
    output_rate = money("output_usd_per_mtok")
    assert input_rate is not None and output_rate is not None  # noqa: S101 - money() raised otherwise
    provider_id, model_ref = split_model_ref(model, provider if isinstance(provider, str) else None)
    return PriceOverride(
        model=model_ref,
        provider=provider_id,
        effective_from=start,
        effective_to=end,
        input_usd_per_mtok=input_rate,
        output_usd_per_mtok=output_rate,
        cache_read_usd_per_mtok=money("cache_read_usd_per_mtok", required=False),
        cache_write_usd_per_mtok=money("cache_write_usd_per_mtok", required=False),
    )


def _parse_time(raw: str, key: str) -> datetime:
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise PriceFileError(f"{key} is not an ISO-8601 time: {raw!r}") from exc

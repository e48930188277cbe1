"""Report rules: date ranges, group-by dimensions, allocation nesting and tag coverage. Pure.

Every figure a report shows is summed from `spend_records` rows; these
functions only validate the request and shape the sums. Money stays Decimal;
an unpriced call adds to `requests` and `unpriced_requests`, never to cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from ledger.errors import LedgerError
from ledger.tags import DIMENSION_COLUMNS

MAX_RANGE = timedelta(days=3660)
DEFAULT_RANGE = timedelta(days=30)
COVERAGE_ALERT_PCT = Decimal(95)


class ReportError(LedgerError):
    """A report request that cannot be answered: a bad range, an unknown dimension or metric."""


class ReconciliationError(LedgerError):
    """Figures that should add up to a total do not (a defect, never the caller's fault)."""


# Names a report may group by -> the `spend_records` column (or expression key) behind it.
GROUP_COLUMNS: dict[str, str] = {
    "date": "date",
    "hour": "hour",
    "app_id": "app_id",
    "app": "app_id",
    "model": "model",
    "provider": "provider",
    "user_id": "user_id",
    "user": "user_id",
    "team": "team",
    "project": "project",
    "environment": "environment",
    "env": "environment",
    "feature": "feature",
    "tenant_id": "tenant_id",
    "tenant": "tenant_id",
    "region": "region",
    "app_version": "app_version",
    "version": "app_version",
    "session_id": "session_id",
    "session": "session_id",
    "status": "status",
    "price_source": "price_source",
}

# Dimensions whose coverage can be measured (a record carries one value or none).
COVERAGE_COLUMNS: dict[str, str] = dict(DIMENSION_COLUMNS)

METRICS = ("requests", "cost", "tokens", "avg_response_time")

# The key a group's list is published under: the seed's `apps` for app_id, `models` for model.
PLURALS: dict[str, str] = {
    "date": "dates",
    "hour": "hours",
    "app_id": "apps",
    "model": "models",
    "provider": "providers",
    "user_id": "users",
    "team": "teams",
    "project": "projects",
    "environment": "environments",
    "feature": "features",
    "tenant_id": "tenants",
    "region": "regions",
    "app_version": "versions",
    "session_id": "sessions",
    "status": "statuses",
    "price_source": "price_sources",
}


@dataclass(frozen=True)
class DateRange:
    """[start, end) in UTC."""

    start: datetime
    end: datetime


def parse_moment(value: str, *, name: str, end: bool = False) -> datetime:
    """ISO-8601 date or date-time. A bare date is midnight UTC (for an end: the next midnight,
    so `end_date=2026-11-30` includes that day). A date-time without a zone is read as UTC."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day, time(), UTC)
            return moment + timedelta(days=1) if end else moment
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReportError(
            f"{name} must be an ISO-8601 date or date-time, e.g. 2026-11-01 or 2026-11-01T00:00:00Z; got {value!r}"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def date_range(start: str | None, end: str | None, *, now: datetime) -> DateRange:
    """The range a report covers; the last 30 days up to `now` by default."""
    end_at = parse_moment(end, name="end_date", end=True) if end else now.astimezone(UTC)
    start_at = parse_moment(start, name="start_date") if start else end_at - DEFAULT_RANGE
    if end_at <= start_at:
        raise ReportError(
            f"end_date ({end_at.isoformat()}) must be after start_date ({start_at.isoformat()})"
        )
    if end_at - start_at > MAX_RANGE:
        raise ReportError(f"the range is longer than {MAX_RANGE.days} days; ask for a shorter one")
    return DateRange(start_at, end_at)


def group_columns(names: Iterable[str], *, default: Sequence[str] = ()) -> list[str]:
    """Column keys for group_by names (comma lists accepted), in order, without repeats."""
    columns: list[str] = []
    unknown: list[str] = []
    for raw in names:
        for name in (part.strip() for part in raw.split(",")):
            if not name:
                continue
            column = GROUP_COLUMNS.get(name.lower())
            if column is None:
                unknown.append(name)
            elif column not in columns:
                columns.append(column)
    if unknown:
        raise ReportError(
            f"unknown group_by {', '.join(repr(u) for u in unknown)}; "
            f"use any of {', '.join(sorted(GROUP_COLUMNS))}"
        )
    return columns or list(default)


def metric_names(names: Iterable[str] | None) -> list[str]:
    """Requested metrics, validated; all of them when none is asked for."""
    chosen = [m.strip().lower() for m in names or () if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ReportError(
            f"unknown metrics {', '.join(repr(u) for u in unknown)}; use any of {', '.join(METRICS)}"
        )
    return [m for m in METRICS if m in chosen] or list(METRICS)


def coverage_columns(dimensions: Iterable[str]) -> list[tuple[str, str]]:
    """(dimension, column) for each required dimension; aliases such as `environment` accepted."""
    out: list[tuple[str, str]] = []
    for raw in dimensions:
        name = raw.strip().lower()
        if not name:
            continue
        name = {"environment": "env", "department": "team", "use_case": "feature", "tenant_id": "tenant"}.get(
            name, name
        )
        if name not in COVERAGE_COLUMNS:
            raise ReportError(f"unknown coverage dimension {raw!r}; use any of {', '.join(COVERAGE_COLUMNS)}")
        if all(name != d for d, _ in out):
            out.append((name, COVERAGE_COLUMNS[name]))
    if not out:
        raise ReportError("name at least one dimension to measure coverage for")
    return out


# ---------------------------------------------------------------- shaping


@dataclass(frozen=True)
class Sums:
    """What one group of records adds up to."""

    requests: int
    cost_usd: Decimal
    tokens: int
    latency_ms_sum: int
    latency_count: int
    successes: int
    unpriced: int

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Sums:
        return cls(
            requests=int(row["requests"]),
            cost_usd=Decimal(row["cost"] or 0),
            tokens=int(row["tokens"]),
            latency_ms_sum=int(row["latency_ms_sum"]),
            latency_count=int(row["latency_count"]),
            successes=int(row["successes"]),
            unpriced=int(row["unpriced"]),
        )

    def __add__(self, other: Sums) -> Sums:
        return Sums(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def avg_response_time_ms(self) -> Decimal | None:
        if not self.latency_count:
            return None
        return (Decimal(self.latency_ms_sum) / self.latency_count).quantize(Decimal("0.1"))

    @property
    def success_rate(self) -> Decimal | None:
        if not self.requests:
            return None
        return (Decimal(self.successes) / self.requests).quantize(Decimal("0.0001"))


ZERO = Sums(0, Decimal(0), 0, 0, 0, 0, 0)


def total(rows: Iterable[Sums]) -> Sums:
    result = ZERO
    for row in rows:
        result = result + row
    return result


def metrics_of(sums: Sums, metrics: Sequence[str], *, prefix: str = "") -> dict[str, Any]:
    """The requested metrics of one group; `prefix="total_"` for a group's own totals (the seed's shape)."""
    out: dict[str, Any] = {}
    if "requests" in metrics:
        out[f"{prefix}requests"] = sums.requests
    if "cost" in metrics:
        out[f"{prefix}cost"] = sums.cost_usd
        out["unpriced_requests"] = sums.unpriced
    if "tokens" in metrics:
        out[f"{prefix}tokens"] = sums.tokens
    if "avg_response_time" in metrics:
        out["avg_response_time"] = sums.avg_response_time_ms
    return out


def group_value(column: str, value: Any) -> Any:
    """A group's value as published: empty dimension values are the untagged bucket (None)."""
    if column in ("date", "hour"):
        return value.isoformat() if hasattr(value, "isoformat") else value
    return value if value != "" else None


def allocation(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    metrics: Sequence[str],
    app_names: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Nest grouped sums: the first column's groups, each holding the next column's list, and so on.

    Groups are ordered by cost, then requests, descending; each level's totals
    are the exact sums of the level below.
    """
    return _nest([(row, Sums.of(row)) for row in rows], list(columns), metrics, app_names)


def _nest(
    rows: list[tuple[Mapping[str, Any], Sums]],
    columns: list[str],
    metrics: Sequence[str],
    app_names: Mapping[str, str],
) -> list[dict[str, Any]]:
    column, rest = columns[0], columns[1:]
    groups: dict[Any, list[tuple[Mapping[str, Any], Sums]]] = {}
    for row, sums in rows:
        groups.setdefault(row[column], []).append((row, sums))
    out = []
    for value, members in groups.items():
        sums = total(s for _, s in members)
        entry: dict[str, Any] = {column: group_value(column, value)}
        if column == "app_id":
            entry["app_name"] = app_names.get(value) or value or None
        if rest:
            entry.update(metrics_of(sums, metrics, prefix="total_"))
            entry[PLURALS[rest[0]]] = _nest(members, rest, metrics, app_names)
        else:
            entry.update(metrics_of(sums, metrics))
        out.append((sums, entry))
    out.sort(key=lambda pair: (pair[0].cost_usd, pair[0].requests), reverse=True)
    return [entry for _, entry in out]


def coverage_dimension(
    dimension: str,
    values: Sequence[tuple[str, int, Decimal]],
    total_requests: int,
    total_cost_usd: Decimal,
    *,
    alert_below_pct: Decimal = COVERAGE_ALERT_PCT,
    max_values: int = 100,
) -> dict[str, Any]:
    """Coverage of one dimension from its (value, requests, cost) rows; '' is the untagged bucket.

    Each record carries one value per dimension at most, so the values plus the
    untagged bucket add up to the grand total exactly; a mismatch is a bug and raises.
    """
    tagged = [(v, r, c) for v, r, c in values if v != ""]
    untagged_requests = sum(r for v, r, _ in values if v == "")
    untagged_cost = sum((c for v, _, c in values if v == ""), Decimal(0))
    tagged_requests = sum(r for _, r, _ in tagged)
    tagged_cost = sum((c for _, _, c in tagged), Decimal(0))
    if tagged_requests + untagged_requests != total_requests or tagged_cost + untagged_cost != total_cost_usd:
        raise ReconciliationError(f"coverage of {dimension} does not reconcile to the total")
    requests_pct = _pct(tagged_requests, total_requests)
    cost_pct = _pct(tagged_cost, total_cost_usd)
    lowest = min((p for p in (requests_pct, cost_pct) if p is not None), default=None)
    return {
        "dimension": dimension,
        "requests_pct": requests_pct,
        "cost_pct": cost_pct,
        "alert": lowest is not None and lowest < alert_below_pct,
        "tagged": {"requests": tagged_requests, "cost": tagged_cost},
        "untagged": {"requests": untagged_requests, "cost": untagged_cost},
        "values": [
            {"value": v, "requests": r, "cost": c}
            for v, r, c in sorted(tagged, key=lambda t: (t[2], t[1], t[0]), reverse=True)[:max_values]
        ],
        "more_values": max(0, len(tagged) - max_values),
    }


def _pct(part: int | Decimal, whole: int | Decimal) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.01"))

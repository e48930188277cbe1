"""Reports for finance and analysts (admin key): usage, cost allocation, spend per tag, tag coverage.

Every report sums `spend_records` over [start, end) directly, so each figure
equals what an analyst's SQL returns for the same range, to the last digit.
Money is an exact JSON number; dates are ISO-8601 in UTC.
"""

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from ingest.errors import InvalidReport, StorageUnavailableError
from ingest.exact import ExactJSONResponse
from ledger.reports import (
    COVERAGE_COLUMNS,
    GROUP_COLUMNS,
    PLURALS,
    DateRange,
    ReportError,
    Sums,
    allocation,
    coverage_columns,
    coverage_dimension,
    date_range,
    group_columns,
    group_value,
    metric_names,
    metrics_of,
    total,
)

# ---------------------------------------------------------------- SQL (pure, tested as text)

_EXPRESSIONS = {"date": "toDate(occurred_at) AS date", "hour": "toStartOfHour(occurred_at) AS hour"}
SUMS = (
    "count() AS requests, sum(ifNull(cost_usd, toDecimal128(0, 12))) AS cost, "
    "sum(input_tokens + output_tokens) AS tokens, sum(ifNull(latency_ms, 0)) AS latency_ms_sum, "
    "count(latency_ms) AS latency_count, countIf(status = 'success') AS successes, "
    "countIf(isNull(cost_usd)) AS unpriced"
)
RANGE = "occurred_at >= toDateTime64(%(start)s, 3, 'UTC') AND occurred_at < toDateTime64(%(end)s, 3, 'UTC')"

# The same sums from the daily rollup, for ranges of whole UTC days over its columns.
ROLLUP_COLUMNS = frozenset(
    {
        "date",
        "app_id",
        "team",
        "environment",
        "feature",
        "project",
        "tenant_id",
        "region",
        "provider",
        "model",
    }
    | {"status", "price_source"}
)
_ROLLUP_EXPRESSIONS = {"date": "day AS date"}
# Qualified: an alias named like a column would shadow it inside the other sums.
ROLLUP_SUMS = (
    "sum(spend_daily.requests) AS requests, sum(spend_daily.cost_usd) AS cost, "
    "sum(spend_daily.input_tokens + spend_daily.output_tokens) AS tokens, "
    "sum(spend_daily.latency_ms_sum) AS latency_ms_sum, sum(spend_daily.latency_count) AS latency_count, "
    "sumIf(spend_daily.requests, spend_daily.status = 'success') AS successes, "
    "sum(spend_daily.unpriced_requests) AS unpriced"
)
ROLLUP_RANGE = "day >= toDate(%(start)s) AND day < toDate(%(end)s)"


# Columns a report may be narrowed to one value of ("" is the untagged bucket); all are in the rollup.
FILTER_COLUMNS = ("app_id", "team", "environment", "feature", "project", "tenant_id", "region", "provider",
                  "model", "status")  # fmt: skip
Filters = Mapping[str, str]


def where(filters: Filters, *, rollup: bool = False) -> str:
    unknown = sorted(set(filters) - set(FILTER_COLUMNS))
    if unknown:
        raise ValueError(f"not a report filter: {unknown}")
    narrowed = "".join(f" AND {column} = %(f_{column})s" for column in sorted(filters))
    return (ROLLUP_RANGE if rollup else RANGE) + narrowed


def filter_parameters(filters: Filters) -> dict[str, str]:
    return {f"f_{column}": value for column, value in filters.items()}


def use_rollup(span: DateRange, columns: Sequence[str]) -> bool:
    """Whole UTC days, grouped only by the rollup's columns: `spend_daily` gives the same sums, faster."""
    whole_days = all(t.hour == t.minute == t.second == t.microsecond == 0 for t in (span.start, span.end))
    return whole_days and set(columns) <= ROLLUP_COLUMNS


# Identifiers in the SQL below come only from these sets (never from a request's text);
# values always travel as parameters.
_ALLOWED = set(GROUP_COLUMNS.values()) | set(COVERAGE_COLUMNS.values())


def _known(columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in _ALLOWED]
    if unknown:
        raise ValueError(f"not a report column: {unknown}")


def grouped_sql(columns: Sequence[str], filters: Filters, limit: int, *, rollup: bool = False) -> str:
    """Sums per group of `columns` (an empty list: one row of totals), from the records or the rollup."""
    _known(columns)
    if rollup and not set(columns) <= ROLLUP_COLUMNS:
        raise ValueError(f"the rollup has no {sorted(set(columns) - ROLLUP_COLUMNS)}")
    table, sums = ("spend_daily", ROLLUP_SUMS) if rollup else ("spend_records", SUMS)
    expressions = _ROLLUP_EXPRESSIONS if rollup else _EXPRESSIONS
    if not columns:
        return f"SELECT {sums} FROM {table} WHERE {where(filters, rollup=rollup)}"  # noqa: S608 - see _ALLOWED
    select = ", ".join(expressions.get(c, c) for c in columns)
    return (
        f"SELECT {select}, {sums} FROM {table} WHERE {where(filters, rollup=rollup)} "  # noqa: S608 - see _ALLOWED
        f"GROUP BY {', '.join(columns)} ORDER BY cost DESC, requests DESC LIMIT {int(limit)}"
    )


def app_names_sql() -> str:
    """Each app's latest name on the days the range touches (from the rollup: cheap at any size)."""
    return (
        "SELECT app_id, argMax(app_name, day) AS name FROM spend_daily "
        "WHERE day >= toDate(%(start)s) AND day <= toDate(%(end)s) AND app_name != '' GROUP BY app_id"
    )


def coverage_sql(columns: Sequence[tuple[str, str]], filters: Filters) -> str:
    """(dimension, value, requests, cost) for every value of every dimension, in one pass."""
    _known([column for _, column in columns])
    if not all(d in COVERAGE_COLUMNS for d, _ in columns):
        raise ValueError("not a coverage dimension")
    pairs = ", ".join(f"('{dimension}', {column})" for dimension, column in columns)
    return (
        "SELECT pair.1 AS dimension, pair.2 AS value, count() AS requests, "  # noqa: S608 - see _ALLOWED
        "sum(ifNull(cost_usd, toDecimal128(0, 12))) AS cost "
        f"FROM spend_records ARRAY JOIN [{pairs}] AS pair WHERE {where(filters)} "
        "GROUP BY dimension, value"
    )


def tags_sql(tags: Sequence[str]) -> str:
    only = " AND tag IN %(tags)s" if tags else ""
    return (
        "SELECT tag, count() AS log_count, sum(ifNull(cost_usd, toDecimal128(0, 12))) AS total_spend "  # noqa: S608
        f"FROM spend_records ARRAY JOIN tags AS tag WHERE {RANGE}{only} "
        "GROUP BY tag ORDER BY total_spend DESC, tag"
    )


def range_parameters(span: DateRange, **extra: Any) -> dict[str, Any]:
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    return {"start": span.start.strftime(fmt)[:-3], "end": span.end.strftime(fmt)[:-3], **extra}


# ---------------------------------------------------------------- storage


class ReportStore(Protocol):
    def rows(self, sql: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]: ...


class ClickHouseReports:
    """Runs report queries with a client of its own, bounded in time."""

    def __init__(self, client: Any, max_seconds: int) -> None:
        self._client = client
        self._settings = {"max_execution_time": str(max_seconds), "readonly": "2"}

    def rows(self, sql: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            result = self._client.query(sql, parameters=dict(parameters), settings=self._settings)
        except Exception as exc:
            raise StorageUnavailableError(
                f"the report query failed: {str(exc).splitlines()[0][:300]}"
            ) from exc
        names = list(result.column_names)
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]


# ---------------------------------------------------------------- API


class AllocationRequest(BaseModel):
    """`POST /v1/analytics/cost-allocation` (seed 000's shape)."""

    model_config = ConfigDict(extra="forbid")

    start_date: str | None = None
    end_date: str | None = None
    group_by: list[str] = Field(default_factory=lambda: ["app_id", "model"], max_length=4)
    metrics: list[str] | None = Field(default=None, max_length=10)
    app_id: str | None = None
    team: str | None = None
    environment: str | None = None
    feature: str | None = None
    project: str | None = None
    tenant_id: str | None = None
    region: str | None = None
    provider: str | None = None
    model: str | None = None
    status: str | None = None

    def filters(self) -> dict[str, str]:
        return {c: v for c in FILTER_COLUMNS if (v := getattr(self, c)) is not None}


def report_filters(
    app_id: str | None = None,
    team: str | None = None,
    environment: str | None = None,
    feature: str | None = None,
    project: str | None = None,
    tenant_id: str | None = None,
    region: str | None = None,
    provider: str | None = None,
    model: str | None = None,
    status: str | None = None,
) -> dict[str, str]:
    """Query parameters that narrow a report to one value of a column (an empty value: the untagged)."""
    given = dict(app_id=app_id, team=team, environment=environment, feature=feature, project=project,
                 tenant_id=tenant_id, region=region, provider=provider, model=model, status=status)  # fmt: skip
    return {column: value for column, value in given.items() if value is not None}


def create_router(
    store: ReportStore,
    require_read: Any,
    *,
    coverage_dimensions: Sequence[str],
    coverage_alert_pct: Decimal,
    max_groups: int,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> APIRouter:
    router = APIRouter(tags=["analytics"], default_response_class=ExactJSONResponse)
    Reader = Annotated[Any, Depends(require_read)]
    Narrowed = Annotated[dict[str, str], Depends(report_filters)]

    async def query(sql: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(store.rows, sql, parameters)

    def checked(build: Callable[[], Any]) -> Any:
        try:
            return build()
        except ReportError as exc:
            raise InvalidReport(str(exc)) from exc

    async def grouped(
        span: DateRange, columns: Sequence[str], filters: Filters
    ) -> tuple[Sums, list[dict[str, Any]], bool, str]:
        """(totals, rows per group, truncated, source table)."""
        parameters = range_parameters(span, **filter_parameters(filters))
        rollup = use_rollup(span, columns)
        rows = await query(grouped_sql(columns, filters, max_groups, rollup=rollup), parameters)
        truncated = len(rows) >= max_groups
        if truncated:  # the listed groups are not all: ask for the whole totals
            sums = Sums.of((await query(grouped_sql([], filters, max_groups, rollup=rollup), parameters))[0])
        else:
            sums = total(Sums.of(row) for row in rows)
        return sums, rows, truncated, "spend_daily" if rollup else "spend_records"

    def header(span: DateRange, **extra: Any) -> dict[str, Any]:
        return {"start_date": span.start.isoformat(), "end_date": span.end.isoformat(), **extra}

    @router.get("/v1/analytics/usage", responses={400: {}})
    async def usage(
        _: Reader,
        filters: Narrowed,
        start_date: str | None = None,
        end_date: str | None = None,
        group_by: Annotated[list[str] | None, Query()] = None,
    ) -> ExactJSONResponse:
        """Totals over the range (requests, cost, tokens, average latency, success rate) and a breakdown.
        `app_id`, `team`, `environment`, `feature`, `project`, `tenant_id`, `region`, `provider`, `model`
        and `status` narrow it to one value each (empty: the untagged)."""
        span = checked(lambda: date_range(start_date, end_date, now=clock()))
        columns = checked(lambda: group_columns(group_by or [], default=["date"]))
        sums, rows, truncated, source = await grouped(span, columns, filters)
        breakdown = []
        for row in rows:
            entry = {c: group_value(c, row[c]) for c in columns}
            group = Sums.of(row)
            entry.update(metrics_of(group, ["requests", "cost", "tokens", "avg_response_time"]))
            entry["success_rate"] = group.success_rate
            breakdown.append(entry)
        return ExactJSONResponse(
            header(span, app_id=filters.get("app_id"), filters=filters, group_by=columns)
            | {
                "total_requests": sums.requests,
                "total_cost": sums.cost_usd,
                "total_tokens": sums.tokens,
                "avg_response_time": sums.avg_response_time_ms,
                "success_rate": sums.success_rate,
                "unpriced_requests": sums.unpriced,
                "breakdown": breakdown,
                "truncated": truncated,
                "source": source,
            }
        )

    @router.post("/v1/analytics/cost-allocation", responses={400: {}})
    async def cost_allocation(body: AllocationRequest, _: Reader) -> ExactJSONResponse:
        """Spend nested by `group_by` (default app → model), e.g. `{"apps": [{…, "models": [...]}]}`."""
        span = checked(lambda: date_range(body.start_date, body.end_date, now=clock()))
        columns = checked(lambda: group_columns(body.group_by, default=["app_id", "model"]))
        metrics = checked(lambda: metric_names(body.metrics))
        sums, rows, truncated, source = await grouped(span, columns, body.filters())
        names: dict[str, str] = {}
        if "app_id" in columns:
            found = await query(app_names_sql(), range_parameters(span))
            names = {str(r["app_id"]): str(r["name"]) for r in found}

        return ExactJSONResponse(
            header(span, filters=body.filters(), group_by=columns, metrics=metrics)
            | metrics_of(sums, metrics, prefix="total_")
            | {
                PLURALS[columns[0]]: allocation(rows, columns, metrics, names),
                "truncated": truncated,
                "source": source,
            }
        )

    @router.get("/spend/tags", responses={400: {}})
    async def spend_per_tag(
        _: Reader,
        start_date: str | None = None,
        end_date: str | None = None,
        tags: str | None = None,
    ) -> ExactJSONResponse:
        """LiteLLM's shape: `[{"individual_request_tag", "log_count", "total_spend"}]`, by spend."""
        span = checked(lambda: date_range(start_date, end_date, now=clock()))
        wanted = [t.strip() for t in (tags or "").split(",") if t.strip()]
        rows = await query(tags_sql(wanted), range_parameters(span, tags=tuple(wanted)))
        return ExactJSONResponse(
            [
                {
                    "individual_request_tag": r["tag"],
                    "log_count": int(r["log_count"]),
                    "total_spend": r["total_spend"],
                }
                for r in rows
            ]
        )

    @router.get("/v1/analytics/coverage", responses={400: {}})
    async def coverage(
        _: Reader,
        filters: Narrowed,
        start_date: str | None = None,
        end_date: str | None = None,
        dimensions: str | None = None,
    ) -> ExactJSONResponse:
        """For each required dimension: the share of requests and cost that carries it, and the untagged bucket."""
        span = checked(lambda: date_range(start_date, end_date, now=clock()))
        columns = checked(lambda: coverage_columns((dimensions or ",".join(coverage_dimensions)).split(",")))
        rows = await query(
            coverage_sql(columns, filters), range_parameters(span, **filter_parameters(filters))
        )
        per_dimension: dict[str, list[tuple[str, int, Decimal]]] = {d: [] for d, _ in columns}
        for row in rows:
            per_dimension[row["dimension"]].append(
                (str(row["value"]), int(row["requests"]), Decimal(row["cost"]))
            )
        # Every record counts once in each dimension, so any one of them adds up to the
        # grand total; coverage_dimension checks that all the others reconcile to it.
        first = per_dimension[columns[0][0]]
        requests = sum(n for _, n, _ in first)
        cost = sum((c for _, _, c in first), Decimal(0))
        reports = [
            coverage_dimension(d, per_dimension[d], requests, cost, alert_below_pct=coverage_alert_pct)
            for d, _ in columns
        ]
        return ExactJSONResponse(
            header(span, app_id=filters.get("app_id"), filters=filters, alert_below_pct=coverage_alert_pct)
            | {
                "total": {"requests": requests, "cost": cost},
                "alert": any(r["alert"] for r in reports),
                "dimensions": reports,
            }
        )

    return router

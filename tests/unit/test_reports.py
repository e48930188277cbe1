"""Report rules (pure): ranges, group-by names, nesting, coverage; and the SQL as text."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ingest.analytics import coverage_sql, grouped_sql, use_rollup
from ledger.reports import (
    DateRange,
    ReconciliationError,
    ReportError,
    allocation,
    coverage_columns,
    coverage_dimension,
    date_range,
    group_columns,
    metric_names,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        ("2026-11-01", "2026-11-30", ("2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00")),
        (
            "2026-11-01T10:00:00+02:00",
            "2026-11-01T12:00:00Z",
            ("2026-11-01T08:00:00+00:00", "2026-11-01T12:00:00+00:00"),
        ),
        (
            "2026-11-01T10:00:00",
            "2026-11-02T00:00:00",
            ("2026-11-01T10:00:00+00:00", "2026-11-02T00:00:00+00:00"),
        ),
        (None, None, ("2026-10-23T10:00:00+00:00", "2026-11-22T10:00:00+00:00")),
    ],
)
def test_ranges_are_utc_and_a_date_only_end_includes_its_day(start, end, expected):
    span = date_range(start, end, now=NOW)
    assert (span.start.isoformat(), span.end.isoformat()) == expected


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-11-02", "2026-11-01", "must be after"),
        ("2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z", "must be after"),
        ("last week", None, "ISO-8601"),
        ("2010-01-01", "2026-01-01", "longer than"),
    ],
)
def test_bad_ranges_say_what_is_wrong(start, end, message):
    with pytest.raises(ReportError, match=message):
        date_range(start, end, now=NOW)


def test_group_by_names_aliases_comma_lists_and_unknowns():
    assert group_columns(["date,model", "user", "user_id", "env"]) == [
        "date",
        "model",
        "user_id",
        "environment",
    ]
    assert group_columns([], default=["date"]) == ["date"]
    with pytest.raises(ReportError, match="unknown group_by 'mood'"):
        group_columns(["model", "mood"])
    assert metric_names(None) == ["requests", "cost", "tokens", "avg_response_time"]
    assert metric_names(["cost", "requests"]) == ["requests", "cost"]
    assert [d for d, _ in coverage_columns(["environment", "team", "env"])] == ["env", "team"]


def row(app: str, model: str, requests: int, cost: str, latency_sum: int, latency_n: int) -> dict:
    return {
        "app_id": app, "model": model, "requests": requests, "cost": Decimal(cost), "tokens": requests * 10,
        "latency_ms_sum": latency_sum, "latency_count": latency_n, "successes": requests, "unpriced": 0,
    }  # fmt: skip


def test_allocation_nests_and_each_level_sums_the_one_below():
    rows = [
        row("chat", "gpt-4o", 3, "0.0135", 3000, 3),
        row("chat", "gpt-4o-mini", 5, "0.0010", 1000, 4),
        row("search", "gpt-4o", 1, "0.0200", 500, 1),
        row("", "gpt-4o", 2, "0.0001", 0, 0),
    ]
    apps = allocation(
        rows, ["app_id", "model"], ["requests", "cost", "avg_response_time"], {"chat": "Chat Bot"}
    )
    assert [a["app_id"] for a in apps] == ["search", "chat", None]  # by cost; "" is the untagged bucket
    chat = apps[1]
    # 0.0135 + 0.0010; latency (3000 + 1000) / (3 + 4) = 571.4 ms
    assert (chat["app_name"], chat["total_requests"], chat["total_cost"]) == (
        "Chat Bot",
        8,
        Decimal("0.0145"),
    )
    assert chat["avg_response_time"] == Decimal("571.4")
    assert [m["model"] for m in chat["models"]] == ["gpt-4o", "gpt-4o-mini"]
    assert apps[2]["avg_response_time"] is None  # no latencies reported: unknown, not 0


def test_coverage_splits_tagged_and_untagged_and_alerts_below_the_threshold():
    values = [("support", 90, Decimal("9")), ("search", 5, Decimal("0.5")), ("", 5, Decimal("0.5"))]
    report = coverage_dimension("team", values, 100, Decimal(10))
    assert report["requests_pct"] == Decimal("95.00") and report["cost_pct"] == Decimal("95.00")
    assert report["alert"] is False  # 95 % is not below 95 %
    assert report["untagged"] == {"requests": 5, "cost": Decimal("0.5")}
    below = coverage_dimension("team", [("a", 94, Decimal(1)), ("", 6, Decimal(0))], 100, Decimal(1))
    assert below["requests_pct"] == Decimal("94.00") and below["alert"] is True
    with pytest.raises(ReconciliationError):
        coverage_dimension("team", values, 101, Decimal(10))


def test_report_sql_takes_identifiers_only_from_the_allowed_columns():
    sql = grouped_sql(["date", "team"], {"app_id": "chat"}, 10)
    assert "toDate(occurred_at) AS date" in sql and "app_id = %(f_app_id)s" in sql and "LIMIT 10" in sql
    assert "FROM spend_daily" in grouped_sql(["date", "model"], {}, 10, rollup=True)
    with pytest.raises(ValueError, match="not a report column"):
        grouped_sql(["team; DROP TABLE spend_records"], {}, 10)
    with pytest.raises(ValueError, match="rollup has no"):
        grouped_sql(["user_id"], {}, 10, rollup=True)
    assert "('team', team), ('env', environment)" in coverage_sql(
        [("team", "team"), ("env", "environment")], {}
    )
    narrowed = grouped_sql(["model"], {"team": "search", "environment": ""}, 10)
    assert "environment = %(f_environment)s AND team = %(f_team)s" in narrowed
    with pytest.raises(ValueError, match="not a report filter"):
        grouped_sql(["model"], {"user_id; DROP TABLE x": "a"}, 10)


def test_the_rollup_answers_only_whole_days_over_its_columns():
    days = DateRange(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC))
    part = DateRange(datetime(2026, 11, 1, 6, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC))
    assert use_rollup(days, ["app_id", "model"]) and not use_rollup(part, ["app_id"])
    assert not use_rollup(days, ["user_id"]) and not use_rollup(days, ["hour"])

"""The reports API over real ClickHouse (chDB): every figure equals the same sum over spend_records."""

import datetime as dt
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest
from httpx import ASGITransport, AsyncClient

from ingest.analytics import ClickHouseReports
from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher
from processors.sink import ClickHouseStore, Landing
from schemas.records import AttributedRecord
from spendledger.platform.settings import Settings

ADMIN = {"Authorization": "Bearer admin-key"}
PRODUCER = {"Authorization": "Bearer prod-key"}
START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
RANGE = {"start_date": "2026-11-01T00:00:00Z", "end_date": "2026-11-08T00:00:00Z"}


def make_records(n: int = 400) -> list[AttributedRecord]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        at = START + dt.timedelta(minutes=rng.randrange(7 * 24 * 60), milliseconds=rng.randrange(60_000))
        team = rng.choice(["support", "search", "platform", ""])  # "" = untagged
        env = rng.choice(["production", "staging", ""]) if i % 10 else ""
        feature = rng.choice(["chat", "summarize"]) if i % 3 else ""
        priced = i % 17 != 0
        app = rng.choice(["chatbot", "search-api"])
        tags = sorted(
            {f"team:{team}", f"env:{env}", f"feature:{feature}", f"app:{app}"} - {"team:", "env:", "feature:"}
        )
        out.append(
            AttributedRecord(
                event_id=f"e{i}",
                request_id=f"r{i}",
                occurred_at=at,
                received_at=at,
                app_id=app,
                app_name={"chatbot": "Support Chatbot", "search-api": "Search"}[app],
                user_id=f"u{rng.randrange(20)}",
                team=team,
                environment=env,
                feature=feature,
                tags=tags,
                provider="openai",
                model=rng.choice(["gpt-4o", "gpt-4o-mini", "mystery-model"]),
                input_tokens=rng.randrange(4000),
                output_tokens=rng.randrange(600),
                cost_usd=Decimal(rng.randrange(1, 10**10)) / Decimal(10**12) if priced else None,
                price_source="catalog" if priced else "unpriced",
                status="success" if i % 13 else "error",
                latency_ms=rng.randrange(100, 4000) if i % 11 else None,
            )
        )
    # One record outside the range on each side: reports must leave them out.
    for n_, at in (("before", START - dt.timedelta(milliseconds=1)), ("after", START + dt.timedelta(days=7))):
        out.append(
            AttributedRecord(
                event_id=n_,
                request_id=n_,
                occurred_at=at,
                received_at=at,
                app_id="chatbot",
                cost_usd=Decimal(99),
            )
        )
    return out


@pytest.fixture
def ledger_db(clickhouse: Any) -> Any:
    client = clickhouse()
    ClickHouseStore(client).land(Landing(records=make_records(), next_offsets={("a", 0): 1}), "sink")
    return client


@pytest.fixture
async def api(ledger_db: Any) -> Any:
    settings = Settings.model_validate(
        {"producer_keys": "prod-key", "admin_keys": "admin-key", "report_max_groups": 50}
    )
    services = Services(
        settings=settings, publisher=InMemoryPublisher(), reports=ClickHouseReports(ledger_db, 30)
    )
    async with AsyncClient(transport=ASGITransport(app=create_app(services)), base_url="http://test") as c:
        yield c


def sql(client: Any, query: str) -> list[tuple[Any, ...]]:
    return client.query(query).result_rows


IN_RANGE = "occurred_at >= '2026-11-01 00:00:00' AND occurred_at < '2026-11-08 00:00:00'"


def exact(response: Any) -> Any:
    """The body with numbers parsed exactly (Decimal), as a careful finance client would."""
    import json

    return json.loads(response.content, parse_float=Decimal)


async def test_usage_totals_and_breakdown_equal_spend_records(api, ledger_db):
    r = await api.get(
        "/v1/analytics/usage",
        params={**RANGE, "app_id": "chatbot", "group_by": ["date", "model"]},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    body = exact(r)
    ((requests, cost, latency, successes),) = sql(
        ledger_db,
        "SELECT count(), sum(ifNull(cost_usd, 0)), round(avg(latency_ms), 1), countIf(status = 'success') "
        f"FROM spend_records WHERE app_id = 'chatbot' AND {IN_RANGE}",
    )
    assert body["total_requests"] == requests and body["total_cost"] == cost
    assert body["avg_response_time"] == Decimal(str(latency))
    assert body["success_rate"] == (Decimal(successes) / requests).quantize(Decimal("0.0001"))
    assert body["start_date"] == "2026-11-01T00:00:00+00:00" and body["group_by"] == ["date", "model"]
    assert body["source"] == "spend_daily"  # whole days: read from the rollup, equal to the records
    assert sum(b["requests"] for b in body["breakdown"]) == requests
    assert sum(b["cost"] for b in body["breakdown"]) == cost
    per_day_model = {
        (str(d), m): (n, c)
        for d, m, n, c in sql(
            ledger_db,
            "SELECT toDate(occurred_at), model, count(), sum(ifNull(cost_usd, 0)) FROM spend_records "
            f"WHERE app_id = 'chatbot' AND {IN_RANGE} GROUP BY 1, 2",
        )
    }
    assert {(b["date"], b["model"]): (b["requests"], b["cost"]) for b in body["breakdown"]} == per_day_model


async def test_cost_allocation_in_the_seeds_shape_reconciles_at_every_level(api, ledger_db):
    payload = {
        **RANGE,
        "group_by": ["app_id", "model"],
        "metrics": ["requests", "cost", "tokens", "avg_response_time"],
    }
    r = await api.post("/v1/analytics/cost-allocation", json=payload, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = exact(r)
    ((requests, cost, tokens),) = sql(
        ledger_db,
        f"SELECT count(), sum(ifNull(cost_usd, 0)), sum(input_tokens + output_tokens) FROM spend_records WHERE {IN_RANGE}",
    )
    assert (body["total_requests"], body["total_cost"], body["total_tokens"]) == (requests, cost, tokens)
    apps = body["apps"]
    assert {a["app_id"]: a["app_name"] for a in apps} == {
        "chatbot": "Support Chatbot",
        "search-api": "Search",
    }
    assert sum(a["total_cost"] for a in apps) == cost
    for app in apps:
        assert sum(m["requests"] for m in app["models"]) == app["total_requests"]
        assert sum(m["cost"] for m in app["models"]) == app["total_cost"]
        assert {"model", "requests", "cost", "tokens", "avg_response_time"} <= set(app["models"][0])
        expected = dict(
            sql(
                ledger_db,
                "SELECT model, sum(ifNull(cost_usd, 0)) FROM spend_records "
                f"WHERE app_id = '{app['app_id']}' AND {IN_RANGE} GROUP BY model",
            )
        )
        assert {m["model"]: m["cost"] for m in app["models"]} == expected
    assert [a["total_cost"] for a in apps] == sorted((a["total_cost"] for a in apps), reverse=True)


async def test_allocation_by_team_keeps_the_untagged_bucket_apart(api, ledger_db):
    r = await api.post(
        "/v1/analytics/cost-allocation",
        json={**RANGE, "group_by": ["team", "feature"], "metrics": ["cost"]},
        headers=ADMIN,
    )
    body = exact(r)
    teams = {t["team"]: t for t in body["teams"]}
    assert set(teams) == {"support", "search", "platform", None}  # None: no team, its own bucket
    assert set(teams["support"]) == {"team", "total_cost", "unpriced_requests", "features"}
    expected = dict(
        sql(
            ledger_db,
            f"SELECT team, sum(ifNull(cost_usd, 0)) FROM spend_records WHERE {IN_RANGE} GROUP BY team",
        )
    )
    assert {k or "": v["total_cost"] for k, v in teams.items()} == expected


async def test_spend_per_tag_in_litellms_shape(api, ledger_db):
    r = await api.get("/spend/tags", params=RANGE, headers=ADMIN)
    rows = exact(r)
    expected = {
        tag: (n, c)
        for tag, n, c in sql(
            ledger_db,
            f"SELECT tag, count(), sum(ifNull(cost_usd, 0)) FROM spend_records ARRAY JOIN tags AS tag WHERE {IN_RANGE} GROUP BY tag",
        )
    }
    assert {x["individual_request_tag"]: (x["log_count"], x["total_spend"]) for x in rows} == expected
    only = exact(
        await api.get("/spend/tags", params={**RANGE, "tags": "team:support,env:production"}, headers=ADMIN)
    )
    assert {x["individual_request_tag"] for x in only} == {"team:support", "env:production"}


async def test_coverage_reconciles_per_dimension_and_raises_the_alert_below_95(api, ledger_db):
    r = await api.get("/v1/analytics/coverage", params=RANGE, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = exact(r)
    ((requests, cost),) = sql(
        ledger_db, f"SELECT count(), sum(ifNull(cost_usd, 0)) FROM spend_records WHERE {IN_RANGE}"
    )
    assert body["total"] == {"requests": requests, "cost": cost}
    dims = {d["dimension"]: d for d in body["dimensions"]}
    assert list(dims) == ["team", "env", "feature"]
    for name, column in (("team", "team"), ("env", "environment"), ("feature", "feature")):
        d = dims[name]
        assert d["tagged"]["requests"] + d["untagged"]["requests"] == requests
        assert d["tagged"]["cost"] + d["untagged"]["cost"] == cost
        assert sum(v["requests"] for v in d["values"]) == d["tagged"]["requests"]
        ((untagged,),) = sql(
            ledger_db, f"SELECT count() FROM spend_records WHERE {IN_RANGE} AND {column} = ''"
        )
        assert d["untagged"]["requests"] == untagged
        assert d["requests_pct"] == (Decimal(requests - untagged) * 100 / requests).quantize(Decimal("0.01"))
        assert d["alert"] is True  # every dimension here has far more than 5 % untagged
    assert body["alert"] is True


async def test_coverage_of_a_fully_tagged_dimension_raises_no_alert(api):
    body = exact(
        await api.get("/v1/analytics/coverage", params={**RANGE, "dimensions": "app,user"}, headers=ADMIN)
    )
    assert [(d["dimension"], d["requests_pct"], d["alert"]) for d in body["dimensions"]] == [
        ("app", Decimal("100.00"), False),
        ("user", Decimal("100.00"), False),
    ]
    assert body["alert"] is False


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start_date": "2026-11-08", "end_date": "2026-11-01"}, "must be after start_date"),
        ({"start_date": "yesterday"}, "ISO-8601"),
        ({"group_by": "colour"}, "unknown group_by 'colour'"),
    ],
)
async def test_bad_requests_get_a_clear_400(api, params, message):
    r = await api.get("/v1/analytics/usage", params=params, headers=ADMIN)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_report" and message in error["message"]


async def test_unknown_metric_and_dimension_are_refused_and_producers_cannot_read_reports(api):
    r = await api.post("/v1/analytics/cost-allocation", json={"metrics": ["vibes"]}, headers=ADMIN)
    assert r.status_code == 400 and "unknown metrics" in r.json()["error"]["message"]
    r = await api.get("/v1/analytics/coverage", params={"dimensions": "mood"}, headers=ADMIN)
    assert r.status_code == 400 and "unknown coverage dimension" in r.json()["error"]["message"]
    assert (await api.get("/spend/tags", headers=PRODUCER)).status_code == 403


async def test_a_date_only_end_includes_that_day_and_naive_times_are_utc(api, ledger_db):
    whole = exact(
        await api.get(
            "/v1/analytics/usage",
            params={"start_date": "2026-11-01", "end_date": "2026-11-07"},
            headers=ADMIN,
        )
    )
    naive = exact(
        await api.get(
            "/v1/analytics/usage",
            params={"start_date": "2026-11-01T00:00:00", "end_date": "2026-11-08T00:00:00"},
            headers=ADMIN,
        )
    )
    ((requests,),) = sql(ledger_db, f"SELECT count() FROM spend_records WHERE {IN_RANGE}")
    assert whole["total_requests"] == naive["total_requests"] == requests
    assert whole["end_date"] == "2026-11-08T00:00:00+00:00"


async def test_many_groups_are_truncated_and_said_so_but_totals_stay_whole(api, ledger_db):
    body = exact(
        await api.get("/v1/analytics/usage", params={**RANGE, "group_by": "user_id,model"}, headers=ADMIN)
    )
    assert body["truncated"] is True and len(body["breakdown"]) == 50  # report_max_groups
    assert body["source"] == "spend_records"  # users are not in the rollup
    ((requests,),) = sql(ledger_db, f"SELECT count() FROM spend_records WHERE {IN_RANGE}")
    assert body["total_requests"] == requests


def test_money_is_an_exact_json_number():
    from ingest.exact import dumps_exact

    assert orjson.loads(dumps_exact({"c": Decimal("0.004500000000")})) == {"c": 0.0045}
    assert dumps_exact({"c": Decimal("12345678901234.123456789012")}) == b'{"c":12345678901234.123456789012}'


async def test_a_range_of_part_days_is_summed_from_the_records_to_the_millisecond(api, ledger_db):
    start, end = "2026-11-02T06:30:00.250Z", "2026-11-05T17:45:10.500Z"
    body = exact(
        await api.post(
            "/v1/analytics/cost-allocation",
            json={
                "start_date": start,
                "end_date": end,
                "group_by": ["team"],
                "metrics": ["requests", "cost"],
            },
            headers=ADMIN,
        )
    )
    assert body["source"] == "spend_records"
    expected = {
        team or None: (n, c)
        for team, n, c in sql(
            ledger_db,
            "SELECT team, count(), sum(ifNull(cost_usd, 0)) FROM spend_records "
            "WHERE occurred_at >= toDateTime64('2026-11-02 06:30:00.250', 3, 'UTC') "
            "AND occurred_at < toDateTime64('2026-11-05 17:45:10.500', 3, 'UTC') GROUP BY team",
        )
    }
    assert {t["team"]: (t["requests"], t["cost"]) for t in body["teams"]} == expected


@pytest.mark.parametrize(
    "filters",
    [
        {"team": "search"},
        {"team": ""},  # the untagged bucket
        {"team": "support", "environment": "production", "model": "gpt-4o"},
        {"app_id": "search-api", "feature": "chat", "status": "error"},
    ],
)
@pytest.mark.parametrize(
    "span", [RANGE, {"start_date": "2026-11-01T06:00:00Z", "end_date": "2026-11-07T18:00:00Z"}]
)
async def test_every_report_narrows_to_a_filter_and_equals_spend_records(api, ledger_db, filters, span):
    """The dashboard's filters and drill-down: usage, allocation and coverage with `team=…&model=…`, from the
    rollup (whole days) and from the records (part days)."""
    clause = " AND ".join(f"{c} = '{v}'" for c, v in filters.items())
    start, end = (span[k].replace("T", " ").rstrip("Z") for k in ("start_date", "end_date"))
    inside = f"occurred_at >= '{start}' AND occurred_at < '{end}' AND {clause}"
    [(requests, cost)] = sql(
        ledger_db, f"SELECT count(), sum(ifNull(cost_usd, 0)) FROM spend_records WHERE {inside}"
    )
    assert requests > 0, filters

    usage = await api.get(
        "/v1/analytics/usage", params={**span, **filters, "group_by": "model"}, headers=ADMIN
    )
    assert usage.status_code == 200, usage.text
    body = exact(usage)
    assert (body["total_requests"], body["total_cost"], body["filters"]) == (requests, cost, filters)
    assert body["source"] == ("spend_daily" if span is RANGE else "spend_records")

    allocation = await api.post(
        "/v1/analytics/cost-allocation",
        json={**span, **filters, "group_by": ["app_id", "model"], "metrics": ["requests", "cost"]},
        headers=ADMIN,
    )
    assert allocation.status_code == 200, allocation.text
    nested = exact(allocation)
    per_model = dict(
        ((a, m), (n, c))
        for a, m, n, c in sql(
            ledger_db,
            f"SELECT app_id, model, count(), sum(ifNull(cost_usd, 0)) FROM spend_records WHERE {inside} GROUP BY 1, 2",
        )
    )
    shown = {
        (a["app_id"], m["model"]): (m["requests"], m["cost"]) for a in nested["apps"] for m in a["models"]
    }
    assert shown == per_model and nested["total_cost"] == cost

    coverage = await api.get("/v1/analytics/coverage", params={**span, **filters}, headers=ADMIN)
    assert coverage.status_code == 200, coverage.text
    assert exact(coverage)["total"] == {"requests": requests, "cost": cost}


async def test_a_filter_on_an_unknown_column_is_refused(api):
    r = await api.post("/v1/analytics/cost-allocation", json={"user_id": "u1"}, headers=ADMIN)
    assert r.status_code == 422


@pytest.mark.parametrize("value", ["\x000\x00", "\x007\x00", '"\x001\x00"'])
async def test_a_filter_value_shaped_like_an_exact_number_mark_comes_back_as_sent(api, value):
    """Before: the exact-JSON writer's marks could be forged by a string (`?team=%000%00` answered with a
    number in its place, `%007%00` with a 500)."""
    r = await api.get("/v1/analytics/usage", params={**RANGE, "team": value}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = exact(r)
    assert body["filters"] == {"team": value} and body["total_requests"] == 0

"""Reports, coverage, rollups and SQL agree with spend_records on the running system."""

import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

from tests.integration.conftest import Ledger

pytestmark = pytest.mark.integration

RANGE = {"start_date": "2026-11-01", "end_date": "2026-11-30"}


def send_calls(ledger: Ledger, run: str) -> None:
    events: list[dict[str, Any]] = []
    for i in range(60):
        tags = [f"team:{run}-{['a', 'b'][i % 2]}"] if i % 5 else []  # every fifth call has no team
        if i % 3:
            tags.append("env:prod")
        events.append(
            {
                "kind": "completed",
                "request_id": f"{run}-{i}",
                "occurred_at": f"2026-11-{10 + i % 4:02d}T{i % 24:02d}:00:00Z",
                "model": ["openai/gpt-4o", "openai/gpt-4o-mini", "acme/unknown-model"][i % 3],
                "headers": {"X-AnyAPI-App-ID": f"{run}-app{i % 2}", "X-AnyAPI-App-Name": f"App {i % 2}"},
                "metadata": {"tags": tags, "feature": "chat" if i % 4 else ""},
                "user": f"user_{i % 7}",
                "usage": {"prompt_tokens": 1000 + i, "completion_tokens": 100 + i},
                "latency_ms": 200 + i,
                "status": "success" if i % 9 else "error",
            }
        )
    assert ledger.send({"events": events}).status_code == 202
    ledger.wait_for(
        f"SELECT count() FROM spend_records WHERE startsWith(app_id, '{run}')", lambda rows: rows[0][0] >= 60
    )


def get(ledger: Ledger, path: str, **params: Any) -> Any:
    r = ledger.http.get(path, params=params, headers={"Authorization": f"Bearer {ledger.system.admin_key}"})
    assert r.status_code == 200, r.text
    return json.loads(r.content, parse_float=Decimal)


def test_reports_and_rollups_agree_with_spend_records(ledger: Ledger) -> None:
    run = f"an{uuid.uuid4().hex[:8]}"
    send_calls(ledger, run)
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}
    mine = f"startsWith(app_id, '{run}')"

    [[requests, cost, unpriced]] = ledger.sql(
        f"SELECT count(), sum(ifNull(cost_usd, 0)), countIf(cost_usd IS NULL) FROM spend_records WHERE {mine}"
    )
    cost = Decimal(cost)
    assert requests == 60 and unpriced == 20  # the unknown model is unpriced, not $0

    # Cost allocation, per app: from the rollup (whole days), equal to the records.
    r = ledger.http.post(
        "/v1/analytics/cost-allocation", json={**RANGE, "group_by": ["app_id", "model"]}, headers=admin
    )
    assert r.status_code == 200, r.text
    body = json.loads(r.content, parse_float=Decimal)
    assert body["source"] == "spend_daily"
    apps = {a["app_id"]: a for a in body["apps"] if a["app_id"].startswith(run)}
    assert {a["app_name"] for a in apps.values()} == {"App 0", "App 1"}
    assert sum(a["total_requests"] for a in apps.values()) == 60
    assert sum(a["total_cost"] for a in apps.values()) == cost
    assert sum(a["unpriced_requests"] for a in apps.values()) == 20

    # Usage for one app, by user: from the records.
    usage = get(ledger, "/v1/analytics/usage", app_id=f"{run}-app0", group_by="user_id", **RANGE)
    [[n0, c0]] = ledger.sql(
        f"SELECT count(), sum(ifNull(cost_usd, 0)) FROM spend_records WHERE app_id = '{run}-app0'"
    )
    assert usage["source"] == "spend_records" and (usage["total_requests"], usage["total_cost"]) == (
        n0,
        Decimal(c0),
    )
    assert sum(b["requests"] for b in usage["breakdown"]) == n0

    # Spend per tag.
    tags = get(ledger, "/spend/tags", tags=f"team:{run}-a,team:{run}-b", **RANGE)
    expected = ledger.sql(
        "SELECT tag, count(), sum(ifNull(cost_usd, 0)) FROM spend_records ARRAY JOIN tags AS tag "
        f"WHERE {mine} AND startsWith(tag, 'team:{run}') GROUP BY tag"
    )
    assert {t["individual_request_tag"]: [t["log_count"], t["total_spend"]] for t in tags} == {
        tag: [n, Decimal(c)] for tag, n, c in expected
    }

    # Coverage for one app: the untagged team bucket is every fifth call.
    coverage = get(ledger, "/v1/analytics/coverage", app_id=f"{run}-app0", **RANGE)
    team = next(d for d in coverage["dimensions"] if d["dimension"] == "team")
    [[untagged]] = ledger.sql(f"SELECT count() FROM spend_records WHERE app_id = '{run}-app0' AND team = ''")
    assert team["untagged"]["requests"] == untagged == 6
    assert team["tagged"]["requests"] + team["untagged"]["requests"] == coverage["total"]["requests"] == 30
    assert team["alert"] is True and coverage["alert"] is True

    # The rollups equal the records for these apps.
    [[rollup_requests, rollup_cost]] = ledger.sql(
        f"SELECT sum(requests), sum(cost_usd) FROM spend_daily WHERE {mine}"
    )
    assert (rollup_requests, Decimal(rollup_cost)) == (60, cost)


def test_sql_reads_only_the_ledgers_tables(ledger: Ledger) -> None:
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}
    for query, words in (
        ("SELECT name FROM system.tables", "the database 'system'"),
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "readonly"),
        ("INSERT INTO spend_records (event_id) VALUES ('x')", "only read-only queries"),
    ):
        r = ledger.http.post("/v1/sql", json={"query": query}, headers=admin)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    # The ledger's own tables stay readable through the same door: the rollup agrees with the records.
    [[rolled, records]] = ledger.sql(
        "SELECT (SELECT sum(requests) FROM spend_daily), (SELECT count() FROM spend_records)"
    )
    assert int(rolled) == int(records) > 0

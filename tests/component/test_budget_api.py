"""Budget endpoints through httpx ASGITransport, with in-memory twins of Kafka, the views and the ledger."""

from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson
import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.budgets import BudgetServices
from ingest.exact import dumps_exact
from ingest.publisher import InMemoryPublisher
from ledger.tags import AttributionPolicy
from schemas.budgets import BlockSignal, BudgetDefinition
from spendledger.guard import BudgetGuard, CompactedView
from spendledger.settings import Settings

ADMIN = {"Authorization": "Bearer admin-key"}
PRODUCER = {"Authorization": "Bearer prod-key"}
NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


class MemorySpend:
    def __init__(self):
        self.rows: list[tuple[str, datetime, Decimal]] = []

    def spend(self, tag, start, end):
        return sum((c for t, at, c in self.rows if t == tag and start <= at < end), Decimal(0))

    def app_name(self, app_id):
        return "Support Bot" if app_id == "support-bot" else ""


@pytest.fixture
def twins():
    registry = CompactedView({}, "spend.budgets", BudgetDefinition.model_validate_json)
    registry.mark_current()
    guard = BudgetGuard({}, "spend.budget-blocks", clock=lambda: NOW.timestamp())
    guard.view.mark_current()
    spend = MemorySpend()
    services = BudgetServices(registry, guard, spend, ZoneInfo("UTC"), AttributionPolicy(), clock=lambda: NOW)
    return services, spend


@pytest.fixture
async def api(twins):
    settings = Settings.model_validate({"producer_keys": "prod-key", "admin_keys": "admin-key"})
    publisher = InMemoryPublisher()
    app = create_app(Services(settings=settings, publisher=publisher, budgets=twins[0]))
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as http:
        yield http, publisher


async def test_tag_new_publishes_the_definition_and_info_reports_spend_and_reset(api, twins):
    http, publisher = api
    services, spend = twins
    spend.rows += [
        ("team:Support", NOW, Decimal("0.004500000000")),
        ("team:Support", datetime(2026, 11, 21, tzinfo=UTC), Decimal(9)),
    ]
    r = await http.post(
        "/tag/new",
        json={"name": "department:Support", "max_budget": 100.0, "budget_duration": "1d"},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "department:Support".replace("department", "team") and body["max_budget"] == 100
    assert b'"spend":0.004500000000' in r.content  # every digit, as a JSON number
    assert body["budget_reset_at"] == "2026-11-23T00:00:00+00:00" and body["blocked"] is False
    topic, key, value = publisher.sent[-1]
    assert topic == "spend.budgets" and key == b"team:Support"
    assert orjson.loads(value)["budget_duration"] == "1d"

    info = (await http.get("/tag/info", params={"names": "team:Support"}, headers=ADMIN)).json()
    assert set(info) == {"team:Support"}
    assert {"name", "max_budget", "budget_duration", "spend", "budget_reset_at", "blocked"} <= set(
        info["team:Support"]
    )

    services.guard.view.put(
        "team:Support",
        BlockSignal(tag="team:Support", blocked=True, spend_usd=Decimal(100), max_budget_usd=Decimal(100),
                    window_start=datetime(2026, 11, 22, tzinfo=UTC), window_end=datetime(2026, 11, 23, tzinfo=UTC),
                    updated_at=NOW, thresholds_fired=[50, 80, 95, 100]),
    )  # fmt: skip
    info = (await http.get("/tag/info", params={"names": "team:Support"}, headers=ADMIN)).json()[
        "team:Support"
    ]
    assert info["blocked"] is True and info["thresholds_fired"] == [50, 80, 95, 100]
    check = (
        await http.post("/v1/check", json={"metadata": {"tags": ["team:Support"]}}, headers=PRODUCER)
    ).json()
    assert check["allowed"] is False and check["blocked_by"][0]["window_end"] == "2026-11-23T00:00:00+00:00"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "team:a", "max_budget": 10}, 422, "invalid_budget"),  # no duration
        ({"name": "team:a", "max_budget": 10, "budget_duration": "1w"}, 422, "invalid_budget"),
        ({"name": "team:a", "max_budget": 10, "budget_duration": "90s"}, 422, "invalid_budget"),
        ({"name": "team:a", "max_budget": -1, "budget_duration": "1d"}, 422, "invalid_request"),
        (
            {"name": "team:a", "max_budget": 1, "soft_budget": 2, "budget_duration": "1d"},
            422,
            "invalid_budget",
        ),
        (
            {"name": "team:a", "max_budget": 1, "budget_duration": "1mo", "window": "sliding"},
            422,
            "invalid_budget",
        ),
        (
            {"name": "team:a", "max_budget": 1, "budget_duration": "1d", "alert_thresholds": [0]},
            422,
            "invalid_request",
        ),
        ({"name": "session:abc", "max_budget": 1, "budget_duration": "1d"}, 422, "invalid_budget"),
        ({"name": "team:a,b", "max_budget": 1, "budget_duration": "1d"}, 422, "invalid_budget"),
    ],
)
async def test_bad_budgets_are_refused_with_the_reason_and_publish_nothing(api, body, status, code):
    http, publisher = api
    r = await http.post("/tag/new", json=body, headers=ADMIN)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]
    assert publisher.sent == []


async def test_conflicts_unknown_tags_and_scopes(api):
    http, publisher = api
    new = {"name": "team:a", "max_budget": 1, "budget_duration": "1d"}
    assert (await http.post("/tag/new", json=new, headers=PRODUCER)).status_code == 403
    assert (await http.post("/tag/new", json=new)).status_code == 401
    assert (await http.post("/tag/new", json=new, headers=ADMIN)).status_code == 200
    assert (await http.post("/tag/new", json=new, headers=ADMIN)).status_code == 409
    r = await http.get("/tag/info", params={"names": "team:a,team:zzz"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["details"] == {"unknown": ["team:zzz"]}
    assert (
        await http.post("/tag/update", json={"name": "team:zzz", "max_budget": 5}, headers=ADMIN)
    ).status_code == 404
    assert (await http.post("/tag/delete", json={"name": "team:zzz"}, headers=ADMIN)).status_code == 404
    # A partial update keeps the other fields; delete publishes a tombstone.
    r = await http.post("/tag/update", json={"name": "team:a", "soft_budget": "0.5"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["max_budget"] == 1 and r.json()["soft_budget"] == 0.5
    assert (await http.post("/tag/delete", json={"name": "team:a"}, headers=ADMIN)).json() == {
        "deleted": ["team:a"]
    }
    assert publisher.sent[-1] == ("spend.budgets", b"team:a", None)
    assert (await http.get("/tag/info", params={"names": "team:a"}, headers=ADMIN)).status_code == 404


async def test_app_limits_are_credits_and_usage_reports_percent(api, twins):
    http, publisher = api
    _, spend = twins
    spend.rows.append(("app:support-bot", NOW, Decimal("12.5")))
    r = await http.post(
        "/v1/limits/app",
        json={"app_id": "support-bot", "limit_type": "monthly", "limit_amount": 10000},
        headers=ADMIN,
    )
    assert r.status_code == 200 and r.json()["success"] is True
    definition = orjson.loads(publisher.sent[-1][2])
    assert definition["tag"] == "app:support-bot" and Decimal(definition["max_budget_usd"]) == 100
    assert definition["budget_duration"] == "1mo" and definition["alert_thresholds"] == [50, 80, 95]
    usage = (await http.get("/v1/usage/app/support-bot/current", headers=ADMIN)).json()
    assert usage == {
        "app_id": "support-bot", "app_name": "Support Bot", "current_usage": 1250, "limit": 10000,
        "usage_percent": 12.5, "limit_type": "monthly", "window_start": "2026-11-01T00:00:00+00:00",
        "window_end": "2026-12-01T00:00:00+00:00", "blocked": False,
    }  # fmt: skip
    bad = await http.post(
        "/v1/limits/app",
        json={"app_id": "support-bot", "limit_type": "yearly", "limit_amount": 1},
        headers=ADMIN,
    )
    assert bad.status_code == 422
    none = (await http.get("/v1/usage/app/other/current", headers=ADMIN)).json()
    assert none["limit"] is None and none["usage_percent"] is None and none["current_usage"] == 0


async def test_budget_endpoints_wait_for_the_views(api, twins):
    http, _ = api
    twins[0].registry._current_at = None  # as right after start-up, before the topic was read
    r = await http.post(
        "/tag/new", json={"name": "team:a", "max_budget": 1, "budget_duration": "1d"}, headers=ADMIN
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "2"


def test_exact_json_keeps_every_digit():
    text = dumps_exact(
        {"a": Decimal("0.000000000001"), "b": [Decimal("123456789012345678.123456789012")], "c": "x"}
    )
    assert text == b'{"a":0.000000000001,"b":[123456789012345678.123456789012],"c":"x"}'


async def test_tag_list_describes_every_budget_sorted(api):
    http, _ = api
    assert (await http.get("/tag/list", headers=ADMIN)).json() == []
    for name, amount in (("team:b", 5), ("team:a", 10)):
        r = await http.post(
            "/tag/new", json={"name": name, "max_budget": amount, "budget_duration": "1d"}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
    listed = (await http.get("/tag/list", headers=ADMIN)).json()
    assert [(b["name"], b["max_budget"], b["blocked"]) for b in listed] == [
        ("team:a", 10, False),
        ("team:b", 5, False),
    ]
    assert (await http.get("/tag/list", headers={"Authorization": "Bearer prod-key"})).status_code == 403

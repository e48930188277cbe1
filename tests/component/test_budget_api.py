"""Budget endpoints through httpx ASGITransport, with in-memory twins of Kafka, the views and the ledger."""

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson
import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.budget_desk import BudgetServices
from ingest.exact import dumps_exact
from ingest.publisher import InMemoryPublisher
from ledger.tags import AttributionPolicy
from schemas.budgets import BlockSignal, BudgetDefinition
from spendledger.guard import BudgetGuard, CompactedView
from spendledger.platform.settings import Settings

ADMIN = {"Authorization": "Bearer admin-key"}
PRODUCER = {"Authorization": "Bearer prod-key"}
NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


class MemorySpend:
    def __init__(self):
        self.rows: list[tuple[str, datetime, Decimal]] = []

    def spend(self, tag, start, end):
        return sum((c for t, at, c in self.rows if t == tag and start <= at < end), Decimal(0))

    def spends(self, windows):
        return {window: self.spend(*window) for window in windows}

    def app_name(self, app_id):
        return "Support Bot" if app_id == "support-bot" else ""


@pytest.fixture
def twins():
    registry = CompactedView({}, "spend.budgets", BudgetDefinition.model_validate_json)
    registry.mark_current()
    guard = BudgetGuard({}, "spend.budget-blocks", clock=lambda: NOW.timestamp())
    guard.view.mark_current()
    spend = MemorySpend()
    services = BudgetServices(
        registry, guard, spend, ZoneInfo("UTC"), AttributionPolicy(), clock=lambda: NOW, answer_wait_s=0
    )
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


# ---------------------------------------------------------------- issue 19: one truth, LiteLLM's forms


def signal(tag: str, spend: str, max_budget: str, blocked: bool, **kw) -> BlockSignal:
    values = {
        "tag": tag,
        "blocked": blocked,
        "spend_usd": Decimal(spend),
        "max_budget_usd": Decimal(max_budget),
        "window_start": datetime(2026, 11, 22, tzinfo=UTC),
        "window_end": datetime(2026, 11, 23, tzinfo=UTC),
        "updated_at": NOW,
    }
    return BlockSignal(**{**values, **kw})


async def test_info_serves_spend_and_block_from_the_agent_and_the_ledger_beside_it(api, twins):
    """19.4: `spend` and `blocked` come from one source; the sink's figure is `ledger_spend`."""
    http, _ = api
    services, spend = twins
    r = await http.post(
        "/tag/new", json={"name": "team:one", "max_budget": 0.004, "budget_duration": "1d"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["spend_source"] == "ledger"
    # The agent has counted a call the sink has not landed yet.
    services.guard.view.put(
        "team:one", signal("team:one", "0.0045", "0.004", True, thresholds_fired=[50, 80, 95, 100])
    )
    info = (await http.get("/tag/info", params={"names": "team:one"}, headers=ADMIN)).json()["team:one"]
    assert (info["spend"], info["blocked"], info["ledger_spend"], info["spend_source"]) == (
        0.0045,
        True,
        0,
        "budget_agent",
    )
    assert info["blocked_until"] == "2026-11-23T00:00:00+00:00"
    # Raised to $1: the old signal (for $0.004) no longer speaks for the budget; the ledger's figure is judged
    # against the new max, so the answer cannot say "blocked" beside a spend below the budget.
    spend.rows.append(("team:one", NOW, Decimal("0.0045")))
    r = await http.post("/tag/update", json={"name": "team:one", "max_budget": 1}, headers=ADMIN)
    body = r.json()
    assert (body["blocked"], body["spend"], body["spend_source"]) == (False, 0.0045, "ledger")
    # A signal of another window (yesterday's) is not today's state either.
    services.guard.view.put(
        "team:one",
        signal(
            "team:one",
            "5",
            "1",
            True,
            window_start=datetime(2026, 11, 21, tzinfo=UTC),
            window_end=datetime(2026, 11, 22, tzinfo=UTC),
        ),
    )
    info = (await http.get("/tag/info", params={"names": "team:one"}, headers=ADMIN)).json()["team:one"]
    assert (info["blocked"], info["spend_source"]) == (False, "ledger")


async def test_a_write_waits_for_the_agent_and_answers_with_its_state(api, twins):
    """19.4: /tag/new answers with what the agent decided, not `blocked: false` beside spend over the max."""
    http, _ = api
    services, _spend = twins
    services.answer_wait_s = 2.0

    async def agent() -> None:
        while services.registry.get("team:two") is None:
            await asyncio.sleep(0.01)
        written = services.registry.get("team:two").updated_at
        services.guard.view.put(
            "team:two", signal("team:two", "0.0045", "0.004", True, definition_updated_at=written)
        )

    task = asyncio.create_task(agent())
    r = await http.post(
        "/tag/new", json={"name": "team:two", "max_budget": 0.004, "budget_duration": "1d"}, headers=ADMIN
    )
    await task
    body = r.json()
    assert (body["spend"], body["blocked"], body["spend_source"]) == (0.0045, True, "budget_agent")


async def test_30d_is_the_month_and_the_answer_says_so(api):
    """19.2: a 30d budget runs from the 1st to the 1st (Nov 1 -> Dec 1 on Nov 22), as LiteLLM resets it."""
    http, _ = api
    r = await http.post(
        "/tag/new", json={"name": "team:m", "max_budget": 10, "budget_duration": "30d"}, headers=ADMIN
    )
    body = r.json()
    assert (body["window_start"], body["budget_reset_at"]) == (
        "2026-11-01T00:00:00+00:00",
        "2026-12-01T00:00:00+00:00",
    )
    assert body["window_rule"] == "calendar: each month, from the 1st at 00:00 UTC"
    r = await http.post(
        "/tag/new", json={"name": "team:d", "max_budget": 10, "budget_duration": "1D"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["budget_reset_at"] == "2026-11-23T00:00:00+00:00"
    r = await http.post(
        "/tag/new", json={"name": "team:x", "max_budget": 10, "budget_duration": "\u0661d"}, headers=ADMIN
    )
    assert r.status_code == 422 and "budget_duration" in r.text


async def test_litellm_forms_post_tag_info_and_a_body_that_is_not_json(api):
    """19.8: POST /tag/info {"names": [...]} as LiteLLM's proxy; a non-JSON body is 400 as on /v1/events."""
    http, _ = api
    await http.post(
        "/tag/new", json={"name": "team:p", "max_budget": 10, "budget_duration": "1d"}, headers=ADMIN
    )
    r = await http.post("/tag/info", json={"names": ["team:p"]}, headers=ADMIN)
    assert r.status_code == 200 and set(r.json()) == {"team:p"}
    for path in ("/tag/new", "/tag/info", "/v1/check", "/v1/limits/app"):
        r = await http.post(
            path, content=b"max_budget=10", headers={**ADMIN, "Content-Type": "application/json"}
        )
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json"), path


async def test_model_and_provider_budgets_use_the_ledger_s_names_and_models_is_refused(api):
    """19.6: `model:openai/gpt-4o` is the `model:gpt-4o` spend counts for; LiteLLM's `models` (routing) is
    refused rather than dropped."""
    http, _ = api
    r = await http.post(
        "/tag/new",
        json={"name": "model:openai/gpt-4o", "max_budget": 1, "budget_duration": "1d"},
        headers=ADMIN,
    )
    assert r.status_code == 200 and r.json()["name"] == "model:gpt-4o"
    r = await http.post(
        "/tag/new", json={"name": "provider:OpenAI", "max_budget": 1, "budget_duration": "1d"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["name"] == "provider:openai"
    r = await http.post(
        "/tag/new",
        json={"name": "team:r", "max_budget": 1, "budget_duration": "1d", "models": ["gpt-4o"]},
        headers=ADMIN,
    )
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "models"


async def test_app_limit_does_not_replace_a_tag_budget_and_keeps_every_digit(api, twins):
    """19.7: /v1/limits/app on a tag that has a /tag/new budget is a 409, not a silent replacement; a limit
    with more digits than the ledger stores is refused, not rounded to 0."""
    http, publisher = api
    await http.post(
        "/tag/new", json={"name": "app:bot", "max_budget": 100, "budget_duration": "1d"}, headers=ADMIN
    )
    r = await http.post(
        "/v1/limits/app", json={"app_id": "bot", "limit_type": "daily", "limit_amount": 5}, headers=ADMIN
    )
    assert r.status_code == 409 and r.json()["error"]["details"]["source"] == "tag"
    assert twins[0].registry.get("app:bot").max_budget_usd == 100
    r = await http.post(
        "/v1/limits/app", json={"app_id": "bot2", "limit_type": "daily", "limit_amount": 1e-11}, headers=ADMIN
    )
    assert r.status_code == 422
    r = await http.post(
        "/v1/limits/app",
        json={"app_id": "bot2", "limit_type": "daily", "limit_amount": "1e-10"},
        headers=ADMIN,
    )
    assert r.status_code == 200
    assert orjson.loads(publisher.sent[-1][2])["max_budget_usd"] == "1E-12"


async def test_alert_destinations_must_be_configured(api, twins):
    http, _ = api
    body = {"name": "team:a", "max_budget": 1, "budget_duration": "1d", "alert_destinations": ["finance"]}
    r = await http.post("/tag/new", json=body, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["details"]["unknown"] == ["finance"]
    twins[0].alert_destinations = frozenset({"finance"})
    r = await http.post("/tag/new", json=body, headers=ADMIN)
    assert r.status_code == 200 and r.json()["alert_destinations"] == ["finance"]


async def test_a_hashed_user_id_is_not_hashed_again_and_a_rotated_key_is_said(twins):
    """19.5: with USER_ID_HMAC_KEY set, `user:uh_…` (as reports show it) is the budget's tag; a budget
    made under another key says it matches no new spend."""
    from ledger.tags import hash_user_id

    services, _ = twins
    settings = Settings.model_validate({"producer_keys": "prod-key", "admin_keys": "admin-key"})

    async def client(key: bytes):
        services.policy = AttributionPolicy(user_id_hmac_key=key)
        app = create_app(Services(settings=settings, publisher=InMemoryPublisher(), budgets=services))
        return AsyncClient(transport=ASGITransport(app=app), base_url="http://test")

    hashed = hash_user_id("alice@example.com", b"key-1")
    async with await client(b"key-1") as http:
        r = await http.post(
            "/tag/new",
            json={"name": f"user:{hashed}", "max_budget": 1, "budget_duration": "1d"},
            headers=ADMIN,
        )
        assert r.status_code == 200 and r.json()["name"] == f"user:{hashed}" and "warning" not in r.json()
        r = await http.post(
            "/tag/new", json={"name": "user:bob", "max_budget": 1, "budget_duration": "1d"}, headers=ADMIN
        )
        assert r.json()["name"] == f"user:{hash_user_id('bob', b'key-1')}"
    async with await client(b"key-2") as http:
        info = (await http.get("/tag/info", params={"names": f"user:{hashed}"}, headers=ADMIN)).json()
        assert "another USER_ID_HMAC_KEY" in info[f"user:{hashed}"]["warning"]


async def test_a_signal_of_another_version_of_the_budget_does_not_speak_for_it(api, twins):
    """Review of 19.4: the agent's state is matched to the definition it was decided under, not by its
    max alone (a sliding budget of the same length and max is another budget)."""
    http, _ = api
    services, _spend = twins
    r = await http.post(
        "/tag/new", json={"name": "team:v", "max_budget": 1, "budget_duration": "1d"}, headers=ADMIN
    )
    first = services.registry.get("team:v")
    services.guard.view.put(
        "team:v", signal("team:v", "2", "1", True, definition_updated_at=first.updated_at)
    )
    assert (await http.post("/tag/info", json={"names": ["team:v"]}, headers=ADMIN)).json()["team:v"][
        "blocked"
    ]
    services.clock = lambda: NOW.replace(minute=1)
    r = await http.post(
        "/tag/update", json={"name": "team:v", "description": "same max, new version"}, headers=ADMIN
    )
    body = r.json()
    assert (body["spend_source"], body["blocked"]) == ("ledger", False)

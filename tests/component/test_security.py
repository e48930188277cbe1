"""Scopes and keys: a producer sends, an analyst reads, an admin manages; bound keys claim only
what they are bound to; keys created through the API are stored hashed and can be revoked."""

from typing import Any

import orjson
import pytest
from httpx import ASGITransport, AsyncClient

from ingest.keys import key_hash
from tests.component.test_fuzz import PUBLISHER, build_app

PUBLIC = {"/healthz", "/readyz", "/metrics", "/ui"}
PRODUCER_ROUTES = {("POST", "/v1/events"), ("POST", "/v1/check")}
ANALYST_ROUTES = {
    ("POST", "/v1/check"),
    ("POST", "/v1/sql"),
    ("GET", "/tag/info"),
    ("POST", "/tag/info"),
    ("GET", "/tag/list"),
    ("GET", "/v1/usage/app/{app_id}/current"),
    ("GET", "/v1/analytics/usage"),
    ("POST", "/v1/analytics/cost-allocation"),
    ("GET", "/spend/tags"),
    ("GET", "/v1/analytics/coverage"),
}
APP = build_app()
ROUTES = sorted(
    (method.upper(), path)
    for path, operations in APP.openapi()["paths"].items()
    if path not in PUBLIC
    for method in operations
)


def test_every_route_is_classified() -> None:
    # events, check, sql, 5 budget, 2 limit, 4 report and 3 key routes: a new one must be classified.
    assert len(ROUTES) == 18
    assert PRODUCER_ROUTES <= set(ROUTES) and ANALYST_ROUTES <= set(ROUTES)


async def call(method: str, path: str, key: str | None, body: Any = None, app: Any = APP) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = path.replace("{app_id}", "some-app").replace("{key_id}", "key_0")
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as http:
        return await http.request(method, url, headers=headers, json={} if body is None else body)


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if r not in PRODUCER_ROUTES])
async def test_a_producer_key_reaches_only_the_producer_routes(method: str, path: str) -> None:
    response = await call(method, path, "prod-key")
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert "producer key" in response.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if r not in ANALYST_ROUTES])
async def test_an_analyst_key_cannot_send_or_manage(method: str, path: str) -> None:
    response = await call(method, path, "analyst-key")
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("method", "path"), sorted(ANALYST_ROUTES))
async def test_an_analyst_key_reads(method: str, path: str) -> None:
    response = await call(method, path, "analyst-key")
    assert response.status_code not in (401, 403), response.text


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("key", [None, "wrong-key", "prod-key-but-longer", "admin-ke", "analyst-key "])
async def test_no_key_or_a_wrong_one_is_refused_everywhere(method: str, path: str, key: str | None) -> None:
    response = await call(method, path, key)
    if key == "analyst-key ":  # surrounding spaces are not part of a key, as in the header itself
        return
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"


def event(n: int, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "kind": "completed",
        "request_id": f"bound-{n}",
        "model": "openai/gpt-4o",
        "usage": {"prompt_tokens": 10, "completion_tokens": 1},
        "headers": headers,
    }


async def create_key(app: Any, **body: Any) -> dict[str, Any]:
    response = await call("POST", "/v1/keys", "admin-key", body, app)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_a_bound_producer_key_cannot_claim_another_team() -> None:
    app = build_app()
    created = await create_key(
        app, scope="producer", name="search team", apps=["search"], tags=["team:search", "env:*"]
    )
    key = created["key"]
    assert key.startswith("sl_producer_") and created["apps"] == ["search"]

    own = event(1, {"x-anyapi-app-id": "search", "x-litellm-tags": "team:search,env:prod"})
    before = len(PUBLISHER.sent)
    assert (await call("POST", "/v1/events", key, own, app)).status_code == 202
    assert len(PUBLISHER.sent) > before

    attacks = [
        ({"x-anyapi-app-id": "search", "x-litellm-tags": "team:victim"}, "tags"),
        ({"x-anyapi-app-id": "billing"}, "app"),
        ({"x-litellm-tags": "team:search"}, "app"),  # no app named
        ({"x-anyapi-app-id": "search", "x-anyapi-team": "victim"}, "tags"),
    ]
    for headers, field in attacks:
        before = len(PUBLISHER.sent)
        batch = {"events": [event(2, {"x-anyapi-app-id": "search"}), event(3, headers)]}
        response = await call("POST", "/v1/events", key, batch, app)
        assert response.status_code == 403, (headers, response.text)
        assert response.json()["error"]["details"]["field"] == field
        assert response.json()["error"]["details"]["index"] == 1
        assert len(PUBLISHER.sent) == before  # nothing of the batch was published


@pytest.mark.parametrize(
    ("headers", "metadata", "field"),
    [
        # One header under two spellings: the join merges by the name as sent, so the other one could win.
        ({"X-AnyAPI-App-ID": "billing", "x-anyapi-app-id": "search"}, None, "headers"),
        # A second value for a dimension is dropped alone, but could count once the partner's header wins.
        ({"x-anyapi-app-id": "search", "x-anyapi-team": "search"}, {"team": "victim"}, "tags"),
        # Tags over the limit are dropped alone, and could count once the partner's tags replace these.
        (
            {"x-anyapi-app-id": "search", "x-litellm-tags": ",".join(f"k:{i}" for i in range(60))},
            {"tags": ["customer:victim"]},
            "tags",
        ),
        # An app-only binding claims no team.
        ({"x-anyapi-app-id": "search", "x-anyapi-team": "victim"}, None, "tags"),
    ],
)
async def test_a_bound_key_cannot_hide_a_claim_for_the_join(
    headers: dict[str, str], metadata: dict[str, Any] | None, field: str
) -> None:
    app = build_app()
    key = (await create_key(app, scope="producer", apps=["search"], tags=["team:search", "k:*"]))["key"]
    body = event(9, headers)
    if metadata:
        body["metadata"] = metadata
    response = await call("POST", "/v1/events", key, body, app)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["details"]["field"] == field


async def test_a_bound_keys_ids_live_in_its_own_namespace() -> None:
    """So its usage never joins another producer's request, nor takes another producer's event id."""
    app = build_app()
    created = await create_key(app, scope="producer", tags=["team:search"])
    before = len(PUBLISHER.sent)
    victim = {"kind": "request", "request_id": "req-victim", "headers": {"x-anyapi-team": "victim"}}
    assert (await call("POST", "/v1/events", "prod-key", victim, app)).status_code == 202
    usage = {
        "kind": "usage",
        "request_id": "req-victim",
        "event_id": "evt-victim",
        "model": "openai/gpt-4o",
        "usage": {"prompt_tokens": 1000000},
        "headers": {"x-anyapi-team": "search"},
    }
    answer = await call("POST", "/v1/events", created["key"], usage, app)
    assert answer.status_code == 202 and answer.json()["event_ids"] == [f"{created['key_id']}/evt-victim"]
    published = [orjson.loads(value) for _, _, value in PUBLISHER.sent[before:] if value]
    assert [p["request_id"] for p in published] == ["req-victim", f"{created['key_id']}/req-victim"]


async def test_a_bound_key_checks_only_what_it_may_claim() -> None:
    app = build_app()
    key = (await create_key(app, scope="producer", tags=["team:search"]))["key"]
    own = await call("POST", "/v1/check", key, {"tags": ["team:search"]}, app)
    assert own.status_code == 200 and own.json()["allowed"] is True
    foreign = await call("POST", "/v1/check", key, {"tags": ["team:victim"]}, app)
    assert foreign.status_code == 403 and foreign.json()["error"]["details"]["field"] == "tags"
    # An unbound key checks anything (a gateway serving many teams).
    assert (await call("POST", "/v1/check", "prod-key", {"tags": ["team:victim"]}, app)).status_code == 200


async def test_tag_patterns_are_kept_as_the_ledger_writes_tags() -> None:
    app = build_app()
    created = await create_key(app, scope="producer", tags=["env:prod", "department:*"])
    assert created["tags"] == ["env:production", "team:*"]
    ok = event(10, {"x-litellm-tags": "env:production,team:infra"})
    assert (await call("POST", "/v1/events", created["key"], ok, app)).status_code == 202


async def test_keys_are_shown_once_stored_hashed_and_revocable() -> None:
    app = build_app()
    created = await create_key(app, scope="analyst", name="finance")
    key, key_id = created["key"], created["key_id"]
    assert (await call("POST", "/v1/check", key, {"tags": ["team:a"]}, app)).status_code == 200

    listing = (await call("GET", "/v1/keys", "admin-key", None, app)).json()["keys"]
    text = str(listing)
    assert key_id in text and key not in text and key_hash(key) not in text
    assert {"key_id": "env:admin:0", "scope": "admin", "source": "environment"} in listing

    revoked = await call("POST", f"/v1/keys/{key_id}/revoke", "admin-key", None, app)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = await call("POST", "/v1/check", key, {"tags": ["team:a"]}, app)
    assert refused.status_code == 401
    assert (await call("POST", "/v1/keys/key_nope/revoke", "admin-key", None, app)).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"scope": "root"},
        {"scope": "analyst", "apps": ["x"]},  # only producer keys are bound
        {"scope": "producer", "tags": ["team"]},
        {"scope": "producer", "tags": ["team:a*"]},
        {"scope": "producer", "events_per_s": -1},
    ],
)
async def test_a_bad_key_request_is_refused_naming_the_problem(body: dict[str, Any]) -> None:
    response = await call("POST", "/v1/keys", "admin-key", body)
    assert response.status_code == 422, response.text


async def test_only_an_admin_manages_keys() -> None:
    for key in ("prod-key", "analyst-key"):
        assert (await call("POST", "/v1/keys", key, {"scope": "admin"})).status_code == 403
        assert (await call("GET", "/v1/keys", key)).status_code == 403


async def test_a_key_over_its_rate_gets_429_with_retry_after() -> None:
    app = build_app()
    key = (await create_key(app, scope="producer", events_per_s=5))["key"]
    batch = {"events": [event(n, {}) for n in range(10)]}  # a burst of 2 s: 10 events
    assert (await call("POST", "/v1/events", key, batch, app)).status_code == 202
    before = len(PUBLISHER.sent)
    response = await call("POST", "/v1/events", key, batch, app)
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
    assert int(response.headers["retry-after"]) >= 1
    assert len(PUBLISHER.sent) == before
    # Another key is not held back by this one.
    assert (await call("POST", "/v1/events", "prod-key", batch, app)).status_code == 202
    # Over its rate, a key's next body is not even read.
    refused = await call("POST", "/v1/events", key, {"not": "an event"}, app)
    assert refused.status_code == 429


async def test_a_refused_batch_costs_its_key_too() -> None:
    app = build_app()
    key = (await create_key(app, scope="producer", events_per_s=5))["key"]
    bad = {"events": [{"kind": "request"}] * 10}  # no request_id: 422, read and parsed all the same
    assert (await call("POST", "/v1/events", key, bad, app)).status_code == 422
    assert (await call("POST", "/v1/events", key, bad, app)).status_code == 429


async def test_a_body_is_not_read_before_a_key_is_shown() -> None:
    for path in ("/v1/sql", "/v1/check", "/v1/keys", "/tag/new"):
        async with AsyncClient(transport=ASGITransport(app=APP), base_url="http://test") as http:
            response = await http.post(
                path, content=b"{not json", headers={"Content-Type": "application/json"}
            )
        assert response.status_code == 401, (path, response.text)
    headers = {"Authorization": "Bearer admin-key", "Content-Length": str(50 * 1024 * 1024)}
    async with AsyncClient(transport=ASGITransport(app=APP), base_url="http://test") as http:
        response = await http.post("/v1/sql", content=b"{}", headers=headers)
    assert response.status_code == 413


async def test_metrics_need_a_reading_key_from_outside() -> None:
    async def metrics(client_host: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = ASGITransport(app=APP, client=(client_host, 5000))
        async with AsyncClient(transport=transport, base_url="http://test") as http:
            return (await http.get("/metrics", headers=headers)).status_code

    assert await metrics("127.0.0.1", None) == 200
    assert await metrics("10.1.2.3", None) == 401
    assert await metrics("10.1.2.3", "prod-key") == 403
    assert await metrics("10.1.2.3", "analyst-key") == 200


async def test_check_latency_is_measured_where_the_api_sees_it() -> None:
    app = build_app()

    async def count() -> float:
        text = (await call("GET", "/metrics", None, None, app)).text
        line = next(line for line in text.splitlines() if line.startswith("spendledger_check_seconds_count"))
        return float(line.rsplit(" ", 1)[1])

    before = await count()
    assert (await call("POST", "/v1/check", "prod-key", {"tags": ["team:a"]}, app)).status_code == 200
    assert (await call("POST", "/v1/check", None, {"tags": ["team:a"]}, app)).status_code == 401
    assert await count() == before + 2

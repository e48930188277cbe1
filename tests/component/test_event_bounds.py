"""Values the pipeline cannot carry are refused at the door (422, naming the field, nothing published):
event times before 2000 or beyond the clock-skew bound, absurd costs and token counts (DESIGN §9.7)."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher
from spendledger.platform.settings import Settings

PRODUCER = {"Authorization": "Bearer prod-key"}
SKEW_S = 300


@pytest.fixture
def publisher() -> InMemoryPublisher:
    return InMemoryPublisher()


@pytest.fixture
async def client(publisher):
    settings = Settings.model_validate(
        {"producer_keys": "prod-key", "admin_keys": "admin-key", "max_future_skew_s": SKEW_S}
    )
    app = create_app(Services(settings=settings, publisher=publisher))
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as c:
        yield c


def event(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "completed",
        "request_id": "r1",
        "model": "acme/unpriced",
        "usage": {"input_tokens": 10},
        **extra,
    }


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def soon(seconds: float) -> str:
    return iso(datetime.now(UTC) + timedelta(seconds=seconds))


async def refused(client, publisher, body: dict[str, Any], loc: list[Any], *words: str) -> None:
    r = await client.post("/v1/events", json=body, headers=PRODUCER)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_event" and publisher.sent == []
    assert [d["loc"] for d in error["details"]] == [loc]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    assert error["message"].startswith(f"{where}: "), error["message"]
    for word in words:
        assert word in error["message"], (word, error["message"])


@pytest.mark.parametrize(
    "occurred_at, words",
    [
        ("0001-01-01T00:00:00Z", ["before 2000-01-01T00:00:00Z"]),
        ("1999-12-31T23:59:59.999Z", ["before 2000-01-01T00:00:00Z"]),
        ("1999-12-31T22:59:59-01:00", ["before 2000-01-01T00:00:00Z"]),
        ("9999-12-31T23:59:59Z", ["clock skew in the future"]),
        ("9999-12-31T23:59:59-01:00", ["clock skew in the future"]),
    ],
)
async def test_an_occurred_at_the_pipeline_cannot_carry_is_refused_naming_the_field(
    client, publisher, occurred_at, words
):
    """Before: accepted with 202, and the sink's `min(times) - lookback` raised OverflowError forever."""
    await refused(client, publisher, event(occurred_at=occurred_at), ["occurred_at"], *words)


async def test_the_bounds_are_the_floor_and_the_receive_time_plus_the_skew(client, publisher):
    await refused(client, publisher, event(occurred_at=soon(SKEW_S + 60)), ["occurred_at"], "clock skew")
    r = await client.post("/v1/events", json=event(occurred_at=soon(SKEW_S - 60)), headers=PRODUCER)
    assert r.status_code == 202, r.text
    for at in ("2000-01-01T00:00:00Z", "1999-12-31T23:00:00-01:00"):  # the floor itself
        r = await client.post("/v1/events", json=event(occurred_at=at), headers=PRODUCER)
        assert r.status_code == 202, r.text


async def test_an_event_of_a_batch_is_named_by_its_index(client, publisher):
    body = {"events": [event(), event(request_id="r2", occurred_at="0001-01-01T00:00:00Z")]}
    await refused(client, publisher, body, ["events", 1, "occurred_at"], "before 2000")


@pytest.mark.parametrize("cost", ["1e16", 10**16, "1000000000.000000000001"])
async def test_a_reported_cost_over_a_billion_dollars_is_refused(client, publisher, cost):
    """Before: 1e16 was accepted, and the ledger agent crashed on `decimal.InvalidOperation`."""
    await refused(client, publisher, event(reported_cost_usd=cost), ["reported_cost_usd"], "1000000000")


async def test_a_reported_cost_of_a_billion_dollars_is_accepted(client, publisher):
    r = await client.post("/v1/events", json=event(reported_cost_usd="1000000000"), headers=PRODUCER)
    assert r.status_code == 202, r.text


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 10**11},
        {"prompt_tokens": 10, "completion_tokens": 20_000_000_001},
        {"input_tokens": 1, "cache_read_input_tokens": 5 * 10**10},
        {"promptTokenCount": 1, "thoughtsTokenCount": 1e15},
        {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 10**12}},
    ],
)
async def test_absurd_token_counts_are_refused(client, publisher, usage):
    await refused(
        client, publisher, event(usage=usage), ["usage"], "token counts must be at most 10,000,000,000"
    )


async def test_ten_billion_tokens_are_accepted(client, publisher):
    r = await client.post("/v1/events", json=event(usage={"input_tokens": 10**10}), headers=PRODUCER)
    assert r.status_code == 202, r.text

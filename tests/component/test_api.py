"""The API through httpx ASGITransport, with the in-memory publisher."""

import orjson
import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.events import default_event_id
from ingest.publisher import InMemoryPublisher
from ingest.sql import QueryResult
from spendledger.platform.errors import BrokerUnavailable
from spendledger.platform.settings import Settings

PRODUCER = {"Authorization": "Bearer prod-key"}
ADMIN = {"Authorization": "Bearer admin-key"}


class FakeQueries:
    def __init__(self):
        self.seen = []

    def query(self, sql, limits):
        self.seen.append((sql, limits))
        return QueryResult(columns=["n"], rows=[[1]])

    def ping(self):
        return True


@pytest.fixture
def publisher():
    return InMemoryPublisher()


@pytest.fixture
async def client(publisher):
    settings = Settings.model_validate(
        {
            "producer_keys": "prod-key",
            "admin_keys": "admin-key",
            "max_body_bytes": 1_000_000,
            "topic_prefix": "t.",
        }
    )
    app = create_app(Services(settings=settings, publisher=publisher, queries=FakeQueries()))
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as c:
        yield c


EVENT = {
    "kind": "completed",
    "request_id": "req_123",
    "model": "openai/gpt-4o",
    "headers": {
        "X-AnyAPI-App-ID": "my-chatbot-v2",
        "Authorization": "Bearer sk-abcdefghijklmnopqrstuvwx",
        "Cookie": "s=1",
    },
    "metadata": {"tags": ["team:support"], "spend_logs_metadata": {"api_key": "hunter2"}},
    "body": {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "my secret prompt"}],
        "metadata": {"project": "q4"},
    },
    "usage": {"input_tokens": 1000, "output_tokens": 200},
}


async def test_single_event_accepted_and_sanitized(client, publisher):
    r = await client.post("/v1/events", json=EVENT, headers=PRODUCER)
    assert r.status_code == 202
    assert r.json() == {
        "accepted": 1,
        "event_ids": [default_event_id("completed", "req_123")],
        "warnings": [],
    }
    ((topic, key, value),) = publisher.sent
    assert topic == "t.spend.raw" and key == b"req_123"
    sent = orjson.loads(value)
    assert sent["headers"] == {"X-AnyAPI-App-ID": "my-chatbot-v2"}
    assert sent["body"] == {"model": "gpt-4o", "metadata": {"project": "q4"}}
    assert sent["metadata"]["spend_logs_metadata"] == {"api_key": "[REDACTED]"}
    assert sent["occurred_at"] == sent["received_at"]
    for secret in (b"sk-abcdef", b"hunter2", b"secret prompt", b"Cookie"):
        assert secret not in value


async def test_batch_keeps_given_event_ids(client, publisher):
    events = [dict(EVENT, request_id=f"r{i}", event_id=f"evt_{i}") for i in range(500)]
    r = await client.post("/v1/events", json={"events": events}, headers=PRODUCER)
    assert r.status_code == 202 and r.json()["accepted"] == 500
    assert r.json()["event_ids"][:2] == ["evt_0", "evt_1"] and len(publisher.sent) == 500


async def test_a_batch_is_published_as_one_bundle_per_partition(client, publisher):
    publisher.partitions = 4
    events = [dict(EVENT, request_id=f"r{i}", event_id=f"evt_{i}") for i in range(500)]
    r = await client.post("/v1/events", json={"events": events}, headers=PRODUCER)
    assert r.status_code == 202 and r.json()["accepted"] == 500
    assert len(publisher.sent) == 4
    sent = [e for _, _, value in publisher.sent for e in orjson.loads(value)["events"]]
    assert sorted(e["event_id"] for e in sent) == sorted(r.json()["event_ids"])
    assert all(b"sk-abcdef" not in value for _, _, value in publisher.sent)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 422, "invalid_event"),
        (orjson.dumps({"kind": "usage", "request_id": "r"}), 422, "invalid_event"),
        (
            orjson.dumps(
                {"kind": "completed", "request_id": "r", "usage": {"input_tokens": 5, "cache_read_tokens": 9}}
            ),
            422,
            "invalid_event",
        ),
        (orjson.dumps({"events": []}), 422, "invalid_event"),
        (
            orjson.dumps({"events": [{"kind": "completed", "request_id": f"r{i}"} for i in range(1001)]}),
            422,
            "invalid_event",
        ),
        (b"x" * 1_000_001, 413, "payload_too_large"),
    ],
)
async def test_bad_input_publishes_nothing(client, publisher, body, status, code):
    r = await client.post("/v1/events", content=body, headers=PRODUCER)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert publisher.sent == []


async def test_validation_errors_never_echo_input(client):
    r = await client.post(
        "/v1/events",
        json={"kind": "completed", "request_id": "sk-abcdefghijklmnopqrstuvwxyz has space"},
        headers=PRODUCER,
    )
    assert r.status_code == 422 and "sk-abcdef" not in r.text


async def test_kafka_down_is_503_with_retry_after(client, publisher):
    publisher.fail_with = BrokerUnavailable("broker gone")
    r = await client.post("/v1/events", json=EVENT, headers=PRODUCER)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "broker_unavailable"
    assert r.json()["error"]["details"]["event_ids"] == [default_event_id("completed", "req_123")]
    assert (await client.get("/readyz")).status_code == 503


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer nope"}, 401), ({"Authorization": "Basic prod-key"}, 401)],
)
async def test_auth(client, publisher, headers, status):
    r = await client.post("/v1/events", json=EVENT, headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == "unauthenticated"
    assert publisher.sent == []


async def test_sql_needs_admin(client):
    r = await client.post("/v1/sql", json={"query": "SELECT 1"}, headers=PRODUCER)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await client.post("/v1/sql", json={"query": "SELECT 1"}, headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"columns": ["n"], "rows": [[1]]}


async def test_health_metrics_docs(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    await client.post("/v1/events", json=EVENT, headers=PRODUCER)
    metrics = (await client.get("/metrics")).text
    assert 'spendledger_events_accepted_total{kind="completed"} 1.0' in metrics
    schema = (await client.get("/openapi.json")).json()
    assert "RawEvent" in schema["components"]["schemas"] and "/v1/events" in schema["paths"]

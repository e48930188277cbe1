"""Issue 18: no credential reaches Kafka, whatever field of an event carries it.

Each case posts, beside an ordinary event, one event with a credential in one field, through the
API with the in-memory publisher, and looks for the credential in every byte published (keys and
values, every topic) and in the answer. The values are fakes of the real shapes.
"""

from typing import Any

import orjson
import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher
from spendledger.platform.settings import Settings

PRODUCER = {"Authorization": "Bearer prod-key"}

STRIPE = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_TEST = "rk_test_" + "51HxYzAbCdEfGhIjKlMnOpQr"
HUGGING_FACE = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"
GITLAB = "glpat-" + "x8Yz1AbCdEfGhIjKlMnO"
GITHUB = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"
OPENAI = "sk-proj-" + "Xy7kQ2mN9pL4rT6vW8zB1cD3fG5hJ0aS"
ANTHROPIC = "sk-ant-api03-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PASSWORD = "hunter2"
DB_PASSWORD = "s3cretPassw0rd"
BEARER_TOKEN = "abcDEF1234567890ghijKLM"

NORMAL = {
    "kind": "completed",
    "request_id": "req_abc123",
    "event_id": "3f2b9c1e-7d4a-4e6b-9a0f-1c2d3e4f5a6b",
    "model": "claude-3-5-sonnet-20241022",
    "provider": "anthropic",
    "status": "success",
    "user": "user_42",
    "headers": {
        "X-AnyAPI-App-ID": "support-bot",
        "X-AnyAPI-User-ID": "user_42",
        "X-AnyAPI-Session-ID": "sess-7f3a",
        "x-litellm-tags": "team:platform,env:prod",
    },
    "metadata": {"tags": ["feature:summarize", "sk-"], "team": "platform", "region": "eu-west-1"},
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 200},
    },
}


def base(request_id: str) -> dict[str, Any]:
    return {"kind": "completed", "request_id": request_id, "model": "gpt-4o", "usage": {"input_tokens": 10}}


# (name, the event's fields, the substrings that must appear nowhere)
CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("user", {"user": STRIPE}, (STRIPE,)),
    ("user_header", {"headers": {"X-AnyAPI-User-ID": HUGGING_FACE}}, (HUGGING_FACE,)),
    ("session_header", {"headers": {"X-AnyAPI-Session-ID": GITLAB}}, (GITLAB,)),
    ("tag_in_metadata", {"metadata": {"tags": ["team:platform", f"pwd:{PASSWORD}"]}}, (PASSWORD,)),
    ("tag_in_header", {"headers": {"x-litellm-tags": f"team:platform,pwd:{PASSWORD}"}}, (PASSWORD,)),
    (
        "litellm_metadata_header",
        {"headers": {"x-litellm-spend-logs-metadata": orjson.dumps({"db_pwd": PASSWORD}).decode()}},
        (PASSWORD,),
    ),
    ("metadata_aws_key", {"metadata": {"aws_key": AWS_SECRET}}, (AWS_SECRET,)),
    ("metadata_pwd", {"metadata": {"pwd": PASSWORD}}, (PASSWORD,)),
    ("metadata_db_pwd", {"metadata": {"db_pwd": PASSWORD}}, (PASSWORD,)),
    ("metadata_dsn", {"metadata": {"dsn": f"postgres://app:{DB_PASSWORD}@db:5432/ledger"}}, (DB_PASSWORD,)),
    ("metadata_bearer", {"metadata": {"note": f"bearer {BEARER_TOKEN}"}}, (BEARER_TOKEN,)),
    (
        "metadata_nested_key",
        {"metadata": {"spend_logs_metadata": {"awsSecretAccessKey": AWS_SECRET}}},
        (AWS_SECRET,),
    ),
    ("metadata_as_key", {"metadata": {GITHUB: "x"}}, (GITHUB,)),
    (
        "body_metadata",
        {"body": {"metadata": {"apiKey": PASSWORD}, "user": STRIPE_TEST}},
        (PASSWORD, STRIPE_TEST),
    ),
    ("usage_api_key", {"usage": {"input_tokens": 10, "api_key": OPENAI}}, (OPENAI,)),
    ("request_id", {"request_id": STRIPE}, (STRIPE,)),
    ("event_id", {"event_id": GITLAB}, (GITLAB,)),
    ("model", {"model": HUGGING_FACE}, (HUGGING_FACE,)),
    ("provider", {"provider": ANTHROPIC}, (ANTHROPIC,)),
    ("status", {"status": f"bearer {BEARER_TOKEN}"}, (BEARER_TOKEN,)),
]


@pytest.fixture
def publisher() -> InMemoryPublisher:
    return InMemoryPublisher()


@pytest.fixture
async def client(publisher: InMemoryPublisher) -> Any:
    settings = Settings.model_validate(
        {
            "producer_keys": "prod-key",
            "admin_keys": "admin-key",
            "max_body_bytes": 1_000_000,
            "topic_prefix": "t.",
        }
    )
    app = create_app(Services(settings=settings, publisher=publisher, queries=None))
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as c:
        yield c


def published(publisher: InMemoryPublisher) -> list[dict[str, Any]]:
    events = []
    for _, _, value in publisher.sent:
        decoded = orjson.loads(value or b"{}")
        events.extend(decoded.get("events", [decoded]))
    return events


def all_bytes(publisher: InMemoryPublisher) -> bytes:
    return b"\n".join(
        topic.encode() + b"|" + key + b"|" + (value or b"") for topic, key, value in publisher.sent
    )


@pytest.mark.parametrize(("fields", "secrets"), [(f, s) for _, f, s in CASES], ids=[n for n, _, _ in CASES])
async def test_no_credential_is_published_from_any_field(client, publisher, fields, secrets):
    carrier = {**base("req_carrier"), **fields}
    r = await client.post("/v1/events", json={"events": [NORMAL, carrier]}, headers=PRODUCER)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 2
    sent = all_bytes(publisher)
    for secret in secrets:
        assert secret.encode() not in sent
        assert secret not in r.text
    normal = published(publisher)[0]
    for field, value in NORMAL.items():
        assert normal[field] == value, field


async def test_a_batch_with_every_credential_at_once(client, publisher):
    carrier = base("req_carrier")
    for _, fields, _ in CASES:
        for field, value in fields.items():
            if isinstance(value, dict) and isinstance(carrier.get(field), dict):
                carrier[field] = {**carrier[field], **value}
            else:
                carrier[field] = value
    publisher.partitions = 3
    r = await client.post("/v1/events", json={"events": [NORMAL, carrier, NORMAL]}, headers=PRODUCER)
    assert r.status_code == 202, r.text
    sent = all_bytes(publisher)
    for _, _, secrets in CASES:
        for secret in secrets:
            assert secret.encode() not in sent and secret not in r.text


async def test_a_credential_in_a_tag_is_named_in_the_warnings(client, publisher):
    event = {**base("req_1"), "metadata": {"tags": ["team:platform", f"pwd:{PASSWORD}"]}}
    r = await client.post("/v1/events", json=event, headers=PRODUCER)
    assert r.status_code == 202
    ((warning,),) = [w["problems"] for w in r.json()["warnings"]]
    assert warning["reason"] == "secret_redacted" and PASSWORD not in r.text


async def test_secret_identifiers_get_stable_distinct_stand_ins(client, publisher):
    """The join (request + usage by request_id) and the dedupe (by event_id) still work."""
    events = [
        {"kind": "request", "request_id": STRIPE, "event_id": GITLAB + "a", "model": "gpt-4o"},
        {"kind": "usage", "request_id": STRIPE, "event_id": GITLAB + "b", "usage": {"input_tokens": 5}},
        {"kind": "usage", "request_id": STRIPE_TEST, "event_id": GITLAB + "b", "usage": {"input_tokens": 5}},
    ]
    r = await client.post("/v1/events", json={"events": events}, headers=PRODUCER)
    assert r.status_code == 202
    request, usage, other = published(publisher)
    assert request["request_id"] == usage["request_id"] != other["request_id"]
    assert request["event_id"] != usage["event_id"] == other["event_id"]
    assert request["request_id"].startswith("redacted-") and request["event_id"].startswith("redacted-")
    assert r.json()["event_ids"] == [request["event_id"], usage["event_id"], other["event_id"]]
    assert [key for _, key, _ in publisher.sent] == [
        e["request_id"].encode() for e in (request, usage, other)
    ]
    assert STRIPE.encode() not in all_bytes(publisher)

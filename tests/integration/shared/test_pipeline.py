"""HTTP -> Kafka (Tansu) -> Faust worker -> ClickHouse (chDB), through the real parts."""

import uuid
from decimal import Decimal
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer

pytestmark = pytest.mark.integration


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def rows_for(ledger, request_ids, columns="request_id, cost_usd"):
    ids = ",".join(f"'{r}'" for r in request_ids)
    return f"SELECT {columns} FROM spend_records WHERE request_id IN ({ids}) ORDER BY request_id"


def test_seed_events_land_attributed_with_exact_costs(ledger):
    r1, r2, r3 = uid("seed0"), uid("seed1"), uid("seed1")
    events = [
        {  # seed 000, method 1: AnyAPI headers
            "kind": "completed",
            "request_id": r1,
            "model": "openai/gpt-4o",
            "headers": {
                "X-AnyAPI-App-ID": "my-chatbot-v2",
                "X-AnyAPI-App-Name": "Customer Support Bot",
                "X-AnyAPI-App-Version": "2.1.0",
                "X-AnyAPI-User-ID": "user_12345",
                "X-AnyAPI-Session-ID": "session_abc123",
            },
            "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
        },
        {  # seed 001: metadata.tags + spend_logs_metadata, Anthropic usage with cache
            "kind": "completed",
            "request_id": r2,
            "body": {
                "model": "anthropic/claude-3-5-sonnet-20241022",
                "metadata": {
                    "tags": ["app:bi-tool", "env:production"],
                    "spend_logs_metadata": {
                        "project": "q4-sales-analysis",
                        "department": "marketing",
                        "version": "1.5.2",
                    },
                },
            },
            "usage": {
                "input_tokens": 100,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 200,
                "output_tokens": 50,
            },
        },
        {  # seed 001: litellm headers and the user parameter
            "kind": "completed",
            "request_id": r3,
            "model": "gpt-4o",
            "provider": "openai",
            "user": "customer_54321",
            "headers": {
                "x-litellm-tags": "app:my-chatbot,env:prod",
                "x-litellm-spend-logs-metadata": '{"project": "q4-analysis"}',
            },
            "usage": {"input_tokens": 2000, "output_tokens": 0, "cache_read_tokens": 2000},
        },
    ]
    assert ledger.send({"events": events}).status_code == 202
    cols = "request_id, app_id, app_name, app_version, user_id, session_id, team, project, environment, provider, model, input_tokens, cache_read_tokens, cache_write_tokens, cost_usd, price_source, tags"
    rows = ledger.wait_for(rows_for(ledger, [r1, r2, r3], cols), lambda rows: len(rows) == 3)
    by_id = {row[0]: row for row in rows}
    assert by_id[r1][1:] == [
        "my-chatbot-v2",
        "Customer Support Bot",
        "2.1.0",
        "user_12345",
        "session_abc123",
        "",
        "",
        "",
        "openai",
        "gpt-4o",
        1000,
        0,
        0,
        "0.004500000000",
        "catalog",
        ["app:my-chatbot-v2", "user:user_12345", "version:2.1.0"],
    ]
    # 100*3 + 1000*0.3 + 200*3.75 + 50*15 = 2100 / 1e6
    assert by_id[r2][1:] == [
        "bi-tool",
        "",
        "1.5.2",
        "",
        "",
        "marketing",
        "q4-sales-analysis",
        "production",
        "anthropic",
        "claude-3-5-sonnet-20241022",
        1300,
        1000,
        200,
        "0.002100000000",
        "catalog",
        ["app:bi-tool", "env:production", "project:q4-sales-analysis", "team:marketing", "version:1.5.2"],
    ]
    # 2000 cached * 1.25 / 1e6
    assert by_id[r3][1] == "my-chatbot" and by_id[r3][4] == "customer_54321" and by_id[r3][8] == "production"
    assert by_id[r3][14] == "0.002500000000"


def test_same_event_twice_lands_once(ledger):
    rid = uid("dup")
    event = {
        "kind": "completed",
        "request_id": rid,
        "model": "openai/gpt-4o",
        "usage": {"input_tokens": 1000, "output_tokens": 200},
    }
    first = ledger.send(event).json()["event_ids"]
    second = ledger.send(event).json()["event_ids"]  # a retry without an event_id: same default id
    third = ledger.send(dict(event, event_id=first[0])).json()["event_ids"]
    assert first == second == third
    marker = uid("marker")
    ledger.send(
        {"kind": "completed", "request_id": marker, "model": "openai/gpt-4o", "usage": {"input_tokens": 1}}
    )
    ledger.wait_for(rows_for(ledger, [marker]), lambda rows: len(rows) == 1)
    rows = ledger.sql(f"SELECT count(), sum(cost_usd) FROM spend_records WHERE request_id = '{rid}'")
    assert rows == [[1, "0.004500000000"]]


def test_split_request_and_usage_join_into_one_row(ledger):
    rid = uid("split")
    request = {
        "kind": "request",
        "request_id": rid,
        "model": "openai/gpt-4o",
        "body": {
            "messages": [{"role": "user", "content": "hello"}],
            "metadata": {"app_id": "data-analyzer", "department": "marketing", "environment": "stg"},
        },
    }
    usage = {
        "kind": "usage",
        "request_id": rid,
        "usage": {"input_tokens": 400, "output_tokens": 100},
        "latency_ms": 840.4,
        "http_status": 200,
    }
    assert ledger.send(usage).status_code == 202  # usage first: the join waits for its request
    assert ledger.send(request).status_code == 202
    cols = "count(), any(app_id), any(team), any(environment), any(join_kind), any(cost_usd), any(latency_ms), any(status)"
    rows = ledger.wait_for(
        f"SELECT {cols} FROM spend_records WHERE request_id = '{rid}'", lambda rows: rows[0][0] >= 1
    )
    # 400*2.5/1e6 + 100*10/1e6 = 0.001 + 0.001
    assert rows == [[1, "data-analyzer", "marketing", "staging", "joined", "0.002000000000", 840, "success"]]


def test_batch_of_500_lands_with_exact_total(ledger):
    prefix = uid("b500")
    events = []
    expected = Decimal(0)
    for i in range(500):
        tokens_in, tokens_out = 1000 + i * 7, 50 + i
        events.append(
            {
                "kind": "completed",
                "request_id": f"{prefix}_{i}",
                "model": "openai/gpt-4o-mini",
                "headers": {"X-AnyAPI-App-ID": "batch-app"},
                "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
            }
        )
        # gpt-4o-mini: $0.15/MTok in, $0.60/MTok out
        expected += (Decimal(tokens_in) * Decimal("0.15") + Decimal(tokens_out) * Decimal("0.60")) / Decimal(
            1_000_000
        )
    r = ledger.send({"events": events})
    assert r.status_code == 202 and r.json()["accepted"] == 500
    query = f"SELECT count(), sum(cost_usd) FROM spend_records WHERE startsWith(request_id, '{prefix}_')"
    rows = ledger.wait_for(query, lambda rows: rows[0][0] == 500)
    assert Decimal(rows[0][1]) == expected


def test_unknown_model_lands_unpriced(ledger):
    rid = uid("unknown")
    ledger.send(
        {
            "kind": "completed",
            "request_id": rid,
            "model": "acme/not-a-real-model",
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
    )
    rows = ledger.wait_for(
        rows_for(ledger, [rid], "cost_usd, price_source, input_tokens"), lambda rows: len(rows) == 1
    )
    assert rows == [[None, "unpriced", 10]]


def test_request_without_usage_becomes_incomplete(ledger):
    rid = uid("lonely")
    ledger.send(
        {
            "kind": "request",
            "request_id": rid,
            "model": "openai/gpt-4o",
            "headers": {"X-AnyAPI-App-ID": "lonely-app"},
        }
    )
    rows = ledger.wait_for(
        rows_for(ledger, [rid], "status, join_kind, app_id, cost_usd"),
        lambda rows: len(rows) == 1,
        timeout=60,
    )
    assert rows == [["incomplete", "request_only", "lonely-app", None]]


def test_poison_message_goes_to_rejects_and_pipeline_continues(ledger):
    topic = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"] + "spend.raw"
    producer = Producer({"bootstrap.servers": ledger.bootstrap})
    placed: set[tuple[int, int]] = set()

    def delivered(err: object, msg: Any) -> None:
        placed.add((msg.partition(), msg.offset()))

    producer.produce(topic, key=b"poison", value=b"\x00\x01 not json", on_delivery=delivered)
    producer.produce(topic, key=b"poison2", value=orjson.dumps({"kind": "usage"}), on_delivery=delivered)
    producer.flush(10)
    assert len(placed) == 2
    rid = uid("after-poison")
    ledger.send(
        {"kind": "completed", "request_id": rid, "model": "openai/gpt-4o", "usage": {"input_tokens": 1}}
    )
    ledger.wait_for(rows_for(ledger, [rid]), lambda rows: len(rows) == 1)
    query = f"SELECT partition, offset, reason FROM spend_rejects WHERE source_topic = '{topic}'"
    rows = ledger.wait_for(
        query, lambda rows: len([r for r in rows if (int(r[0]), int(r[1])) in placed]) == 2
    )
    assert all(r[2].startswith("invalid raw event") for r in rows if (int(r[0]), int(r[1])) in placed)


def test_no_credential_reaches_kafka_or_clickhouse(ledger):
    rid = uid("secret")
    secrets = ["sk-proj-abcdefghijklmnopqrstuvwxyz0123", "hunter2-password", "AKIAABCDEFGHIJKLMNOP"]
    event = {
        "kind": "completed",
        "request_id": rid,
        "model": "openai/gpt-4o",
        "headers": {
            "Authorization": f"Bearer {secrets[0]}",
            "X-AnyAPI-App-ID": "sec-app",
            "x-api-key": secrets[0],
        },
        "metadata": {"password": secrets[1], "note": secrets[2], "tags": [f"team:{secrets[0]}"]},
        "body": {
            "messages": [{"role": "user", "content": secrets[1]}],
            "metadata": {"spend_logs_metadata": {"api_key": secrets[1]}},
        },
        "usage": {"input_tokens": 10, "output_tokens": 1},
    }
    assert ledger.send(event).status_code == 202
    rows = ledger.wait_for(
        f"SELECT * FROM spend_records WHERE request_id = '{rid}'", lambda rows: len(rows) == 1
    )
    stored = orjson.dumps(rows).decode()
    assert "sec-app" in stored
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    consumer = Consumer(
        {"bootstrap.servers": ledger.bootstrap, "group.id": uid("audit"), "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([f"{prefix}spend.raw", f"{prefix}spend.attributed", f"{prefix}spend.tag-spend"])
    seen = b""
    found_raw = found_attributed = False
    for _ in range(60):
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is None and msg.key() == rid.encode():
                seen += msg.value()
                found_raw |= msg.topic().endswith("spend.raw")
                found_attributed |= msg.topic().endswith("spend.attributed")
        if found_raw and found_attributed:
            break
    consumer.close()
    assert found_raw and found_attributed
    logs = "".join(p.read_text(errors="replace") for p in ledger.system.log_dir.glob("*.log"))
    keys = [ledger.system.producer_key, ledger.system.admin_key]
    for secret in secrets + keys:
        assert secret not in stored, secret
        assert secret.encode() not in seen, secret
        assert secret not in logs, secret  # the API, worker and broker logs


def placements(bootstrap: str, topic: str, keys: list[bytes], **config: str) -> dict[bytes, int]:
    """Where a confluent-kafka producer (with `config`) puts each key on the real broker."""
    placed: dict[bytes, int] = {}
    producer = Producer({"bootstrap.servers": bootstrap, **config})
    for key in keys:
        producer.produce(
            topic, key=key, value=b"x", on_delivery=lambda e, m: placed.update({m.key(): m.partition()})
        )
    producer.flush(10)
    return placed


def test_a_batch_travels_in_bundles_placed_where_librdkafka_puts_each_event(ledger):
    import asyncio

    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from ingest.publisher import KafkaPublisher
    from schemas.partitions import librdkafka_partition as partition_of

    # librdkafka's default partitioner, on the real broker, is what the API groups by.
    scratch = uid("partitions")
    admin = AdminClient({"bootstrap.servers": ledger.bootstrap})
    admin.create_topics([NewTopic(scratch, 4, 1)])[scratch].result(10)
    placed = placements(ledger.bootstrap, scratch, [f"req-{i}".encode() for i in range(200)])
    assert len(placed) == 200 and len(set(placed.values())) == 4
    assert placed == {key: partition_of(key, 4) for key in placed}
    # The worker's producer (murmur2, as the Java client and Faust) is what spend bundles group by.
    from schemas.bundles import tag_partition

    keys = [f"team:t{i}".encode() for i in range(200)]
    tagged = placements(ledger.bootstrap, scratch, keys, partitioner="murmur2_random")
    assert len(tagged) == 200 and tagged == {key: tag_partition(key.decode(), 4) for key in tagged}
    publisher = KafkaPublisher({"bootstrap.servers": ledger.bootstrap}, timeout_s=5)
    assert asyncio.run(publisher.partition_count(scratch)) == 4
    publisher.close()

    # A batch through the API: one message per partition, every event landed once.
    run = uid("bundle")
    batch = [
        {
            "kind": "completed",
            "request_id": f"{run}-{i}",
            "model": "openai/gpt-4o",
            "usage": {"input_tokens": 10},
        }
        for i in range(300)
    ]
    assert ledger.send({"events": batch}).status_code == 202
    topic = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"] + "spend.raw"
    consumer = Consumer({"bootstrap.servers": ledger.bootstrap, "group.id": uid("reader")})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
    bundles: dict[int, list[str]] = {}
    for _ in range(30):
        for msg in consumer.consume(1000, 0.5):
            if msg.error() is None and msg.key().decode().startswith(run):
                data = orjson.loads(msg.value())
                bundles[msg.partition()] = [e["request_id"] for e in data.get("events", [data])]
        if sum(map(len, bundles.values())) == 300:
            break
    consumer.close()
    assert len(bundles) == 4 and sum(map(len, bundles.values())) == 300
    for partition, members in bundles.items():
        assert {partition_of(r.encode(), 4) for r in members} == {partition}
    rows = ledger.wait_for(
        f"SELECT count(), uniqExact(request_id) FROM spend_records WHERE request_id LIKE '{run}-%'",
        lambda rows: rows[0][0] >= 300,
    )
    assert rows == [[300, 300]]

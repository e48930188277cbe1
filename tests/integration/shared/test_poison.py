"""Poison on every input topic: malformed bytes and schema-violating JSON become rejects with a reason; nothing stops."""

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from tests.integration.conftest import Ledger

pytestmark = pytest.mark.integration

POISON = {
    "bytes": b"\x00\xff not json at all",
    "schema": orjson.dumps({"kind": "completed", "request_id": 42, "usage": "lots"}),
    "truncated": b'{"kind": "completed", "request_id": "r',
}


def test_poison_on_raw_attributed_and_budgets_is_rejected_with_reasons_and_the_pipeline_goes_on(
    ledger: Ledger,
) -> None:
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    run = f"poison-{uuid.uuid4().hex[:8]}"
    body = {"kind": "completed", "model": "openai/gpt-4o", "usage": {"input_tokens": 1000}}

    def land(request_id: str, **extra: object) -> float:
        """Send one valid call; seconds until its row is in ClickHouse."""
        sent_at = time.monotonic()
        assert ledger.send({**body, "request_id": request_id, **extra}).status_code == 202
        query = f"SELECT count() FROM spend_records WHERE request_id = '{request_id}'"
        ledger.wait_for(query, lambda r: r[0][0] == 1, timeout=30)
        return time.monotonic() - sent_at

    land(f"{run}-warm-up")
    before_s = land(f"{run}-before")
    producer = Producer({"bootstrap.servers": ledger.bootstrap})
    topics = [f"{prefix}spend.raw", f"{prefix}spend.attributed", f"{prefix}spend.budgets"]
    placed: set[tuple[str, int, int]] = set()  # where each poison message went: its rejects say so
    for topic in topics:
        for name, value in POISON.items():
            producer.produce(
                topic,
                key=f"{run}-{name}".encode(),
                value=value,
                on_delivery=lambda err, msg: placed.add((msg.topic(), msg.partition(), msg.offset())),
            )
    producer.flush(10)
    assert len(placed) == len(topics) * len(POISON)

    # A valid call and a valid budget right behind the poison still go through.
    after_s = land(run, headers={"x-litellm-tags": f"team:{run}"})
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}
    r = ledger.http.post(
        "/tag/new", json={"name": f"team:{run}", "max_budget": 1, "budget_duration": "1d"}, headers=admin
    )
    assert r.status_code == 200, r.text
    info = ledger.http.get("/tag/info", params={"names": f"team:{run}"}, headers=admin).json()[f"team:{run}"]
    assert info["spend"] == 0.0025  # 1000 input tokens of gpt-4o, counted despite the poison before it

    # Other modules of this system send poison too: only the rejects of these messages count.
    query = f"SELECT source_topic, partition, offset, reason FROM spend_rejects WHERE startsWith(source_topic, '{prefix}')"

    def mine() -> list[tuple[str, str]]:
        return [(t, reason) for t, p, o, reason in ledger.sql(query) if (t, int(p), int(o)) in placed]

    rejects = ledger.wait_for(query, lambda _: len(mine()) >= 12)
    assert rejects
    by_topic: dict[str, list[str]] = {}
    for topic, reason in mine():
        by_topic.setdefault(topic, []).append(reason)
    assert len(by_topic[topics[0]]) == 3 and all(
        r.startswith("invalid raw event") for r in by_topic[topics[0]]
    )
    assert len(by_topic[topics[1]]) == 3 and all(
        r.startswith("sink cannot decode") for r in by_topic[topics[1]]
    )
    # A bad budget definition is refused by the budget agent (dead letter) and by the sink.
    assert len(by_topic[topics[2]]) == 6
    assert any(r.startswith("invalid budget definition") for r in by_topic[topics[2]])
    # Reported in docs/reliability.md (a figure, not an assertion: timing belongs in benchmarks).
    print(f"a valid call landed in {before_s:.2f} s before the poison, {after_s:.2f} s right after it")


def test_poison_values_beside_valid_events_are_rejected_alone_and_the_valid_ones_land(ledger: Ledger) -> None:
    """Values the API refuses, written straight to spend.raw and spend.attributed by another producer, in
    the same messages as valid events (DESIGN §9.7). Before: a year-1 or year-9999 record stopped the sink
    for everyone (OverflowError, retried forever); a 1e16 reported cost crashed the ledger agent and the
    valid events of its message were committed past and lost."""
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    run = f"values-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    producer = Producer({"bootstrap.servers": ledger.bootstrap})

    def event(name: str, **extra: object) -> dict[str, object]:
        at = now.isoformat()
        return {
            "kind": "completed",
            "request_id": f"{run}-{name}",
            "event_id": f"{run}-{name}",
            "model": "acme/unpriced",
            "usage": {"input_tokens": 10},
            "occurred_at": at,
            "received_at": at,
            **extra,
        }

    raw_poison = {
        "year-1": {"occurred_at": "0001-01-01T00:00:00Z"},
        "year-9999": {"occurred_at": "9999-12-31T23:59:59Z"},
        "cost-1e16": {"reported_cost_usd": 1e16},
        "tokens-1e11": {"usage": {"input_tokens": 10**11}},
        "epoch-number": {"occurred_at": int(now.timestamp())},  # the schema reads it; the ledger does not
    }
    valid = [event(f"ok-{i}") for i in range(5)]
    bundle = [
        *valid[:2],
        event("year-1", **raw_poison["year-1"]),
        *valid[2:],
        event("cost-1e16", **raw_poison["cost-1e16"]),
    ]
    raw = f"{prefix}spend.raw"
    producer.produce(raw, key=f"{run}-bundle".encode(), value=orjson.dumps({"events": bundle}))
    for name in ("year-9999", "tokens-1e11", "epoch-number"):
        producer.produce(
            raw, key=f"{run}-{name}".encode(), value=orjson.dumps(event(name, **raw_poison[name]))
        )

    # Records as another producer may write them to spend.attributed: dated where ClickHouse cannot
    # store them, or with a cost its Decimal(38, 12) column refuses; valid ones beside.
    def record(name: str, **extra: object) -> bytes:
        at = now.isoformat()
        fields = {
            "event_id": f"{run}-{name}",
            "request_id": f"{run}-{name}",
            "occurred_at": at,
            "received_at": at,
        }
        return orjson.dumps({**fields, **extra})

    attributed = f"{prefix}spend.attributed"
    records = {
        "rec-ok-1": record("rec-ok-1", cost_usd="0.5"),
        "rec-year-1": record("rec-year-1", occurred_at="0001-01-01T00:00:00Z"),
        "rec-year-9999": record("rec-year-9999", occurred_at="9999-12-31T23:59:59Z"),
        "rec-cost-1e30": record("rec-cost-1e30", cost_usd="1e30"),
        "rec-ok-2": record("rec-ok-2", cost_usd="0.25"),
    }
    for name, value in records.items():
        producer.produce(attributed, key=name.encode(), value=value, partition=0)
    producer.flush(10)

    landed = ledger.wait_for(
        f"SELECT request_id FROM spend_records WHERE startsWith(request_id, '{run}') ORDER BY request_id",
        lambda rows: len(rows) >= 7,
    )
    assert [r[0] for r in landed] == sorted(
        [f"{run}-ok-{i}" for i in range(5)] + [f"{run}-rec-ok-1", f"{run}-rec-ok-2"]
    )
    poison = [*raw_poison, "rec-year-1", "rec-year-9999", "rec-cost-1e30"]
    rejects = ledger.wait_for(
        f"SELECT source_topic, reason, payload FROM spend_rejects WHERE position(payload, '{run}') > 0",
        lambda rows: len(rows) >= len(poison),
    )
    reasons: dict[str, tuple[str, str]] = {}
    for topic, reason, payload in rejects:
        (name,) = [n for n in poison if f'"{run}-{n}"' in payload]
        assert name not in reasons, f"{name} rejected twice"
        reasons[name] = (topic, reason)
    assert set(reasons) == set(poison)
    for name in raw_poison:
        assert reasons[name][0] == raw
    assert reasons["year-1"][1].startswith("invalid raw event") and "2000-01-01" in reasons["year-1"][1]
    assert reasons["year-9999"][1].startswith("invalid raw event") and "skew" in reasons["year-9999"][1]
    assert (
        reasons["cost-1e16"][1].startswith("invalid raw event")
        and "reported_cost_usd" in reasons["cost-1e16"][1]
    )
    assert reasons["tokens-1e11"][1].startswith("invalid raw event") and "usage" in reasons["tokens-1e11"][1]
    assert reasons["epoch-number"][1].startswith("cannot attribute")
    assert reasons["rec-year-1"] == (attributed, reasons["rec-year-1"][1])
    assert reasons["rec-year-1"][1].startswith("sink cannot land: occurred_at")
    assert reasons["rec-year-9999"][1].startswith("sink cannot land: occurred_at")
    assert reasons["rec-cost-1e30"][1].startswith("ClickHouse refused the spend_records row")
    # The pipeline goes on: a call through the API right after lands.
    assert ledger.send({**event("after"), "occurred_at": None, "received_at": None}).status_code == 202
    ledger.wait_for(
        f"SELECT count() FROM spend_records WHERE request_id = '{run}-after'", lambda r: r[0][0] == 1
    )
    r = ledger.http.get("/readyz")
    assert "stuck" not in r.json(), r.text
    r = httpx.get(f"http://{ledger.system.host}:{ledger.system.sink_port}/readyz")
    assert r.json() == {"status": "ok"}, r.text
    # The relay's token is in the environment of the API and the sink, and no other process's.
    environs = {
        name: Path(f"/proc/{child.pid}/environ").read_bytes()
        for name, child in ledger.system.children.items()
    }
    holders = {
        name
        for name, env in environs.items()
        if b"SPENDLEDGER_CLICKHOUSE_RELAY=" in env or b"relay://" in env
    }
    assert holders == {"api", "sink"}, holders

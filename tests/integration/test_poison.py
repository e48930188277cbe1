"""Poison on every input topic: malformed bytes and schema-violating JSON become rejects with a reason; nothing stops."""

import time
import uuid

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
    for topic in topics:
        for name, value in POISON.items():
            producer.produce(topic, key=f"{run}-{name}".encode(), value=value)
    producer.flush(10)

    # A valid call and a valid budget right behind the poison still go through.
    after_s = land(run, headers={"x-litellm-tags": f"team:{run}"})
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}
    r = ledger.http.post(
        "/tag/new", json={"name": f"team:{run}", "max_budget": 1, "budget_duration": "1d"}, headers=admin
    )
    assert r.status_code == 200, r.text
    info = ledger.http.get("/tag/info", params={"names": f"team:{run}"}, headers=admin).json()[f"team:{run}"]
    assert info["spend"] == 0.0025  # 1000 input tokens of gpt-4o, counted despite the poison before it

    rejects = ledger.wait_for(
        f"SELECT source_topic, reason FROM spend_rejects WHERE startsWith(source_topic, '{prefix}') "
        "AND source_topic != '' ORDER BY source_topic",
        lambda rows: {t for t, _ in rows} >= set(topics) and len(rows) >= 9,
    )
    by_topic: dict[str, list[str]] = {}
    for topic, reason in rejects:
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

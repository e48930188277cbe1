"""The rollups stay exactly equal to spend_records: through the sink's replays and a late back-fill (real chDB)."""

import datetime as dt
import random
from decimal import Decimal
from typing import Any

from processors.sink import ClickHouseStore, Landing
from schemas.clickhouse import migrations
from schemas.records import AttributedRecord

DAY = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
TOTALS = """
SELECT toDate(occurred_at) AS day, app_id, model, count(), sum(ifNull(cost_usd, 0)), countIf(cost_usd IS NULL),
       sum(input_tokens), sum(output_tokens)
FROM spend_records GROUP BY day, app_id, model ORDER BY day, app_id, model
"""
ROLLUP = """
SELECT day, app_id, model, sum(requests), sum(cost_usd), sum(unpriced_requests), sum(input_tokens),
       sum(output_tokens)
FROM spend_daily GROUP BY day, app_id, model ORDER BY day, app_id, model
"""
TAG_TOTALS = """
SELECT toDate(occurred_at) AS day, tag, count(), sum(ifNull(cost_usd, 0))
FROM spend_records ARRAY JOIN tags AS tag GROUP BY day, tag ORDER BY day, tag
"""
TAG_ROLLUP = (
    "SELECT day, tag, sum(requests), sum(cost_usd) FROM spend_daily_tags GROUP BY day, tag ORDER BY day, tag"
)


def records(n: int, seed: int) -> list[AttributedRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = DAY + dt.timedelta(hours=rng.randrange(72), milliseconds=rng.randrange(3_600_000))
        team = rng.choice(["support", "search", ""])
        priced = rng.random() > 0.1
        out.append(
            AttributedRecord(
                event_id=f"e{seed}-{i}",
                request_id=f"r{seed}-{i}",
                occurred_at=at,
                received_at=at,
                app_id=rng.choice(["chat", "search"]),
                team=team,
                tags=sorted({f"team:{team}", "env:production"} - {"team:"}),
                model=rng.choice(["gpt-4o", "claude-haiku-4-5"]),
                input_tokens=rng.randrange(5000),
                output_tokens=rng.randrange(500),
                cost_usd=Decimal(rng.randrange(1, 10**9)) / Decimal(10**12) if priced else None,
                price_source="catalog" if priced else "unpriced",
                latency_ms=rng.randrange(50, 3000),
            )
        )
    return out


def land(store: ClickHouseStore, batch: list[AttributedRecord], offset: int) -> None:
    store.land(Landing(records=batch, next_offsets={("spend.attributed", 0): offset}), "sink")


def assert_rollups_equal_records(client: Any) -> None:
    assert client.query(ROLLUP).result_rows == client.query(TOTALS).result_rows
    assert client.query(TAG_ROLLUP).result_rows == client.query(TAG_TOTALS).result_rows


def test_a_replayed_batch_changes_neither_the_records_nor_the_rollups(clickhouse):
    client = clickhouse()
    store = ClickHouseStore(client)
    first, second = records(300, 1), records(200, 2)
    land(store, first, 300)
    land(store, second, 500)
    land(store, first, 300)  # the sink crashed before committing: the same batch, the same token
    land(store, second, 500)
    assert client.query("SELECT count() FROM spend_records").result_rows == [(500,)]
    assert_rollups_equal_records(client)
    total = sum((r.cost_usd or Decimal(0) for r in first + second), Decimal(0))
    assert client.query("SELECT sum(cost_usd) FROM spend_daily").result_rows == [(total,)]
    client.command("OPTIMIZE TABLE spend_daily FINAL")  # after the background merge: still equal
    assert_rollups_equal_records(client)


def test_rollups_created_after_records_landed_are_back_filled_once(clickhouse):
    client = clickhouse(migrated=False)
    for name, statements in migrations():
        if name < "006":
            for statement in statements:
                client.command(statement)
    store = ClickHouseStore(client)
    land(store, records(150, 3), 150)  # before the rollups exist

    from spendledger.platform.clickhouse import migrate

    migrate(client)
    migrate(client)  # a second start must not back-fill again
    land(store, records(50, 4), 200)
    assert client.query("SELECT sum(requests) FROM spend_daily").result_rows == [(200,)]
    assert_rollups_equal_records(client)


def test_the_replay_lookup_finds_ids_past_clickhouses_query_size_limit(clickhouse):
    """3,000 ids of 200 characters: one `IN` list would be 600 KB, over ClickHouse's 256 KiB query limit."""
    client = clickhouse()
    store = ClickHouseStore(client)
    batch = [
        r.model_copy(update={"event_id": f"{i:04d}" + "e" * 196}) for i, r in enumerate(records(3000, seed=3))
    ]
    land(store, batch, 0)
    ids = [r.event_id for r in batch]
    start = min(r.occurred_at for r in batch) - dt.timedelta(seconds=1)
    end = max(r.occurred_at for r in batch) + dt.timedelta(seconds=1)
    assert store.existing_event_ids([*ids, "never-landed"], start, end) == set(ids)


def test_budget_keys_and_time_in_sql_are_the_budget_agents(clickhouse):
    """`BUDGET_KEYS_SQL`/`SPEND_TIME_SQL` (the ledger_spend of /tag/info, the restore) name the same keys and
    time as `ledger.budgets.budget_keys`/`spend_time` (the budget agent), for odd models and tags too."""
    from ledger.budgets import budget_keys, spend_time
    from schemas.clickhouse import BUDGET_KEYS_SQL, SPEND_TIME_SQL

    client = clickhouse()
    store = ClickHouseStore(client)
    cases = [
        (["team:a", "env:production"], "gpt-4o", "openai"),
        ([], "openai/GPT-4o", "openrouter"),
        (["model:gpt-4o"], "GPT-4o", "openai"),  # a caller's own label is not counted twice
        (["provider:openai"], " meta-llama/Llama-3.1-8B ", "openai"),
        ([], "", ""),
        (["x"], "Modèle-Ünïcode", "self-hosted"),
    ]
    batch = [
        AttributedRecord(
            event_id=f"k{i}",
            request_id=f"k{i}",
            occurred_at=DAY + dt.timedelta(hours=9),  # stamped ahead; received earlier
            received_at=DAY + dt.timedelta(seconds=i),
            tags=tags,
            model=model,
            provider=provider,
            cost_usd=Decimal("0.5"),
        )
        for i, (tags, model, provider) in enumerate(cases)
    ]
    land(store, batch, 1)
    rows = client.query(
        f"SELECT event_id, {BUDGET_KEYS_SQL}, toUnixTimestamp64Milli({SPEND_TIME_SQL}) FROM spend_records "  # noqa: S608
        "WHERE startsWith(event_id, 'k') ORDER BY event_id"
    ).result_rows
    for record, (event_id, keys, at) in zip(batch, rows, strict=True):
        assert event_id == record.event_id
        assert list(keys) == budget_keys(record.tags, record.model, record.provider), record
        occurred, received = (int(t.timestamp() * 1000) for t in (record.occurred_at, record.received_at))
        assert at == spend_time(occurred, received)

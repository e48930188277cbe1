from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.clickhouse import migrations, split_statements
from schemas.events import EventBatch, RawEvent
from schemas.records import AttributedRecord
from schemas.topics import Topics


def test_split_statements():
    sql = "-- c\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n\n-- d\nCREATE TABLE b (y UInt8)\nENGINE = Memory;\n"
    assert split_statements(sql) == [
        "CREATE TABLE a (x UInt8) ENGINE = Memory",
        "CREATE TABLE b (y UInt8)\nENGINE = Memory",
    ]


def test_ddl_has_the_contract_tables_and_columns():
    ddl = "\n".join(s for _, statements in migrations() for s in statements)
    for table in ("spend_records", "spend_rejects", "budget_events", "tag_budgets", "sink_offsets"):
        assert f"CREATE TABLE IF NOT EXISTS {table}" in ddl
    for column in AttributedRecord.model_fields:
        assert f"\n    {column} " in ddl, column
    assert "cost_usd            Nullable(Decimal(38, 12))" in ddl
    assert "Float" not in ddl  # money is never Float


def test_topics_prefix():
    t = Topics("test1.")
    assert t.raw == "test1.spend.raw" and t.budget_blocks == "test1.spend.budget-blocks"
    assert t.all()[t.budget_blocks] is True and t.all()[t.raw] is False


@pytest.mark.parametrize(
    "event",
    [
        {"kind": "completed"},
        {"kind": "other", "request_id": "r"},
        {"kind": "usage", "request_id": "has space"},
        {"kind": "usage", "request_id": "r", "occurred_at": "2026-11-22T10:00:00"},
        {"kind": "usage", "request_id": "r", "reported_cost_usd": -1},
    ],
)
def test_invalid_events(event):
    with pytest.raises(ValidationError):
        RawEvent.model_validate(event)


def test_batch_limit():
    with pytest.raises(ValidationError):
        EventBatch.model_validate(
            {"events": [{"kind": "completed", "request_id": f"r{i}"} for i in range(1001)]}
        )


def test_sql_table_rendering():
    from spendledger.cli import render

    assert render(["app_id", "cost_usd"], [["a", "0.1"], ["bb", None]], "table") == (
        "app_id | cost_usd\n-------+---------\na      | 0.1     \nbb     | NULL    \n(2 rows)"
    )
    assert render(["a"], [[1]], "csv") == "a\n1"


@pytest.mark.parametrize(
    "field",
    [
        {"metadata": {"n": [2**64]}},
        {"usage": {"input_tokens": -(2**63) - 1}},
        {"body": {"metadata": {"deep": {"x": 10**30}}}},
        {"user": 2**70},
    ],
)
def test_integers_beyond_64_bits_are_refused_at_the_door(field):
    """Found by fuzzing: Kafka's JSON encoder (orjson) cannot write them, which became a 500."""
    with pytest.raises(ValueError, match="64 bits"):
        RawEvent.model_validate({"kind": "completed", "request_id": "r1", **field})


def test_a_huge_integer_in_metadata_is_still_a_readable_label():
    from ledger.tags import AttributionPolicy, normalize

    result = normalize(metadata=[{"note": [2**70]}], policy=AttributionPolicy())
    assert result.metadata["note"] == f"[{2**70}]"


BASE = {"kind": "completed", "request_id": "r1"}
NOW = datetime(2026, 11, 22, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    "field, ok",
    [
        ({"occurred_at": "2000-01-01T00:00:00Z"}, True),
        ({"occurred_at": "1999-12-31T23:59:59.999Z"}, False),
        ({"received_at": "0001-01-01T00:00:00Z"}, False),
        ({"occurred_at": "2026-11-22T10:05:00Z"}, True),  # the skew exactly
        ({"occurred_at": "2026-11-22T10:05:00.001Z"}, False),
        ({"occurred_at": "9999-12-31T23:59:59-01:00"}, False),
        ({"received_at": "2026-11-22T11:00:00Z"}, False),
        ({"reported_cost_usd": "1000000000"}, True),
        ({"reported_cost_usd": "1000000000.000000000001"}, False),
        ({"usage": {"input_tokens": 10**10, "nested": [{"n": -(10**10)}]}}, True),
        ({"usage": {"input_tokens": 10**10 + 1}}, False),
        ({"usage": {"details": [{"tokenCount": 1e11}]}}, False),
    ],
)
def test_bounds_of_times_costs_and_token_counts(field, ok):
    """Times from 2000 to the skew after `now` (the caller's clock), a billion dollars, ten billion tokens."""
    from schemas.events import time_bounds

    context = time_bounds(NOW, 300)
    if ok:
        RawEvent.model_validate({**BASE, **field}, context=context)
    else:
        with pytest.raises(ValidationError) as refused:
            RawEvent.model_validate({**BASE, **field}, context=context)
        assert [e["loc"] for e in refused.value.errors()] == [(next(iter(field)),)]


def test_without_a_clock_only_the_floor_bounds_times():
    RawEvent.model_validate({**BASE, "occurred_at": "9999-12-31T23:59:59Z"})
    with pytest.raises(ValidationError):
        RawEvent.model_validate({**BASE, "occurred_at": "0001-01-01T00:00:00Z"})


def test_a_reject_reason_names_the_field_and_rule_never_the_input():
    from processors.deadletter import describe

    with pytest.raises(ValidationError) as refused:
        RawEvent.model_validate(
            {**BASE, "occurred_at": "1970-01-01T00:00:00Z", "reported_cost_usd": "sk-secret"}
        )
    reason = describe(refused.value)
    assert reason == "ValidationError: occurred_at: must not be before 2000-01-01T00:00:00Z (and 1 more)"


def test_the_worker_skips_the_integer_walk_only_for_what_orjson_decoded() -> None:
    """orjson reads an integer outside 64 bits as a float, so the worker's data cannot hold one; data
    from elsewhere is still walked."""
    import orjson

    from schemas.events import DECODED_BY_ORJSON

    text = b'{"kind": "completed", "request_id": "r1", "metadata": {"n": 123456789012345678901234567890}}'
    decoded = orjson.loads(text)
    assert isinstance(decoded["metadata"]["n"], float)
    RawEvent.model_validate(decoded, context={DECODED_BY_ORJSON: True})
    big = {"kind": "completed", "request_id": "r1", "metadata": {"n": 2**70}}
    with pytest.raises(ValidationError, match="64 bits"):
        RawEvent.model_validate(big)

"""spend.raw bundles: ingest packs a request's events per partition, the worker unpacks them."""

from dataclasses import dataclass
from decimal import Decimal

import orjson

from processors.ledger_step import Bundled, raw_events
from schemas.bundles import raw_messages
from schemas.partitions import librdkafka_partition as partition_of


def events(n: int, prefix: str = "r") -> list[dict]:
    return [{"kind": "completed", "request_id": f"{prefix}{i}", "model": "openai/gpt-4o"} for i in range(n)]


def unpack(value: bytes) -> list[dict]:
    data = orjson.loads(value)
    return data["events"] if "events" in data else [data]


def test_events_of_one_partition_travel_together_in_order_under_the_first_ones_key():
    published = events(200)
    messages = raw_messages(published, partitions=4)
    assert len(messages) == 4
    seen = []
    for key, value in messages:
        members = unpack(value)
        assert key == members[0]["request_id"].encode()
        assert {partition_of(m["request_id"].encode(), 4) for m in members} == {partition_of(key, 4)}
        assert [int(m["request_id"][1:]) for m in members] == sorted(
            int(m["request_id"][1:]) for m in members
        )
        seen += members
    assert sorted(seen, key=lambda e: int(e["request_id"][1:])) == published


def test_a_lone_event_stays_a_plain_event():
    (key, value), *rest = raw_messages(events(1), partitions=4)
    assert not rest and key == b"r0" and orjson.loads(value) == events(1)[0]


def test_unknown_partitioning_sends_one_message_per_event():
    messages = raw_messages(events(5), partitions=None)
    assert [k for k, _ in messages] == [b"r0", b"r1", b"r2", b"r3", b"r4"]


def test_bundles_are_split_to_stay_under_the_size_limit():
    published = events(300)
    messages = raw_messages(published, partitions=1, max_bytes=2_000)
    assert len(messages) > 1
    assert all(len(value) <= 2_000 for _, value in messages)
    assert [e for _, v in messages for e in unpack(v)] == published


def test_librdkafka_crc32_partitions_are_what_partition_of_computes():
    # Known values of CRC-32 (the IEEE polynomial librdkafka's consistent partitioner uses).
    assert partition_of(b"123456789", 1_000_000_000) == 0xCBF43926 % 1_000_000_000
    assert partition_of(b"", 7) == 0


@dataclass
class Message:
    value: bytes | None
    topic: str = "spend.raw"
    partition: int = 2
    offset: int = 41
    key: bytes | None = b"k"


def test_the_worker_reads_plain_events_bundles_and_rejects_what_it_cannot_decode():
    rejected = []
    bundle = raw_messages(events(3), partitions=1)[0][1]
    messages = [
        Message(orjson.dumps(events(1, "single")[0])),
        Message(bundle),
        Message(b"\x00 no json"),
        Message(None),
    ]
    out = list(raw_events(messages, lambda stage, source, reason: rejected.append((source.offset, reason))))
    assert [e["request_id"] for _, e in out] == ["single0", "r0", "r1", "r2"]
    assert out[0][0] is messages[0]
    member = out[2][0]
    assert isinstance(member, Bundled)
    assert (member.topic, member.partition, member.offset, member.key) == ("spend.raw", 2, 41, b"r1")
    assert orjson.loads(member.value) == events(3)[1]
    assert [offset for offset, _ in rejected] == [41, 41]
    assert all(reason.startswith("invalid raw event") for _, reason in rejected)


def test_an_event_named_events_is_still_an_event():
    event = {**events(1)[0], "events": []}
    ((source, data),) = raw_events([Message(orjson.dumps(event))], lambda *a: None)
    assert data == event


def test_a_large_batch_spends_in_bundles_of_bounded_size_on_each_tags_partition():
    from datetime import UTC, datetime
    from decimal import Decimal

    from processors.ledger_step import tag_spend_messages
    from schemas.bundles import MAX_SPEND_ENTRIES, read_tag_spend, tag_partition
    from schemas.records import AttributedRecord

    at = datetime(2026, 11, 30, tzinfo=UTC)
    records = [
        AttributedRecord(
            event_id=f"evt_{i}",
            request_id=f"r{i}",
            occurred_at=at,
            received_at=at,
            tags=["env:prod", f"team:t{i % 2}", f"user:u{i % 40}"],
            cost_usd=Decimal("0.001") if i % 10 else None,  # unpriced: nothing to count
        )
        for i in range(5000)
    ]
    counted: dict[str, list[tuple]] = {}
    for key, value, partition in tag_spend_messages(records, partitions=4):
        spends = read_tag_spend(key, value)
        assert key.decode() == spends[0][0]
        assert sum(len(items) for _, items in spends) <= MAX_SPEND_ENTRIES and len(value) < 512 * 1024
        for tag, items in spends:
            assert tag_partition(tag, 4) == partition
            counted.setdefault(tag, []).extend(items)
    priced = [i for i in range(5000) if i % 10]
    assert counted["env:prod"] == [(f"evt_{i}", int(at.timestamp() * 1000), Decimal("0.001")) for i in priced]
    assert (len(counted["team:t0"]), len(counted["team:t1"])) == (2000, 2500)
    assert len(counted) == 3 + 36 and sum(map(len, counted.values())) == 3 * len(priced)


def test_the_budget_agent_reads_bundles_and_forwarded_definitions_and_refuses_bad_ones():
    import pytest

    from schemas.budgets import TagSpend
    from schemas.bundles import read_tag_spend

    bundle = orjson.dumps({"type": "spends", "tags": {"a": [["e1", 5, "0.5"]], "b": [["e1", 5, "0.5"]]}})
    assert [(t, [i[2] for i in items]) for t, items in read_tag_spend(b"a", bundle)] == [
        ("a", [Decimal("0.5")]),
        ("b", [Decimal("0.5")]),
    ]
    ((tag, single),) = read_tag_spend(b"team:x", TagSpend(type="budget").model_dump_json().encode())
    assert tag == "team:x" and isinstance(single, TagSpend) and single.type == "budget"
    for bad in (
        b"not json",
        orjson.dumps({"type": "spends", "tags": []}),
        orjson.dumps({"type": "spends", "tags": {"a": [["e1", 5, 0.5]]}}),  # a float cost: not exact
        orjson.dumps({"type": "spends", "tags": {"a": [["e1", 5]]}}),
        orjson.dumps({"type": "spends", "tags": {"a": [["e1", 5, "x"]]}}),
        orjson.dumps({"type": "other"}),
        orjson.dumps([1, 2]),
        # the single-tag spend of before bundles is no longer read
        orjson.dumps({"type": "spend", "entries": [{"event_id": "e1", "occurred_ms": 5, "cost_usd": "1"}]}),
    ):
        with pytest.raises(ValueError):
            read_tag_spend(b"a", bad)
    with pytest.raises(ValueError):
        read_tag_spend(None, bundle)


def test_spend_counts_for_model_and_provider_and_at_the_receive_time_when_stamped_ahead():
    """Issue 19.1 and 19.6: a call's spend counts for `model:` and `provider:` budgets as for its tags,
    and a call stamped ahead of the API's clock counts when it was received."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from processors.ledger_step import tag_spend_entries
    from schemas.records import AttributedRecord

    received = datetime(2026, 12, 1, 23, 59, tzinfo=UTC)
    ahead = datetime(2026, 12, 2, 8, 59, tzinfo=UTC)  # a host clock 9 h fast
    record = AttributedRecord(
        event_id="e1",
        request_id="r1",
        occurred_at=ahead,
        received_at=received,
        tags=["team:a", "model:gpt-4o"],
        model="gpt-4o",
        provider="openai",
        cost_usd=Decimal("0.5"),
    )
    entries = tag_spend_entries([record])
    assert sorted(entries) == ["model:gpt-4o", "provider:openai", "team:a"]
    assert all(
        items == [("e1", int(received.timestamp() * 1000), Decimal("0.5"))] for items in entries.values()
    )


def test_a_back_dated_call_counts_when_it_was_received():
    """Review of 19.1: a call stamped yesterday (a slow or forged clock) counts in today's window."""
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from processors.ledger_step import tag_spend_entries
    from schemas.records import AttributedRecord

    received = datetime(2026, 12, 2, 10, tzinfo=UTC)
    record = AttributedRecord(
        event_id="e1",
        request_id="r1",
        occurred_at=received - timedelta(days=1),
        received_at=received,
        tags=["team:a"],
        cost_usd=Decimal("5"),
    )
    assert tag_spend_entries([record]) == {"team:a": [("e1", int(received.timestamp() * 1000), Decimal("5"))]}


def test_an_alert_that_fires_again_after_an_update_has_a_new_id_and_a_resent_one_the_same():
    from datetime import UTC, datetime
    from decimal import Decimal

    from ledger.budgets import Alert, Window
    from processors.budgets import budget_alert
    from schemas.budgets import BudgetDefinition

    alert = Alert("team:a", "threshold", 80, Decimal(8), Decimal(10), None, Window(0, 86_400_000))

    def version(at: datetime) -> BudgetDefinition:
        return BudgetDefinition(tag="team:a", budget_duration="1d", created_at=at, updated_at=at)

    first = budget_alert(alert, 1000, version(datetime(2026, 12, 1, tzinfo=UTC)))
    again = budget_alert(alert, 5000, version(datetime(2026, 12, 1, tzinfo=UTC)))
    raised = budget_alert(alert, 9000, version(datetime(2026, 12, 1, 12, tzinfo=UTC)))
    assert first.alert_id == again.alert_id != raised.alert_id

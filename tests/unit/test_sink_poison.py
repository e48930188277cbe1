"""No single value halts the sink (DESIGN §9.7): a message it cannot plan, or a row ClickHouse refuses,
becomes a `spend_rejects` row with the reason, and the rest of its batch lands. An outage is retried."""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from processors.sink import FLUSH_ATTEMPTS, Landing, Message, Sink, land_apart, plan_landing
from schemas.topics import Topics
from spendledger.platform.settings import Settings
from tests.unit.test_sink_plan import ATTR, MemoryStore, msg, rec

T = datetime(2026, 11, 22, 10, tzinfo=UTC)


def record_json(event_id: str, occurred_at: str) -> bytes:
    """An attributed record as another producer may write it straight to spend.attributed."""
    value = orjson.loads(rec(event_id).model_dump_json())
    return orjson.dumps({**value, "occurred_at": occurred_at})


@pytest.mark.parametrize(
    "occurred_at", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1899-12-31T23:59:59Z"]
)
def test_a_record_dated_beyond_what_clickhouse_stores_is_a_reject_beside_valid_records(occurred_at):
    """Before: `min(times) - lookback` raised OverflowError, the flush retried forever, nothing landed."""
    store = MemoryStore()
    messages = [
        msg(0, rec("e1").model_dump_json().encode()),
        msg(1, record_json("extreme", occurred_at)),
        msg(2, rec("e2").model_dump_json().encode()),
    ]
    landing = plan_landing(messages, topics=Topics(), landed={}, store=store)
    assert [r.event_id for r in landing.records] == ["e1", "e2"]
    ((reject,),) = [landing.rejects]
    assert (reject.source_topic, reject.offset) == (ATTR, 1)
    assert reject.reason.startswith("sink cannot land: occurred_at") and "1900 to 2299" in reject.reason
    assert '"extreme"' in reject.payload
    assert landing.next_offsets == {(ATTR, 0): 3}


@pytest.mark.parametrize("t", [datetime(1900, 1, 1, tzinfo=UTC), datetime(2299, 12, 31, 23, 59, tzinfo=UTC)])
def test_the_look_up_bounds_stay_inside_what_clickhouse_parses(t):
    seen = []

    class Spy(MemoryStore):
        def existing_event_ids(self, event_ids, start, end):
            seen.append((start, end))
            return set()

    landing = plan_landing(
        [msg(0, rec("e1", t=t).model_dump_json().encode())],
        topics=Topics(),
        landed={},
        store=Spy(),
        lookback=timedelta(days=10**8),  # past datetime's range
    )
    assert [r.event_id for r in landing.records] == ["e1"]
    ((start, end),) = seen
    assert (
        datetime(1900, 1, 1, tzinfo=UTC)
        <= start
        <= t
        <= end
        <= datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
    )


def test_an_event_id_too_long_to_look_up_is_a_reject():
    store = MemoryStore()
    landing = plan_landing(
        [msg(0, rec("x" * 300_000).model_dump_json().encode()), msg(1, rec("e1").model_dump_json().encode())],
        topics=Topics(),
        landed={},
        store=store,
    )
    assert [r.event_id for r in landing.records] == ["e1"]
    assert [r.reason for r in landing.rejects] == [
        "sink cannot land: event_id is not up to 256 characters of UTF-8"
    ]


class Refusing(MemoryStore):
    """ClickHouse refusing any insert that holds a poisoned record (as it refuses a value its column
    cannot hold), and answering pings unless `down`."""

    def __init__(self, poisoned: set[str], down: bool = False) -> None:
        super().__init__()
        self.poisoned = poisoned
        self.down = down
        self.inserts: list[tuple[str, int]] = []  # (token, rows) of each attempted records insert
        self.tokens: list[str] = []

    def ping(self):
        return not self.down

    def land(self, landing: Landing, group):
        if self.down:
            raise ConnectionError("connection refused")
        if landing.records:
            self.inserts.append((landing.token(group), len(landing.records)))
        bad = [r.event_id for r in landing.records if r.event_id in self.poisoned]
        if bad:
            raise OverflowError(f"int too big to convert ({bad[0]})")
        self.tokens.append(landing.token(group))
        super().land(landing, group)


class Consumer:
    def __init__(self) -> None:
        self.committed: list[Any] = []

    def commit(self, offsets, asynchronous):
        self.committed += offsets


class KafkaMessage:
    """The confluent-kafka message methods the sink reads."""

    def __init__(self, m: Message) -> None:
        self.m = m

    def topic(self):
        return self.m.topic

    def partition(self):
        return self.m.partition

    def offset(self):
        return self.m.offset

    def value(self):
        return self.m.value

    def timestamp(self):
        return (1, self.m.timestamp_ms or 0)  # TIMESTAMP_CREATE_TIME

    def key(self):
        return self.m.key


class Waits:
    """The sink's stop event: no real waiting; stops after `limit` waits."""

    def __init__(self, limit: int = 1000) -> None:
        self.calls = 0
        self.limit = limit

    def wait(self, delay: float) -> bool:
        self.calls += 1
        return self.calls >= self.limit

    def set(self) -> None:
        pass


def sink_with(store: MemoryStore, stop: Waits) -> Sink:
    sink = Sink(Settings(), store)
    sink._stop = stop  # type: ignore[assignment]
    return sink


def batch(n: int, poisoned: set[str]) -> list[KafkaMessage]:
    return [
        KafkaMessage(
            msg(i, rec(f"e{i}", cost="2.5" if f"e{i}" in poisoned else "0.1").model_dump_json().encode())
        )
        for i in range(n)
    ]


def test_a_batch_clickhouse_refuses_is_landed_apart_and_the_refused_row_is_a_reject():
    """Before: the flush was retried every 10 s forever, and nothing landed any more for anyone."""
    store = Refusing({"e5"})
    sink = sink_with(store, Waits())
    consumer = Consumer()
    sink._flush_with_retry(consumer, batch(8, {"e5"}))
    assert sorted(store.records) == [f"e{i}" for i in range(8) if i != 5]
    ((reject,),) = [store.rejects]
    assert (reject.source_topic, reject.partition, reject.offset) == (ATTR, 0, 5)
    assert (
        reject.reason
        == "ClickHouse refused the spend_records row: OverflowError: int too big to convert (e5)"
    )
    assert '"event_id":"e5"' in reject.payload
    assert store.offsets == {(ATTR, 0): 8} and [(tp.topic, tp.offset) for tp in consumer.committed] == [
        (ATTR, 8)
    ]
    assert sink.stuck_reason is None and sink.healthy
    # Tried whole FLUSH_ATTEMPTS times, then apart: 8 refused, e0-e3 land, e4-e7 refused, e4-e5
    # refused, e4 lands, e5 refused alone, e6-e7 land.
    assert [rows for _, rows in store.inserts] == [8] * FLUSH_ATTEMPTS + [8, 4, 4, 2, 1, 1, 2]
    assert len(set(store.tokens)) == len(store.tokens)  # every landed part has its own dedup token


def test_several_poisoned_rows_are_each_rejected_alone():
    poisoned = {"e0", "e3", "e4", "e9"}
    store = Refusing(poisoned)
    sink_with(store, Waits())._flush_with_retry(Consumer(), batch(10, poisoned))
    assert sorted(store.records) == sorted(f"e{i}" for i in range(10) if f"e{i}" not in poisoned)
    assert sorted(r.offset for r in store.rejects) == [0, 3, 4, 9]
    assert sum(r.cost_usd for r in store.records.values()) == Decimal("0.6")


def test_a_clickhouse_that_is_down_is_retried_and_no_row_becomes_a_reject():
    store = Refusing(set(), down=True)
    stop = Waits(limit=2 * FLUSH_ATTEMPTS)
    sink = sink_with(store, stop)
    sink._flush_with_retry(Consumer(), batch(3, set()))
    assert stop.calls == 2 * FLUSH_ATTEMPTS  # still retrying when stopped: never split, never given up
    assert store.records == {} and store.rejects == [] and store.offsets == {}
    assert sink.stuck_reason is not None and "failed to land 6 times" in sink.stuck_reason
    assert "ConnectionError: connection refused" in sink.stuck_reason
    # Back up: the same batch lands whole.
    store.down = False
    sink._flush_with_retry(Consumer(), batch(3, set()))
    assert sorted(store.records) == ["e0", "e1", "e2"] and sink.stuck_reason is None


def test_clickhouse_going_down_while_a_batch_is_landed_apart_stops_it_without_rejects():
    store = Refusing({"e1"})
    pings = iter([True, False])
    store.ping = lambda: next(pings)  # type: ignore[method-assign]
    landing = plan_landing([m.m for m in batch(4, {"e1"})], topics=Topics(), landed={}, store=store)
    with pytest.raises(OverflowError):
        land_apart(store, landing, "g")
    assert store.rejects == [] and store.offsets == {}


def test_a_refused_reject_means_spend_rejects_is_failing_and_is_retried():
    class NoRejects(Refusing):
        def land(self, landing, group):
            if landing.rejects:
                raise RuntimeError("Code: 60. Table spend_rejects does not exist")
            super().land(landing, group)

    store = NoRejects({"e1"})
    landing = plan_landing([m.m for m in batch(3, {"e1"})], topics=Topics(), landed={}, store=store)
    with pytest.raises(RuntimeError, match="spend_rejects"):
        land_apart(store, landing, "g")
    assert store.offsets == {}  # nothing committed: the batch is replayed, its good rows deduped


@pytest.mark.parametrize(
    ("field", "value"),
    [("input_tokens", -1), ("input_tokens", 2**64), ("http_status", 70_000), ("latency_ms", 2**32)],
)
def test_an_integer_its_column_cannot_hold_is_a_reject_not_a_wrapped_row(field: str, value: int) -> None:
    """Records land as JSON lines, where ClickHouse wraps an integer around (-1 in a UInt64 is 2**64-1):
    the sink refuses such a value when it decodes the message."""
    value_json = json.dumps({**orjson.loads(rec("odd").model_dump_json()), field: value}).encode()
    landing = plan_landing(
        [msg(0, rec("e1").model_dump_json().encode()), msg(1, value_json)],
        topics=Topics(),
        landed={},
        store=MemoryStore(),
    )
    assert [r.event_id for r in landing.records] == ["e1"]
    [reject] = landing.rejects
    assert reject.reason.startswith("sink cannot decode") and field in reject.reason

"""The sink lands `spend.alert-deliveries` in `alert_deliveries` (chDB): each attempt once, whether
its batch is replayed or a copy of it comes at a new offset; a message that does not decode is a
reject."""

from datetime import UTC, datetime
from typing import Any

from processors.sink import ClickHouseStore, Message, Sink
from schemas.alerts import DeliveryAttempt
from schemas.topics import Topics
from spendledger.platform.settings import Settings

T = datetime(2026, 11, 22, 10, 30, 0, 123_000, tzinfo=UTC)
DELIVERIES = Topics().alert_deliveries


class Consumer:
    def commit(self, offsets, asynchronous):
        pass


def attempt(offset: int, attempt_id: str, **extra: Any) -> Message:
    fields: dict[str, Any] = {
        "attempt_id": attempt_id,
        "alert_id": "a-80",
        "tag": "team:support",
        "destination": "finance",
        "attempt": 1,
        "status": "retrying",
        "http_status": 503,
        "error": "HTTP 503",
        "latency_ms": 12,
        "at": T,
    }
    value = DeliveryAttempt.model_validate({**fields, **extra}).model_dump_json().encode()
    return Message(DELIVERIES, 0, offset, value, b"a-80")


def test_an_alert_delivery_lands_once_when_replayed(clickhouse):
    client = clickhouse()
    store = ClickHouseStore(client)
    sink = Sink(Settings(), store)
    assert DELIVERIES in sink.topics
    delivered = {"attempt": 2, "status": "delivered", "http_status": 200, "error": "", "latency_ms": 30}
    batch = [
        attempt(0, "att-1"),
        attempt(1, "att-2", **delivered),
        attempt(2, "att-2", **delivered),  # a copy in the same batch
    ]
    sink.flush(Consumer(), batch)

    query = (
        "SELECT at, attempt_id, alert_id, tag, destination, attempt, status, http_status, error, latency_ms "
        "FROM alert_deliveries ORDER BY attempt"
    )
    at = T.replace(tzinfo=None)  # as clickhouse-connect reads a DateTime64 back: UTC, naive
    landed = [
        (at, "att-1", "a-80", "team:support", "finance", 1, "retrying", 503, "HTTP 503", 12),
        (at, "att-2", "a-80", "team:support", "finance", 2, "delivered", 200, "", 30),
    ]
    assert client.query(query).result_rows == landed

    # The same batch again, as after a crash before the Kafka commit: nothing more lands.
    sink._landed = {}
    sink.flush(Consumer(), batch)
    # A copy sent again at a new offset (the worker's outbox retried it): found by its attempt_id.
    sink.flush(Consumer(), [attempt(3, "att-1")])
    assert client.query(query).result_rows == landed
    assert client.query("SELECT count() FROM alert_deliveries").result_rows == [(2,)]
    assert store.landed_offsets(sink.group) == {(DELIVERIES, 0): 4}


def test_an_undecodable_alert_delivery_is_a_reject(clickhouse):
    client = clickhouse()
    sink = Sink(Settings(), ClickHouseStore(client))
    sink.flush(Consumer(), [Message(DELIVERIES, 0, 0, b'{"attempt_id": "x"}'), attempt(1, "att-9")])
    assert client.query("SELECT attempt_id FROM alert_deliveries").result_rows == [("att-9",)]
    [(topic, reason)] = client.query("SELECT source_topic, reason FROM spend_rejects").result_rows
    assert topic == DELIVERIES and reason.startswith("sink cannot decode: ValidationError")

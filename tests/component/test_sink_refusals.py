"""The sink against the real ClickHouse engine (chDB): rows ClickHouse refuses are found by landing
the batch apart and become rejects with its reason; the rest of the batch lands once."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from processors.sink import ClickHouseStore, Message, Sink
from schemas.records import AttributedRecord
from spendledger.platform.settings import Settings

T = datetime(2026, 11, 22, 10, tzinfo=UTC)
ATTR = "spend.attributed"


class Consumer:
    def commit(self, offsets, asynchronous):
        pass


def record(event_id: str, **extra: object) -> bytes:
    fields = {"event_id": event_id, "request_id": "r-" + event_id, "occurred_at": T, "received_at": T}
    return AttributedRecord.model_validate({**fields, **extra}).model_dump_json().encode()


def test_rows_clickhouse_refuses_become_rejects_and_the_rest_lands(clickhouse):
    client = clickhouse()
    store = ClickHouseStore(client)
    assert store.ping()
    messages = [
        Message(ATTR, 0, 0, record("ok-1", cost_usd=Decimal("0.5"))),
        Message(ATTR, 0, 1, record("too-rich", cost_usd=Decimal("1e30"))),  # Decimal(38, 12) holds < 1e26
        Message(ATTR, 0, 2, record("ok-2", cost_usd=Decimal("0.25"))),
        # UInt64: refused where it is decoded (an insert of JSON lines would wrap it around).
        Message(ATTR, 0, 3, record("negative").replace(b'"input_tokens":0', b'"input_tokens":-1')),
        Message(ATTR, 0, 4, record("ok-3", latency_ms=5)),
    ]
    sink = Sink(Settings(), store)
    with pytest.raises(Exception, match="too big|native array"):
        sink.flush(Consumer(), messages)  # whole: refused
    sink.flush(Consumer(), messages, apart=True)

    landed = client.query("SELECT event_id, cost_usd FROM spend_records ORDER BY event_id").result_rows
    assert landed == [("ok-1", Decimal("0.5")), ("ok-2", Decimal("0.25")), ("ok-3", None)]
    rejects = client.query("SELECT offset, reason, payload FROM spend_rejects ORDER BY offset").result_rows
    assert [(offset, reason.split(":")[0]) for offset, reason, _ in rejects] == [
        (1, "ClickHouse refused the spend_records row"),
        (3, "sink cannot decode"),
    ]
    assert '"too-rich"' in rejects[0][2] and '"negative"' in rejects[1][2]
    assert store.landed_offsets(sink.group) == {(ATTR, 0): 5}

    # The same batch again (a crash before the Kafka commit): nothing more lands.
    sink._landed = {}
    sink.flush(Consumer(), messages, apart=True)
    assert client.query("SELECT count() FROM spend_records").result_rows == [(3,)]
    assert client.query("SELECT count() FROM spend_rejects").result_rows == [(2,)]

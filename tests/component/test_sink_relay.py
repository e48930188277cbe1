"""The sink's JSON rows land exactly as clickhouse-connect's native insert did, and the relay the embedded
system lends the engine through carries the sink's statements (real chDB, a real loopback socket)."""

import datetime as dt
import secrets
import socket
from decimal import Decimal
from typing import Any

import pytest

from processors.sink import (
    ALERT_DELIVERY_COLUMNS,
    BUDGET_COLUMNS,
    BUDGET_EVENT_COLUMNS,
    OFFSET_COLUMNS,
    REJECT_COLUMNS,
    ClickHouseStore,
    Landing,
    json_rows,
)
from schemas.records import AttributedRecord
from spendledger.chdb_relay import RelayAddress, RelayClient, RelayError, RelayServer

AT = dt.datetime(2026, 12, 2, 7, 1, 2, 345678, tzinfo=dt.UTC)
NAIVE = dt.datetime(2299, 12, 31, 23, 59, 59, 999000)

ROWS: dict[str, tuple[list[str], list[list[Any]]]] = {
    "spend_rejects": (
        REJECT_COLUMNS,
        [
            ["spend.raw", 3, 2**62, "bad 'quote' \\ and \n newline", '{"x": "\u00e9\u0000\u2028"}', AT],
            ["spend.attributed", 0, 0, "", "", dt.datetime(1900, 1, 2, tzinfo=dt.UTC)],
        ],
    ),
    "tag_budgets": (
        BUDGET_COLUMNS,
        [
            [
                "team:a",
                Decimal("1E+2"),
                Decimal("0.000000001"),
                "30d",
                [50, 80, 95],
                0,
                AT,
                "calendar",
                "tag",
                AT,
                "d\u00e9j\u00e0",
            ],
            ["team:b", None, None, "", [], 1, NAIVE, "sliding", "tag", NAIVE, None],
        ],  # fmt: skip
    ),
    "budget_events": (
        BUDGET_EVENT_COLUMNS,
        [
            [AT, "team:a", "alert", 80, Decimal("12.3456789012"), Decimal("15"), AT, AT, "a1", None],
            [AT, "team:a", "unblock", None, Decimal("0"), None, AT, NAIVE, "", Decimal("-0.5")],
        ],
    ),
    "alert_deliveries": (
        ALERT_DELIVERY_COLUMNS,
        [
            [AT, "t1", "a1", "team:a", "ops", 1, "retrying", 503, "HTTP 503", 12],
            [AT, "t2", "a1", "team:a", "ops", 2, "delivered", None, "", None],
        ],
    ),
    "sink_offsets": (
        OFFSET_COLUMNS,
        [["sink@x", "spend.attributed", 0, 2**40], ["sink@x", "spend.raw", 7, 0]],
    ),
}


@pytest.mark.parametrize("table", sorted(ROWS))
def test_json_rows_land_as_the_native_insert_did(clickhouse: Any, table: str) -> None:
    native, as_json = clickhouse(), clickhouse()
    columns, rows = ROWS[table]
    native.insert(table, rows, column_names=columns)
    ClickHouseStore(as_json)._insert_json(table, json_rows(rows, columns), columns, None)
    query = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}, {columns[1]}"  # noqa: S608
    expected = native.query(query).result_rows
    assert len(expected) == len(rows)
    assert as_json.query(query).result_rows == expected


def test_json_rows_refuse_what_is_not_json() -> None:
    with pytest.raises(TypeError, match="not JSON serializable: set"):
        json_rows([[{1}]], ["x"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def relay(clickhouse: Any) -> Any:
    engine = clickhouse()
    address = RelayAddress("127.0.0.1", free_port(), secrets.token_urlsafe(16))
    server = RelayServer(engine, address).start()
    yield engine, address
    server.stop()


def record(i: int) -> AttributedRecord:
    return AttributedRecord(
        event_id=f"e{i}", request_id=f"r{i}", occurred_at=AT, received_at=AT, team="search",
        tags=["team:search"], model="gpt-4o", input_tokens=1000 + i, cost_usd=Decimal("0.0045"),
        price_source="catalog",
    )  # fmt: skip


def test_the_sink_lands_through_the_relay(relay: Any) -> None:
    engine, address = relay
    client = RelayClient(address.dsn())
    store = ClickHouseStore(client)
    landing = Landing(records=[record(i) for i in range(3)], next_offsets={("spend.attributed", 0): 3})
    store.land(landing, "sink@c")
    store.land(landing, "sink@c")  # a replay: the same token lands nothing new
    assert engine.query("SELECT count(), sum(cost_usd) FROM spend_records").result_rows == [
        (3, Decimal("0.0135"))
    ]
    assert store.landed_offsets("sink@c") == {("spend.attributed", 0): 3}
    later = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
    assert store.existing_event_ids(["e1", "e9", "it's"], AT - dt.timedelta(days=1), later) == {"e1"}
    assert store.ping()
    assert client.command("SELECT 40 + 2") == 42
    with pytest.raises(RelayError, match="UNKNOWN_TABLE|Unknown table"):
        client.query("SELECT * FROM no_such_table")
    assert client.query("SELECT 1").result_rows == [[1]]  # the connection outlives an engine error


def test_the_relay_refuses_a_wrong_token(relay: Any) -> None:
    _, address = relay
    wrong = RelayClient(RelayAddress(address.host, address.port, "not-" + address.token).dsn())
    with pytest.raises(RelayError, match="closed the connection"):
        wrong.query("SELECT 1")
    assert not ClickHouseStore(wrong).ping()


def test_a_relay_that_is_down_fails_each_call_and_heals(clickhouse: Any) -> None:
    address = RelayAddress("127.0.0.1", free_port(), "t0ken")
    client = RelayClient(address.dsn(), timeout_s=2)
    with pytest.raises(RelayError, match="ClickHouse relay"):
        client.query("SELECT 1")
    server = RelayServer(clickhouse(), address).start()
    try:
        assert client.query("SELECT 2").result_rows == [[2]]
    finally:
        server.stop()


@pytest.mark.parametrize("dsn", ["relay://127.0.0.1:1", "relay://:t@host", "chdb:///x", "relay://:@h:1"])
def test_a_relay_dsn_names_host_port_and_token(dsn: str) -> None:
    with pytest.raises(ValueError, match="relay://:TOKEN@HOST:PORT"):
        RelayAddress.parse(dsn)

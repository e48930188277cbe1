"""The sink's JSON rows land exactly as clickhouse-connect's native insert did, and the relay the embedded
system lends the engine through carries the sink's statements (real chDB, a real loopback socket)."""

import datetime as dt
import os
import secrets
import socket
import struct
from decimal import Decimal
from typing import Any

import orjson
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
    land_apart,
)
from schemas.records import AttributedRecord
from spendledger.platform.chdb_relay import (
    MAX_HEADER_BYTES,
    RelayAddress,
    RelayClient,
    RelayError,
    RelayServer,
    RelayUnavailable,
    socket_path,
)

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


@pytest.fixture
def relay(clickhouse: Any, tmp_path: Any) -> Any:
    engine = clickhouse()
    address = RelayAddress(str(tmp_path / "relay.sock"), secrets.token_urlsafe(16))
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
    with pytest.raises(RelayError, match="UNKNOWN_TABLE|Unknown table") as refused:
        client.query("SELECT * FROM no_such_table")
    assert not isinstance(refused.value, ConnectionError)  # the engine said no: not an outage
    assert client.query("SELECT 1").result_rows == [[1]]  # the connection outlives an engine error
    assert os.stat(address.path).st_mode & 0o777 == 0o600
    assert address.token not in repr(address) and address.token not in repr(client.address)


def test_the_relay_refuses_a_wrong_token(relay: Any) -> None:
    _, address = relay
    wrong = RelayClient(RelayAddress(address.path, "not-" + address.token).dsn())
    with pytest.raises(RelayUnavailable, match="ClickHouse relay"):  # closed (or reset: the body unread)
        wrong.query("SELECT 1")
    assert not ClickHouseStore(wrong).ping()


def raw_frame_then_wait(path: str, frame: bytes) -> float:
    """Send `frame` and return how long the server took to close the connection."""
    import time

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(frame)
        started = time.monotonic()
        try:
            assert sock.recv(1) == b""  # closed, nothing answered
        except ConnectionResetError:
            pass  # closed with the frame's rest unread
        return time.monotonic() - started


def test_the_relay_reads_no_body_before_the_token_and_no_huge_header(relay: Any) -> None:
    _, address = relay
    head = orjson.dumps({"op": "query", "sql": "SELECT 1", "token": "wrong"})
    # A wrong token announcing a 200 MiB body it never sends: refused at the header.
    raw_frame_then_wait(address.path, struct.pack(">I", len(head)) + head + struct.pack(">I", 200 << 20))
    # A header announced over the limit: refused before it is read.
    raw_frame_then_wait(address.path, struct.pack(">I", MAX_HEADER_BYTES + 1))


def test_a_kept_connection_that_died_is_retried_once_on_a_new_one(clickhouse: Any, tmp_path: Any) -> None:
    engine = clickhouse()
    address = RelayAddress(str(tmp_path / "relay.sock"), "t0ken")
    client = RelayClient(address.dsn(), timeout_s=5)
    server = RelayServer(engine, address).start()
    assert client.query("SELECT 1").result_rows == [[1]]
    server.stop()  # the API restarts: the client's connection is dead
    server = RelayServer(engine, address).start()
    try:
        assert client.query("SELECT 2").result_rows == [[2]]
    finally:
        server.stop()


def test_a_relay_that_is_down_fails_each_call_as_unavailable_and_heals(
    clickhouse: Any, tmp_path: Any
) -> None:
    address = RelayAddress(str(tmp_path / "relay.sock"), "t0ken")
    client = RelayClient(address.dsn(), timeout_s=2)
    with pytest.raises(RelayUnavailable, match="ClickHouse relay"):
        client.query("SELECT 1")
    server = RelayServer(clickhouse(), address).start()
    try:
        assert client.query("SELECT 2").result_rows == [[2]]
    finally:
        server.stop()


def test_an_unreachable_store_is_retried_never_landed_as_rejects() -> None:
    """land_apart takes a row ClickHouse refuses for a bad row, but a relay that broke is an outage."""

    class Flaky:
        def land(self, landing: Landing, group: str) -> None:
            raise RelayUnavailable("the ClickHouse relay closed the connection")

        def ping(self) -> bool:
            return True  # the next request would reconnect

    with pytest.raises(RelayUnavailable):
        land_apart(Flaky(), Landing(records=[record(1)]), "sink")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dsn", ["relay://127.0.0.1:1", "relay://:t@host:1/x", "chdb:///x", "relay://:@unix/x", "relay://:t@unix"]
)
def test_a_relay_dsn_names_its_socket_and_token(dsn: str) -> None:
    with pytest.raises(ValueError, match="relay://:TOKEN@unix/PATH/TO/SOCKET"):
        RelayAddress.parse(dsn)
    assert RelayAddress.parse("relay://:t0k-en_@unix/srv/d/relay.sock") == RelayAddress(
        "/srv/d/relay.sock", "t0k-en_"
    )


def test_a_long_data_dir_gets_its_socket_in_a_private_directory(tmp_path: Any) -> None:
    assert socket_path(tmp_path) == str(tmp_path / "relay.sock")
    long_dir = tmp_path / ("d" * 120)
    path = socket_path(long_dir)
    assert len(path) <= 107 and os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


def test_a_replayed_batch_of_budget_events_lands_once(clickhouse: Any) -> None:
    engine = clickhouse()
    store = ClickHouseStore(engine)
    columns, rows = ROWS["budget_events"]
    landing = Landing(budget_events=rows, next_offsets={("spend.budget-blocks", 0): 2}, label="b1")
    store.land(landing, "sink@c")
    store.land(landing, "sink@c")  # the API died before the offsets landed: the sink sends it again
    assert engine.query("SELECT count() FROM budget_events").result_rows == [(2,)]

"""Budget listings read the ledger in one query, and the budget desk works without HTTP.

- `/tag/list` and a multi-name `/tag/info` ask the spend reader once for every budget (`spends`), with
  the figures per-tag `spend` gives;
- `ClickHouseSpendReader.spends` over real ClickHouse (chDB) equals `spend` window by window, in one query
  whose values are all bound;
- `BudgetDesk` and its pure parts (`agent_view`, `budget_state`) called directly.
"""

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from httpx import ASGITransport, AsyncClient

from ingest.app import Services, create_app
from ingest.budget_desk import (
    BudgetDesk,
    BudgetServices,
    CheckRequest,
    TagDelete,
    TagNew,
    agent_view,
    budget_state,
)
from ingest.errors import BudgetsUnavailable, Conflict, NotFound
from ingest.publisher import InMemoryPublisher
from ingest.sql import ClickHouseSpendReader, spends_query
from ledger.budgets import Window
from ledger.tags import AttributionPolicy
from processors.sink import ClickHouseStore, Landing
from schemas.budgets import BlockSignal, BudgetDefinition
from schemas.records import AttributedRecord
from spendledger.guard import BudgetGuard, CompactedView
from spendledger.platform.settings import Settings

ADMIN = {"Authorization": "Bearer admin-key"}
NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
DAY = (datetime(2026, 11, 22, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC))
MONTH = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))


class RecordingSpend:
    """The ledger's twin (spend per tag), recording each query a real reader would make."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, datetime, Decimal]] = []
        self.queries: list[tuple[str, int]] = []

    def _sum(self, tag: str, start: datetime, end: datetime) -> Decimal:
        return sum((c for t, at, c in self.rows if t == tag and start <= at < end), Decimal(0))

    def spend(self, tag: str, start: datetime, end: datetime) -> Decimal:
        self.queries.append(("spend", 1))
        return self._sum(tag, start, end)

    def spends(self, windows: Any) -> dict[Any, Decimal]:
        self.queries.append(("spends", len(windows)))
        return {window: self._sum(*window) for window in windows}

    def app_name(self, app_id: str) -> str:
        return ""


@pytest.fixture
def services() -> BudgetServices:
    registry = CompactedView({}, "spend.budgets", BudgetDefinition.model_validate_json)
    registry.mark_current()
    guard = BudgetGuard({}, "spend.budget-blocks", clock=lambda: NOW.timestamp())
    guard.view.mark_current()
    return BudgetServices(
        registry,
        guard,
        RecordingSpend(),
        ZoneInfo("UTC"),
        AttributionPolicy(),
        clock=lambda: NOW,
        answer_wait_s=0,
    )


@pytest.fixture
async def http(services: BudgetServices) -> Any:
    settings = Settings.model_validate({"producer_keys": "prod-key", "admin_keys": "admin-key"})
    app = create_app(Services(settings=settings, publisher=InMemoryPublisher(), budgets=services))
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://test") as client:
        yield client


def exact(response: Any) -> Any:
    return json.loads(response.content, parse_float=Decimal)


BUDGETS = [
    {"name": "team:a", "max_budget": 10, "budget_duration": "1d"},
    {"name": "team:b", "max_budget": 10, "budget_duration": "1mo"},
    {"name": "team:c", "max_budget": 1, "budget_duration": "1h", "window": "sliding"},
    {"name": "model:gpt-4o", "max_budget": 1, "budget_duration": "1d"},
    {"name": "team:quiet", "max_budget": 1, "budget_duration": "7d"},
]


async def test_tag_list_reads_every_budget_s_spend_in_one_query(http: Any, services: BudgetServices) -> None:
    reader = services.spend
    assert isinstance(reader, RecordingSpend)
    reader.rows += [
        ("team:a", NOW, Decimal("1.25")),
        ("team:a", NOW - timedelta(days=1), Decimal(9)),  # yesterday: not in the 1d window
        ("team:b", NOW - timedelta(days=1), Decimal("2.5")),
        ("team:b", datetime(2026, 10, 31, 23, tzinfo=UTC), Decimal(7)),  # last month
        ("team:c", NOW - timedelta(minutes=30), Decimal("0.5")),
        ("team:c", NOW - timedelta(hours=2), Decimal(4)),  # slid out
        ("model:gpt-4o", NOW, Decimal("0.000000000001")),
    ]
    for budget in BUDGETS:
        assert (await http.post("/tag/new", json=budget, headers=ADMIN)).status_code == 200
    reader.queries.clear()

    listed = exact(await http.get("/tag/list", headers=ADMIN))

    assert reader.queries == [("spends", len(BUDGETS))]  # one query, not one per budget
    assert [b["name"] for b in listed] == sorted(b["name"] for b in BUDGETS)
    for budget in listed:
        start, end = (datetime.fromisoformat(budget[k]) for k in ("window_start", "budget_reset_at"))
        assert budget["ledger_spend"] == budget["spend"] == reader.spend(budget["name"], start, end)
    figures = {b["name"]: b["ledger_spend"] for b in listed}
    assert figures == {
        "model:gpt-4o": Decimal("0.000000000001"),
        "team:a": Decimal("1.25"),
        "team:b": Decimal("2.5"),
        "team:c": Decimal("0.5"),
        "team:quiet": 0,
    }


async def test_tag_info_for_several_names_reads_once_and_still_names_the_unknown(
    http: Any, services: BudgetServices
) -> None:
    reader = services.spend
    assert isinstance(reader, RecordingSpend)
    for budget in BUDGETS[:3]:
        await http.post("/tag/new", json=budget, headers=ADMIN)
    reader.queries.clear()
    r = await http.get("/tag/info", params={"names": "team:a,team:b,team:c,team:a"}, headers=ADMIN)
    assert r.status_code == 200 and list(r.json()) == ["team:a", "team:b", "team:c"]
    r = await http.post("/tag/info", json={"names": ["team:c", "team:b"]}, headers=ADMIN)
    assert r.status_code == 200 and list(r.json()) == ["team:c", "team:b"]
    assert reader.queries == [("spends", 3), ("spends", 2)]
    r = await http.get("/tag/info", params={"names": "team:a,team:zzz"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["details"] == {"unknown": ["team:zzz"]}


# ---------------------------------------------------------------- the desk, without HTTP


async def test_the_desk_creates_lists_and_deletes_without_http(services: BudgetServices) -> None:
    publisher = InMemoryPublisher()
    desk = BudgetDesk(services, publisher, "spend.budgets")
    reader = services.spend
    assert isinstance(reader, RecordingSpend)
    assert await desk.listing() == [] and reader.queries == []  # nothing to read: no query
    answer = await desk.create(TagNew(name="department:ops", max_budget=Decimal(5), budget_duration="1d"))
    assert (answer["name"], answer["spend_source"], answer["budget_reset_at"]) == (
        "team:ops",
        "ledger",
        DAY[1],
    )
    assert publisher.sent[-1][:2] == ("spend.budgets", b"team:ops")
    with pytest.raises(Conflict):
        await desk.create(TagNew(name="team:ops", max_budget=Decimal(5), budget_duration="1d"))
    assert [b["name"] for b in await desk.listing()] == ["team:ops"]
    with pytest.raises(NotFound) as missing:
        await desk.infos(["team:ops", "team:nope"])
    assert missing.value.details == {"unknown": ["team:nope"]}
    assert await desk.delete(TagDelete(name="team:ops")) == {"deleted": ["team:ops"]}
    assert publisher.sent[-1] == ("spend.budgets", b"team:ops", None)
    with pytest.raises(NotFound):
        await desk.delete(TagDelete(name="team:ops"))


async def test_the_desk_waits_for_the_views(services: BudgetServices) -> None:
    desk = BudgetDesk(services, InMemoryPublisher(), "spend.budgets")
    assert desk.check(CheckRequest(tags=["team:a"]), None)["allowed"] is True
    services.guard.view._current_at = None
    with pytest.raises(BudgetsUnavailable):
        desk.check(CheckRequest(tags=["team:a"]), None)
    services.registry._current_at = None
    with pytest.raises(BudgetsUnavailable):
        await desk.listing()


def definition(**kw: Any) -> BudgetDefinition:
    values: dict[str, Any] = {
        "tag": "team:a",
        "max_budget_usd": Decimal(1),
        "budget_duration": "1d",
        "created_at": NOW,
        "updated_at": NOW,
    }
    return BudgetDefinition(**{**values, **kw})


def block(**kw: Any) -> BlockSignal:
    values: dict[str, Any] = {
        "tag": "team:a",
        "blocked": True,
        "spend_usd": Decimal(2),
        "max_budget_usd": Decimal(1),
        "window_start": DAY[0],
        "window_end": DAY[1],
        "updated_at": NOW,
    }
    return BlockSignal(**{**values, **kw})


TODAY = Window(int(DAY[0].timestamp() * 1000), int(DAY[1].timestamp() * 1000))
LAST_HOUR = Window(int((NOW - timedelta(minutes=59)).timestamp() * 1000), int((NOW + timedelta(minutes=1)).timestamp() * 1000))  # fmt: skip


@pytest.mark.parametrize(
    ("budget", "signal", "window", "speaks"),
    [
        (definition(), None, TODAY, False),
        (definition(), block(), TODAY, True),  # same max, same window
        (definition(), block(change="deleted"), TODAY, False),
        (definition(), block(max_budget_usd=Decimal(2)), TODAY, False),  # decided under another max
        (definition(), block(definition_updated_at=NOW), TODAY, True),
        (
            definition(),
            block(definition_updated_at=NOW - timedelta(seconds=1)),
            TODAY,
            False,
        ),  # other version
        (definition(), block(window_start=DAY[0] - timedelta(days=1), window_end=DAY[0]), TODAY, False),
        # Sliding: the agent's window is current when of the same length and ended at most a minute ago.
        (
            definition(budget_duration="1h", window="sliding"),
            block(window_start=NOW - timedelta(hours=1), window_end=NOW),
            LAST_HOUR,
            True,
        ),
        (
            definition(budget_duration="1h", window="sliding"),
            block(window_start=NOW - timedelta(hours=1, minutes=1), window_end=NOW - timedelta(minutes=1)),
            LAST_HOUR,
            False,
        ),
    ],
)
def test_agent_view_speaks_only_for_this_budget_and_window(
    budget: BudgetDefinition, signal: BlockSignal | None, window: Window, speaks: bool
) -> None:
    assert (agent_view(budget, signal, window) is not None) is speaks


@pytest.mark.parametrize(
    ("max_budget", "ledger", "blocked"),
    [
        (Decimal(1), Decimal("0.999999999999"), False),
        (Decimal(1), Decimal(1), True),
        (None, Decimal(10**6), False),
    ],
)
def test_without_the_agent_the_ledger_s_figure_is_judged_at_the_max(
    max_budget: Decimal | None, ledger: Decimal, blocked: bool
) -> None:
    state = budget_state(definition(max_budget_usd=max_budget), None, ledger, DAY[1])
    assert (state.spend, state.source, state.blocked) == (ledger, "ledger", blocked)
    assert state.blocked_until == (DAY[1] if blocked else None) and state.evaluated_at is None


def test_the_agent_s_state_is_served_as_it_decided_it() -> None:
    ends = NOW + timedelta(hours=3)
    state = budget_state(
        definition(), block(block_ends_at=ends, thresholds_fired=[50, 100]), Decimal(0), DAY[1]
    )
    assert (state.spend, state.source, state.blocked, state.blocked_until) == (
        Decimal(2),
        "budget_agent",
        True,
        ends,
    )
    assert state.thresholds_fired == [50, 100] and state.evaluated_at == NOW


# ---------------------------------------------------------------- the grouped query on real ClickHouse


def record(
    n: int, at: datetime, cost: str | None, tags: list[str], model: str = "", provider: str = ""
) -> Any:
    return AttributedRecord(
        event_id=f"e{n}",
        request_id=f"r{n}",
        occurred_at=at - timedelta(days=40),  # a producer's clock: never what a window counts by
        received_at=at,
        tags=tags,
        model=model,
        provider=provider,
        cost_usd=Decimal(cost) if cost is not None else None,
    )


class CountingClient:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.queries: list[str] = []

    def query(self, sql: str, **kw: Any) -> Any:
        self.queries.append(sql)
        return self.client.query(sql, **kw)


@pytest.fixture
def ledger(clickhouse: Any) -> Any:
    client = clickhouse()
    records = [
        record(
            0, DAY[0], "1.000000000001", ["team:a", "team:b"], "openai/GPT-4o", "openai"
        ),  # at the start: in
        record(1, DAY[1], "2", ["team:a"]),  # at the end: the next window's
        record(2, DAY[1] - timedelta(milliseconds=1), "0.5", ["team:a", "team:o'neil"]),
        record(3, NOW, None, ["team:unpriced"]),
        record(4, NOW, "3", ["team:b"], "gpt-4o"),
        record(5, MONTH[0] + timedelta(days=2), "4", ["team:b", "team:a"], provider="anthropic"),
        record(6, MONTH[0] - timedelta(seconds=1), "100", ["team:a", "team:b"]),
    ]
    ClickHouseStore(client).land(Landing(records=records, next_offsets={("a", 0): 1}), "sink")
    return client


def test_spends_equals_spend_for_every_window_in_one_bound_query(ledger: Any) -> None:
    windows = [
        (tag, *span)
        for tag in ("team:a", "team:b", "team:o'neil", "team:unpriced", "model:gpt-4o", "provider:openai",
                    "provider:anthropic", "team:none")
        for span in (DAY, MONTH)
    ] + [("team:a", DAY[0] - timedelta(days=1), DAY[0]), ("team:a", *DAY)]  # fmt: skip
    client = CountingClient(ledger)
    grouped = ClickHouseSpendReader(client).spends(windows)
    assert len(client.queries) == 1
    single = ClickHouseSpendReader(ledger)
    assert grouped == {window: single.spend(*window) for window in windows}
    assert grouped[("team:a", *DAY)] == Decimal("1.500000000001")
    assert grouped[("team:b", *MONTH)] == Decimal("8.000000000001")
    assert grouped[("model:gpt-4o", *DAY)] == Decimal("4.000000000001")
    assert grouped[("team:unpriced", *DAY)] == grouped[("team:none", *MONTH)] == 0
    assert ClickHouseSpendReader(client).spends([]) == {} and len(client.queries) == 1


def test_the_grouped_query_binds_every_value_and_has_a_column_per_window() -> None:
    tags = [f"team:{n}'; DROP TABLE x --" for n in range(50)]
    sql, parameters = spends_query(tags, [DAY, MONTH])
    assert all(f"%({name})s" in sql for name in parameters)
    assert "2026" not in sql and "DROP" not in sql and "team:" not in sql
    assert sql.count("sumIf(") == 2 and parameters["tags"] == tags  # one column per distinct window
    assert (parameters["start"], parameters["end"]) == (MONTH[0], MONTH[1])


def test_a_listing_of_ten_thousand_long_tags_is_read_in_slices_that_fit_a_query(ledger: Any) -> None:
    """The client writes bound values into the query's text, and ClickHouse refuses a query over 256 KiB:
    one query for 10,000 budgets failed (a 400 for /tag/list)."""
    from clickhouse_connect.driver.binding import finalize_query

    from spendledger.platform.clickhouse import quoted_slices

    tags = sorted({f"team:budget-{n:05d}-{chr(0x4E00 + n % 500) * 60}'" for n in range(10_000)})
    assert len(finalize_query(*spends_query(tags, [DAY, MONTH])).encode()) > 256 * 1024  # as one query
    slices = quoted_slices(tags)
    assert [t for part in slices for t in part] == tags and len(slices) > 1
    for part in slices:
        sql, parameters = spends_query(part, [DAY, MONTH])
        assert len(finalize_query(sql, parameters).encode()) < 256 * 1024
    windows = [(tag, *MONTH) for tag in tags] + [("team:a", *DAY), ("team:b", *MONTH)]
    client = CountingClient(ledger)
    grouped = ClickHouseSpendReader(client).spends(windows)
    assert len(client.queries) == len(slices)
    single = ClickHouseSpendReader(ledger)
    assert grouped[("team:a", *DAY)] == single.spend("team:a", *DAY) == Decimal("1.500000000001")
    assert grouped[("team:b", *MONTH)] == single.spend("team:b", *MONTH)
    assert not any(grouped[(tag, *MONTH)] for tag in tags)


def test_odd_tags_and_a_window_edge_within_a_second_sum_as_one_by_one(clickhouse: Any) -> None:
    client = clickhouse()
    odd = [
        "team:o'neil",
        "team:back\\slash",
        "team:nul\x00x",
        "team:ünï©ødé",
        "team:%(start)s",
        "team:tab\tx",
    ]
    records = [record(i, DAY[0] + timedelta(minutes=i), "1.5", [tag, tag]) for i, tag in enumerate(odd)]
    records.append(record(100, DAY[0] + timedelta(seconds=1, milliseconds=500), "7", [odd[0]]))
    ClickHouseStore(client).land(Landing(records=records, next_offsets={("a", 0): 1}), "sink")
    edge = (DAY[0] + timedelta(seconds=1, milliseconds=600), DAY[1])
    windows = [(tag, *span) for tag in odd for span in (DAY, MONTH, edge)]
    reader = ClickHouseSpendReader(client)
    assert reader.spends(windows) == {window: reader.spend(*window) for window in windows}
    assert reader.spends([(odd[0], *DAY)]) == {(odd[0], *DAY): Decimal("8.5")}

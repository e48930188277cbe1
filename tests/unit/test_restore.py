"""The budget agent's accounts rebuilt from what ClickHouse holds (spendledger.restore.rebuild_accounts)."""

from datetime import UTC, datetime
from decimal import Decimal

from ledger.budgets import DAY_MS, MINUTE_MS, HistoryPolicy, Window
from schemas.budgets import BudgetDefinition
from spendledger.restore import SpendRows, rebuild_accounts

NOW = int(datetime(2026, 12, 1, 15, 30, tzinfo=UTC).timestamp() * 1000)
TODAY = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)
MONTH = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)
POLICY = HistoryPolicy()


def definition(tag: str, max_usd: str, duration: str) -> BudgetDefinition:
    at = datetime(2026, 11, 1, tzinfo=UTC)
    return BudgetDefinition(
        tag=tag, max_budget_usd=Decimal(max_usd), budget_duration=duration, created_at=at, updated_at=at
    )


def rows(**fired: tuple[frozenset[int], bool]) -> SpendRows:
    """team:a spent $1 twenty days ago (a day bucket), $2 this morning (a minute bucket) and $0.5 in
    two calls a minute ago (each with its id); team:b, with no budget, $3 this morning."""
    return SpendRows(
        days=[("team:a", TODAY - 20 * DAY_MS, Decimal(1))],
        minutes=[("team:a", TODAY + 9 * 60 * MINUTE_MS, Decimal(2)), ("team:b", TODAY, Decimal(3))],
        events=[
            ("team:a", "e1", NOW - MINUTE_MS, Decimal("0.25")),
            ("team:a", "e2", NOW - MINUTE_MS + 500, Decimal("0.25")),
        ],
        newest_ms={"team:a": NOW - MINUTE_MS + 500, "team:b": TODAY},
        fired={("team:a", TODAY): (frozenset({50}), False)},
    )


def test_window_spend_is_what_the_ledger_holds_and_a_budget_over_it_is_blocked() -> None:
    """team:a today: 2 + 0.25 + 0.25 = 2.50 against a $2 daily budget: blocked until midnight."""
    accounts = rebuild_accounts(rows(), {"team:a": definition("team:a", "2", "1d")}, POLICY, NOW)
    a = accounts["team:a"]
    assert a.status.window == Window(TODAY, TODAY + DAY_MS)
    assert a.status.spend == Decimal("2.50")
    assert a.status.blocked is True and a.status.block_end_ms == TODAY + DAY_MS
    assert a.history.total(Window(MONTH - 30 * DAY_MS, NOW + 1)) == Decimal("3.50")


def test_only_thresholds_the_ledger_shows_fired_count_as_fired_so_a_lost_alert_fires_again() -> None:
    accounts = rebuild_accounts(rows(), {"team:a": definition("team:a", "2", "1d")}, POLICY, NOW)
    a = accounts["team:a"]
    assert a.status.fired == frozenset({50})
    result = a.evaluate(NOW)
    assert result is not None
    assert sorted(alert.threshold_pct or 0 for alert in result.alerts) == [80, 95, 100]
    assert result.change == "none"  # the block was already restored


def test_event_ids_of_the_last_minutes_are_kept_so_a_replayed_event_counts_once() -> None:
    accounts = rebuild_accounts(rows(), {"team:a": definition("team:a", "100", "1d")}, POLICY, NOW)
    a = accounts["team:a"]
    assert a.add_spend([("e1", NOW - MINUTE_MS, Decimal("0.25"))]) == 0
    assert a.add_spend([("e3", NOW, Decimal("0.25"))]) == 1
    assert a.status.spend == Decimal("2.75")


def test_a_tag_without_a_budget_keeps_its_spend_for_a_budget_created_later() -> None:
    accounts = rebuild_accounts(rows(), {}, POLICY, NOW)
    b = accounts["team:b"]
    assert b.rule is None
    assert b.history.total(Window(TODAY, TODAY + DAY_MS)) == Decimal(3)
    assert b.max_event_ms == TODAY


def test_a_budget_with_no_spend_yet_starts_clear() -> None:
    accounts = rebuild_accounts(rows(), {"team:new": definition("team:new", "1", "1mo")}, POLICY, NOW)
    new = accounts["team:new"]
    assert new.status.spend == 0 and new.status.blocked is False and new.status.fired == frozenset()


def test_the_rebuilt_state_reaches_the_budget_agent_as_messages_and_loads_as_it_was() -> None:
    """restore -> `state` messages on spend.tag-spend -> the agent's store: the same accounts."""
    from processors.budgets import BudgetStore
    from schemas.bundles import read_state, state_messages, tag_partition

    definitions = {"team:a": definition("team:a", "2", "1d")}
    accounts = rebuild_accounts(rows(), definitions, POLICY, NOW)
    stored: list[tuple[int, bytes, bytes]] = []
    sender = BudgetStore({}, lambda p, k, v: stored.append((p, k, v)), POLICY)
    for tag, account in accounts.items():
        sender.accounts[tag], sender.partitions[tag] = account, tag_partition(tag, 4)
        sender.definitions.update({tag: definitions[tag]} if tag in definitions else {})
        sender.persist(account, rule=True)

    messages = list(state_messages(stored))
    assert {(key, partition) for key, _, partition in messages} == {
        (b"team:a", tag_partition("team:a", 4)),
        (b"team:b", tag_partition("team:b", 4)),
    }
    changelog: list[tuple[int, bytes, bytes | None]] = []
    agent = BudgetStore({}, lambda p, k, v: changelog.append((p, k, v)), POLICY)
    agent.load(
        agent.check([entry for _, value, _ in messages for entry in read_state(value) or []]), {0, 1, 2, 3}
    )

    a, b = agent.accounts["team:a"], agent.accounts["team:b"]
    assert a.status == accounts["team:a"].status and a.rule == accounts["team:a"].rule
    assert a.history.total(Window(0, NOW + DAY_MS)) == Decimal("3.50")
    assert b.history.total(Window(0, NOW + DAY_MS)) == Decimal(3)
    assert a.add_spend([("e2", NOW - MINUTE_MS + 500, Decimal("0.25"))]) == 0  # its ids came along
    assert len(changelog) == len(stored)  # the agent's own changelog holds it for its next recovery
    assert read_state(b'{"type":"spends","tags":{}}') is None

"""The budget agent's work without Faust (processors.budgets.BudgetProcessor): batches of
`spend.tag-spend` messages in, block signals and alerts out, state in the changelog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from ledger.budgets import DAY_MS, HistoryPolicy
from processors import metrics
from processors.budgets import BudgetProcessor, BudgetStore
from schemas.budgets import BlockSignal, BudgetAlert, BudgetDefinition
from schemas.bundles import budget_message, spend_messages, state_messages, tag_partition
from schemas.state import read_budget_key

NOW = int(datetime(2026, 3, 2, 12, tzinfo=UTC).timestamp() * 1000)
PARTITIONS = 4


@dataclass
class Message:
    key: bytes | None
    value: bytes | None
    partition: int = 0
    topic: str = "spend.tag-spend"
    offset: int = 0


class Harness:
    def __init__(self, data: dict[bytes, bytes] | None = None) -> None:
        self.data: dict[bytes, bytes] = {} if data is None else data
        self.changelog: list[tuple[int, bytes, bytes | None]] = []
        self.rejected: list[tuple[str, bytes | None, str]] = []
        store = BudgetStore(self.data, lambda p, k, v: self.changelog.append((p, k, v)), HistoryPolicy())
        self.processor = BudgetProcessor(store, "blocks", "alerts", self.reject)

    def reject(self, stage: str, source: object, reason: str) -> None:
        self.rejected.append((stage, getattr(source, "key", None), reason))

    def apply(
        self, messages: list[Message], now_ms: int = NOW
    ) -> tuple[list[BlockSignal], list[BudgetAlert]]:
        out = self.processor.apply(messages, now_ms, set(range(PARTITIONS)))
        return signals_and_alerts(out)


def signals_and_alerts(out: list) -> tuple[list[BlockSignal], list[BudgetAlert]]:
    signals = [BlockSignal.model_validate_json(o.value) for o in out if o.topic == "blocks"]
    alerts = [BudgetAlert.model_validate_json(o.value) for o in out if o.topic == "alerts"]
    assert all(o.key == orjson.loads(o.value)["tag"].encode() for o in out)
    return signals, alerts


def definition(tag: str, max_usd: str | None = "1", duration: str = "1d") -> Message:
    at = datetime.fromtimestamp(NOW / 1000, UTC)
    value = BudgetDefinition(
        tag=tag, max_budget_usd=Decimal(max_usd) if max_usd else None, budget_duration=duration,
        created_at=at, updated_at=at,
    )  # fmt: skip
    return Message(tag.encode(), budget_message(value), tag_partition(tag, PARTITIONS))


def delete(tag: str) -> Message:
    return Message(tag.encode(), budget_message(None), tag_partition(tag, PARTITIONS))


def spend(by_tag: dict[str, list[tuple[str, int, Decimal]]]) -> list[Message]:
    return [Message(k, v, p) for k, v, p in spend_messages(by_tag, PARTITIONS)]


def test_a_definition_then_spend_past_it_blocks_and_alerts_in_one_batch() -> None:
    h = Harness()
    signals, alerts = h.apply(
        [definition("team:a"), *spend({"team:a": [("e1", NOW, Decimal("0.6")), ("e2", NOW, Decimal("0.6"))]})]
    )
    assert [(s.tag, s.blocked, s.spend_usd) for s in signals] == [("team:a", True, Decimal("1.2"))]
    assert sorted(a.threshold_pct or 0 for a in alerts) == [50, 80, 95, 100]
    assert not h.rejected
    # State went to the changelog partition of the tag, and the same batch replayed counts nothing twice.
    assert {p for p, _, _ in h.changelog} == {tag_partition("team:a", PARTITIONS)}
    again, _ = h.apply(spend({"team:a": [("e1", NOW, Decimal("0.6"))]}))
    assert h.processor.store.accounts["team:a"].status.spend == Decimal("1.2") and not again


def test_a_bad_message_or_tag_is_rejected_alone_and_the_batch_goes_on() -> None:
    h = Harness()
    good = spend({"team:b": [("e1", NOW, Decimal("2"))]})
    signals, _ = h.apply([Message(b"x", b"not json"), Message(None, b"{}"), definition("team:b"), *good])
    assert [(s.tag, s.blocked) for s in signals] == [("team:b", True)]
    assert [(stage, key) for stage, key, _ in h.rejected] == [("budgets", b"x"), ("budgets", None)]


def test_deleting_a_budget_sends_an_unblocked_deleted_signal_and_forgets_its_rule() -> None:
    h = Harness()
    h.apply([definition("team:c", "1"), *spend({"team:c": [("e1", NOW, Decimal("5"))]})])
    signals, _ = h.apply([delete("team:c")], NOW + 1000)
    assert [(s.change, s.blocked) for s in signals] == [("deleted", False)]
    assert h.processor.store.accounts["team:c"].rule is None
    assert not any(k.startswith(b"r\x00team:c") for k in h.data)


def test_the_clock_alone_lifts_a_block_when_its_window_ends() -> None:
    h = Harness()
    h.apply([definition("team:d", "1", "1d"), *spend({"team:d": [("e1", NOW, Decimal("5"))]})])
    assert h.processor.tick(NOW + 1000, set(range(PARTITIONS))) == []
    signals, _ = signals_and_alerts(h.processor.tick(NOW + DAY_MS, set(range(PARTITIONS))))
    assert [(s.tag, s.change, s.blocked) for s in signals] == [("team:d", "unblocked", False)]


def test_state_a_restore_sends_is_loaded_before_the_spend_of_the_same_batch() -> None:
    source = Harness()
    source.apply([definition("team:e", "10"), *spend({"team:e": [("e1", NOW, Decimal("4"))]})])
    stored = [(p, k, v) for p, k, v in source.changelog if v is not None and k in source.data]
    restored = [Message(k, v, p) for k, v, p in state_messages(stored)]
    h = Harness()
    signals, _ = h.apply(
        [*restored, *spend({"team:e": [("e1", NOW, Decimal("4")), ("e2", NOW, Decimal("7"))]})]
    )
    # e1 was counted before the restore: only e2 adds, and the sum crosses the budget.
    assert [(s.spend_usd, s.blocked) for s in signals] == [(Decimal("11"), True)]
    assert not h.rejected


def test_a_batch_the_store_cannot_read_is_rejected_rather_than_stopping_the_agent() -> None:
    h = Harness()
    broken = orjson.dumps({"type": "state", "entries": [["s\x00team:f\x00x", '{"p": 0}']]})
    h.apply([Message(b"team:f", broken)])
    assert [reason.split(":")[0] for _, _, reason in h.rejected] == ["cannot load restored state"]


def budgeted(tag: str) -> Harness:
    """A store with one budgeted tag: $1 a day, $0.6 spent (event e1)."""
    h = Harness()
    h.apply([definition(tag, "1"), *spend({tag: [("e1", NOW, Decimal("0.6"))]})])
    assert not h.rejected
    return h


UNREADABLE = {
    "a whole-second key of before parts": (b"s\x00team:old\x001772452800000", b'{"a":"0.1","i":["x"],"p":0}'),
    "a newer version": (b"m\x00team:new\x0029540880", b'{"a":"0.1","p":0,"v":2}'),
    "a version that is not an integer": (b"m\x00team:new\x0029540880", b'{"a":"0.1","p":0,"v":true}'),
    "a number written otherwise": (b"m\x00team:new\x00 29540880", b'{"a":"0.1","p":0}'),
    "a key that is not UTF-8": (b"m\x00team:\xff\x0029540880", b'{"a":"0.1","p":0}'),
    "a status missing its fields": (b"t\x00team:new", b'{"p":0}'),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_one_unreadable_key_is_left_aside_and_every_other_budget_is_rebuilt(name: str) -> None:
    """faust swallows an error in a table's recovery callback: a rebuild that stopped at one key would
    leave every budget after it unenforced, and its next write would destroy their state."""
    key, value = UNREADABLE[name]
    worker = Harness({key: value, **budgeted("team:a").data})
    before = metrics.STATE_UNREADABLE.labels("budget-state")._value.get()
    worker.processor.rebuild(set(range(PARTITIONS)))
    assert metrics.STATE_UNREADABLE.labels("budget-state")._value.get() == before + 1
    signals, _ = worker.apply(spend({"team:a": [("e1", NOW, Decimal("0.6")), ("e2", NOW, Decimal("0.6"))]}))
    assert [(s.tag, s.blocked, s.spend_usd) for s in signals] == [("team:a", True, Decimal("1.2"))]
    assert worker.data[key] == value  # kept as it was, for a person to look at


def test_a_tag_holding_a_nul_is_stored_under_keys_that_read_back() -> None:
    h = Harness()
    h.apply(
        [definition("model:evil\x00model", "1"), *spend({"model:evil\x00model": [("n1", NOW, Decimal("2"))]})]
    )
    assert not h.rejected and h.data
    assert {read_budget_key(key)[1] for key in h.data} == {"model:evil\x00model"}
    again = Harness(dict(h.data))
    again.processor.rebuild(set(range(PARTITIONS)))
    assert again.processor.store.accounts["model:evil\x00model"].status.blocked


def test_a_restored_state_message_that_cannot_be_read_is_rejected_alone_before_any_of_it_is_stored() -> None:
    source = budgeted("team:r")
    stored = [(p, k, v) for p, k, v in source.changelog if v is not None and source.data.get(k) == v]
    restored = [Message(k, v, p) for k, v, p in state_messages(stored)]
    bad_entries = [["m\x00team:q\x0029540880", '{"a": "1", "p": 0}'], ["x\x00team:q", '{"p": 0}']]
    bad = Message(b"team:q", orjson.dumps({"type": "state", "entries": bad_entries}))
    h = Harness()
    other = spend({"team:z": [("z1", NOW, Decimal("0.1"))]})
    signals, _ = h.apply(
        [
            *restored,
            bad,
            *other,
            *spend({"team:r": [("e1", NOW, Decimal("0.6")), ("e2", NOW, Decimal("0.6"))]}),
        ]
    )
    assert [(key, reason.split(":")[0]) for _, key, reason in h.rejected] == [
        (b"team:q", "cannot load restored state")
    ]
    assert [(s.tag, s.blocked) for s in signals] == [("team:r", True)]  # the good state was loaded
    assert not any(b"team:q" in key for key in h.data)
    assert "z1" in h.processor.store.accounts["team:z"].history.seen

"""Budget agent state: per-tag accounts (ledger.budgets) persisted in a changelog-backed table.

Each history bucket, rule and status is its own table key, so a batch writes
only what it changed (a busy tag's history is never rewritten whole). The
changelog partition of every key is the `spend.tag-spend` partition its tag
comes from. The in-memory accounts are rebuilt from the table after recovery.

A second bucket (the dedupe tier) is written as parts, `s|tag|second|n`: each
batch writes only the ids it added, in parts of at most MAX_PART_ID_CHARS
characters of ids, so a hot second is never rewritten whole and no value
outgrows a Kafka message.

Replays: a replayed `spend.tag-spend` message carries the same event ids, and
each part holds its amount together with the ids counted in it, written in one
key, so the replay finds them whichever writes of a crashed batch landed.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from ledger.budgets import (
    Alert,
    BudgetRule,
    BudgetStatus,
    Evaluation,
    HistoryPolicy,
    SpendHistory,
    TagAccount,
    Window,
    rule_of,
)
from schemas.budgets import BlockChange, BlockSignal, BudgetAlert, BudgetDefinition, TagSpend
from schemas.partitions import java_partition

SEP = "\x00"

SpendItem = tuple[str, int, Decimal]  # event_id, occurred_ms, cost_usd

# Characters of event ids in one stored part of a second bucket: about 300 KB of JSON at most,
# well under Kafka's default 1 MiB, however many events one tag has in one second.
MAX_PART_ID_CHARS = 256 * 1024

# Entries per `spend.tag-spend` message: about 100 KB (550 KB with 256-character event ids),
# under Kafka's default 1 MiB.
MAX_SPEND_ENTRIES = 2000


@functools.lru_cache(maxsize=16_384)
def tag_partition(tag: str, partitions: int) -> int:
    """The partition of a tag's key on `spend.tag-spend` (schemas.partitions: where the worker's
    producer puts it, with the tag's budget definitions). Memoized: murmur2 is pure Python."""
    return java_partition(tag.encode(), partitions)


def spend_messages(
    by_tag: Mapping[str, list[SpendItem]], partitions: int
) -> Iterator[tuple[bytes, bytes, int]]:
    """The `spend.tag-spend` messages for a batch's spend, as (key, value, partition): one bundle
    `{"type": "spends", "tags": {tag: [[event_id, occurred_ms, "cost"], ...]}}` per partition, keyed by
    its first tag, of at most MAX_SPEND_ENTRIES entries. With a tag or two per event and a few events
    per tag per batch, one message per tag was most of what the budget agent read."""
    groups: dict[int, list[str]] = {}
    for tag in by_tag:
        groups.setdefault(tag_partition(tag, partitions), []).append(tag)
    for partition, tags in groups.items():
        bundle: dict[str, list[list[Any]]] = {}
        size = 0
        for tag in tags:
            items = by_tag[tag]
            for start in range(0, len(items), MAX_SPEND_ENTRIES):
                if bundle and size + min(len(items) - start, MAX_SPEND_ENTRIES) > MAX_SPEND_ENTRIES:
                    yield _spends(bundle, partition)
                    bundle, size = {}, 0
                part = items[start : start + MAX_SPEND_ENTRIES]
                bundle.setdefault(tag, []).extend([i, ms, str(c)] for i, ms, c in part)
                size += len(part)
        if bundle:
            yield _spends(bundle, partition)


def _spends(bundle: dict[str, list[list[Any]]], partition: int) -> tuple[bytes, bytes, int]:
    return next(iter(bundle)).encode(), orjson.dumps({"type": "spends", "tags": bundle}), partition


def _item(entry: Any, costs: dict[str, Decimal]) -> SpendItem:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise TypeError("not [event_id, occurred_ms, cost]")
    event_id, occurred_ms, cost = entry
    if not (isinstance(event_id, str) and isinstance(occurred_ms, int) and isinstance(cost, str)):
        raise TypeError("wrong types")
    amount = costs.get(cost)
    if amount is None:
        amount = costs[cost] = Decimal(cost)
    return event_id, occurred_ms, amount


MAX_STATE_ENTRIES = 2000  # stored keys per `state` message: well under Kafka's 1 MiB


def state_messages(entries: Iterable[tuple[int, bytes, bytes]]) -> Iterator[tuple[bytes, bytes, int]]:
    """`spend.tag-spend` messages that carry stored state (`BudgetStore` keys and values, as written to
    its table) to the budget agent, as (key, value, partition): `{"type": "state", "entries":
    [[key, value], ...]}`, one tag's keys per message, at most MAX_STATE_ENTRIES each. A restore sends
    them to an empty broker before the worker starts (spendledger.restore)."""
    by_tag: dict[tuple[str, int], list[list[str]]] = {}
    for partition, key, value in entries:
        tag = key.decode().split(SEP)[1]
        by_tag.setdefault((tag, partition), []).append([key.decode(), value.decode()])
    for (tag, partition), items in by_tag.items():
        for start in range(0, len(items), MAX_STATE_ENTRIES):
            chunk = items[start : start + MAX_STATE_ENTRIES]
            yield tag.encode(), orjson.dumps({"type": "state", "entries": chunk}), partition


def read_state(value: bytes | None) -> list[tuple[bytes, bytes]] | None:
    """The stored keys and values of a `state` message (see `state_messages`); None for any other message."""
    if value is None or not value.startswith(b'{"type":"state"'):
        return None
    entries = orjson.loads(value)["entries"]
    return [(key.encode(), stored.encode()) for key, stored in entries]


def read_tag_spend(key: bytes | None, value: bytes | None) -> list[tuple[str, list[SpendItem] | TagSpend]]:
    """A `spend.tag-spend` message as (tag, spend items) pairs, or (tag, TagSpend) for a single-tag
    message (a budget definition, or spend as written before bundles). Raises ValueError."""
    if value is None or key is None:
        raise ValueError("a tag-spend message has a key and a value")
    data = orjson.loads(value)
    if not (isinstance(data, dict) and data.get("type") == "spends"):
        return [(key.decode(), TagSpend.model_validate(data))]
    tags = data.get("tags")
    if not isinstance(tags, dict):
        raise ValueError("a spend bundle has a `tags` object")
    out: list[tuple[str, list[SpendItem] | TagSpend]] = []
    costs: dict[str, Decimal] = {}  # a call's cost comes once per tag it carries: parsed once
    for tag, entries in tags.items():
        try:
            items = [_item(entry, costs) for entry in entries]
        except (TypeError, ValueError, InvalidOperation) as exc:
            raise ValueError(f"a spend entry of {tag!r} is not [event_id, occurred_ms, cost]") from exc
        out.append((tag, items))
    return out


def compact(raw: bytes) -> bytes:
    """An exact-size copy: orjson's result keeps a 4 KiB allocation however short it is (measured:
    4,097 bytes held for a 67-byte value), which, kept in a table, multiplied state memory by 50."""
    return bytes(memoryview(raw))


def to_datetime(at_ms: int) -> datetime:
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC)


def block_signal(
    tag: str,
    status: BudgetStatus,
    rule: BudgetRule | None,
    change: BlockChange,
    now_ms: int,
    definition: BudgetDefinition | None = None,
) -> BlockSignal:
    window = status.window or Window(now_ms, now_ms)
    return BlockSignal(
        tag=tag,
        blocked=status.blocked,
        spend_usd=status.spend,
        max_budget_usd=rule.max_budget if rule else None,
        soft_budget_usd=rule.soft_budget if rule else None,
        window_start=to_datetime(window.start_ms),
        window_end=to_datetime(window.end_ms),
        updated_at=to_datetime(now_ms),
        change=change,
        thresholds_fired=sorted(status.fired),
        block_ends_at=to_datetime(status.block_end_ms) if status.block_end_ms is not None else None,
        soft_budget_fired=status.soft_fired,
        definition_updated_at=definition.updated_at if definition is not None else None,
    )


def budget_alert(alert: Alert, now_ms: int, definition: BudgetDefinition | None = None) -> BudgetAlert:
    # One id per budget version, window and threshold: a crash's re-sent alert keeps it, while an alert
    # that fires again after an update (or a delete and re-create) is a new one.
    version = int(definition.updated_at.timestamp() * 1000) if definition is not None else 0
    ident = f"{alert.tag}|{version}|{alert.window.start_ms}|{alert.kind}|{alert.threshold_pct}"
    destinations = definition.alert_destinations if definition is not None else []
    projection = alert.projection
    exhausted = projection.exhausted_at_ms if projection is not None else None
    return BudgetAlert(
        alert_id=hashlib.blake2b(ident.encode(), digest_size=12).hexdigest(),
        tag=alert.tag,
        kind=alert.kind,
        threshold_pct=alert.threshold_pct,
        spend_usd=alert.spend,
        max_budget_usd=alert.max_budget,
        soft_budget_usd=alert.soft_budget,
        window_start=to_datetime(alert.window.start_ms),
        window_end=to_datetime(alert.window.end_ms),
        at=to_datetime(now_ms),
        projected_spend_usd=projection.spend if projection is not None else None,
        exhausted_at=to_datetime(exhausted) if exhausted is not None else None,
        destinations=list(destinations),
    )


class BudgetStore:
    """Accounts by tag, mirrored into a key/value table (`data`) with a changelog (`send`)."""

    def __init__(self, data: MutableMapping[bytes, bytes], send: Any, policy: HistoryPolicy) -> None:
        self.data = data
        self.send = send  # send(partition, key, value | None)
        self.policy = policy
        self.accounts: dict[str, TagAccount] = {}
        self.partitions: dict[str, int] = {}
        self.definitions: dict[str, BudgetDefinition] = {}
        self.parts: dict[tuple[str, int], int] = {}  # (tag, second) -> parts written

    def account(self, tag: str, partition: int) -> TagAccount:
        self.partitions[tag] = partition
        found = self.accounts.get(tag)
        if found is None:
            found = self.accounts[tag] = TagAccount(tag, SpendHistory(self.policy))
        return found

    def budgeted(self, partitions: set[int]) -> Iterable[TagAccount]:
        return [
            a for t, a in self.accounts.items() if a.rule is not None and self.partitions[t] in partitions
        ]

    def set_definition(self, account: TagAccount, definition: BudgetDefinition | None) -> None:
        if definition is None:
            self.definitions.pop(account.tag, None)
            account.set_rule(None)
        else:
            self.definitions[account.tag] = definition
            account.set_rule(rule_of(definition))

    # ------------------------------------------------------------ persistence

    def _put(self, partition: int, key: str, value: dict[str, Any] | None) -> None:
        raw_key = key.encode()
        if value is None:
            if self.data.pop(raw_key, None) is not None:
                self.send(partition, raw_key, None)
            return
        value["p"] = partition
        raw = compact(orjson.dumps(value))
        self.data[raw_key] = raw
        self.send(partition, raw_key, raw)

    def persist(self, account: TagAccount, *, rule: bool = False) -> None:
        """Write what changed in the account: its touched buckets, its status, and its rule if asked."""
        tag = account.tag
        partition = self.partitions[tag]
        history = account.history
        for tier, start in history.changed:
            key = f"{tier}{SEP}{tag}{SEP}{start}"
            if tier == "s":
                self._persist_second(partition, key, (tag, start), history.seconds.get(start))
                continue
            amount = (history.minutes if tier == "m" else history.days).get(start)
            self._put(partition, key, {"a": str(amount)} if amount is not None else None)
        history.changed.clear()
        if rule:
            definition = self.definitions.get(tag)
            self._put(
                partition, f"r{SEP}{tag}", {"def": definition.model_dump(mode="json")} if definition else None
            )
        status = account.status
        if account.rule is None:
            # Nothing to remember without a budget (the clock comes back from the history).
            self._put(partition, f"t{SEP}{tag}", None)
            return
        self._put(
            partition,
            f"t{SEP}{tag}",
            {
                "w": [status.window.start_ms, status.window.end_ms] if status.window else None,
                "spend": str(status.spend),
                "fired": sorted(status.fired),
                "soft": status.soft_fired,
                "blocked": status.blocked,
                "end": status.block_end_ms,
                "proj": status.projected_fired,
                "max_ms": account.max_event_ms,
                "pending": account.pending,
            },
        )

    def _persist_second(self, partition: int, key: str, part_key: tuple[str, int], bucket: Any) -> None:
        if bucket is None:  # moved to the minute tier: forget every part
            for n in range(self.parts.pop(part_key, 0)):
                self._put(partition, f"{key}{SEP}{n}", None)
            return
        for ids, amount in bucket.take_unsaved(MAX_PART_ID_CHARS):
            n = self.parts.get(part_key, 0)
            self._put(partition, f"{key}{SEP}{n}", {"a": str(amount), "i": ids})
            self.parts[part_key] = n + 1

    def rebuild(self, partitions: set[int]) -> None:
        """Rebuild the accounts from the table (after recovery), keeping only the given partitions."""
        self.accounts.clear()
        self.partitions.clear()
        self.definitions.clear()
        self.parts.clear()
        foreign: list[bytes] = []
        legacy: list[tuple[int, bytes]] = []
        for raw_key, raw in list(self.data.items()):
            value = orjson.loads(raw)
            kind, tag, *rest = raw_key.decode().split(SEP)
            partition = int(value["p"])
            if partition not in partitions:
                foreign.append(raw_key)
                continue
            account = self.account(tag, partition)
            history = account.history
            if kind == "s":
                second = int(rest[0])
                bucket = history.restore_second(second, Decimal(value["a"]), value["i"])
                if len(rest) == 1:  # a whole bucket in one key (before parts): written again as a part
                    legacy.append((partition, raw_key))
                    # (its amount rides on its first id)
                    amounts = [Decimal(value["a"])] + [Decimal(0)] * (len(value["i"]) - 1)
                    bucket.unsaved += zip(value["i"], amounts, strict=True)
                    history.changed.add(("s", second))
                else:
                    self.parts[(tag, second)] = max(self.parts.get((tag, second), 0), int(rest[1]) + 1)
            elif kind == "m":
                history.minutes[int(rest[0])] = Decimal(value["a"])
            elif kind == "d":
                history.days[int(rest[0])] = Decimal(value["a"])
            elif kind == "r":
                definition = BudgetDefinition.model_validate(value["def"])
                self.definitions[tag] = definition
                account.rule = rule_of(definition)
            elif kind == "t":
                w = value["w"]
                account.status = BudgetStatus(
                    window=Window(w[0], w[1]) if w else None,
                    spend=Decimal(value["spend"]),
                    fired=frozenset(value["fired"]),
                    soft_fired=value["soft"],
                    blocked=value["blocked"],
                    block_end_ms=value["end"],
                    projected_fired=value.get("proj", False),
                )
                account.max_event_ms = value["max_ms"]
                account.pending = value["pending"]
        for raw_key in foreign:
            self.data.pop(raw_key, None)
        for partition, raw_key in legacy:
            self._put(partition, raw_key.decode(), None)
        for account in self.accounts.values():
            account.max_event_ms = max(account.max_event_ms, max(account.history.seconds, default=0))
            account.history.drop_covered()
            if account.history.changed:
                self.persist(account)

    def load(self, entries: list[tuple[bytes, bytes]], partitions: set[int]) -> None:
        """Store keys and values as they were (a restore's `state` messages), then rebuild the accounts.
        Call it between batches: accounts not yet persisted would be rebuilt without their changes."""
        for key, value in entries:
            self.data[key] = compact(value)
            self.send(int(orjson.loads(value)["p"]), key, self.data[key])
        self.rebuild(partitions)

    def compact(self, now_ms: int, partitions: set[int]) -> int:
        """Move old buckets to coarser tiers; forget accounts with neither budget nor history."""
        forgotten = 0
        for tag, account in list(self.accounts.items()):
            if self.partitions[tag] not in partitions:
                continue
            account.history.compact(account.clock(now_ms))
            if account.history.changed:
                self.persist(account)
            h = account.history
            if account.rule is None and not (h.seconds or h.minutes or h.days):
                self._put(self.partitions[tag], f"t{SEP}{tag}", None)
                del self.accounts[tag]
                del self.partitions[tag]
                forgotten += 1
        return forgotten


def outcome_messages(
    account: TagAccount, result: Evaluation | None, now_ms: int, definition: BudgetDefinition | None = None
) -> tuple[BlockSignal | None, list[BudgetAlert]]:
    """What to send for one evaluation: the block state when it changed, and the alerts (each for the
    budget's own alert destinations as well as the default ones)."""
    if result is None:
        return None, []
    signal = None
    if result.change != "none":
        signal = block_signal(account.tag, result.status, account.rule, result.change, now_ms, definition)
    return signal, [budget_alert(a, now_ms, definition) for a in result.alerts]

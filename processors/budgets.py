"""The budget agent's work, without Faust: per-tag accounts (ledger.budgets) kept in a changelog-backed
table (`BudgetStore`), and what a batch of `spend.tag-spend` messages or the window timer makes of them
(`BudgetProcessor`). processors.app only wires these to Faust and the outbox.

Each history bucket, rule and status is its own table key (schemas.state), so a batch writes only what
it changed. A one-second bucket (the dedupe tier) is written as parts: each batch writes only the ids
it added, in parts of at most MAX_PART_ID_CHARS characters of ids, so no value outgrows a Kafka message.
The changelog partition of every key is the `spend.tag-spend` partition its tag comes from.

Replays: a replayed `spend.tag-spend` message carries the same event ids, and each part holds its amount
together with the ids counted in it, in one key, so the replay finds them whichever writes of a crashed
batch landed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, MutableMapping, Sequence
from decimal import Decimal
from typing import Any

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
from processors import metrics
from processors.deadletter import describe
from processors.messages import ChangelogSend, Output, Rejecter, Source
from schemas.budgets import BlockChange, BlockSignal, BudgetAlert, BudgetDefinition, TagSpend
from schemas.bundles import read_state, read_tag_spend
from schemas.state import StateFormatError, budget_key, dump_state, load_state, read_budget_key
from schemas.times import from_ms

log = logging.getLogger(__name__)

# Characters of event ids in one stored part of a second bucket: well under Kafka's default 1 MiB.
MAX_PART_ID_CHARS = 256 * 1024


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
        window_start=from_ms(window.start_ms),
        window_end=from_ms(window.end_ms),
        updated_at=from_ms(now_ms),
        change=change,
        thresholds_fired=sorted(status.fired),
        block_ends_at=from_ms(status.block_end_ms) if status.block_end_ms is not None else None,
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
        window_start=from_ms(alert.window.start_ms),
        window_end=from_ms(alert.window.end_ms),
        at=from_ms(now_ms),
        projected_spend_usd=projection.spend if projection is not None else None,
        exhausted_at=from_ms(exhausted) if exhausted is not None else None,
        destinations=list(destinations),
    )


class BudgetStore:
    """Accounts by tag, mirrored into a key/value table (`data`) with a changelog (`send`)."""

    def __init__(
        self, data: MutableMapping[bytes, bytes], send: ChangelogSend, policy: HistoryPolicy
    ) -> None:
        self.data = data
        self.send = send
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
        raw = dump_state(value)
        self.data[raw_key] = raw
        self.send(partition, raw_key, raw)

    def persist(self, account: TagAccount, *, rule: bool = False) -> None:
        """Write what changed in the account: its touched buckets, its status, and its rule if asked."""
        tag = account.tag
        partition = self.partitions[tag]
        history = account.history
        for tier, start in history.changed:
            if tier == "s":
                self._persist_second(partition, tag, start, history.seconds.get(start))
                continue
            amount = (history.minutes if tier == "m" else history.days).get(start)
            self._put(
                partition, budget_key(tier, tag, start), {"a": str(amount)} if amount is not None else None
            )
        history.changed.clear()
        if rule:
            definition = self.definitions.get(tag)
            value = {"def": definition.model_dump(mode="json")} if definition else None
            self._put(partition, budget_key("r", tag), value)
        status = account.status
        if account.rule is None:
            # Nothing to remember without a budget (the clock comes back from the history).
            self._put(partition, budget_key("t", tag), None)
            return
        self._put(
            partition,
            budget_key("t", tag),
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

    def _persist_second(self, partition: int, tag: str, second: int, bucket: Any) -> None:
        if bucket is None:  # moved to the minute tier: forget every part
            for n in range(self.parts.pop((tag, second), 0)):
                self._put(partition, budget_key("s", tag, second, n), None)
            return
        for ids, amount in bucket.take_unsaved(MAX_PART_ID_CHARS):
            n = self.parts.get((tag, second), 0)
            self._put(partition, budget_key("s", tag, second, n), {"a": str(amount), "i": ids})
            self.parts[(tag, second)] = n + 1

    def rebuild(self, partitions: set[int]) -> None:
        """Rebuild the accounts from the table (after recovery), keeping only the given partitions."""
        self.accounts.clear()
        self.partitions.clear()
        self.definitions.clear()
        self.parts.clear()
        foreign: list[bytes] = []
        for raw_key, raw in list(self.data.items()):
            try:
                if self._restore(raw_key, raw, partitions):
                    foreign.append(raw_key)
            except Exception as exc:  # one unreadable key must not take the others' budgets with it
                metrics.STATE_UNREADABLE.labels("budget-state").inc()
                log.error("budget state: left aside the unreadable key %r: %s", raw_key[:120], describe(exc))
        for raw_key in foreign:
            self.data.pop(raw_key, None)
        for account in self.accounts.values():
            account.max_event_ms = max(account.max_event_ms, max(account.history.seconds, default=0))
            account.history.drop_covered()
            if account.history.changed:
                self.persist(account)

    def _restore(self, raw_key: bytes, raw: bytes, partitions: set[int]) -> bool:
        """Puts one stored key back in its account; True when its partition is not ours."""
        value = load_state(raw)
        kind, tag, parts = read_budget_key(raw_key)
        partition = int(value["p"])
        if partition not in partitions:
            return True
        account = self.account(tag, partition)
        history = account.history
        if kind == "s":
            second, n = parts
            history.restore_second(second, Decimal(value["a"]), value["i"])
            self.parts[(tag, second)] = max(self.parts.get((tag, second), 0), n + 1)
        elif kind == "m":
            history.minutes[parts[0]] = Decimal(value["a"])
        elif kind == "d":
            history.days[parts[0]] = Decimal(value["a"])
        elif kind == "r":
            definition = BudgetDefinition.model_validate(value["def"])
            self.definitions[tag] = definition
            account.rule = rule_of(definition)
        else:
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
        return False

    @staticmethod
    def check(entries: list[tuple[bytes, bytes]]) -> list[tuple[bytes, dict[str, Any]]]:
        """Stored keys and values (a restore's `state` message) read, each value's fields with its
        partition. Raises StateFormatError before any is stored."""
        checked = []
        for key, value in entries:
            read_budget_key(key)
            fields = load_state(value)
            if not isinstance(fields.get("p"), int):
                raise StateFormatError(f"stored state of {key[:80]!r} has no partition")
            checked.append((key, fields))
        return checked

    def load(self, checked: list[tuple[bytes, dict[str, Any]]], partitions: set[int]) -> None:
        """Store what `check` read, as it was, then rebuild the accounts. Call it between batches:
        accounts not yet persisted would be rebuilt without their changes."""
        for key, fields in checked:
            self.data[key] = dump_state(fields)
            self.send(fields["p"], key, self.data[key])
        self.rebuild(partitions)

    def forget_idle(self, now_ms: int, partitions: set[int]) -> int:
        """Move old buckets to coarser tiers; forget accounts with neither budget nor history."""
        forgotten = 0
        for tag, account in list(self.accounts.items()):
            if self.partitions[tag] not in partitions:
                continue
            account.history.roll_up(account.clock(now_ms))
            if account.history.changed:
                self.persist(account)
            h = account.history
            if account.rule is None and not (h.seconds or h.minutes or h.days):
                self._put(self.partitions[tag], budget_key("t", tag), None)
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


class BudgetProcessor:
    """What the budget agents do, as plain calls: `apply` a batch of `spend.tag-spend` messages,
    `tick` the windows on the wall clock, `tidy` old history. Each returns the block signals and
    alerts to send, as (topic, key, value); state goes to the store's changelog as it changes, and
    an input that cannot be applied goes to `reject` (one message's or one tag's, never the batch's)."""

    def __init__(self, store: BudgetStore, blocks_topic: str, alerts_topic: str, reject: Rejecter) -> None:
        self.store = store
        self.blocks_topic = blocks_topic
        self.alerts_topic = alerts_topic
        self.reject = reject

    def apply(self, messages: Sequence[Source], now_ms: int, partitions: set[int]) -> list[Output]:
        """A batch: restored state first, then definitions and spend in order, then one evaluation
        per touched tag. `now_ms` is the windows' clock: an event stamped later counts now."""
        out: list[Output] = []
        rest = self._load_state(messages, partitions)
        touched: dict[str, bool] = {}  # tag -> its rule changed
        deleted: list[tuple[str, BudgetStatus, BudgetRule]] = []
        last: dict[str, Source] = {}  # per tag, the message a failure to evaluate is reported on
        for message in rest:
            try:
                spends = read_tag_spend(message.key, message.value)
            except Exception as exc:
                self.reject("budgets", message, f"cannot apply to a budget: {describe(exc)}")
                continue
            for tag, spend in spends:
                last[tag] = message
                try:
                    account = self.store.account(tag, message.partition)
                    if isinstance(spend, TagSpend):
                        before = (account.status, account.rule)
                        self.store.set_definition(account, spend.definition)
                        account.announce()  # a write's answer waits for this definition's signal
                        if spend.definition is None and before[1] is not None:
                            deleted.append((tag, before[0], before[1]))
                        touched[tag] = True
                        continue
                    counted = account.add_spend(spend, now_ms)
                    metrics.BUDGET_ENTRIES.inc(counted)
                    metrics.BUDGET_DUPLICATES.inc(len(spend) - counted)
                    touched.setdefault(tag, False)
                except Exception as exc:
                    self.reject("budgets", message, f"cannot apply to {tag!r}'s budget: {describe(exc)}")
        for tag, status, rule in deleted:
            try:
                signal = block_signal(tag, status, rule, "deleted", now_ms).model_copy(
                    update={"blocked": False}
                )
                out.append(self._signal(signal))
            except Exception as exc:
                self.reject("budgets", last[tag], f"cannot delete {tag!r}'s budget: {describe(exc)}")
        for tag, rule_changed in touched.items():
            try:
                account = self.store.accounts[tag]
                self._outcome(account, account.evaluate(now_ms), now_ms, out)
                self.store.persist(account, rule=rule_changed)
            except Exception as exc:
                self.reject("budgets", last[tag], f"cannot evaluate {tag!r}'s budget: {describe(exc)}")
        metrics.BUDGET_TAGS.set(len(self.store.accounts))
        return out

    def tick(self, now_ms: int, partitions: set[int]) -> list[Output]:
        """Windows end without traffic: lift blocks and roll windows on the wall clock."""
        out: list[Output] = []
        for account in self.store.budgeted(partitions):
            if account.due_ms > now_ms:
                continue  # nothing the clock alone can change yet
            try:
                result = account.evaluate(now_ms)
                if result is not None and (result.change != "none" or result.alerts):
                    self._outcome(account, result, now_ms, out)
                    self.store.persist(account)
            except Exception as exc:  # one budget's failure must not stop the others' windows
                account.due_ms = now_ms + 60_000
                log.error("cannot evaluate %r's budget: %s", account.tag, describe(exc))
        return out

    def tidy(self, now_ms: int, partitions: set[int]) -> None:
        self.store.forget_idle(now_ms, partitions)
        metrics.BUDGET_TAGS.set(len(self.store.accounts))

    def rebuild(self, partitions: set[int]) -> None:
        self.store.rebuild(partitions)
        metrics.BUDGET_TAGS.set(len(self.store.accounts))
        log.info(
            "budget state rebuilt: partitions %s, %d tags, %d keys",
            sorted(partitions),
            len(self.store.accounts),
            len(self.store.data),
        )

    def _load_state(self, messages: Sequence[Source], partitions: set[int]) -> list[Source]:
        """Loads the stored state a restore sent (it comes first in its partitions, so before the
        batch's spend); returns the other messages. A state message with an entry this worker cannot
        read is rejected whole, before any of it is stored."""
        rest, entries = [], []
        for message in messages:
            try:
                found = read_state(message.value)
                if found is not None:
                    entries += self.store.check(found)
            except Exception as exc:
                self.reject("budgets", message, f"cannot load restored state: {describe(exc)}")
                continue
            if found is None:
                rest.append(message)
        if entries:
            self.store.load(entries, partitions)
            log.info(
                "budget state loaded from a restore: %d keys, %d tags", len(entries), len(self.store.accounts)
            )
        return rest

    def _outcome(
        self, account: TagAccount, result: Evaluation | None, now_ms: int, out: list[Output]
    ) -> None:
        """Appends to `out` as each message is made: a block signal made is sent, even if an alert after
        it cannot be."""
        signal, alerts = outcome_messages(account, result, now_ms, self.store.definitions.get(account.tag))
        if signal is not None:
            out.append(self._signal(signal))
        for alert in alerts:
            metrics.BUDGET_ALERTS.labels(alert.kind).inc()
            out.append(Output(self.alerts_topic, alert.tag.encode(), alert.model_dump_json().encode()))

    def _signal(self, signal: BlockSignal) -> Output:
        metrics.BUDGET_SIGNALS.labels(signal.change).inc()
        return Output(self.blocks_topic, signal.tag.encode(), signal.model_dump_json().encode())

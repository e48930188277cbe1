"""Carrying the ledger over a broker that starts empty (the embedded system, DESIGN §9).

The embedded broker keeps its log in memory; ClickHouse (the ledger of record) and
the ingest journal (`spendledger.platform.journal`) are on disk. So `up` runs `restore()`
after it starts a broker and before it starts the worker and the API:

1. Budget definitions (`tag_budgets`, latest version per tag, app limits
   included) are published to `spend.budgets` again.
2. The budget agent's state is rebuilt from `spend_records` (spend by tag: day
   buckets, minute buckets, and the last few minutes event by event with their
   ids, as the agent keeps them) and `budget_events` (the thresholds already
   fired in the current window), and sent to the agent as `state` messages on
   `spend.tag-spend`, ahead of any spend; the agent stores them as its own. The
   spend a budget sees is then what ClickHouse holds, to the cent.
3. Each budget's block state is published to `spend.budget-blocks`, so the guard
   and `/v1/check` refuse a blocked tag from the first request.
4. The journal's events whose call neither landed in `spend_records` nor was
   rejected are published to `spend.raw` again, in their order: calls that were
   in flight, and requests still waiting for their usage (the join's pending
   state). Only those stay in the journal.

Replays are harmless: the sink skips an event_id already landed, and the
journal's landed calls are not replayed at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, Producer

from ledger.budgets import (
    DAY_MS,
    MINUTE_MS,
    BudgetStatus,
    HistoryPolicy,
    SpendHistory,
    TagAccount,
    evaluate,
    rule_of,
)
from processors.budgets import BudgetStore, block_signal
from schemas.budgets import BudgetDefinition
from schemas.bundles import raw_messages, state_messages, tag_partition
from schemas.clickhouse import BUDGET_KEYS_SQL, SPEND_TIME_SQL
from schemas.times import from_ms
from schemas.topics import Topics
from spendledger.platform.clickhouse import quoted_slices
from spendledger.platform.errors import StartupError
from spendledger.platform.journal import is_whole, read_segment, remove, segments, set_aside, write_segment
from spendledger.platform.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Restored:
    budgets: int = 0
    tags: int = 0
    blocked: int = 0
    replayed: int = 0
    landed: int = 0


# ------------------------------------------------------------------ journal


@dataclass
class Unsettled:
    """What a journal holds that ClickHouse does not have yet."""

    events: list[dict[str, Any]]  # raw events whose call neither landed nor was rejected, in order
    budgets: list[tuple[bytes, bytes | None]]  # the latest change of each budget not in tag_budgets
    settled: int = 0  # raw events that had settled (or were copies of another)

    def __bool__(self) -> bool:
        return bool(self.events or self.budgets)


def find_unsettled(client: Any, paths: Iterable[Path], topics: Topics) -> Unsettled:
    events: list[dict[str, Any]] = []
    changes: dict[bytes, bytes | None] = {}
    for path in paths:
        for topic, key, value in read_segment(path):
            if topic == topics.budgets:
                changes.pop(key, None)
                changes[key] = value  # in order of the latest change
            elif topic == topics.raw and value is not None:
                events += _events(value)
    unique = list({_identity(e): e for e in reversed(events)}.values())[::-1]  # a retried copy once
    settled = settled_events(client, unique, topics)
    left = [e for e in unique if _identity(e) not in settled]
    budgets = unlanded_budgets(client, changes) if changes else []
    return Unsettled(left, budgets, len(events) - len(left))


def _events(value: bytes) -> list[dict[str, Any]]:
    """The events of a `spend.raw` message (a bundle `{"events": [...]}` gives each of its own)."""
    data = orjson.loads(value)
    if isinstance(data, dict) and "kind" not in data and isinstance(data.get("events"), list):
        data = data["events"]
    found = data if isinstance(data, list) else [data]
    return [e for e in found if isinstance(e, dict) and isinstance(e.get("request_id"), str)]


def _identity(event: dict[str, Any]) -> tuple[str, str]:
    """How a journal event is known: its request and its own id (the API always assigns one)."""
    return event["request_id"], str(event.get("event_id") or event.get("kind"))


def settled_events(client: Any, events: list[dict[str, Any]], topics: Topics) -> set[tuple[str, str]]:
    """The identities of these events that settled: a usage or completed event once a record carries its
    event_id (the billing event's); a request event once its call has a record; any event once it, or
    its call's record, was rejected. The look-up is bounded to a month around the events' times (a
    record carries one of its call's event times), so it reads a few parts, not the whole ledger."""
    if not events:
        return set()
    times = [t for t in map(_event_time, events) if t is not None]
    start = min(times, default=datetime(2000, 1, 1, tzinfo=UTC)) - _SETTLE_MARGIN
    end = max(times, default=datetime(2299, 1, 1, tzinfo=UTC)) + _SETTLE_MARGIN
    landed: set[tuple[str, str]] = set()  # (request_id, event_id) of records
    rejected: set[str] = set()
    for ids in quoted_slices(list({e["request_id"] for e in events})):
        params = {"ids": ids, "topics": (topics.raw, topics.attributed), "start": start, "end": end}
        landed |= {
            (r, e)
            for r, e in client.query(
                "SELECT request_id, event_id FROM spend_records WHERE occurred_at >= %(start)s "
                "AND occurred_at <= %(end)s AND request_id IN %(ids)s",
                parameters=params,
            ).result_rows
        }
        rejected |= {
            row[0]
            for row in client.query(
                "SELECT DISTINCT JSONExtractString(payload, 'request_id') AS r FROM spend_rejects "
                "WHERE rejected_at >= %(start)s AND source_topic IN %(topics)s AND r IN %(ids)s",
                parameters=params,
            ).result_rows
        }
    called = {r for r, _ in landed}
    out = set()
    for event in events:
        request_id, event_id = identity = _identity(event)
        if request_id in rejected or (
            request_id in called if event.get("kind") == "request" else identity in landed
        ):
            out.add(identity)
    return out


_SETTLE_MARGIN = timedelta(days=31)


def _event_time(event: dict[str, Any]) -> datetime | None:
    for name in ("occurred_at", "received_at"):
        value = event.get(name)
        if isinstance(value, str):
            try:
                at = datetime.fromisoformat(value)
            except ValueError:
                continue
            return at if at.tzinfo else at.replace(tzinfo=UTC)
    return None


def unlanded_budgets(client: Any, changes: Mapping[bytes, bytes | None]) -> list[tuple[bytes, bytes | None]]:
    """The budget changes `tag_budgets` does not show yet (a definition at least as new, or a deletion)."""
    latest: dict[str, tuple[datetime, bool]] = {}
    for tags in quoted_slices([key.decode() for key in changes]):
        for tag, updated, deleted in client.query(
            "SELECT tag, max(updated_at), argMax(deleted, updated_at) FROM tag_budgets "
            "WHERE tag IN %(tags)s GROUP BY tag",
            parameters={"tags": tags},
        ).result_rows:
            latest[tag] = (_utc(updated), bool(deleted))
    out: list[tuple[bytes, bytes | None]] = []
    for key, value in changes.items():
        landed = latest.get(key.decode())
        if value is None:
            if landed is not None and not landed[1]:
                out.append((key, value))
        elif (
            landed is None
            or landed[1]
            or landed[0] < _to_milliseconds(BudgetDefinition.model_validate_json(value).updated_at)
        ):
            out.append((key, value))
    return out


def settled_segments(client: Any, closed: list[Path], topics: Topics) -> list[Path]:
    """The closed segments whose every message settled in ClickHouse."""
    return [path for path in closed if not find_unsettled(client, [path], topics)]


# ------------------------------------------------------------------ budgets


def load_definitions(client: Any) -> dict[str, BudgetDefinition]:
    """The latest definition of every budget that is not deleted."""
    result = client.query(
        "SELECT tag, argMax(max_budget_usd, updated_at), argMax(soft_budget_usd, updated_at), "
        "argMax(budget_duration, updated_at), argMax(alert_thresholds, updated_at), "
        "argMax(deleted, updated_at), argMax(window, updated_at), argMax(source, updated_at), "
        "argMax(created_at, updated_at), max(updated_at), argMax(description, updated_at) "
        "FROM tag_budgets GROUP BY tag"
    )
    out = {}
    for (
        tag,
        max_usd,
        soft_usd,
        duration,
        thresholds,
        deleted,
        window,
        source,
        created,
        updated,
        text,
    ) in result.result_rows:
        if deleted:
            continue
        out[tag] = BudgetDefinition(
            tag=tag,
            max_budget_usd=max_usd,
            soft_budget_usd=soft_usd,
            budget_duration=duration,
            window=window,
            alert_thresholds=list(thresholds),
            source=source,
            created_at=_utc(created),
            updated_at=_utc(updated),
            description=text,
        )
    return out


@dataclass(frozen=True)
class SpendRows:
    """Priced spend by tag as ClickHouse holds it, in the agent's tiers (see ledger.budgets)."""

    days: list[tuple[str, int, Decimal]]  # tag, local day start ms, amount
    minutes: list[tuple[str, int, Decimal]]  # tag, minute start ms, amount
    events: list[tuple[str, str, int, Decimal]]  # tag, event_id, occurred ms, cost
    newest_ms: dict[str, int]  # tag -> newest event time
    fired: dict[tuple[str, int], tuple[frozenset[int], bool]]  # (tag, window start) -> thresholds, soft


def load_spend(client: Any, policy: HistoryPolicy, now_ms: int) -> SpendRows:
    tz = str(policy.tz)
    history = SpendHistory(policy)
    days_from = now_ms - policy.day_history_ms
    minutes_from = history.day_start(now_ms - policy.minute_history_ms)
    events_from = (now_ms - policy.dedupe_ms) // MINUTE_MS * MINUTE_MS - MINUTE_MS
    # Each record's spend under every budget key, at the time it counts (as the budget agent counts it).
    priced = (
        f"FROM spend_records ARRAY JOIN {BUDGET_KEYS_SQL} AS tag WHERE cost_usd IS NOT NULL AND cost_usd != 0"
    )
    window = f"AND {SPEND_TIME_SQL} >= %(start)s AND {SPEND_TIME_SQL} < %(end)s"

    def rows(select: str, start_ms: int, end_ms: int, group: str = "") -> list[Any]:
        query = f"SELECT {select} {priced} {window} {group}"  # noqa: S608 - fixed text, bound values
        params = {"start": from_ms(start_ms), "end": from_ms(end_ms), "tz": tz}
        return list(client.query(query, parameters=params).result_rows)

    far = now_ms + 100 * 366 * DAY_MS
    days = rows(
        f"tag, toUnixTimestamp(toStartOfDay({SPEND_TIME_SQL}, %(tz)s)) * 1000 AS d, sum(cost_usd)",
        days_from,
        minutes_from,
        "GROUP BY tag, d",
    )
    minutes = rows(
        f"tag, toUnixTimestamp(toStartOfMinute({SPEND_TIME_SQL})) * 1000 AS m, sum(cost_usd)",
        minutes_from,
        events_from,
        "GROUP BY tag, m",
    )
    events = rows(f"tag, event_id, toUnixTimestamp64Milli({SPEND_TIME_SQL}), cost_usd", events_from, far)
    newest = rows(f"tag, toUnixTimestamp64Milli(max({SPEND_TIME_SQL}))", days_from, far, "GROUP BY tag")
    fired_rows = client.query(
        "SELECT tag, toUnixTimestamp64Milli(window_start) AS ws, "
        "groupUniqArrayIf(assumeNotNull(threshold_pct), event_type = 'alert'), "
        "max(event_type = 'soft_alert') FROM budget_events "
        "WHERE event_type IN ('alert', 'soft_alert') AND window_end > %(now)s GROUP BY tag, ws",
        parameters={"now": from_ms(now_ms)},
    ).result_rows
    return SpendRows(
        days=[(t, int(d), Decimal(a)) for t, d, a in days],
        minutes=[(t, int(m), Decimal(a)) for t, m, a in minutes],
        events=[(t, i, int(ms), Decimal(c)) for t, i, ms, c in events],
        newest_ms={t: int(ms) for t, ms in newest},
        fired={(t, int(ws)): (frozenset(int(x) for x in th), bool(soft)) for t, ws, th, soft in fired_rows},
    )


def rebuild_accounts(
    spend: SpendRows,
    definitions: Mapping[str, BudgetDefinition],
    policy: HistoryPolicy,
    now_ms: int,
) -> dict[str, TagAccount]:
    """The budget agent's accounts as the ledger implies them at `now_ms`. Pure.

    A budget's status is evaluated afresh; of the thresholds already passed, only
    those `budget_events` shows fired in the current window count as fired, so an
    alert that never landed fires again (its alert_id is the same: it lands once).
    """
    accounts: dict[str, TagAccount] = {}

    def account(tag: str) -> TagAccount:
        found = accounts.get(tag)
        if found is None:
            found = accounts[tag] = TagAccount(tag, SpendHistory(policy))
        return found

    for tag, day, amount in spend.days:
        history = account(tag).history
        history.days[day] = history.days.get(day, Decimal(0)) + amount
        history.changed.add(("d", day))
    for tag, minute, amount in spend.minutes:
        history = account(tag).history
        history.minutes[minute] = history.minutes.get(minute, Decimal(0)) + amount
        history.changed.add(("m", minute))
    for tag, event_id, at_ms, cost in spend.events:
        account(tag).history.add(event_id, at_ms, cost)
    for tag in definitions:
        account(tag)
    for tag, found in accounts.items():
        found.max_event_ms = spend.newest_ms.get(tag, 0)
        found.history.roll_up(found.clock(now_ms))
        definition = definitions.get(tag)
        if definition is None:
            continue
        rule = rule_of(definition)
        result = evaluate(rule, found.history, BudgetStatus(), found.clock(now_ms), created=True)
        status = result.status
        window_start = status.window.start_ms if status.window else 0
        thresholds, soft = spend.fired.get((tag, window_start), (frozenset(), False))
        found.rule = rule
        found.status = replace(status, fired=status.fired & thresholds, soft_fired=status.soft_fired and soft)
    return accounts


# ------------------------------------------------------------------ the whole step


def restore(
    settings: Settings, client: Any, journal_dir: Path | None, say: Callable[[str], None]
) -> Restored:
    """Steps 1-4 of the module docstring, against an empty broker."""
    topics = settings.topics
    partitions = settings.topic_partitions
    now_ms = int(time.time() * 1000)
    done = Restored()
    producer = _Producer(settings)
    paths = segments(journal_dir) if journal_dir is not None else []
    say(f"    reading the journal ({len(paths)} segments) and what of it landed")
    journal = find_unsettled(client, paths, topics)

    definitions = load_definitions(client)
    for tag, definition in definitions.items():
        producer.send(topics.budgets, tag.encode(), definition.model_dump_json().encode())
    for key, value in journal.budgets:  # changes acknowledged that had not landed yet
        producer.send(topics.budgets, key, value)
        if value is None:
            definitions.pop(key.decode(), None)
        else:
            definitions[key.decode()] = BudgetDefinition.model_validate_json(value)
    done.budgets = len(definitions)

    policy = settings.history_policy()
    say(f"    reading spend by tag from spend_records for {len(definitions)} budgets")
    accounts = rebuild_accounts(load_spend(client, policy, now_ms), definitions, policy, now_ms)
    stored: list[tuple[int, bytes, bytes]] = []

    def keep(partition: int, key: bytes, value: bytes | None) -> None:
        if value is not None:  # (a store that starts empty deletes nothing)
            stored.append((partition, key, value))

    store = BudgetStore({}, keep, policy)
    for tag, account in accounts.items():
        store.accounts[tag] = account
        store.partitions[tag] = tag_partition(tag, partitions)
        if tag in definitions:
            store.definitions[tag] = definitions[tag]
        store.persist(account, rule=True)
        if account.rule is not None:
            signal = block_signal(tag, account.status, account.rule, "update", now_ms)
            value = signal.model_dump_json().encode()
            # Where the worker puts the tag's later signals (murmur2), so the latest one wins.
            producer.send(topics.budget_blocks, tag.encode(), value, store.partitions[tag])
            done.blocked += account.status.blocked
    done.tags = len(accounts)
    # The state goes to the budget agent as messages on its own input: a changelog filled before the
    # worker's first start left its streams unread after recovery, now and then, under load.
    for key, value, partition in state_messages(stored):
        producer.send(topics.tag_spend, key, value, partition)

    messages = raw_messages(journal.events, partitions) if journal.events else []
    for key, value in messages:
        producer.send(topics.raw, key, value)
    producer.wait()
    if journal_dir is not None:
        kept = [(topics.budgets, k, v) for k, v in journal.budgets] + [
            (topics.raw, k, v) for k, v in messages
        ]
        if kept:
            write_segment(journal_dir, kept)
        damaged = [path for path in paths if not is_whole(path)]
        for path in damaged:  # a torn tail is an unanswered write; anything else is kept for a person
            say(
                f"    journal segment {path.name} is damaged past its first entries; kept as {set_aside(path).name}"
            )
        remove([path for path in paths if path not in damaged])
    done.replayed, done.landed = len(journal.events), journal.settled
    say(f"    {done.budgets} budgets, spend of {done.tags} tags, {done.blocked} blocked")
    say(f"    journal: {done.replayed} events not landed yet, sent again ({done.landed} had landed)")
    return done


class _Producer:
    """Idempotent and acks=all; `wait` raises unless everything sent was acknowledged."""

    def __init__(self, settings: Settings) -> None:
        config = {"acks": "all", "enable.idempotence": True}
        self._producer = Producer(settings.kafka_config(**config))
        self._errors: list[str] = []

    def send(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        while True:
            try:  # partition -1: the producer's partitioner chooses (the same as the API's)
                self._producer.produce(
                    topic,
                    value,
                    key,
                    partition=-1 if partition is None else partition,
                    on_delivery=self._delivered,
                )
                return
            except BufferError:
                self._producer.poll(0.1)

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._errors.append(err.str())

    def wait(self) -> None:
        if self._producer.flush(60) or self._errors:
            raise StartupError(f"could not restore the ledger's state into Kafka: {self._errors[:3]}")


def _to_milliseconds(value: datetime) -> datetime:
    """A time as ClickHouse's DateTime64(3) keeps it."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)

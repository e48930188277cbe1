"""The sink: spend.attributed, spend.dead-letter and the budget topics -> ClickHouse, each message landing once.

`spend.budgets` lands in `tag_budgets` (a tombstone as a `deleted` row);
`spend.budget-blocks` transitions (blocked, unblocked, deleted) and
`spend.budget-alerts` land in `budget_events`; a re-sent alert (same
`alert_id`) lands once. `spend.alert-deliveries` lands in `alert_deliveries`;
a copy of an attempt (same `attempt_id`) lands once.

Order of one flush, and what a crash at each point leaves (DESIGN §9):

1. Skip messages below the landed offset of their partition (kept in
   `sink_offsets`): a batch replayed after a crash between step 4 and step 6.
2. Decode. A message that does not decode becomes a `spend_rejects` row with
   the reason; it never stops the sink.
3. Drop records whose event_id is already in `spend_records`, or repeated in
   the batch: the worker re-emits calls after its own crash (at new offsets),
   and producers retry. The look-up covers `SINK_DEDUPE_LOOKBACK_S` before the
   batch's earliest `occurred_at`: a retried event sent without `occurred_at`
   is stamped with its own, later, receive time.
4. INSERT records and rejects. Crash after this -> on restart the offsets in
   ClickHouse and Kafka are both old; the replay is removed by steps 1 and 3.
5. INSERT the next offsets into `sink_offsets`. Crash after this -> Kafka's
   committed offset is old, but on assignment we seek to ClickHouse's.
6. Commit the offsets to Kafka. A failure here is harmless for the same reason.

A failed INSERT (ClickHouse down) leaves the batch in memory and is retried
with backoff; nothing is committed until it lands. No single value halts the
sink (DESIGN §9.7): a message that cannot be planned (decoded, or a record
ClickHouse cannot store or look up) is a reject at step 2; a batch whose INSERT
fails FLUSH_ATTEMPTS times while ClickHouse answers a ping is landed apart
(`land_apart`): each table's rows in halves, down to the rows ClickHouse
refuses alone, which become rejects with its reason. While the ping fails,
the batch is only retried: an outage never turns rows into rejects.
`Sink.stuck_reason` says why the sink is not landing (None when it is).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, TopicPartition

from processors import metrics
from processors.deadletter import describe
from schemas.alerts import DeliveryAttempt
from schemas.budgets import BlockSignal, BudgetAlert, BudgetDefinition
from schemas.events import MAX_ID_CHARS
from schemas.records import AttributedRecord, Reject
from schemas.topics import Topics
from spendledger.platform.clickhouse import quoted_slices
from spendledger.platform.settings import SinkSettings

log = logging.getLogger(__name__)

RECORD_COLUMNS: list[str] = list(AttributedRecord.model_fields)
REJECT_COLUMNS: list[str] = list(Reject.model_fields)
BUDGET_COLUMNS = [
    "tag", "max_budget_usd", "soft_budget_usd", "budget_duration", "alert_thresholds",
    "deleted", "updated_at", "window", "source", "created_at", "description",
]  # fmt: skip
BUDGET_EVENT_COLUMNS = [
    "at", "tag", "event_type", "threshold_pct", "spend_usd", "max_budget_usd",
    "window_start", "window_end", "alert_id", "soft_budget_usd",
]  # fmt: skip
ALERT_DELIVERY_COLUMNS = [
    "at", "attempt_id", "alert_id", "tag", "destination", "attempt", "status", "http_status", "error",
    "latency_ms",
]  # fmt: skip
OFFSET_COLUMNS = ["consumer_group", "topic", "partition", "next_offset"]
TopicPartitionKey = tuple[str, int]

# Failed landings of one batch, with ClickHouse answering, before the batch is landed apart.
FLUSH_ATTEMPTS = 3
# What ClickHouse's DateTime64 holds: a record dated outside cannot be stored or looked up as sent.
EARLIEST_STORABLE = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_STORABLE = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
MAX_PAYLOAD_CHARS = 65_536


@dataclass(frozen=True)
class Message:
    """The parts of a Kafka message the sink uses (so the flush logic is testable without Kafka)."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp_ms: int | None = None  # when the producer sent it (a tombstone's deletion time)


@dataclass
class Landing:
    """What one flush writes."""

    records: list[AttributedRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    budgets: list[list[Any]] = field(default_factory=list)
    budget_events: list[list[Any]] = field(default_factory=list)
    alert_deliveries: list[list[Any]] = field(default_factory=list)
    next_offsets: dict[TopicPartitionKey, int] = field(default_factory=dict)
    replayed: int = 0
    duplicates: int = 0
    # The message each row came from, by (table, row index): a row ClickHouse refuses is rejected with it.
    origins: dict[tuple[str, int], Message] = field(default_factory=dict)
    # Set on a part of a landing landed apart: the part's own deduplication token.
    label: str = ""

    def token(self, group: str) -> str:
        """Deterministic id of this landing, for ClickHouse's insert deduplication."""
        if self.label:
            return self.label
        spans = ",".join(f"{t}/{p}:{o}" for (t, p), o in sorted(self.next_offsets.items()))
        return hashlib.sha256(f"{group}|{spans}".encode()).hexdigest()

    def rows(self, table: str) -> list[Any]:
        tables: dict[str, list[Any]] = {
            "spend_records": self.records,
            "spend_rejects": self.rejects,
            "tag_budgets": self.budgets,
            "budget_events": self.budget_events,
            "alert_deliveries": self.alert_deliveries,
        }
        return tables[table]

    def part(self, table: str, start: int, end: int, label: str) -> Landing:
        """Rows start..end of one table, alone, without offsets."""
        part = Landing(label=label)
        part.rows(table).extend(self.rows(table)[start:end])
        return part


LANDED_TABLES = ("spend_records", "spend_rejects", "tag_budgets", "budget_events", "alert_deliveries")


class LedgerStore(Protocol):
    """Where the sink lands rows; ClickHouse in production, a dict in unit tests."""

    def landed_offsets(self, group: str) -> dict[TopicPartitionKey, int]: ...

    def existing_event_ids(self, event_ids: list[str], start: datetime, end: datetime) -> set[str]: ...

    def existing_alert_ids(self, alert_ids: list[str]) -> set[str]: ...

    def existing_attempt_ids(self, attempt_ids: list[str]) -> set[str]: ...

    def land(self, landing: Landing, group: str) -> None: ...

    def ping(self) -> bool:
        """True when the store answers a trivial query (it is up, whatever it thinks of our rows)."""
        ...


def plan_landing(
    messages: Iterable[Message],
    *,
    topics: Topics,
    landed: dict[TopicPartitionKey, int],
    store: LedgerStore,
    lookback: timedelta = timedelta(days=1),
) -> Landing:
    """Steps 1-3 of the flush: what to write for these messages. Any error planning one message makes
    that message a reject (DESIGN §9.7)."""
    landing = Landing()
    candidates: dict[str, tuple[AttributedRecord, Message]] = {}
    alerts: dict[str, tuple[list[Any], Message]] = {}
    deliveries: dict[str, tuple[DeliveryAttempt, Message]] = {}

    def keep(table: str, row: Any, message: Message) -> None:
        rows = landing.rows(table)
        landing.origins[(table, len(rows))] = message
        rows.append(row)

    for message in messages:
        tp = (message.topic, message.partition)
        if message.offset < landed.get(tp, -1):
            landing.replayed += 1
            continue
        landing.next_offsets[tp] = max(landing.next_offsets.get(tp, 0), message.offset + 1)
        try:
            if message.topic == topics.budgets:
                keep("tag_budgets", _budget_row(message), message)
                continue
            if message.value is None:
                if message.topic == topics.budget_blocks:
                    continue  # the tombstone after a deleted budget's last state
                raise ValueError("message has no value")
            if message.topic == topics.budget_blocks:
                signal = BlockSignal.model_validate_json(message.value)
                if signal.change != "update":
                    keep("budget_events", _block_row(signal), message)
            elif message.topic == topics.budget_alerts:
                alert = BudgetAlert.model_validate_json(message.value)
                if len(alert.alert_id) > MAX_ID_CHARS:  # looked up in a query of bounded size
                    raise ValueError(f"alert_id is longer than {MAX_ID_CHARS} characters")
                alerts.setdefault(alert.alert_id, (_alert_row(alert), message))
            elif message.topic == topics.alert_deliveries:
                attempt = DeliveryAttempt.model_validate_json(message.value)
                if max(len(attempt.alert_id), len(attempt.attempt_id)) > MAX_ID_CHARS:
                    raise ValueError(f"alert_id or attempt_id is longer than {MAX_ID_CHARS} characters")
                deliveries.setdefault(attempt.attempt_id, (attempt, message))
            elif message.topic == topics.attributed:
                record = AttributedRecord.model_validate_json(message.value)
                problem = unstorable(record)
                if problem is not None:
                    landing.rejects.append(rejected(message, f"sink cannot land: {problem}"))
                elif record.event_id in candidates:
                    landing.duplicates += 1
                else:
                    candidates[record.event_id] = (record, message)
            else:
                keep("spend_rejects", Reject.model_validate_json(message.value), message)
        except Exception as exc:
            landing.rejects.append(rejected(message, f"sink cannot decode: {describe(exc)}"))
    if candidates:
        times = [r.occurred_at for r, _ in candidates.values()]
        # Whole seconds around the bounds (a query parameter may carry no milliseconds), held inside
        # what ClickHouse parses: a long look-back must not overflow or leave its range.
        start = max(_shifted(min(times), -lookback - timedelta(seconds=1)), EARLIEST_STORABLE)
        end = min(_shifted(max(times), timedelta(seconds=1)), LATEST_STORABLE)
        existing = store.existing_event_ids(list(candidates), start, end)
        landing.duplicates += len(existing)
        for event_id, (record, message) in candidates.items():
            if event_id not in existing:
                keep("spend_records", record, message)
    if alerts:
        existing = store.existing_alert_ids(list(alerts))
        landing.duplicates += len(existing)
        for alert_id, (row, message) in alerts.items():
            if alert_id not in existing:
                keep("budget_events", row, message)
    if deliveries:
        existing = store.existing_attempt_ids(list(deliveries))
        landing.duplicates += len(existing)
        for attempt_id, (attempt, message) in deliveries.items():
            if attempt_id not in existing:
                keep("alert_deliveries", _delivery_row(attempt), message)
    return landing


def unstorable(record: AttributedRecord) -> str | None:
    """Why ClickHouse cannot hold this record as sent, or look it up (None: it can)."""
    for name, at in (("occurred_at", record.occurred_at), ("received_at", record.received_at)):
        # The year first: comparing aware datetimes converts their zones, a cost on every record.
        if not 1900 < at.year < 2299 and not EARLIEST_STORABLE <= at <= LATEST_STORABLE:
            return f"{name} {at.isoformat()} is outside what ClickHouse stores (years 1900 to 2299)"
    if (
        len(record.event_id) > MAX_ID_CHARS
        or not record.event_id.isascii()
        and not _encodable(record.event_id)
    ):
        return f"event_id is not up to {MAX_ID_CHARS} characters of UTF-8"
    return None


def rejected(message: Message, reason: str) -> Reject:
    """The `spend_rejects` row for a message the sink cannot land."""
    return Reject(
        source_topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        reason=_plain(reason),
        payload=(message.value or b"").decode("utf-8", "replace")[:MAX_PAYLOAD_CHARS],
        rejected_at=datetime.now(UTC),
    )


def land_apart(store: LedgerStore, landing: Landing, group: str) -> list[tuple[str, Reject]]:
    """Land a landing ClickHouse refused as a whole: each table's rows in halves, down to the rows it
    refuses alone, which land as rejects with its reason; then the offsets. Returns (table, reject) for
    each refused row.

    Every part has its own deduplication token, derived from the landing's, so a replay of the same
    batch lands the same parts once. Raises as soon as ClickHouse stops answering a ping: an outage is
    retried, never taken for bad rows. A reject ClickHouse refuses too means spend_rejects itself is
    failing, not one row: that raises as well (retried, nothing lost).
    """
    base = landing.token(group)
    refused: list[tuple[str, Reject]] = []
    for table in LANDED_TABLES:
        for index, exc in _refused_rows(store, landing, table, 0, len(landing.rows(table)), base, group):
            origin = landing.origins.get((table, index))
            if origin is None:  # a landing built without its messages: the row itself is the payload
                origin = Message("", -1, -1, _plain(repr(landing.rows(table)[index])).encode())
            refused.append((table, rejected(origin, f"ClickHouse refused the {table} row: {describe(exc)}")))
    if refused:
        store.land(Landing(rejects=[r for _, r in refused], label=f"{base}:refused"), group)
    store.land(Landing(next_offsets=landing.next_offsets, label=f"{base}:offsets"), group)
    return refused


def _refused_rows(
    store: LedgerStore, landing: Landing, table: str, start: int, end: int, base: str, group: str
) -> list[tuple[int, Exception]]:
    """Land rows start..end of one table; the index and error of each row refused alone."""
    if start == end:
        return []
    try:
        store.land(landing.part(table, start, end, f"{base}:{table}:{start}-{end}"), group)
        return []
    except Exception as exc:
        if isinstance(exc, ConnectionError) or not store.ping():  # the store unreachable: never a bad row
            raise
        if end - start == 1:
            return [(start, exc)]
    middle = (start + end) // 2
    return _refused_rows(store, landing, table, start, middle, base, group) + _refused_rows(
        store, landing, table, middle, end, base, group
    )


def _shifted(at: datetime, delta: timedelta) -> datetime:
    """`at + delta`, held at the end of datetime's range instead of overflowing."""
    try:
        return at + delta
    except OverflowError:
        return datetime.max.replace(tzinfo=UTC) if delta > timedelta(0) else datetime.min.replace(tzinfo=UTC)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain(text: str) -> str:
    """Text that encodes as UTF-8 (a lone surrogate, which ClickHouse's client cannot send, becomes "?")."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _sent_ms(message: Any) -> int | None:
    kind, ms = message.timestamp()
    return ms if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else None


def _budget_row(message: Message) -> list[Any]:
    if message.value is None:
        if not message.key:
            raise ValueError("a budget tombstone without a key")
        # The deletion's time is when the API sent it, not when it lands: a budget created again
        # right after (its updated_at, the API's clock) is newer than the deletion however late it lands.
        sent = message.timestamp_ms
        now = datetime.fromtimestamp(sent / 1000, UTC) if sent else datetime.now(UTC)
        return [message.key.decode(), None, None, "", [], 1, now, "calendar", "tag", now, None]
    d = BudgetDefinition.model_validate_json(message.value)
    return [
        d.tag, d.max_budget_usd, d.soft_budget_usd, d.budget_duration, d.alert_thresholds,
        0, d.updated_at, d.window, d.source, d.created_at, d.description,
    ]  # fmt: skip


def _block_row(s: BlockSignal) -> list[Any]:
    return [
        s.updated_at, s.tag, s.change, None, s.spend_usd, s.max_budget_usd,
        s.window_start, s.window_end, "", s.soft_budget_usd,
    ]  # fmt: skip


# budget_events.event_type of each alert kind.
ALERT_EVENT_TYPES = {"threshold": "alert", "soft_budget": "soft_alert", "projected": "projected_alert"}


def _alert_row(a: BudgetAlert) -> list[Any]:
    return [
        a.at, a.tag, ALERT_EVENT_TYPES[a.kind], a.threshold_pct, a.spend_usd,
        a.max_budget_usd, a.window_start, a.window_end, a.alert_id, a.soft_budget_usd,
    ]  # fmt: skip


def _delivery_row(a: DeliveryAttempt) -> list[Any]:
    return [
        a.at, a.attempt_id, a.alert_id, a.tag, a.destination, a.attempt, a.status, a.http_status, a.error,
        a.latency_ms,
    ]  # fmt: skip


class ClickHouseStore:
    """LedgerStore on ClickHouse (server or chDB) through clickhouse-connect."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def landed_offsets(self, group: str) -> dict[TopicPartitionKey, int]:
        result = self._client.query(
            "SELECT topic, partition, max(next_offset) FROM sink_offsets "
            "WHERE consumer_group = %(group)s GROUP BY topic, partition",
            parameters={"group": group},
        )
        return {(topic, int(partition)): int(offset) for topic, partition, offset in result.result_rows}

    def existing_event_ids(self, event_ids: list[str], start: datetime, end: datetime) -> set[str]:
        found = set()
        for ids in quoted_slices(event_ids):
            result = self._client.query(
                "SELECT event_id FROM spend_records WHERE occurred_at >= %(start)s AND occurred_at <= %(end)s "
                "AND event_id IN %(ids)s",
                parameters={"ids": ids, "start": start, "end": end},
            )
            found |= {row[0] for row in result.result_rows}
        return found

    def existing_alert_ids(self, alert_ids: list[str]) -> set[str]:
        return self._existing("budget_events", "alert_id", alert_ids)

    def existing_attempt_ids(self, attempt_ids: list[str]) -> set[str]:
        return self._existing("alert_deliveries", "attempt_id", attempt_ids)

    def _existing(self, table: str, column: str, wanted: list[str]) -> set[str]:
        """Which of these ids `table` already holds in `column` (fixed names, bound ids)."""
        found = set()
        for ids in quoted_slices(wanted):
            result = self._client.query(
                f"SELECT {column} FROM {table} WHERE {column} IN %(ids)s",  # noqa: S608
                parameters={"ids": ids},
            )
            found |= {row[0] for row in result.result_rows}
        return found

    def land(self, landing: Landing, group: str) -> None:
        # Every table as JSON lines that ClickHouse parses itself (in C++, outside the GIL): building the
        # native format in Python cost ten times as much (docs/performance.md), and the same statements
        # pass through the embedded system's relay (spendledger.platform.chdb_relay).
        token = landing.token(group)
        if landing.records:
            body = b"\n".join(r.model_dump_json().encode() for r in landing.records)
            self._insert_json("spend_records", body, RECORD_COLUMNS, f"{token}:records")
        if landing.rejects:
            rows = [[getattr(r, c) for c in REJECT_COLUMNS] for r in landing.rejects]
            self._insert("spend_rejects", rows, REJECT_COLUMNS, f"{token}:rejects")
        if landing.budgets:
            self._insert("tag_budgets", landing.budgets, BUDGET_COLUMNS, f"{token}:budgets")
        if landing.budget_events:
            self._insert(
                "budget_events", landing.budget_events, BUDGET_EVENT_COLUMNS, f"{token}:budget_events"
            )
        if landing.alert_deliveries:
            self._insert(
                "alert_deliveries",
                landing.alert_deliveries,
                ALERT_DELIVERY_COLUMNS,
                f"{token}:alert_deliveries",
            )
        if landing.next_offsets:
            rows = [[group, t, p, o] for (t, p), o in landing.next_offsets.items()]
            self._insert_json("sink_offsets", json_rows(rows, OFFSET_COLUMNS), OFFSET_COLUMNS, None)

    def _insert(self, table: str, rows: list[list[Any]], columns: list[str], token: str) -> None:
        self._insert_json(table, json_rows(rows, columns), columns, token)

    def _insert_json(self, table: str, body: bytes, columns: list[str], token: str | None) -> None:
        settings = {**(_dedupe_settings(token) if token else {}), "date_time_input_format": "best_effort"}
        self._client.raw_insert(table, columns, body, settings=settings, fmt="JSONEachRow")

    def ping(self) -> bool:
        try:
            self._client.command("SELECT 1")
        except Exception:  # any error: not answering
            return False
        return True


def json_rows(rows: list[list[Any]], columns: list[str]) -> bytes:
    """Rows as JSONEachRow lines (decimals in plain notation, which ClickHouse parses exactly)."""
    return b"\n".join(orjson.dumps(dict(zip(columns, row, strict=True)), default=_json_value) for row in rows)


def _json_value(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _dedupe_settings(token: str) -> dict[str, Any]:
    # A replayed block must be skipped by the rollups' views too: they dedupe on the token passed
    # down to them (their tables keep a deduplication window).
    return {"insert_deduplication_token": token, "deduplicate_blocks_in_dependent_materialized_views": 1}


def landed_offsets_key(group: str, cluster_id: str | None) -> str:
    """Where the landed offsets of `group` on this cluster are kept (`sink_offsets.consumer_group`)."""
    return f"{group}@{cluster_id}" if cluster_id else group


class Sink:
    """Consumes spend.attributed and spend.dead-letter and lands them (see the module docstring)."""

    # Why the sink is not landing (for readiness), None while it is; set by `_flush_with_retry`.
    stuck_reason: str | None = None

    def __init__(self, settings: SinkSettings, store: LedgerStore) -> None:
        self.settings = settings
        self.store = store
        self.consumer_group = settings.topics.sink_group
        # The key of the landed offsets in ClickHouse: the group on one Kafka cluster (`run` adds the
        # cluster id; an embedded broker is a new cluster at every start, its logs starting from 0).
        self.group = self.consumer_group
        t = settings.topics
        self.topics = [
            t.attributed, t.dead_letter, t.budgets, t.budget_blocks, t.budget_alerts, t.alert_deliveries,
        ]  # fmt: skip
        self._landed: dict[TopicPartitionKey, int] = {}
        self._stop = threading.Event()
        self.healthy = True
        self.last_flush_at: float | None = None

    def stop(self) -> None:
        self._stop.set()

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._landed = self.store.landed_offsets(self.group)
        for tp in partitions:
            landed = self._landed.get((tp.topic, tp.partition))
            if landed is not None:
                tp.offset = landed
        consumer.assign(partitions)

    def run(self) -> None:
        """Consume and land until `stop()`."""
        consumer = Consumer(
            self.settings.kafka_config(
                **{
                    "group.id": self.consumer_group,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": int(self.settings.broker_session_timeout_s * 1000),
                    "heartbeat.interval.ms": int(self.settings.broker_heartbeat_interval_s * 1000),
                    "logger": logging.getLogger("confluent_kafka.sink"),
                }
            )
        )
        while True:  # the broker may not answer yet: the offsets' key needs its cluster id
            try:
                cluster_id = consumer.list_topics(timeout=10).cluster_id
                break
            except KafkaException as exc:
                log.warning("sink cannot reach Kafka; retrying", extra={"error": describe(exc)})
                if self._stop.wait(1.0):
                    consumer.close()
                    return
        self.group = landed_offsets_key(self.consumer_group, cluster_id)
        while not self.store.ping():  # e.g. the API that lends the embedded engine is restarting
            self.healthy, self.stuck_reason = False, "ClickHouse does not answer"
            log.warning("sink cannot reach ClickHouse; retrying")
            if self._stop.wait(1.0):
                consumer.close()
                return
        self.healthy, self.stuck_reason = True, None
        consumer.subscribe(self.topics, on_assign=self._on_assign)
        buffer: list[Any] = []
        first_at = 0.0
        try:
            while not self._stop.is_set():
                batch = consumer.consume(
                    self.settings.sink_batch_max, timeout=self.settings.sink_flush_interval_s
                )
                for msg in batch:
                    error = msg.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("kafka consume error", extra={"error": error.str()})
                        continue
                    if not buffer:
                        first_at = time.monotonic()
                    buffer.append(msg)
                due = time.monotonic() - first_at >= self.settings.sink_flush_interval_s
                if buffer and (len(buffer) >= self.settings.sink_batch_max or due):
                    self._flush_with_retry(consumer, buffer)
                    buffer = []
            if buffer:
                self._flush_with_retry(consumer, buffer)
        finally:
            consumer.close()

    def _flush_with_retry(self, consumer: Any, buffer: list[Any]) -> None:
        """Flush until the batch lands. After FLUSH_ATTEMPTS failures it is landed apart, so rows
        ClickHouse refuses become rejects; while ClickHouse does not answer, it is only retried."""
        messages = [
            Message(m.topic(), m.partition(), m.offset(), m.value(), m.key(), _sent_ms(m)) for m in buffer
        ]
        delay = 0.2
        failures = 0
        while True:
            try:
                self.flush(consumer, messages, apart=failures >= FLUSH_ATTEMPTS)
                self.healthy = True
                self.stuck_reason = None
                return
            except Exception as exc:  # ClickHouse errors come in many types; retry them all
                failures += 1
                metrics.SINK_FLUSH_ERRORS.inc()
                self.healthy = False
                self.stuck_reason = (
                    f"a batch of {len(messages)} messages failed to land {failures} times: {describe(exc)}"
                )
                log.error("sink flush failed; retrying", extra={"error": describe(exc), "retry_in_s": delay})
                if self._stop.wait(delay):
                    return  # unlanded and uncommitted: the next owner replays it
                delay = min(delay * 2, 10.0)

    def flush(self, consumer: Any, messages: list[Message], *, apart: bool = False) -> None:
        """One flush (steps 1-6 of the module docstring); `apart`: land the batch with `land_apart`."""
        started = time.perf_counter()
        landing = plan_landing(
            messages,
            topics=self.settings.topics,
            landed=self._landed,
            store=self.store,
            lookback=timedelta(seconds=self.settings.sink_dedupe_lookback_s),
        )
        refused: dict[str, int] = dict.fromkeys(LANDED_TABLES, 0)
        if apart:
            for table, reject in land_apart(self.store, landing, self.group):
                log.error("row refused by ClickHouse", extra={"table": table, "reason": reject.reason})
                refused[table] += 1
                refused["spend_rejects"] -= 1  # its reject landed instead
        else:
            self.store.land(landing, self.group)
        self._landed.update(landing.next_offsets)
        if landing.next_offsets:
            offsets = [TopicPartition(t, p, o) for (t, p), o in landing.next_offsets.items()]
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as exc:  # harmless: ClickHouse holds the landed offsets
                log.warning("kafka commit failed", extra={"error": describe(exc)})
        for table in LANDED_TABLES:
            metrics.SINK_ROWS.labels(table).inc(len(landing.rows(table)) - refused[table])
        metrics.SINK_SKIPPED.labels("replayed_offset").inc(landing.replayed)
        metrics.SINK_SKIPPED.labels("duplicate_event_id").inc(landing.duplicates)
        metrics.SINK_FLUSH_SECONDS.observe(time.perf_counter() - started)
        self.last_flush_at = time.time()

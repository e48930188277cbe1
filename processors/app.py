"""The Faust app: `ledger` (spend.raw -> join -> attribute -> spend.attributed and
spend.tag-spend), and the budgets (spend.budgets forwarded into spend.tag-spend;
tag-spend -> spend.budget-blocks and spend.budget-alerts).

Agents are thin: decode -> validate -> ledger calls -> queue output in the outbox,
whose flush ends each batch. Concurrency is 1 (faust-streaming can commit past an
unprocessed message with more), delivery is at-least-once, and replays are absorbed
by the join's done markers, the budgets' event ids and the sink's event_id check.
Join and attribution run in one agent: a second hop through Kafka would cost more
than all the ledger work of an event.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from ledger.attribute import Attributor
from ledger.budgets import budget_keys, spend_time
from ledger.join import JoinedCall, JoinStep, JoinTimeouts, PendingCall, next_tick_ms, on_event, on_tick
from ledger.pricing import PriceBook, parse_price_overrides
from processors import metrics, rebalance
from processors.alerts import install_alert_delivery
from processors.budgets import (
    BudgetStore,
    SpendItem,
    block_signal,
    compact,
    outcome_messages,
    read_state,
    read_tag_spend,
    spend_messages,
)
from processors.deadletter import dead_letter, describe
from processors.outbox import Outbox
from schemas.budgets import BudgetDefinition, TagSpend
from schemas.events import DECODED_BY_ORJSON, RawEvent, time_bounds
from schemas.records import AttributedRecord
from spendledger.settings import Settings

log = logging.getLogger(__name__)


ChangelogSend = Callable[[int, bytes, bytes | None], None]
Attributed = tuple[AttributedRecord, bytes]  # a record and its `spend.attributed` value


class Source(Protocol):
    """Where a rejected input came from (a Kafka message, an event of a bundle, or a join timer's call)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class Bundled:
    """One event of a `spend.raw` bundle: its message's place, and its own payload for a dead letter."""

    __slots__ = ("_message", "_event")

    def __init__(self, message: Source, event: Any) -> None:
        self._message = message
        self._event = event

    topic = property(lambda self: self._message.topic)
    partition = property(lambda self: self._message.partition)
    offset = property(lambda self: self._message.offset)

    @property
    def key(self) -> bytes | None:
        request_id = self._event.get("request_id") if isinstance(self._event, dict) else None
        return request_id.encode() if isinstance(request_id, str) else self._message.key

    @property
    def value(self) -> bytes:
        return orjson.dumps(self._event, default=str)


def raw_events(
    messages: Iterable[Source], reject: Callable[[str, Source, str], None]
) -> Iterator[tuple[Source, Any]]:
    """The events of a batch of `spend.raw` messages: each a single event or a bundle `{"events": [...]}`
    (see ingest.events.raw_messages), with where each came from. An undecodable message is rejected."""
    for message in messages:
        try:
            data = orjson.loads(message.value)  # type: ignore[arg-type]  # None: a TypeError, rejected
        except (orjson.JSONDecodeError, TypeError) as exc:
            reject("join", message, f"invalid raw event: {describe(exc)}")
            continue
        if isinstance(data, dict) and "kind" not in data and isinstance(data.get("events"), list):
            for event in data["events"]:
                yield Bundled(message, event), event
        else:
            yield message, data


class JoinState:
    """Join state per request_id in a changelog-backed Faust table, and when each state is next due.

    Batches (`take_events`) have no "current event", so Faust's own `table[k] = v`
    cannot pick the changelog partition; we write the store and the changelog
    explicitly, with the partition the key came from.

    The join timer runs every second, and done markers stay for `done_retention_ms`
    (10 minutes by default: 1.2 million of them at 2,000 calls/s). Looking at every
    state on every tick took seconds per tick at that size, so a heap of (next tick,
    key) gives the timer only the states that are due. A key may have an outdated
    entry in the heap after its state changed; the timer looks at the state itself,
    so such an entry changes nothing.
    """

    def __init__(self, table: Any, send: ChangelogSend, timeouts: JoinTimeouts) -> None:
        self.table = table
        self.send = send
        self.timeouts = timeouts
        self._due: list[tuple[int, bytes]] = []
        self.pending: set[bytes] = set()  # keys still waiting for a partner (not done)

    def get(self, key: bytes) -> PendingCall | None:
        raw = self.table.data.get(key)
        return PendingCall.decode(raw) if raw else None

    def apply(self, key: bytes, step: JoinStep, partition: int) -> None:
        if not step.changed:
            return
        if step.state is None:
            self.table.data.pop(key, None)
            self.pending.discard(key)
            self.send(partition, key, None)
        else:
            value = compact(step.state.encode())
            self.table.data[key] = value
            self._track_pending(key, step.state)
            heapq.heappush(self._due, (next_tick_ms(step.state, self.timeouts), key))
            self.send(partition, key, value)

    def _track_pending(self, key: bytes, state: PendingCall) -> None:
        if state.done_ms is None:
            self.pending.add(key)
        else:
            self.pending.discard(key)

    def rebuild(self, partitions: set[int]) -> None:
        """Index the states of these partitions (after a recovery: the table is all there is)."""
        self._due = []
        self.pending = set()
        for key, raw in self.table.data.items():
            state = PendingCall.decode(raw)
            if state.partition in partitions:
                self._track_pending(key, state)
                self._due.append((next_tick_ms(state, self.timeouts), key))
        heapq.heapify(self._due)

    def due(self, now_ms: int) -> Iterator[tuple[bytes, PendingCall]]:
        """The states whose next tick has come, each taken off the heap (apply puts a changed one back)."""
        while self._due and self._due[0][0] <= now_ms:
            _, key = heapq.heappop(self._due)
            raw = self.table.data.get(key)
            if raw:
                yield key, PendingCall.decode(raw)


def load_price_book(path: Path | None) -> PriceBook:
    if path is None:
        return PriceBook()
    return PriceBook(parse_price_overrides(path.read_text(encoding="utf-8")))


def shorten_fetch_wait(max_wait_ms: int) -> None:
    """faust-streaming hard-codes `fetch_max_wait_ms=1500` for its consumer. A broker that holds
    a fetch for the full wait instead of answering when data arrives (as Tansu does) then adds up
    to 1.5 s per hop; each hop of the budget path (raw -> tag-spend -> blocks) pays it."""
    import aiokafka  # type: ignore[import-untyped]

    original = aiokafka.AIOKafkaConsumer
    if getattr(original, "_spendledger_fetch_wait", None) == max_wait_ms:
        return

    class Consumer(original):  # type: ignore[misc, valid-type]
        _spendledger_fetch_wait = max_wait_ms

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = max_wait_ms
            super().__init__(*args, **kwargs)

    aiokafka.AIOKafkaConsumer = Consumer


def create_app(settings: Settings) -> faust.App:
    topics = settings.topics
    shorten_fetch_wait(settings.worker_fetch_wait_ms)
    rebalance.install(settings.kafka_config())
    optional: dict[str, Any] = {}
    if settings.worker_data_dir is not None:
        optional["datadir"] = str(settings.worker_data_dir)
    app = faust.App(
        topics.faust_app_id,
        broker="kafka://" + settings.kafka_bootstrap.replace(",", ";"),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        producer_acks=-1,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_commit_interval=1.0,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        web_enabled=settings.worker_web_port > 0,
        web_port=settings.worker_web_port or 6066,
        web_bind=settings.worker_web_host,
        web_in_thread=False,
        **optional,
    )
    rebalance.hold_cleared(app)
    raw_topic = app.topic(topics.raw, partitions=settings.topic_partitions)
    outbox = Outbox(settings.kafka_config())
    pending_calls = state_table(app, settings, "pending-calls", "Join state per request_id")
    timeouts = settings.join_timeouts()
    state = JoinState(pending_calls, changelog_writer(pending_calls, outbox), timeouts)
    attributor = Attributor(settings.attribution_policy(), load_price_book(settings.price_overrides_file))

    reject = rejecter(outbox, topics.dead_letter)
    watch = StallWatch(app, [topics.raw, topics.budgets, topics.tag_spend], settings.worker_stall_timeout_s)

    def attribute(calls: Iterable[JoinedCall], source: Source | None) -> list[Attributed]:
        records = []
        for call in calls:
            metrics.child(metrics.CALLS_JOINED, call.join_kind).inc()
            try:
                record = attributor.record(call)
                # Serialized, and its spend by tag built, here: a record that cannot be published is
                # this call's reject alone, not its batch's crash (DESIGN §9.7).
                value = record.model_dump_json().encode()
                record.occurred_at.timestamp()  # what its tag-spend entry needs
            except Exception as exc:
                reject(
                    "attribute", source or TimedOut(topics.raw, call), f"cannot attribute: {describe(exc)}"
                )
                continue
            for entry in record.invalid_tags:
                metrics.child(metrics.INVALID_TAGS, entry.partition("|")[0]).inc()
            metrics.child(metrics.RECORDS_OUT, record.price_source).inc()
            records.append((record, value))
        return records

    def publish(records: list[Attributed]) -> None:
        """The records, then their spend by tag in one bundle per partition (the budgets' input)."""
        for record, value in records:
            outbox.put(topics.attributed, record.request_id.encode(), value)
        spend = tag_spend_messages([record for record, _ in records], settings.topic_partitions)
        for key, value, partition in spend:
            outbox.put(topics.tag_spend, key, value, partition)

    @app.agent(raw_topic, concurrency=1)
    async def ledger(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            watch.took_in()
            started = time.perf_counter()
            now_ms = int(time.time() * 1000)
            bounds = time_bounds(datetime.fromtimestamp(now_ms / 1000, UTC), settings.max_future_skew_s)
            bounds[DECODED_BY_ORJSON] = True  # raw_events decodes with orjson
            records: list[Attributed] = []
            for source, data in raw_events((event.message for event in events), reject):
                if len(records) >= settings.batch_max_events:
                    # Bundles hold many events each: a backlog's batch is published and flushed in
                    # slices of a batch's size, so the other agents run in between and what waits
                    # in memory for the flush stays bounded.
                    publish(records)
                    records = []
                    await outbox.flush()
                # The same bounds as the API's, against this worker's clock: other producers write
                # spend.raw directly. A value the steps below cannot handle rejects its event alone.
                try:
                    RawEvent.model_validate(data, context=bounds)
                except Exception as exc:
                    reject("join", source, f"invalid raw event: {describe(exc)}")
                    continue
                metrics.child(metrics.EVENTS_IN, data["kind"]).inc()
                try:
                    key = data["request_id"].encode()
                    step = on_event(state.get(key), data, partition=source.partition, now_ms=now_ms)
                    state.apply(key, step, source.partition)
                except Exception as exc:
                    reject("join", source, f"cannot join: {describe(exc)}")
                    continue
                if step.duplicate:
                    metrics.DUPLICATES.inc()
                records += attribute(step.emitted, source)
            publish(records)
            await outbox.flush()
            metrics.BATCH_SECONDS.labels("ledger").observe(time.perf_counter() - started)

    def assigned_raw() -> set[int]:
        return assigned_partitions(app, topics.raw)

    @pending_calls.on_recover
    async def index_join_state() -> None:
        partitions = assigned_raw()
        state.rebuild(partitions)
        metrics.PENDING_CALLS.set(len(state.pending))
        log.info("join state indexed: partitions %s, %d keys", sorted(partitions), len(pending_calls.data))

    @app.timer(settings.join_sweep_interval_s)
    async def sweep() -> None:
        """Expire pending calls whose partner never came; forget old done markers."""
        assigned = assigned_raw()
        now_ms = int(time.time() * 1000)
        records: list[Attributed] = []
        for key, current in state.due(now_ms):
            if current.partition not in assigned:
                continue  # another worker's now; a recovery indexes it again if it comes back
            step = on_tick(current, now_ms=now_ms, timeouts=timeouts)
            state.apply(key, step, current.partition)
            records += attribute(step.emitted, None)
        publish(records)
        await outbox.flush()
        metrics.PENDING_CALLS.set(len(state.pending))

    install_budgets(app, settings, watch)
    install_alert_delivery(app, settings)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready, body = watch.readiness()
        return web.json(body, status=200 if ready else 503)

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside `content_type`: the full header goes in as a header.
        return web.bytes(generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app


class StallWatch:
    """Ends the worker when its streams have messages waiting and none was taken in for `timeout_s`
    outside a rebalance or recovery.

    After a restart on topics filled before it started (the embedded system's restore), a worker
    under CPU load was seen to recover its tables and then fetch nothing more from its streams, for
    good. A new worker reads on: `up`'s supervisor (or an orchestrator) starts one, and at-least-once
    delivery replays what this one had not committed."""

    def __init__(self, app: faust.App, topics: list[str], timeout_s: float) -> None:
        self.app = app
        self.topics = set(topics)
        self.timeout_s = timeout_s
        self.taken_at = time.monotonic()
        # Why the worker is not making progress, for /readyz: set once messages have waited for half
        # the timeout with none taken in (the worker exits at the full timeout).
        self.stuck_reason: str | None = None
        app.timer(max(1.0, timeout_s / 6), name="stall-watch")(self.check)

    def took_in(self) -> None:
        self.taken_at = time.monotonic()
        self.stuck_reason = None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """The worker's /readyz: ready when its tables are recovered, no rebalance is under way and
        its streams are not stalled."""
        app: Any = self.app
        if self.stuck_reason is not None:
            return False, {"status": "not_ready", "stuck": self.stuck_reason}
        if app.rebalancing or app.in_recovery or not app.tables.recovery.completed.is_set():
            return False, {"status": "recovering"}
        return True, {"status": "ready"}

    async def check(self) -> None:
        app: Any = self.app
        if app.rebalancing or app.in_recovery or not app.tables.recovery.completed.is_set():
            self.took_in()  # the clock starts when the streams may run
            return
        if time.monotonic() - self.taken_at < self.timeout_s / 2:
            return
        consumer = app.consumer
        streams = [tp for tp in app.assignor.assigned_actives() if tp.topic in self.topics]
        ends = await consumer.highwaters(*streams) if streams else {}
        waiting = {}
        for tp, end in ends.items():
            done = max(consumer._read_offset.get(tp) or -1, (consumer._committed_offset.get(tp) or 0) - 1)
            if end - 1 > done:
                waiting[f"{tp.topic}/{tp.partition}"] = end - 1 - done
        if not waiting:
            self.took_in()
            return
        idle_s = round(time.monotonic() - self.taken_at)
        if idle_s < self.timeout_s:
            self.stuck_reason = f"stalled: {waiting} messages wait, none taken in for {idle_s} s"
            return
        log.error(
            "worker stalled: %s wait, none taken in for %d s; exiting for a fresh worker", waiting, idle_s
        )
        os._exit(75)


def tag_spend_entries(records: list[AttributedRecord]) -> dict[str, list[SpendItem]]:
    """Priced spend of a batch by budget key: a record counts in full for each of its tags, its model
    and its provider (`ledger.budget_keys`), at the time the ledger received it (`ledger.spend_time`)."""
    out: dict[str, list[SpendItem]] = {}
    for record in records:
        if not record.cost_usd:
            continue  # unpriced (NULL) or free: nothing to count
        at = spend_time(_ms(record.occurred_at), _ms(record.received_at))
        entry = (record.event_id, at, record.cost_usd)
        for key in budget_keys(record.tags, record.model, record.provider):
            out.setdefault(key, []).append(entry)
    return out


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def tag_spend_messages(
    records: list[AttributedRecord], partitions: int
) -> Iterator[tuple[bytes, bytes, int]]:
    """The `spend.tag-spend` messages for a batch's records (see processors.budgets.spend_messages)."""
    return spend_messages(tag_spend_entries(records), partitions)


Reject = Callable[[str, Source, str], None]


def rejecter(outbox: Outbox, topic: str) -> Reject:
    """Dead-letters an input through an agent's outbox, so the agent's flush covers it."""

    def reject(stage: str, source: Source, reason: str) -> None:
        metrics.DEAD_LETTERS.labels(stage).inc()
        outbox.put(
            topic,
            source.key,
            dead_letter(
                source_topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                reason=reason,
                payload=source.value,
            ),
        )

    return reject


class TimedOut:
    """The source of a call the join timer emitted (no Kafka message of its own)."""

    def __init__(self, topic: str, call: JoinedCall) -> None:
        self.topic = topic
        self.partition = -1
        self.offset = -1
        self.key: bytes | None = call.request_id.encode()
        self.value: bytes | None = call.encode()


def changelog_writer(table: Any, outbox: Outbox) -> ChangelogSend:
    """Writes a table's changelog through the outbox (Faust's producer costs far more per message);
    the agent's flush at the end of its batch sends them after the batch's outputs (see Outbox)."""
    topic = table.changelog_topic_name

    def send(partition: int, key: bytes, value: bytes | None) -> None:
        outbox.put_state(topic, key, value, partition)

    return send


def assigned_partitions(app: faust.App, topic: str) -> set[int]:
    """The partitions of `topic` this worker holds now."""
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


def state_table(app: faust.App, settings: Settings, name: str, help: str) -> Any:
    """A changelog-backed table of raw bytes, written explicitly by its agent (see JoinState)."""
    return app.Table(name, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes, help=help)


def install_budgets(app: faust.App, settings: Settings, watch: StallWatch) -> None:
    """The budget agents: definitions forwarded into tag-spend, the per-tag accounts, the window timer.

    They have their own outbox: a flush waits for everything queued in its producer, and with one
    producer for all agents a block signal waited for the ledger's records and changelog as well."""
    topics = settings.topics
    outbox = Outbox(settings.kafka_config())
    reject = rejecter(outbox, topics.dead_letter)
    budgets_topic = app.topic(topics.budgets, partitions=settings.topic_partitions)
    tag_spend_topic = app.topic(topics.tag_spend, partitions=settings.topic_partitions)
    table = state_table(app, settings, "budget-state", "Spend history, budget and status per tag")
    store = BudgetStore(table.data, changelog_writer(table, outbox), settings.history_policy())
    compacted_at = [0.0]

    def assigned() -> set[int]:
        return assigned_partitions(app, topics.tag_spend)

    @table.on_recover
    async def rebuild() -> None:
        partitions = assigned()
        store.rebuild(partitions)
        await outbox.flush()
        metrics.BUDGET_TAGS.set(len(store.accounts))
        log.info(
            "budget state rebuilt: partitions %s, %d tags, %d keys",
            sorted(partitions),
            len(store.accounts),
            len(table.data),
        )

    def publish(tag: str, result: Any, now_ms: int) -> None:
        account = store.accounts[tag]
        signal, alerts = outcome_messages(account, result, now_ms, store.definitions.get(tag))
        if signal is not None:
            metrics.BUDGET_SIGNALS.labels(signal.change).inc()
            outbox.put(topics.budget_blocks, tag.encode(), signal.model_dump_json().encode())
        for alert in alerts:
            metrics.BUDGET_ALERTS.labels(alert.kind).inc()
            outbox.put(topics.budget_alerts, tag.encode(), alert.model_dump_json().encode())

    @app.agent(budgets_topic, concurrency=1)
    async def forward_budgets(stream: Any) -> None:
        """Budget definitions join their tag's spend stream, so both are applied in order."""
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            watch.took_in()
            for event in events:
                message = event.message
                try:
                    definition = (
                        None if message.value is None else BudgetDefinition.model_validate_json(message.value)
                    )
                except ValidationError as exc:
                    reject("budgets", message, f"invalid budget definition: {describe(exc)}")
                    continue
                value = TagSpend(type="budget", definition=definition)
                outbox.put(topics.tag_spend, message.key, value.model_dump_json().encode())
            await outbox.flush()

    def load_state(events: list[Any]) -> set[Any]:
        """Stored state a restore sent (it comes first in its partitions, so it is loaded before the
        batch's spend); returns the events that carried it."""
        carried, entries = set(), []
        for event in events:
            try:
                found = read_state(event.message.value)
            except Exception as exc:
                reject("budgets", event.message, f"cannot load restored state: {describe(exc)}")
                carried.add(event)
                continue
            if found is not None:
                carried.add(event)
                entries += found
        if entries:
            store.load(entries, assigned())
            metrics.BUDGET_TAGS.set(len(store.accounts))
            log.info(
                "budget state loaded from a restore: %d keys, %d tags", len(entries), len(store.accounts)
            )
        return carried

    @app.agent(tag_spend_topic, concurrency=1)
    async def budgets(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            watch.took_in()
            started = time.perf_counter()
            touched: dict[str, bool] = {}
            deleted: list[tuple[str, Any, Any]] = []
            last_message: dict[str, Any] = {}  # per tag, the message a failure to evaluate is reported on
            now_ms = int(time.time() * 1000)  # windows follow this clock; an event stamped later counts now
            restored = load_state(events)
            # Any error is one message's (or one tag's) reject, never the agent's crash (DESIGN §9.7).
            for event in events:
                message = event.message
                if event in restored:
                    continue
                try:
                    spends = read_tag_spend(message.key, message.value)
                except Exception as exc:
                    reject("budgets", message, f"cannot apply to a budget: {describe(exc)}")
                    continue
                for tag, spend in spends:
                    last_message[tag] = message
                    try:
                        account = store.account(tag, message.partition)
                        if isinstance(spend, TagSpend) and spend.type == "budget":
                            before = (account.status, account.rule)
                            store.set_definition(account, spend.definition)
                            account.announce()  # a write's answer waits for this definition's signal
                            if spend.definition is None and before[1] is not None:
                                deleted.append((tag, *before))
                            touched[tag] = True
                            continue
                        items = (
                            [(e.event_id, e.occurred_ms, e.cost_usd) for e in spend.entries]
                            if isinstance(spend, TagSpend)
                            else spend
                        )
                        counted = account.add_spend(items, now_ms)
                        metrics.BUDGET_ENTRIES.inc(counted)
                        metrics.BUDGET_DUPLICATES.inc(len(items) - counted)
                        touched.setdefault(tag, False)
                    except Exception as exc:
                        reject("budgets", message, f"cannot apply to {tag!r}'s budget: {describe(exc)}")
            for tag, status, rule in deleted:
                try:
                    signal = block_signal(tag, status, rule, "deleted", now_ms).model_copy(
                        update={"blocked": False}
                    )
                    value = signal.model_dump_json().encode()
                except Exception as exc:
                    reject("budgets", last_message[tag], f"cannot delete {tag!r}'s budget: {describe(exc)}")
                    continue
                metrics.BUDGET_SIGNALS.labels("deleted").inc()
                outbox.put(topics.budget_blocks, tag.encode(), value)
            for tag, rule_changed in touched.items():
                try:
                    account = store.accounts[tag]
                    publish(tag, account.evaluate(now_ms), now_ms)
                    store.persist(account, rule=rule_changed)
                except Exception as exc:
                    reject("budgets", last_message[tag], f"cannot evaluate {tag!r}'s budget: {describe(exc)}")
            await outbox.flush()
            metrics.BUDGET_TAGS.set(len(store.accounts))
            metrics.BATCH_SECONDS.labels("budgets").observe(time.perf_counter() - started)

    @app.timer(settings.budget_tick_interval_s)
    async def budget_windows() -> None:
        """Windows end without traffic: lift blocks and roll windows on the wall clock."""
        partitions = assigned()
        now_ms = int(time.time() * 1000)
        for account in store.budgeted(partitions):
            if account.due_ms > now_ms:
                continue  # nothing the clock alone can change yet
            try:
                result = account.evaluate(now_ms)
                if result is not None and (result.change != "none" or result.alerts):
                    publish(account.tag, result, now_ms)
                    store.persist(account)
            except Exception as exc:  # one budget's failure must not stop the others' windows
                account.due_ms = now_ms + 60_000
                log.error("cannot evaluate %r's budget: %s", account.tag, describe(exc))
        await outbox.flush()
        if time.monotonic() - compacted_at[0] >= 60:
            compacted_at[0] = time.monotonic()
            store.compact(now_ms, partitions)
            await outbox.flush()
            metrics.BUDGET_TAGS.set(len(store.accounts))


def run_worker(settings: Settings) -> None:
    """Run one Faust worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker

    from spendledger.kafka import ensure_topics

    ensure_topics(settings)  # the outbox writes topics no agent reads, so Faust would not declare them
    if settings.worker_nice:
        os.nice(settings.worker_nice)  # on a shared host, the gateway's /v1/check goes first
    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()

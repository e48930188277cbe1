"""The Faust app: join (spend.raw -> spend.joined), attribute (-> spend.attributed and
spend.tag-spend), and budgets (spend.budgets forwarded into spend.tag-spend; tag-spend ->
spend.budget-blocks and spend.budget-alerts).

Agents are thin: decode -> validate -> one ledger call -> send. Concurrency is 1
(faust-streaming can commit past an unprocessed message with more), delivery is
at-least-once, and replays are absorbed by the join's done markers and the
sink's event_id check.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faust
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from ledger import Attributor, JoinedCall, LedgerError, PendingCall, PriceBook, on_event, on_tick
from ledger.join import JoinStep
from ledger.pricing import parse_price_overrides
from processors import metrics
from processors.budgets import BudgetStore, block_signal, outcome_messages
from processors.deadletter import dead_letter, describe
from schemas.budgets import BudgetDefinition, SpendEntry, TagSpend
from schemas.events import RawEvent
from schemas.records import AttributedRecord
from spendledger.settings import Settings

log = logging.getLogger(__name__)


class JoinState:
    """Join state per request_id in a changelog-backed Faust table.

    Batches (`take_events`) have no "current event", so Faust's own `table[k] = v`
    cannot pick the changelog partition; we write the store and the changelog
    explicitly, with the partition the key came from.
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, key: bytes) -> PendingCall | None:
        raw = self.table.data.get(key)
        return PendingCall.decode(raw) if raw else None

    def apply(self, key: bytes, step: JoinStep, partition: int) -> None:
        if not step.changed:
            return
        if step.state is None:
            self.table.data.pop(key, None)
            self.table.send_changelog(partition, key, None)
        else:
            value = step.state.encode()
            self.table.data[key] = value
            self.table.send_changelog(partition, key, value)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.table.data.items())


def load_price_book(path: Path | None) -> PriceBook:
    if path is None:
        return PriceBook()
    return PriceBook(parse_price_overrides(path.read_text(encoding="utf-8")))


def shorten_fetch_wait(max_wait_ms: int) -> None:
    """faust-streaming hard-codes `fetch_max_wait_ms=1500` for its consumer. A broker that holds
    a fetch for the full wait instead of answering when data arrives (as Tansu does) then adds up
    to 1.5 s per hop; each hop of the budget path (raw -> joined -> tag-spend) pays it."""
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
        web_bind=settings.api_host,
        web_in_thread=False,
    )
    raw_topic = app.topic(topics.raw, partitions=settings.topic_partitions)
    joined_topic = app.topic(topics.joined, partitions=settings.topic_partitions)
    attributed_topic = app.topic(topics.attributed, partitions=settings.topic_partitions)
    dead_letter_topic = app.topic(topics.dead_letter, partitions=settings.topic_partitions)
    tag_spend_topic = app.topic(topics.tag_spend, partitions=settings.topic_partitions)
    state = JoinState(state_table(app, settings, "pending-calls", "Join state per request_id"))
    timeouts = settings.join_timeouts()
    attributor = Attributor(settings.attribution_policy(), load_price_book(settings.price_overrides_file))

    async def reject(stage: str, event: Any, reason: str) -> None:
        message = event.message
        metrics.DEAD_LETTERS.labels(stage).inc()
        await dead_letter_topic.send(
            key=message.key,
            value=dead_letter(
                source_topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                reason=reason,
                payload=message.value,
            ),
        )

    async def emit(calls: list[JoinedCall]) -> None:
        for call in calls:
            metrics.CALLS_JOINED.labels(call.join_kind).inc()
            await joined_topic.send(key=call.request_id.encode(), value=call.encode())

    @app.agent(raw_topic, concurrency=1)
    async def join(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            started = time.perf_counter()
            now_ms = int(time.time() * 1000)
            for event in events:
                try:
                    data = orjson.loads(event.message.value)
                    RawEvent.model_validate(data)
                except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
                    await reject("join", event, f"invalid raw event: {describe(exc)}")
                    continue
                metrics.EVENTS_IN.labels(data["kind"]).inc()
                key = data["request_id"].encode()
                partition = event.message.partition
                step = on_event(state.get(key), data, partition=partition, now_ms=now_ms)
                if step.duplicate:
                    metrics.DUPLICATES.inc()
                state.apply(key, step, partition)
                await emit(step.emitted)
            metrics.BATCH_SECONDS.labels("join").observe(time.perf_counter() - started)

    @app.timer(settings.join_sweep_interval_s)
    async def sweep() -> None:
        """Expire pending calls whose partner never came; forget old done markers."""
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.raw}
        now_ms = int(time.time() * 1000)
        pending = 0
        for key, raw in state.items():
            current = PendingCall.decode(raw)
            if current.partition not in assigned:
                continue
            step = on_tick(current, now_ms=now_ms, timeouts=timeouts)
            state.apply(key, step, current.partition)
            await emit(step.emitted)
            if step.state is not None and step.state.done_ms is None:
                pending += 1
        metrics.PENDING_CALLS.set(pending)

    @app.agent(joined_topic, concurrency=1)
    async def attribute(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            started = time.perf_counter()
            records: list[AttributedRecord] = []
            for event in events:
                try:
                    call = JoinedCall.decode(event.message.value)
                    record = attributor.record(call)
                except (LedgerError, ValidationError, ValueError, KeyError, TypeError) as exc:
                    await reject("attribute", event, f"cannot attribute: {describe(exc)}")
                    continue
                for entry in record.invalid_tags:
                    metrics.INVALID_TAGS.labels(entry.partition("|")[0]).inc()
                metrics.RECORDS_OUT.labels(record.price_source).inc()
                await attributed_topic.send(key=event.message.key, value=record.model_dump_json().encode())
                records.append(record)
            # After the records: one spend message per tag for the whole batch.
            for tag, entries in tag_spend_entries(records).items():
                spend = TagSpend(type="spend", entries=entries)
                await tag_spend_topic.send(key=tag.encode(), value=spend.model_dump_json().encode())
            metrics.BATCH_SECONDS.labels("attribute").observe(time.perf_counter() - started)

    install_budgets(app, settings, tag_spend_topic, reject)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST)

    return app


def tag_spend_entries(records: list[AttributedRecord]) -> dict[str, list[SpendEntry]]:
    """Priced spend of a batch by tag; a record counts in full for each of its tags."""
    out: dict[str, list[SpendEntry]] = {}
    for record in records:
        if not record.cost_usd:
            continue  # unpriced (NULL) or free: nothing to count
        entry = SpendEntry(
            event_id=record.event_id,
            occurred_ms=int(record.occurred_at.timestamp() * 1000),
            cost_usd=record.cost_usd,
        )
        for tag in record.tags:
            out.setdefault(tag, []).append(entry)
    return out


def state_table(app: faust.App, settings: Settings, name: str, help: str) -> Any:
    """A changelog-backed table of raw bytes, written explicitly by its agent (see JoinState)."""
    return app.Table(name, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes, help=help)


def install_budgets(app: faust.App, settings: Settings, tag_spend_topic: Any, reject: Any) -> None:
    """The budget agents: definitions forwarded into tag-spend, the per-tag accounts, the window timer."""
    topics = settings.topics
    budgets_topic = app.topic(topics.budgets, partitions=settings.topic_partitions)
    blocks_topic = app.topic(topics.budget_blocks, partitions=settings.topic_partitions)
    alerts_topic = app.topic(topics.budget_alerts, partitions=settings.topic_partitions)
    table = state_table(app, settings, "budget-state", "Spend history, budget and status per tag")
    store = BudgetStore(table.data, table.send_changelog, settings.history_policy())
    compacted_at = [0.0]

    def assigned() -> set[int]:
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topics.tag_spend}

    @table.on_recover
    async def rebuild() -> None:
        store.rebuild(assigned())
        metrics.BUDGET_TAGS.set(len(store.accounts))

    async def publish(tag: str, result: Any, now_ms: int) -> None:
        account = store.accounts[tag]
        signal, alerts = outcome_messages(account, result, now_ms)
        if signal is not None:
            metrics.BUDGET_SIGNALS.labels(signal.change).inc()
            await blocks_topic.send(key=tag.encode(), value=signal.model_dump_json().encode())
        for alert in alerts:
            metrics.BUDGET_ALERTS.labels(alert.kind).inc()
            await alerts_topic.send(key=tag.encode(), value=alert.model_dump_json().encode())

    @app.agent(budgets_topic, concurrency=1)
    async def forward_budgets(stream: Any) -> None:
        """Budget definitions join their tag's spend stream, so both are applied in order."""
        async for event in stream.events():
            message = event.message
            try:
                definition = (
                    None if message.value is None else BudgetDefinition.model_validate_json(message.value)
                )
            except ValidationError as exc:
                await reject("budgets", event, f"invalid budget definition: {describe(exc)}")
                continue
            value = TagSpend(type="budget", definition=definition)
            await tag_spend_topic.send(key=message.key, value=value.model_dump_json().encode())

    @app.agent(tag_spend_topic, concurrency=1)
    async def budgets(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            started = time.perf_counter()
            touched: dict[str, bool] = {}
            deleted: list[tuple[str, Any, Any]] = []
            for event in events:
                message = event.message
                try:
                    tag = message.key.decode()
                    spend = TagSpend.model_validate_json(message.value)
                    account = store.account(tag, message.partition)
                    if spend.type == "budget":
                        before = (account.status, account.rule)
                        store.set_definition(account, spend.definition)
                        if spend.definition is None and before[1] is not None:
                            deleted.append((tag, *before))
                        touched[tag] = True
                    else:
                        counted = account.add_spend(
                            [(e.event_id, e.occurred_ms, e.cost_usd) for e in spend.entries]
                        )
                        metrics.BUDGET_ENTRIES.inc(counted)
                        metrics.BUDGET_DUPLICATES.inc(len(spend.entries) - counted)
                        touched.setdefault(tag, False)
                except (LedgerError, ValidationError, ValueError, AttributeError) as exc:
                    await reject("budgets", event, f"cannot apply to a budget: {describe(exc)}")
            now_ms = int(time.time() * 1000)
            for tag, status, rule in deleted:
                signal = block_signal(tag, status, rule, "deleted", now_ms).model_copy(
                    update={"blocked": False}
                )
                metrics.BUDGET_SIGNALS.labels("deleted").inc()
                await blocks_topic.send(key=tag.encode(), value=signal.model_dump_json().encode())
            for tag, rule_changed in touched.items():
                account = store.accounts[tag]
                await publish(tag, account.evaluate(now_ms), now_ms)
                store.persist(account, rule=rule_changed)
            metrics.BUDGET_TAGS.set(len(store.accounts))
            metrics.BATCH_SECONDS.labels("budgets").observe(time.perf_counter() - started)

    @app.timer(settings.budget_tick_interval_s)
    async def budget_windows() -> None:
        """Windows end without traffic: lift blocks and roll windows on the wall clock."""
        partitions = assigned()
        now_ms = int(time.time() * 1000)
        for account in store.budgeted(partitions):
            result = account.evaluate(now_ms)
            if result is not None and (result.change != "none" or result.alerts):
                await publish(account.tag, result, now_ms)
                store.persist(account)
        if time.monotonic() - compacted_at[0] >= 60:
            compacted_at[0] = time.monotonic()
            store.compact(now_ms, partitions)
            metrics.BUDGET_TAGS.set(len(store.accounts))


def run_worker(settings: Settings) -> None:
    """Run one Faust worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker

    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()

"""The Faust app: `ledger` (spend.raw -> join -> attribute -> spend.attributed and
spend.tag-spend), and the budgets (spend.budgets forwarded into spend.tag-spend;
tag-spend -> spend.budget-blocks and spend.budget-alerts).

Agents are glue: a batch goes to a processor (processors.ledger_step.LedgerStep,
processors.budgets.BudgetProcessor), its outputs to the outbox, whose flush ends the batch. Concurrency is 1 (faust-streaming can commit past an
unprocessed message with more), delivery is at-least-once, and replays are absorbed
by the join's done markers, the budgets' event ids and the sink's event_id check.
Join and attribution run in one agent: a second hop through Kafka would cost more
than all the ledger work of an event.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from ledger.attribute import Attributor
from ledger.pricing import PriceBook, parse_price_overrides
from processors import metrics, rebalance
from processors.alerts import install_alert_delivery
from processors.budgets import BudgetProcessor, BudgetStore
from processors.deadletter import dead_letter, describe
from processors.ledger_step import JoinState, LedgerStep
from processors.messages import ChangelogSend, Output, Rejecter, Source
from processors.outbox import Outbox
from schemas.budgets import BudgetDefinition
from schemas.bundles import budget_message
from spendledger.platform.settings import WorkerSettings

log = logging.getLogger(__name__)


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


def create_app(settings: WorkerSettings) -> faust.App:
    """The worker: the ledger agent, the budget agents, alert delivery, and the web pages."""
    shorten_fetch_wait(settings.worker_fetch_wait_ms)
    rebalance.install(settings.kafka_config())
    app = faust_app(settings)
    rebalance.hold_cleared(app)
    topics = settings.topics
    watch = StallWatch(app, [topics.raw, topics.budgets, topics.tag_spend], settings.worker_stall_timeout_s)
    install_ledger(app, settings, watch)
    install_budgets(app, settings, watch)
    install_alert_delivery(app, settings)
    install_pages(app, watch)
    return app


def faust_app(settings: WorkerSettings) -> faust.App:
    optional: dict[str, Any] = {}
    if settings.worker_data_dir is not None:
        optional["datadir"] = str(settings.worker_data_dir)
    return faust.App(
        settings.topics.faust_app_id,
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


def install_ledger(app: faust.App, settings: WorkerSettings, watch: StallWatch) -> None:
    """The ledger agent (spend.raw -> LedgerStep -> spend.attributed, spend.tag-spend) and its join timer."""
    topics = settings.topics
    raw_topic = app.topic(topics.raw, partitions=settings.topic_partitions)
    outbox = Outbox(settings.kafka_config())
    pending_calls = state_table(app, settings, "pending-calls", "Join state per request_id")
    state = JoinState(pending_calls, changelog_writer(pending_calls, outbox), settings.join_timeouts())
    attributor = Attributor(settings.attribution_policy(), load_price_book(settings.price_overrides_file))
    step = LedgerStep(
        state,
        attributor,
        topics,
        rejecter(outbox, topics.dead_letter),
        partitions=settings.topic_partitions,
        max_events=settings.batch_max_events,
        max_future_skew_s=settings.max_future_skew_s,
    )

    @app.agent(raw_topic, concurrency=1)
    async def ledger(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            watch.took_in()
            started = time.perf_counter()
            for outputs in step.apply([event.message for event in events], now_ms()):
                send(outbox, outputs)
                await outbox.flush()
            metrics.BATCH_SECONDS.labels("ledger").observe(time.perf_counter() - started)

    @pending_calls.on_recover
    @fatal_on_error
    async def index_join_state() -> None:
        partitions = assigned_partitions(app, topics.raw)
        state.rebuild(partitions)
        metrics.PENDING_CALLS.set(len(state.pending))
        log.info("join state indexed: partitions %s, %d keys", sorted(partitions), len(pending_calls.data))

    @app.timer(settings.join_sweep_interval_s)
    async def sweep() -> None:
        send(outbox, step.sweep(now_ms(), assigned_partitions(app, topics.raw)))
        await outbox.flush()


def install_pages(app: faust.App, watch: StallWatch) -> None:
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


def fatal_on_error(callback: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A table's recovery callback that ends the worker when it fails: faust-streaming runs these
    through `asyncio.wait` and never looks at their errors, so a failed rebuild would otherwise go on
    unseen, with state missing. A fresh worker (`up`'s supervisor, or an orchestrator) recovers again."""

    @functools.wraps(callback)
    async def run() -> None:
        try:
            await callback()
        except Exception:
            log.exception("%s failed; exiting for a fresh worker", callback.__name__)
            os._exit(70)

    return run


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


def now_ms() -> int:
    return int(time.time() * 1000)


def send(outbox: Outbox, outputs: Iterable[Output]) -> None:
    for topic, key, value, partition in outputs:
        outbox.put(topic, key, value, partition)


def rejecter(outbox: Outbox, topic: str) -> Rejecter:
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


def state_table(app: faust.App, settings: WorkerSettings, name: str, help: str) -> Any:
    """A changelog-backed table of raw bytes, written explicitly by its agent (see JoinState)."""
    return app.Table(name, partitions=settings.topic_partitions, key_type=bytes, value_type=bytes, help=help)


def install_budgets(app: faust.App, settings: WorkerSettings, watch: StallWatch) -> None:
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
    processor = BudgetProcessor(store, topics.budget_blocks, topics.budget_alerts, reject)
    tidied_at = [0.0]

    def assigned() -> set[int]:
        return assigned_partitions(app, topics.tag_spend)

    @table.on_recover
    @fatal_on_error
    async def rebuild() -> None:
        processor.rebuild(assigned())
        await outbox.flush()

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
                outbox.put(topics.tag_spend, message.key, budget_message(definition))
            await outbox.flush()

    @app.agent(tag_spend_topic, concurrency=1)
    async def budgets(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            watch.took_in()
            started = time.perf_counter()
            send(outbox, processor.apply([event.message for event in events], now_ms(), assigned()))
            await outbox.flush()
            metrics.BATCH_SECONDS.labels("budgets").observe(time.perf_counter() - started)

    @app.timer(settings.budget_tick_interval_s)
    async def budget_windows() -> None:
        clock, partitions = now_ms(), assigned()
        send(outbox, processor.tick(clock, partitions))
        await outbox.flush()
        if time.monotonic() - tidied_at[0] >= 60:
            tidied_at[0] = time.monotonic()
            processor.tidy(clock, partitions)
            await outbox.flush()


def run_worker(settings: WorkerSettings) -> None:
    """Run one Faust worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker

    from spendledger.platform.kafka import ensure_topics

    ensure_topics(settings)  # the outbox writes topics no agent reads, so Faust would not declare them
    if settings.worker_nice:
        os.nice(settings.worker_nice)  # on a shared host, the gateway's /v1/check goes first
    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()

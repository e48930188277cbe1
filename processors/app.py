"""The Faust app: join agent (spend.raw -> spend.joined) and attribute agent (-> spend.attributed).

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
from processors.deadletter import dead_letter, describe
from schemas.events import RawEvent
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


def create_app(settings: Settings) -> faust.App:
    topics = settings.topics
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
    table = app.Table(
        "pending-calls",
        partitions=settings.topic_partitions,
        key_type=bytes,
        value_type=bytes,
        help="Join state per request_id",
    )
    state = JoinState(table)
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
            metrics.BATCH_SECONDS.labels("attribute").observe(time.perf_counter() - started)

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/metrics")
    async def prometheus(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST)

    return app


def run_worker(settings: Settings) -> None:
    """Run one Faust worker in the foreground until SIGINT/SIGTERM."""
    from faust.worker import Worker

    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()

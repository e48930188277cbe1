"""The worker's output producer: confluent-kafka (librdkafka), flushed before a batch is acknowledged.

Faust's own producer costs tens of microseconds of Python per message; at thousands of
events per second that is most of a core. The agents instead `put()` their output here
(a C call that only queues the message) and `await flush()` at the end of each batch.
Faust acknowledges a batch's input only after the agent's loop body returns, so a batch
whose output is not yet in Kafka is never committed: at-least-once is kept, and the
duplicates a replay makes are absorbed downstream (the sink by event_id, the budgets by
event id).

State (table changelogs) is written in a second phase: `put_state()` holds a message
until every output queued before it is in Kafka. A worker killed mid-flush may leave
any subset of a flush delivered; were a join's done-marker delivered without the record
it stands for, the worker taking over would skip the call as a duplicate and lose it.
In this order the worst case is the record without its marker: processed again, and
absorbed downstream as a duplicate. The agents put a batch's outputs and state without
awaiting in between, so when a flush finds its queue empty, every state message held so
far has its outputs delivered.

The ledger and the budget agents each have their own outbox: a flush waits for everything
queued in its producer, so with one shared producer a block signal waited for the ledger's
records and changelog too (docs/performance.md). Ordering is only needed within an agent's
own outputs and state.

Keys are partitioned with murmur2, as Java clients, aiokafka and Faust do, so a tag's
definitions and spend land in the same `spend.tag-spend` partition whoever wrote them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from processors.metrics import FLUSH_SECONDS
from spendledger.platform.kafka import RenewableProducer

log = logging.getLogger(__name__)


class Outbox:
    def __init__(
        self, config: dict[str, Any], *, flush_timeout_s: float = 30.0, factory: Any = Producer
    ) -> None:
        self._kafka = RenewableProducer(
            {
                **config,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "batch.num.messages": 10_000,
                "partitioner": "murmur2_random",
                "logger": logging.getLogger("confluent_kafka.outbox"),
            },
            factory,
        )
        self._flush_timeout_s = flush_timeout_s
        self._failed: list[Message] = []
        self._state: list[tuple[str, bytes | None, bytes | None, int | None]] = []
        self._lock = threading.Lock()
        self._callback = partial(self._on_delivery, 0)

    def put(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        """Queue one message (does not wait). `partition=None` partitions by key."""
        target = -1 if partition is None else partition  # -1: librdkafka's "unassigned", partitioned by key
        while True:
            try:
                self._kafka.producer.produce(
                    topic, value=value, key=key, partition=target, on_delivery=self._callback
                )
                break
            except BufferError:  # the local queue is full: serve delivery reports, then retry
                self._kafka.producer.poll(0.05)

    def put_state(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Queue a state message (a changelog write): sent by `flush()` once the outputs before it are in Kafka."""
        self._state.append((topic, key, value, partition))

    def _on_delivery(self, renewals: int, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._kafka.note(err, renewals)
            with self._lock:
                self._failed.append(msg)

    async def flush(self) -> None:
        """Return once every queued message is in Kafka, outputs first, then state; failures are sent again."""
        started = time.perf_counter()
        try:
            await self._flush()
        finally:
            FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def _flush(self) -> None:
        delay = 0.2
        while True:
            remaining = await self._drain(self._flush_timeout_s)
            if self._kafka.renew_if_failed():  # what the old producer held is now in `_failed`
                self._callback = partial(self._on_delivery, self._kafka.renewals)
                remaining = 0
            with self._lock:
                failed, self._failed = self._failed, []
            if remaining == 0 and not failed:
                if not self._state:
                    return
                # Everything put so far is delivered: now the state that follows it.
                state, self._state = self._state, []
                for topic, key, value, partition in state:
                    self.put(topic, key, value, partition)
                continue
            log.warning(
                "outbox: messages not yet delivered; retrying",
                extra={"queued": remaining, "failed": len(failed), "retry_in_s": delay},
            )
            for msg in failed:
                self.put(msg.topic() or "", msg.key(), msg.value(), msg.partition())
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _drain(self, timeout_s: float) -> int:
        """Send what is queued now (no linger) and serve delivery reports, polling without blocking
        so the event loop keeps serving Faust's consumer meanwhile (no executor thread)."""
        deadline = time.monotonic() + timeout_s
        pause = 0.0005
        producer = self._kafka.producer
        while (remaining := producer.flush(0)) and time.monotonic() < deadline and not self._kafka.failed:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)
        return remaining

    def close(self, timeout_s: float = 10.0) -> None:
        self._kafka.producer.flush(timeout_s)

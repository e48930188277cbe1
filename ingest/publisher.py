"""Publishing accepted events to Kafka: the one I/O seam of ingest, with an in-memory twin."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException

from spendledger.platform.errors import BrokerUnavailable
from spendledger.platform.journal import Journal
from spendledger.platform.kafka import RenewableProducer

log = logging.getLogger(__name__)

Message = tuple[bytes, bytes | None]  # (key, value); a None value is a tombstone

# librdkafka's partitioners that place a keyed message by the CRC-32 of its key (the default first).
DEFAULT_PARTITIONER = "consistent_random"
CRC32_PARTITIONERS = frozenset({DEFAULT_PARTITIONER, "consistent"})
PARTITIONS_TTL_S = 60.0
PARTITIONS_ASK_S = 1.0


class EventPublisher(Protocol):
    """Publishes messages to a topic and returns only once every one is acknowledged."""

    async def publish(self, topic: str, messages: Sequence[Message]) -> None: ...

    async def partition_count(self, topic: str) -> int | None:
        """The topic's partitions, when keyed messages are placed by librdkafka's default
        partitioner (CRC-32); None when that is not known (callers then send one event per message)."""
        ...

    async def ready(self) -> bool: ...

    def close(self) -> None: ...


class InMemoryPublisher:
    """Keeps published messages in a list; `fail_with` simulates an unavailable broker."""

    def __init__(self, partitions: int | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.fail_with: Exception | None = None
        self.partitions = partitions

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.extend((topic, key, value) for key, value in messages)

    async def partition_count(self, topic: str) -> int | None:
        return self.partitions

    async def ready(self) -> bool:
        return self.fail_with is None

    def close(self) -> None:
        pass


class JournaledPublisher:
    """A publisher whose acknowledged messages are also kept in a journal on disk (spendledger.platform.journal):
    `publish` returns once both Kafka and the disk have them. For a broker that forgets at a restart."""

    def __init__(self, inner: EventPublisher, journal: Journal) -> None:
        self.inner = inner
        self.journal = journal

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        await self.inner.publish(topic, messages)
        try:
            await asyncio.to_thread(self.journal.append, topic, messages)
        except OSError as exc:
            log.error("journal write failed", extra={"error": str(exc)})
            raise BrokerUnavailable(f"cannot keep the messages on disk: {exc.strerror or exc}") from exc

    async def partition_count(self, topic: str) -> int | None:
        return await self.inner.partition_count(topic)

    async def ready(self) -> bool:
        return await self.inner.ready()

    def close(self) -> None:
        self.inner.close()
        self.journal.close()


class KafkaPublisher:
    """confluent-kafka producer: idempotent, acks=all; a background thread serves delivery reports."""

    def __init__(self, config: dict[str, Any], *, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._config = config
        self._kafka = RenewableProducer(
            {
                **config,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "message.timeout.ms": int(timeout_s * 1000),
                "socket.timeout.ms": max(1000, int(timeout_s * 1000)),
                "queue.buffering.max.messages": 500_000,
                "logger": logging.getLogger("confluent_kafka.producer"),
            }
        )
        self._partitions: dict[str, tuple[float, int | None]] = {}  # topic -> (known at, count)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._kafka.producer.poll(0.05)

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        batch = _Batch(
            len(messages),
            lambda err: loop.call_soon_threadsafe(_settle, done, err),
            partial(self._kafka.note, renewals=self._kafka.renewals),
        )
        producer = self._kafka.producer
        try:
            for key, value in messages:
                producer.produce(topic, value=value, key=key, on_delivery=batch.on_delivery)
        except (BufferError, KafkaException) as exc:
            batch.abandon()
            self._kafka.renew_if_failed()
            raise BrokerUnavailable(f"could not queue events for Kafka: {exc}") from exc
        if not messages:
            return
        try:
            await asyncio.wait_for(done, timeout=self._timeout_s + 2)
        except TimeoutError as exc:
            raise BrokerUnavailable("Kafka did not acknowledge in time") from exc
        except BrokerUnavailable:
            self._kafka.renew_if_failed()  # the client sends again, through a working producer
            raise

    async def partition_count(self, topic: str) -> int | None:
        """Asked of the broker, then known for a minute (partitions can be added to a topic)."""
        if self._config.get("partitioner", DEFAULT_PARTITIONER) not in CRC32_PARTITIONERS:
            return None
        known = self._partitions.get(topic)
        if known is not None and time.monotonic() - known[0] < PARTITIONS_TTL_S:
            return known[1]

        def ask() -> int | None:
            try:
                found = self._kafka.producer.list_topics(topic, timeout=PARTITIONS_ASK_S).topics.get(topic)
            except KafkaException:
                return None
            return (
                len(found.partitions)
                if found is not None and found.error is None and found.partitions
                else None
            )

        count = await asyncio.to_thread(ask)
        if count is None and known is not None:
            count = known[1]  # the broker did not answer: keep what it said last
        self._partitions[topic] = (time.monotonic(), count)  # not asked again for a minute either way
        return count

    async def ready(self) -> bool:
        def probe() -> bool:
            try:
                self._kafka.producer.list_topics(timeout=2.0)
                return True
            except KafkaException:
                return False

        return await asyncio.to_thread(probe)

    def close(self) -> None:
        self._kafka.producer.flush(self._timeout_s)
        self._stop.set()
        self._poller.join(timeout=2)


class _Batch:
    """Counts one request's delivery reports; wakes the request once, on its last report or its first
    error (one cross-thread wake-up per request, not per event)."""

    def __init__(self, size: int, settle: Any, note: Any) -> None:
        self._pending = size
        self._settle = settle
        self._note = note
        self._lock = threading.Lock()
        self._settled = False

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._note(err)
        with self._lock:
            if self._settled:
                return
            self._pending -= 1
            if err is None and self._pending > 0:
                return
            self._settled = True
        self._settle(err)

    def abandon(self) -> None:
        with self._lock:
            self._settled = True


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(BrokerUnavailable(f"Kafka did not acknowledge: {err.str()}"))

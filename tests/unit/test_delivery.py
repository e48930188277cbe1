"""Delivery bookkeeping of the ingest publisher and the worker's outbox (no broker: their report logic)."""

import asyncio
from typing import Any

from confluent_kafka import KafkaError

from ingest.publisher import _Batch
from processors.outbox import Outbox
from spendledger.platform.kafka import RenewableProducer


class Report:
    def __init__(self, topic: str = "t", partition: int = 0) -> None:
        self._topic, self._partition = topic, partition

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v"

    def partition(self) -> int:
        return self._partition


def test_a_request_is_woken_once_on_its_last_report():
    settled: list[Any] = []
    noted: list[Any] = []
    batch = _Batch(3, settled.append, noted.append)
    batch.on_delivery(None, None)
    batch.on_delivery(None, None)
    assert settled == []
    batch.on_delivery(None, None)
    assert settled == [None] and noted == []


def test_a_request_is_woken_on_its_first_error_and_only_then():
    settled: list[Any] = []
    noted: list[Any] = []
    batch = _Batch(3, settled.append, noted.append)
    batch.on_delivery("broker down", None)
    batch.on_delivery("fenced", None)
    batch.on_delivery(None, None)
    assert settled == ["broker down"]
    assert noted == ["broker down", "fenced"]  # every error is shown to the producer's keeper


def test_an_abandoned_request_is_never_woken():
    settled: list[Any] = []
    batch = _Batch(1, settled.append, lambda _: None)
    batch.abandon()
    batch.on_delivery(None, None)
    assert settled == []


class FlakyProducer:
    """Stands in for librdkafka: the first delivery of each message fails, the second succeeds."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, int, Any]] = []
        self.produced: list[tuple[str, int]] = []
        self.failed_once: set[tuple[str, int]] = set()

    def produce(self, topic: str, *, value: Any, key: Any, partition: int, on_delivery: Any) -> None:
        self.queued.append((topic, partition, on_delivery))

    def flush(self, _timeout: float) -> int:
        for topic, partition, on_delivery in self.queued:
            if (topic, partition) in self.failed_once:
                self.produced.append((topic, partition))
                on_delivery(None, Report(topic, partition))
            else:
                self.failed_once.add((topic, partition))
                on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), Report(topic, partition))
        self.queued = []
        return 0


def test_outbox_flush_sends_failed_messages_again_until_delivered():
    producer = FlakyProducer()
    outbox = Outbox({"bootstrap.servers": "127.0.0.1:1"}, factory=lambda _: producer)
    outbox.put("spend.attributed", b"k", b"v", partition=2)
    outbox.put("spend.tag-spend", b"k", b"v", partition=0)
    asyncio.run(outbox.flush())
    assert sorted(producer.produced) == [("spend.attributed", 2), ("spend.tag-spend", 0)]


class OrderedProducer:
    """Records what was handed to librdkafka, and in which flush; every delivery succeeds."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, Any]] = []
        self.flushes: list[list[str]] = []

    def produce(self, topic: str, *, value: Any, key: Any, partition: int, on_delivery: Any) -> None:
        self.queued.append((topic, on_delivery))

    def flush(self, _timeout: float) -> int:
        if self.queued:
            self.flushes.append([topic for topic, _ in self.queued])
            for topic, on_delivery in self.queued:
                on_delivery(None, Report(topic, 0))
            self.queued = []
        return 0


def test_state_is_sent_only_after_the_outputs_put_before_it_are_delivered():
    """A done-marker delivered without its record would make the next owner skip the call: lost."""
    producer = OrderedProducer()
    outbox = Outbox({"bootstrap.servers": "127.0.0.1:1"}, factory=lambda _: producer)
    outbox.put_state("pending-calls-changelog", b"r1", b"done", partition=0)
    outbox.put("spend.attributed", b"r1", b"record", partition=0)
    outbox.put_state("budget-state-changelog", b"team:a", b"spent", partition=1)
    outbox.put("spend.tag-spend", b"team:a", b"spend", partition=1)
    assert producer.queued == [
        ("spend.attributed", producer.queued[0][1]),
        ("spend.tag-spend", producer.queued[1][1]),
    ]
    asyncio.run(outbox.flush())
    assert producer.flushes == [
        ["spend.attributed", "spend.tag-spend"],
        ["pending-calls-changelog", "budget-state-changelog"],
    ]


class FencedProducer:
    """An idempotent producer after the broker fenced it: every delivery fails, never flagged fatal."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, Any]] = []
        self.purged = 0

    def produce(self, topic: str, *, value: Any, key: Any, partition: int, on_delivery: Any) -> None:
        self.queued.append((topic, on_delivery))

    def flush(self, _timeout: float) -> int:
        for topic, on_delivery in self.queued:
            on_delivery(KafkaError(KafkaError.PRODUCER_FENCED), Report(topic, 0))
        self.queued = []
        return 0

    def purge(self) -> None:
        self.purged += 1

    def poll(self, _timeout: float) -> int:
        return 0


def test_a_fenced_producer_is_replaced_and_its_messages_are_sent_by_the_new_one():
    """Tansu fences an idempotent producer whose requests timed out (a frozen broker): without a new
    producer every later flush would fail forever and the worker would stall."""
    fenced, fresh = FencedProducer(), OrderedProducer()
    made = iter([fenced, fresh])
    outbox = Outbox({"bootstrap.servers": "127.0.0.1:1"}, factory=lambda _: next(made))
    outbox.put("spend.attributed", b"r1", b"record", partition=0)
    outbox.put("spend.tag-spend", b"team:a", b"spend", partition=1)
    asyncio.run(outbox.flush())
    assert fenced.purged == 1 and outbox._kafka.renewals == 1
    assert fresh.flushes == [["spend.attributed", "spend.tag-spend"]]


def test_reports_from_a_replaced_producer_do_not_condemn_the_new_one():
    made: list[Any] = []
    kafka = RenewableProducer({}, factory=lambda _: made.append(FencedProducer()) or made[-1])
    assert kafka.note(KafkaError(KafkaError.PRODUCER_FENCED), renewals=0)
    assert kafka.renew_if_failed() and len(made) == 2
    assert not kafka.note(KafkaError(KafkaError.PRODUCER_FENCED), renewals=0)  # late report of the old one
    assert not kafka.failed and not kafka.renew_if_failed()
    assert not kafka.note(KafkaError(KafkaError._MSG_TIMED_OUT), renewals=1)  # transient: keep the producer
    assert kafka.note(KafkaError(KafkaError.PRODUCER_FENCED), renewals=1) and kafka.failed

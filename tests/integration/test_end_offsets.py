"""End offsets on the embedded broker: a fetch's, not `ListOffsets`'s (which Tansu answers low)."""

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from spendledger.platform.kafka import fetched_end_offsets, start_tansu
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    port = free_port()
    log = Path(tmp_path_factory.mktemp("tansu")) / "tansu.log"
    process = start_tansu("127.0.0.1", port, log, uuid.uuid4().hex)
    try:
        yield {"bootstrap.servers": f"127.0.0.1:{port}"}
    finally:
        process.kill()
        process.wait(10)


def test_end_offsets_after_multi_record_batches_are_the_log_ends(broker: dict[str, str]) -> None:
    topic = f"ends-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(broker)
    for future in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        future.result(15)
    time.sleep(0.5)
    producer = Producer({**broker, "linger.ms": 50})
    sizes = {0: [7, 5], 1: [3], 2: []}  # records per produce request, by partition
    for requests in zip(*(v + [0] * (2 - len(v)) for v in sizes.values()), strict=True):
        for partition, n in enumerate(requests):
            for _ in range(n):
                producer.produce(topic, value=b"v", partition=partition)
        producer.flush(15)
    consumer = Consumer({**broker, "group.id": "ends-test"})
    listed = {
        (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in sizes
    }
    consumer.close()

    ends = fetched_end_offsets(broker, listed)

    assert ends == {(topic, p): sum(n) for p, n in sizes.items()}
    assert all(ends[key] >= end for key, end in listed.items())


def test_no_listed_partitions_need_no_fetch(broker: dict[str, str]) -> None:
    assert fetched_end_offsets(broker, {}) == {}

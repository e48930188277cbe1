"""The gateway's budget guard, and the compacted-topic view it is built on.

A gateway embeds one `BudgetGuard` per process:

    guard = BudgetGuard.from_settings(GuardSettings())  # or BudgetGuard({"bootstrap.servers": ...}, topic)
    guard.start(); guard.wait_ready(10)
    decision = guard.check_request(headers=request.headers, metadata=body.get("metadata"), user=body.get("user"))
    if not decision.allowed:
        return 429, {"error": {"type": "budget_exceeded", ...}}, {"Retry-After": decision.retry_after_s}

It reads `spend.budget-blocks` from the beginning with a plain consumer (no
group, nothing committed), keeps the latest state per tag in memory, and
answers from memory. A block whose window has ended no longer blocks, even if
the worker has not yet said so. `staleness_s` says how long ago the guard was
last known to have read everything on the topic.

`GuardSettings` is the part of the server's settings a guard needs, read from the same `SPENDLEDGER_*`
variables (and `.env`) with the same defaults, so a gateway reads the server's topic the way the
server's own clients do and normalizes tags as the ledger does, without installing the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.tags import AttributionPolicy, normalize
from schemas.budgets import BlockSignal
from schemas.topics import Topics

log = logging.getLogger(__name__)

T = TypeVar("T")


class GuardSettings(BaseSettings):
    """What a guard takes of the server's settings (spendledger.platform.settings.Settings): the same variables,
    the same defaults, the same validation. A field added to the server's `kafka_config()` or
    `attribution_policy()` belongs here too (tests/unit/test_guard_settings.py fails until it is)."""

    # As the server's: a rejected value is never quoted back (the HMAC key, a SASL password).
    model_config = SettingsConfigDict(
        env_prefix="SPENDLEDGER_", env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    kafka_bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = ""
    kafka_security: dict[str, str] = Field(
        default_factory=dict, description="extra librdkafka settings, e.g. sasl.mechanism (JSON)", repr=False
    )  # (it may hold sasl.password: never in a repr)
    user_id_hmac_key: SecretStr | None = Field(
        default=None, description="the server's key for user-id pseudonyms, so `user:` budgets match"
    )
    max_tags: int = Field(default=50, ge=1)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def kafka_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka configuration for a client of this cluster."""
        return {"bootstrap.servers": self.kafka_bootstrap, **self.kafka_security, **extra}

    def attribution_policy(self) -> AttributionPolicy:
        key = self.user_id_hmac_key.get_secret_value().encode() if self.user_id_hmac_key else None
        return AttributionPolicy(max_tags=self.max_tags, user_id_hmac_key=key or None)


class CompactedView(Generic[T]):
    """The latest value per key of a compacted topic, kept current by a background thread."""

    def __init__(
        self,
        kafka_config: Mapping[str, Any],
        topic: str,
        decode: Callable[[bytes], T],
        *,
        check_interval_s: float = 0.5,
    ) -> None:
        self.topic = topic
        self._decode = decode
        self._config = {
            **kafka_config,
            "group.id": f"view-{topic}",  # required by librdkafka; nothing is ever committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": 10,  # a block is news: the broker may hold a fetch this long
            "logger": logging.getLogger("confluent_kafka.view"),
        }
        self._check_interval_s = check_interval_s
        self._values: dict[str, T] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._current_at: float | None = None
        self.errors = 0

    # ------------------------------------------------------------ reading

    def get(self, key: str) -> T | None:
        return self._values.get(key)

    def items(self) -> list[tuple[str, T]]:
        with self._lock:
            return list(self._values.items())

    def put(self, key: str, value: T | None) -> None:
        """Apply a value locally before it comes back from the topic (read-your-writes)."""
        with self._lock:
            if value is None:
                self._values.pop(key, None)
            else:
                self._values[key] = value

    @property
    def staleness_s(self) -> float | None:
        """Seconds since the view last had everything on the topic; None before the first time."""
        if self._current_at is None:
            return None
        return max(0.0, time.monotonic() - self._current_at)

    def mark_current(self) -> None:
        """Declare the view complete without a topic (in-memory use: tests, tools)."""
        self._current_at = time.monotonic()
        self._ready.set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the view has read the topic to its end once."""
        return self._ready.wait(timeout_s)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"view-{self.topic}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except KafkaException as exc:
                self.errors += 1
                log.warning(
                    "view consumer failed; reconnecting", extra={"topic": self.topic, "error": str(exc)}
                )
                self._stop.wait(1.0)

    def _consume(self) -> None:
        consumer = Consumer(self._config)
        try:
            metadata = consumer.list_topics(self.topic, timeout=10)
            topic = metadata.topics.get(self.topic)
            if topic is None or topic.error is not None or not topic.partitions:
                raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"no topic {self.topic}"))
            partitions = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(topic.partitions)]
            consumer.assign(partitions)
            positions = {p.partition: 0 for p in partitions}
            next_check = 0.0
            while not self._stop.is_set():
                for message in consumer.consume(500, timeout=0.05):
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            self.errors += 1
                        continue
                    self._apply(message.key(), message.value())
                    positions[message.partition() or 0] = (message.offset() or 0) + 1
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + self._check_interval_s
                    if self._caught_up(consumer, positions):
                        self._current_at = now
                        self._ready.set()
        finally:
            consumer.close()

    def _caught_up(self, consumer: Any, positions: dict[int, int]) -> bool:
        """True when every partition has been read to its high watermark (asks the broker)."""
        try:
            for partition, position in positions.items():
                _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=1.0)
                if position < high:
                    return False
        except KafkaException:
            return False
        return True

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        name = key.decode("utf-8", "replace")
        if value is None:
            self.put(name, None)
            return
        try:
            decoded = self._decode(value)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self.errors += 1
            log.warning(
                "undecodable message on a view topic", extra={"topic": self.topic, "error": str(exc)[:200]}
            )
            return
        self.put(name, decoded)


@dataclass(frozen=True)
class Decision:
    """The guard's answer for one call."""

    allowed: bool
    blocked_by: list[BlockSignal] = field(default_factory=list)
    staleness_s: float | None = None

    @property
    def retry_after_s(self) -> int | None:
        """Whole seconds until the first block ends (for a `Retry-After` header)."""
        if self.allowed:
            return None
        ends = [(s.block_ends_at or s.window_end).timestamp() for s in self.blocked_by]
        return max(1, int(min(ends) - time.time() + 0.999))

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "blocked_by": [
                {
                    "tag": s.tag,
                    "spend_usd": format(s.spend_usd, "f"),
                    "max_budget_usd": format(s.max_budget_usd, "f") if s.max_budget_usd is not None else None,
                    "window_start": s.window_start.isoformat(),
                    "window_end": (s.block_ends_at or s.window_end).isoformat(),
                }
                for s in self.blocked_by
            ],
            "staleness_s": None if self.staleness_s is None else round(self.staleness_s, 3),
        }


class BudgetGuard:
    """Answers "may this call go ahead?" from the latest `spend.budget-blocks` state, in memory."""

    def __init__(
        self,
        kafka_config: Mapping[str, Any],
        topic: str,
        *,
        policy: AttributionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.view: CompactedView[BlockSignal] = CompactedView(
            kafka_config, topic, BlockSignal.model_validate_json
        )
        self.policy = policy or AttributionPolicy()
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: GuardSettings) -> BudgetGuard:
        """A guard (not started) on `settings`' cluster and budget-block topic, normalizing with its policy."""
        return cls(
            settings.kafka_config(), settings.topics.budget_blocks, policy=settings.attribution_policy()
        )

    def start(self) -> BudgetGuard:
        self.view.start()
        return self

    def stop(self) -> None:
        self.view.stop()

    def wait_ready(self, timeout_s: float) -> bool:
        return self.view.wait_ready(timeout_s)

    @property
    def staleness_s(self) -> float | None:
        return self.view.staleness_s

    def check(self, tags: Iterable[str]) -> Decision:
        """Decision for a call carrying these canonical tags (e.g. a record's `tags`)."""
        now = self._clock()
        blocked = []
        for tag in tags:
            signal = self.view.get(tag)
            if (
                signal is not None
                and signal.blocked
                and (signal.block_ends_at or signal.window_end).timestamp() > now
            ):
                blocked.append(signal)
        return Decision(not blocked, blocked, self.view.staleness_s)

    def check_request(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        user: Any = None,
    ) -> Decision:
        """Decision for a call described the way producers send it (attribution headers, body metadata, user)."""
        attribution = normalize(headers=headers, metadata=[metadata], users=[user], policy=self.policy)
        return self.check(attribution.tags)

"""What the processors take in and put out, apart from Faust and the outbox."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol


class Source(Protocol):
    """Where an input came from (a Kafka message, an event of a bundle, or a join timer's call)."""

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


class Output(NamedTuple):
    """A message to send; `partition` None: the key's partition."""

    topic: str
    key: bytes
    value: bytes
    partition: int | None = None


# Dead-letters an input that cannot be processed: reject(stage, source, reason).
Rejecter = Callable[[str, Source, str], None]

# Writes a changelog-backed table's changelog: send(partition, key, value), value None deleting the key.
ChangelogSend = Callable[[int, bytes, bytes | None], None]

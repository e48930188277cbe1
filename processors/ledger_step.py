"""The ledger agent's work, without Faust: `spend.raw` events joined into calls (ledger.join, state in
a changelog-backed table), attributed and priced (ledger.attribute), and their spend by budget key.
`LedgerStep` returns what to send; processors.app only wires it to Faust and the outbox.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from ledger.attribute import Attributor
from ledger.budgets import budget_keys, spend_time
from ledger.join import JoinedCall, JoinStep, JoinTimeouts, PendingCall, next_tick_ms, on_event, on_tick
from processors import metrics
from processors.deadletter import describe
from processors.messages import ChangelogSend, Output, Rejecter, Source
from schemas.bundles import SpendItem, bundled_events, spend_messages
from schemas.events import DECODED_BY_ORJSON, RawEvent, time_bounds
from schemas.records import AttributedRecord
from schemas.state import dump_state, load_state
from schemas.times import from_ms, to_ms
from schemas.topics import Topics

log = logging.getLogger(__name__)


def read_pending(raw: bytes) -> PendingCall:
    return PendingCall(**load_state(raw))


class Bundled:
    """One event of a `spend.raw` bundle: its message's place, and its own payload for a dead letter."""

    __slots__ = ("_message", "_event")

    def __init__(self, message: Source, event: Any) -> None:
        self._message = message
        self._event = event

    topic = property(lambda self: self._message.topic)
    partition = property(lambda self: self._message.partition)
    offset = property(lambda self: self._message.offset)

    @property
    def key(self) -> bytes | None:
        request_id = self._event.get("request_id") if isinstance(self._event, dict) else None
        return request_id.encode() if isinstance(request_id, str) else self._message.key

    @property
    def value(self) -> bytes:
        return orjson.dumps(self._event, default=str)


def raw_events(messages: Iterable[Source], reject: Rejecter) -> Iterator[tuple[Source, Any]]:
    """The events of a batch of `spend.raw` messages (schemas.bundles), with where each came from.
    An undecodable message is rejected."""
    for message in messages:
        try:
            data = orjson.loads(message.value)  # type: ignore[arg-type]  # None: a TypeError, rejected
        except (orjson.JSONDecodeError, TypeError) as exc:
            reject("join", message, f"invalid raw event: {describe(exc)}")
            continue
        events = bundled_events(data)
        if events is None:
            yield message, data
        else:
            for event in events:
                yield Bundled(message, event), event


class JoinState:
    """Join state per request_id in a changelog-backed Faust table, and when each state is next due.

    Batches (`take_events`) have no "current event", so Faust's own `table[k] = v`
    cannot pick the changelog partition; we write the store and the changelog
    explicitly, with the partition the key came from.

    The join timer runs every second, and done markers stay for `done_retention_ms`
    (10 minutes by default: 1.2 million of them at 2,000 calls/s). Looking at every
    state on every tick took seconds per tick at that size, so a heap of (next tick,
    key) gives the timer only the states that are due. A key may have an outdated
    entry in the heap after its state changed; the timer looks at the state itself,
    so such an entry changes nothing.
    """

    def __init__(self, table: Any, send: ChangelogSend, timeouts: JoinTimeouts) -> None:
        self.table = table
        self.send = send
        self.timeouts = timeouts
        self._due: list[tuple[int, bytes]] = []
        self.pending: set[bytes] = set()  # keys still waiting for a partner (not done)

    def get(self, key: bytes) -> PendingCall | None:
        raw = self.table.data.get(key)
        return read_pending(raw) if raw else None

    def apply(self, key: bytes, step: JoinStep, partition: int) -> None:
        if not step.changed:
            return
        if step.state is None:
            self.table.data.pop(key, None)
            self.pending.discard(key)
            self.send(partition, key, None)
        else:
            value = dump_state(step.state.__dict__)
            self.table.data[key] = value
            self._track_pending(key, step.state)
            heapq.heappush(self._due, (next_tick_ms(step.state, self.timeouts), key))
            self.send(partition, key, value)

    def _track_pending(self, key: bytes, state: PendingCall) -> None:
        if state.done_ms is None:
            self.pending.add(key)
        else:
            self.pending.discard(key)

    def rebuild(self, partitions: set[int]) -> None:
        """Index the states of these partitions (after a recovery: the table is all there is)."""
        self._due = []
        self.pending = set()
        for key, raw in self.table.data.items():
            state = self._read(key, raw)
            if state is not None and state.partition in partitions:
                self._track_pending(key, state)
                self._due.append((next_tick_ms(state, self.timeouts), key))
        heapq.heapify(self._due)

    @staticmethod
    def _read(key: bytes, raw: bytes) -> PendingCall | None:
        """A stored state, or None when it cannot be read: left aside, so the others still time out."""
        try:
            return read_pending(raw)
        except Exception as exc:
            metrics.STATE_UNREADABLE.labels("pending-calls").inc()
            log.error("join state: left aside the unreadable value of %r: %s", key[:120], describe(exc))
            return None

    def due(self, now_ms: int) -> Iterator[tuple[bytes, PendingCall]]:
        """The states whose next tick has come, each taken off the heap (apply puts a changed one back)."""
        while self._due and self._due[0][0] <= now_ms:
            _, key = heapq.heappop(self._due)
            raw = self.table.data.get(key)
            state = self._read(key, raw) if raw else None
            if state is not None:
                yield key, state


class TimedOut:
    """The source of a call the join timer emitted (no Kafka message of its own)."""

    def __init__(self, topic: str, call: JoinedCall) -> None:
        self.topic = topic
        self.partition = -1
        self.offset = -1
        self.key: bytes | None = call.request_id.encode()
        self.value: bytes | None = call.encode()


def tag_spend_entries(records: list[AttributedRecord]) -> dict[str, list[SpendItem]]:
    """Priced spend of a batch by budget key: a record counts in full for each of its tags, its model
    and its provider (`ledger.budget_keys`), at the time the ledger received it (`ledger.spend_time`)."""
    out: dict[str, list[SpendItem]] = {}
    for record in records:
        if not record.cost_usd:
            continue  # unpriced (NULL) or free: nothing to count
        at = spend_time(to_ms(record.occurred_at), to_ms(record.received_at))
        entry = (record.event_id, at, record.cost_usd)
        for key in budget_keys(record.tags, record.model, record.provider):
            out.setdefault(key, []).append(entry)
    return out


def tag_spend_messages(
    records: list[AttributedRecord], partitions: int
) -> Iterator[tuple[bytes, bytes, int]]:
    """The `spend.tag-spend` messages for a batch's records (schemas.bundles)."""
    return spend_messages(tag_spend_entries(records), partitions)


class LedgerStep:
    """What the ledger agent does, as plain calls: `apply` a batch of `spend.raw` messages, `sweep`
    the join's timers. Each gives the records for `spend.attributed` and their spend bundles for
    `spend.tag-spend`; join state goes to its table's changelog as it changes, and an event that
    cannot be processed goes to `reject` (that event's, never its batch's)."""

    def __init__(
        self,
        state: JoinState,
        attributor: Attributor,
        topics: Topics,
        reject: Rejecter,
        *,
        partitions: int,
        max_events: int,
        max_future_skew_s: float,
    ) -> None:
        self.state = state
        self.attributor = attributor
        self.topics = topics
        self.reject = reject
        self.partitions = partitions
        self.max_events = max_events
        self.max_future_skew_s = max_future_skew_s

    def apply(self, messages: Iterable[Source], now_ms: int) -> Iterator[list[Output]]:
        """The outputs of a batch, in slices of at most `max_events` records: send and flush each
        before asking for the next (a backlog's bundles hold many events each, and what waits in
        memory for a flush stays bounded)."""
        # The API's bounds, against this worker's clock: other producers write spend.raw directly.
        bounds = time_bounds(from_ms(now_ms), self.max_future_skew_s)
        bounds[DECODED_BY_ORJSON] = True  # raw_events decodes with orjson
        records: list[tuple[AttributedRecord, bytes]] = []
        for source, data in raw_events(messages, self.reject):
            if len(records) >= self.max_events:
                yield self.outputs(records)
                records = []
            try:
                RawEvent.model_validate(data, context=bounds)
            except Exception as exc:
                self.reject("join", source, f"invalid raw event: {describe(exc)}")
                continue
            metrics.child(metrics.EVENTS_IN, data["kind"]).inc()
            try:
                key = data["request_id"].encode()
                step = on_event(self.state.get(key), data, partition=source.partition, now_ms=now_ms)
                self.state.apply(key, step, source.partition)
            except Exception as exc:
                self.reject("join", source, f"cannot join: {describe(exc)}")
                continue
            if step.duplicate:
                metrics.DUPLICATES.inc()
            records += self.attribute(step.emitted, source)
        yield self.outputs(records)

    def sweep(self, now_ms: int, assigned: set[int]) -> list[Output]:
        """Expire pending calls whose partner never came; forget old done markers."""
        records: list[tuple[AttributedRecord, bytes]] = []
        for key, current in self.state.due(now_ms):
            if current.partition not in assigned:
                continue  # another worker's now; a recovery indexes it again if it comes back
            step = on_tick(current, now_ms=now_ms, timeouts=self.state.timeouts)
            self.state.apply(key, step, current.partition)
            records += self.attribute(step.emitted, None)
        metrics.PENDING_CALLS.set(len(self.state.pending))
        return self.outputs(records)

    def attribute(
        self, calls: Iterable[JoinedCall], source: Source | None
    ) -> list[tuple[AttributedRecord, bytes]]:
        records = []
        for call in calls:
            metrics.child(metrics.CALLS_JOINED, call.join_kind).inc()
            try:
                record = self.attributor.record(call)
                # Serialized, and its spend time read, here: a record that cannot be published is
                # this call's reject alone, not its batch's crash (DESIGN §9.7).
                value = record.model_dump_json().encode()
                record.occurred_at.timestamp()
            except Exception as exc:
                where = source or TimedOut(self.topics.raw, call)
                self.reject("attribute", where, f"cannot attribute: {describe(exc)}")
                continue
            for entry in record.invalid_tags:
                metrics.child(metrics.INVALID_TAGS, entry.partition("|")[0]).inc()
            metrics.child(metrics.RECORDS_OUT, record.price_source).inc()
            records.append((record, value))
        return records

    def outputs(self, records: list[tuple[AttributedRecord, bytes]]) -> list[Output]:
        """The records, then their spend by tag in one bundle per partition (the budgets' input)."""
        out = [Output(self.topics.attributed, record.request_id.encode(), value) for record, value in records]
        spend = tag_spend_messages([record for record, _ in records], self.partitions)
        out += [Output(self.topics.tag_spend, key, value, partition) for key, value, partition in spend]
        return out

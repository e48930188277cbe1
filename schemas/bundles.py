"""The bundles on Kafka that are not one model per message (docs/architecture.md, "Formats").

`spend.raw` (written by the API, read by the ledger agent):
    one event, or `{"events": [event, ...]}`: events of one partition, in their order, keyed by the
    first event's request_id.

`spend.tag-spend` (written by the ledger agent and the budget forwarder, read by the budget agent):
    `{"type": "spends", "tags": {tag: [[event_id, occurred_ms, "cost_usd"], ...]}}`: a batch's spend,
        one bundle per partition, keyed by its first tag;
    `{"type": "budget", "definition": {...} | null}` (schemas.budgets.TagSpend): a budget definition
        forwarded from `spend.budgets`, keyed by its tag, so definitions and spend arrive in order;
    `{"type": "state", "entries": [[key, value], ...]}`: stored budget state (schemas.state) that a
        restore sends to an empty broker, one tag's keys per message.

Each message stays well under Kafka's default limit of 1 MiB.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from schemas.budgets import BudgetDefinition, TagSpend
from schemas.partitions import java_partition, librdkafka_partition
from schemas.state import read_budget_key

RAW_BUNDLE_MAX_BYTES = 512 * 1024
# Entries per `spends` bundle: about 100 KB (550 KB with 256-character event ids).
MAX_SPEND_ENTRIES = 2000
MAX_STATE_ENTRIES = 2000  # stored keys per `state` message

SpendItem = tuple[str, int, Decimal]  # event_id, occurred_ms, cost_usd
Message = tuple[bytes, bytes, int]  # key, value, partition

_OPEN, _CLOSE = b'{"events":[', b"]}"


# ------------------------------------------------------------------ spend.raw


def raw_messages(
    published: list[dict[str, Any]], partitions: int | None, max_bytes: int = RAW_BUNDLE_MAX_BYTES
) -> list[tuple[bytes, bytes]]:
    """The `spend.raw` messages for one request's events, as (key, value).

    Events of the same partition (where the API's producer puts each alone, schemas.partitions)
    travel as one bundle, so the worker reads one message per partition per request instead of one
    per event. A lone event stays a plain event. `partitions` None (not known): one message per event.
    """
    singles = [(p["request_id"].encode(), orjson.dumps(p)) for p in published]
    if partitions is None or len(singles) < 2:
        return singles
    groups: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, value in singles:
        groups.setdefault(librdkafka_partition(key, partitions), []).append((key, value))
    messages = []
    for group in groups.values():
        bundle: list[tuple[bytes, bytes]] = []
        size = len(_OPEN) + len(_CLOSE)
        for key, value in group:
            if bundle and size + len(value) + 1 > max_bytes:
                messages.append(_bundled(bundle))
                bundle, size = [], len(_OPEN) + len(_CLOSE)
            bundle.append((key, value))
            size += len(value) + 1
        messages.append(_bundled(bundle))
    return messages


def _bundled(events: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    if len(events) == 1:
        return events[0]
    return events[0][0], _OPEN + b",".join(value for _, value in events) + _CLOSE


def bundled_events(data: Any) -> list[Any] | None:
    """The events of a decoded `spend.raw` value when it is a bundle; None for a single event."""
    if isinstance(data, dict) and "kind" not in data and isinstance(data.get("events"), list):
        return data["events"]
    return None


# ------------------------------------------------------------ spend.tag-spend


@functools.lru_cache(maxsize=16_384)
def tag_partition(tag: str, partitions: int) -> int:
    """The partition of a tag's key on `spend.tag-spend`: where the worker's producer (the Java
    client's partitioner) puts it. Memoized: murmur2 is pure Python."""
    return java_partition(tag.encode(), partitions)


def spend_messages(by_tag: Mapping[str, list[SpendItem]], partitions: int) -> Iterator[Message]:
    """The `spends` bundles for a batch's spend by tag: one per partition, keyed by its first tag, of
    at most MAX_SPEND_ENTRIES entries."""
    groups: dict[int, list[str]] = {}
    for tag in by_tag:
        groups.setdefault(tag_partition(tag, partitions), []).append(tag)
    for partition, tags in groups.items():
        bundle: dict[str, list[list[Any]]] = {}
        size = 0
        for tag in tags:
            items = by_tag[tag]
            for start in range(0, len(items), MAX_SPEND_ENTRIES):
                if bundle and size + min(len(items) - start, MAX_SPEND_ENTRIES) > MAX_SPEND_ENTRIES:
                    yield _spends(bundle, partition)
                    bundle, size = {}, 0
                part = items[start : start + MAX_SPEND_ENTRIES]
                bundle.setdefault(tag, []).extend([i, ms, str(c)] for i, ms, c in part)
                size += len(part)
        if bundle:
            yield _spends(bundle, partition)


def _spends(bundle: dict[str, list[list[Any]]], partition: int) -> Message:
    return next(iter(bundle)).encode(), orjson.dumps({"type": "spends", "tags": bundle}), partition


def budget_message(definition: BudgetDefinition | None) -> bytes:
    """The `budget` message forwarding a definition (None: a delete) into its tag's spend stream."""
    return TagSpend(type="budget", definition=definition).model_dump_json().encode()


def read_tag_spend(key: bytes | None, value: bytes | None) -> list[tuple[str, list[SpendItem] | TagSpend]]:
    """A `spends` bundle as (tag, spend items) pairs, or a `budget` message as [(tag, TagSpend)].
    Raises ValueError (a `state` message is read by `read_state`)."""
    if value is None or key is None:
        raise ValueError("a tag-spend message has a key and a value")
    data = orjson.loads(value)
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "budget":
        return [(key.decode(), TagSpend.model_validate(data))]
    if kind != "spends":
        raise ValueError(f"unknown tag-spend message type {kind!r}")
    tags = data.get("tags")
    if not isinstance(tags, dict):
        raise ValueError("a spend bundle has a `tags` object")
    out: list[tuple[str, list[SpendItem] | TagSpend]] = []
    costs: dict[str, Decimal] = {}  # a call's cost comes once per tag it carries: parsed once
    for tag, entries in tags.items():
        try:
            items = [_item(entry, costs) for entry in entries]
        except (TypeError, ValueError, InvalidOperation) as exc:
            raise ValueError(f"a spend entry of {tag!r} is not [event_id, occurred_ms, cost]") from exc
        out.append((tag, items))
    return out


def _item(entry: Any, costs: dict[str, Decimal]) -> SpendItem:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise TypeError("not [event_id, occurred_ms, cost]")
    event_id, occurred_ms, cost = entry
    if not (isinstance(event_id, str) and isinstance(occurred_ms, int) and isinstance(cost, str)):
        raise TypeError("wrong types")
    amount = costs.get(cost)
    if amount is None:
        amount = costs[cost] = Decimal(cost)
    return event_id, occurred_ms, amount


def state_messages(entries: Iterable[tuple[int, bytes, bytes]]) -> Iterator[Message]:
    """The `state` messages carrying stored budget state, given as (partition, key, value)."""
    by_tag: dict[tuple[str, int], list[list[str]]] = {}
    for partition, key, value in entries:
        _, tag, _ = read_budget_key(key)
        by_tag.setdefault((tag, partition), []).append([key.decode(), value.decode()])
    for (tag, partition), items in by_tag.items():
        for start in range(0, len(items), MAX_STATE_ENTRIES):
            chunk = items[start : start + MAX_STATE_ENTRIES]
            yield tag.encode(), orjson.dumps({"type": "state", "entries": chunk}), partition


def read_state(value: bytes | None) -> list[tuple[bytes, bytes]] | None:
    """The stored keys and values of a `state` message; None for any other message."""
    if value is None or not value.startswith(b'{"type":"state"'):
        return None
    entries = orjson.loads(value)["entries"]
    return [(key.encode(), stored.encode()) for key, stored in entries]

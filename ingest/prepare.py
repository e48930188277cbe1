"""The CPU work of one `POST /v1/events`, from the body's bytes to the Kafka messages.

It runs outside the API's event loop: in a process of its own in a running API (its GIL is
not the event loop's, so `/v1/check` stays fast while batches arrive), or on a thread in
tests. Everything it takes and returns is plain data, so it crosses a process boundary.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from ingest.errors import Forbidden, IngestUnavailable, InvalidEvent, InvalidJson, PayloadTooLarge
from ingest.events import attribution_warnings, sanitize
from ledger.attribute import canonical_attribution
from ledger.errors import UsageError
from ledger.scopes import Binding
from ledger.tags import AttributionPolicy
from ledger.usage import parse_usage
from schemas.bundles import raw_messages
from schemas.events import MAX_BATCH_EVENTS, MAX_ID_CHARS, EventBatch, RawEvent, time_bounds


@dataclass(frozen=True)
class Prepared:
    """What the API needs to publish and answer: never the events themselves."""

    event_ids: list[str]
    kinds: list[str]
    messages: list[tuple[bytes, bytes]]
    warnings: list[dict[str, Any]]


def prepare_events(
    body: bytes,
    *,
    received_at: datetime,
    max_future_skew_s: float,
    binding: Binding,
    policy: AttributionPolicy,
    partitions: int | None,
    max_event_bytes: int,
    warnings: bool,
    key_id: str = "",
) -> Prepared:
    """Parse, check and sanitize a body's events, and build their `spend.raw` messages.
    Raises the API's errors (400, 403, 413, 422) for what cannot be accepted.

    A bound key's ids live in its own namespace (`<key_id>/<id>`): its events join and dedupe
    only with its own, so it can neither attach its usage to another producer's request nor
    take another producer's event id."""
    events = parse_events(body, time_bounds(received_at, max_future_skew_s))
    published = [sanitize(e, received_at=received_at) for e in events]
    if binding.bound:
        check_binding(binding, published, policy)
        for event in published:
            event["request_id"] = namespaced(key_id, event["request_id"])
            event["event_id"] = namespaced(key_id, event["event_id"])
    messages = raw_messages(published, partitions)
    check_sizes(messages, published, max_event_bytes)
    return Prepared(
        [p["event_id"] for p in published],
        [p["kind"] for p in published],
        messages,
        attribution_warnings(published, policy) if warnings else [],
    )


def namespaced(key_id: str, identifier: str) -> str:
    """`<key_id>/<id>`, within the ids' length (a long id keeps a hash of itself)."""
    out = f"{key_id}/{identifier}"
    if len(out) <= MAX_ID_CHARS:
        return out
    return f"{key_id}/h{hashlib.sha256(identifier.encode()).hexdigest()[:40]}"


class IngestPool:
    """Runs `prepare_events` in `processes` spawned processes (0: on one thread of this one).

    A process that dies (killed, out of memory) fails the requests it held with 503 and the
    pool is made again for the next request."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    def _current(self) -> Executor:
        with self._lock:
            if self._executor is None:
                if self.processes > 0:
                    spawn = multiprocessing.get_context("spawn")  # never fork a process with threads
                    self._executor = ProcessPoolExecutor(
                        self.processes,
                        mp_context=spawn,
                        initializer=_exit_with_parent,
                        initargs=(os.getpid(),),
                    )
                else:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="ingest")
            return self._executor

    def start(self) -> None:
        """Start the processes now (they import for about a second), not at the first request."""
        self._current().submit(int).result()

    async def run(self, body: bytes, **options: Any) -> Prepared:
        executor = self._current()
        call = functools.partial(prepare_events, body, **options)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except BrokenProcessPool as exc:
            with self._lock:
                if self._executor is executor:
                    self._executor = None
            raise IngestUnavailable(
                "the process checking events stopped; nothing was acknowledged, retry with the same event ids",
                retry_after_s=1,
            ) from exc

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _exit_with_parent(parent: int) -> None:
    """In an ingest process: exit when the API is gone (a kill -9 of the API leaves no orphan)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def check_sizes(messages: list[tuple[bytes, bytes]], published: list[dict[str, Any]], limit: int) -> None:
    """Refuse an event larger than a Kafka message may be (a bundle of several is split below it)."""
    if all(len(value) <= limit for _, value in messages):
        return
    for index, event in enumerate(published):
        size = len(orjson.dumps(event))
        if size > limit:
            raise PayloadTooLarge(
                f"event {index} is {size} bytes as stored; one event may be at most {limit} bytes "
                "(drop large metadata); nothing was acknowledged",
                {"index": index, "size_bytes": size, "limit_bytes": limit},
            )


# Attribution a call's record would drop, and so never shows when one event is checked alone; in a
# joined call (a request and its usage) the other event's inputs can make it count instead.
_HIDDEN_CLAIMS = ("conflict", "too_many_tags")


def check_binding(binding: Binding, published: list[dict[str, Any]], policy: AttributionPolicy) -> None:
    """Refuse the whole request when any event claims more than the key's binding.

    Each event is checked alone, so it must also carry nothing that its own attribution would
    drop but a join with its partner could keep: a header sent twice under two spellings (the
    join merges by the name as sent), a second value for a dimension, tags over the limit."""
    for index, event in enumerate(published):
        names = [name.strip().lower() for name in event.get("headers") or {}]
        if len(names) != len(set(names)):
            _refuse(index, event, "headers", "a bound key may not send one header under two spellings")
        attribution = canonical_attribution([event], policy)
        hidden = [entry for entry in attribution.invalid if entry.split("|", 1)[0] in _HIDDEN_CLAIMS]
        if hidden:
            reason, _, claim = hidden[0].partition("|")
            _refuse(
                index,
                event,
                "tags",
                f"a bound key may not send claims the ledger would drop ({reason}: {claim!r})",
            )
        problem = binding.violation(attribution)
        if problem is not None:
            _refuse(index, event, *problem)


def _refuse(index: int, event: dict[str, Any], field_name: str, reason: str) -> None:
    raise Forbidden(
        f"event {index}: {reason}; nothing was acknowledged",
        {"index": index, "field": field_name, "event_id": event["event_id"]},
    )


def parse_events(body: bytes, context: dict[str, Any]) -> list[RawEvent]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from exc
    try:
        if isinstance(data, dict) and "events" in data:
            events = _validate_batch(data, context)
        elif isinstance(data, dict):
            events = [RawEvent.model_validate(data, context=context)]
        else:
            raise InvalidEvent(
                f'send one event object or {{"events": [...]}} with up to {MAX_BATCH_EVENTS} events'
            )
    except ValidationError as exc:
        details = [error_detail(e) for e in exc.errors()]
        raise InvalidEvent(_problems_message(details), details) from exc
    problems = []
    for index, event in enumerate(events):
        if event.kind == "usage" and event.usage is None:
            problems.append({"loc": ["events", index, "usage"], "msg": "a usage event needs a usage object"})
        try:
            parse_usage(event.usage)
        except UsageError as exc:
            problems.append({"loc": ["events", index, "usage"], "msg": str(exc)})
    if problems:
        raise InvalidEvent(_problems_message(problems), problems)
    return events


def _validate_batch(data: dict[str, Any], context: dict[str, Any]) -> list[RawEvent]:
    """`EventBatch`, validated one event at a time: one pydantic call over 1,000 events holds
    the GIL for milliseconds, and /v1/check waits that long."""
    raw = data["events"]
    if not isinstance(raw, list) or set(data) != {"events"}:
        return EventBatch.model_validate(data, context=context).events  # its own, complete errors
    if not raw or len(raw) > MAX_BATCH_EVENTS:
        return EventBatch.model_validate({"events": raw}, context=context).events  # names the count
    events, errors = [], []
    for index, item in enumerate(raw):
        try:
            events.append(RawEvent.model_validate(item, context=context))
        except ValidationError as exc:
            errors += [{**e, "loc": ("events", index, *e["loc"])} for e in exc.errors()]
    if errors:
        raise InvalidEvent(
            _problems_message([error_detail(e) for e in errors]), [error_detail(e) for e in errors]
        )
    return events


def _problems_message(details: list[dict[str, Any]]) -> str:
    """The first problem in words, e.g. `events[3].headers: at most 100 headers; nothing was published`."""
    first = details[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    more = (
        f" (and {len(details) - 1} more problem{'s' if len(details) > 2 else ''})" if len(details) > 1 else ""
    )
    return f"{where or 'event'}: {first['msg']}{more}; nothing was published"


def error_detail(error: Any) -> dict[str, Any]:
    # Never echo the input back: it may hold a credential the producer sent by mistake.
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    return {"loc": list(error.get("loc", ())), "msg": message, "type": error.get("type", "")}

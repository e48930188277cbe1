"""`SpendClient`: send events to `POST /v1/events` without ever slowing or breaking the caller.

`emit(event)` only puts the event on a bounded in-memory queue and returns; a
background thread sends batches. What happens to an event:

- **sent**: the API answered 202 (Kafka acknowledged it).
- **retried**: a network error, 408, 429 or 5xx; the same batch, with the same
  `event_id`s, is sent again with exponential backoff (honouring `Retry-After`)
  for up to `retry_for_s`. The ledger counts a retried event once.
- **rejected**: a 4xx other than those. A rejected batch is split in halves
  until the bad event is alone, so one malformed event does not take its
  neighbours down; 413 splits the same way, and so does a 403 that names one
  event (a bound key's event claiming outside its binding).
- **dropped**: the queue was full (the ledger is down or too slow for longer
  than the queue lasts), retries ran out, or the client was closed with events
  still unsent. Counted in `stats`, logged as a warning at most every 30 s.

`flush()` waits until everything queued so far has an outcome; `close()`
flushes and stops the thread; both run at interpreter exit. `emit` never
raises. `AsyncSpendClient` is the same client for async code: `emit` does not
block the event loop, and `await flush()` / `await aclose()` run in a thread.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import httpx

from spendledger.sdk.context import Attribution, current_attribution

log = logging.getLogger("spendledger.sdk")

MAX_BATCH_EVENTS = 1000  # the API's limit per request
DROP_LOG_INTERVAL_S = 30.0
MAX_WARNINGS_SHOWN = 100  # distinct attribution problems logged per client


class EventSink(Protocol):
    """Anything events can be emitted to: `SpendClient`, `AsyncSpendClient`, `MemoryClient`."""

    def emit(self, event: Mapping[str, Any]) -> bool: ...


@dataclass(frozen=True)
class ClientStats:
    """Outcomes so far. `queued` is waiting or in flight."""

    queued: int
    sent: int
    retried: int
    rejected: int
    dropped: int


def new_event_id() -> str:
    return "evt_" + uuid.uuid4().hex


def completed_event(
    *,
    model: str | None,
    usage: Mapping[str, Any] | None,
    provider: str | None = None,
    request_id: str | None = None,
    occurred_at: dt.datetime | None = None,
    latency_ms: float | None = None,
    status: str = "success",
    http_status: int | None = None,
    reported_cost_usd: Decimal | None = None,
    attribution: Attribution | None = None,
) -> dict[str, Any]:
    """A `completed` event (DESIGN §4) carrying the given attribution (default: the current one)."""
    event: dict[str, Any] = {
        "kind": "completed",
        "event_id": new_event_id(),
        "request_id": request_id or "req_" + uuid.uuid4().hex,
        "occurred_at": (occurred_at or dt.datetime.now(dt.UTC)).isoformat(),
        "status": status,
    }
    optional = {
        "model": model,
        "provider": provider,
        "usage": dict(usage) if usage is not None else None,
        "latency_ms": round(latency_ms, 3) if latency_ms is not None else None,
        "http_status": http_status,
        "reported_cost_usd": reported_cost_usd,
    }
    event.update({k: v for k, v in optional.items() if v is not None})
    event.update((attribution if attribution is not None else current_attribution()).event_fields())
    return event


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class SpendClient:
    """Batches events to the ledger's ingest API in a background thread; see the module docstring."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        batch_size: int = 200,
        flush_interval_s: float = 0.5,
        max_queue_events: int = 10_000,
        timeout_s: float = 10.0,
        retry_for_s: float = 60.0,
        retry_base_s: float = 0.2,
        close_timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        flush_at_exit: bool = True,
    ) -> None:
        url = url or os.environ.get("SPENDLEDGER_URL")
        api_key = api_key or os.environ.get("SPENDLEDGER_API_KEY")
        if not url:
            raise ValueError("SpendClient needs the ledger's URL (url= or SPENDLEDGER_URL)")
        if not api_key:
            raise ValueError("SpendClient needs a producer key (api_key= or SPENDLEDGER_API_KEY)")
        if not 1 <= batch_size <= MAX_BATCH_EVENTS:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_EVENTS}")
        self.url = url.rstrip("/") + "/v1/events"
        self._http = httpx.Client(
            timeout=timeout_s,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_for_s = retry_for_s
        self.retry_base_s = retry_base_s
        self.close_timeout_s = close_timeout_s
        self._queue: queue.Queue[Mapping[str, Any]] = queue.Queue(maxsize=max_queue_events)
        self._lock = threading.Condition()
        self._outstanding = 0
        self._counts = {"sent": 0, "retried": 0, "rejected": 0, "dropped": 0}
        self._warned: set[tuple[Any, Any]] = set()
        self._flush_now = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._last_drop_log = 0.0
        self._thread = threading.Thread(target=self._run, name="spendledger-sdk", daemon=True)
        self._thread.start()
        if flush_at_exit:
            atexit.register(self.close)

    # ------------------------------------------------------------ caller side

    def emit(self, event: Mapping[str, Any]) -> bool:
        """Queue one event (DESIGN §4 shape); never blocks, never raises. False if it was dropped."""
        try:
            if self._closed:
                self._drop(1, "the client is closed")
                return False
            if not event.get("event_id"):
                event = {**event, "event_id": new_event_id()}  # retries must carry the same id
            with self._lock:
                self._outstanding += 1
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self._finish("dropped", 1)
                self._drop(0, "the queue is full (is the ledger reachable?)")
                return False
            if self._queue.qsize() >= self.batch_size:
                self._flush_now.set()
            return True
        except Exception:  # never break the caller's LLM call
            log.exception("spendledger: could not queue an event")
            return False

    def record(self, *, model: str | None, usage: Mapping[str, Any] | None, **details: Any) -> bool:
        """Emit a `completed` event for a call made outside the wrappers (see `completed_event`)."""
        try:
            return self.emit(completed_event(model=model, usage=usage, **details))
        except Exception:
            log.exception("spendledger: could not build an event")
            return False

    @property
    def stats(self) -> ClientStats:
        with self._lock:
            return ClientStats(queued=self._outstanding, **self._counts)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every event emitted so far is sent, rejected or dropped. False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while self._outstanding:
                self._flush_now.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Flush (up to `timeout_s`, default `close_timeout_s`), then stop; unsent events are dropped."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.flush(self.close_timeout_s if timeout_s is None else timeout_s)
        self._closing.set()
        self._flush_now.set()
        self._thread.join(timeout=max(1.0, self.close_timeout_s))
        self._http.close()

    def __enter__(self) -> SpendClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------ sender thread

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch:
                try:
                    self._deliver(batch)
                except Exception:
                    log.exception("spendledger: sending events failed")
                    self._finish("dropped", len(batch))
                    self._drop(0, "an unexpected error while sending")
            elif self._closing.is_set():
                self._drain_on_close()
                return

    def _next_batch(self) -> list[Mapping[str, Any]]:
        """Up to batch_size events, waiting at most flush_interval_s for the batch to fill."""
        try:
            first = self._queue.get(timeout=min(self.flush_interval_s, 0.1))  # short: notice close() soon
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            if self._flush_now.is_set() or self._closing.is_set():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._flush_now.wait(min(remaining, 0.05))
        self._flush_now.clear()
        return batch

    def _drain_on_close(self) -> None:
        left = 0
        while True:
            try:
                self._queue.get_nowait()
                left += 1
            except queue.Empty:
                break
        if left:
            self._finish("dropped", left)
            self._drop(0, "the client closed before they were sent")

    def _deliver(self, batch: list[Mapping[str, Any]]) -> None:
        deadline = time.monotonic() + self.retry_for_s
        attempt = 0
        body = json.dumps({"events": batch}, default=_json_default, separators=(",", ":"))
        while True:
            delay: float | None
            try:
                response = self._http.post(self.url, content=body)
            except httpx.HTTPError as exc:
                reason, delay = f"{type(exc).__name__}: {exc}", None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    self._finish("sent", len(batch))
                    self._show_warnings(response)
                    return
                if (status in (400, 413, 422) or _refuses_one_event(response)) and len(batch) > 1:
                    half = len(batch) // 2
                    self._deliver(batch[:half])
                    self._deliver(batch[half:])
                    return
                if status not in (408, 429) and status < 500:
                    self._finish("rejected", len(batch))
                    log.error(
                        "spendledger: the ledger rejected %d event(s): HTTP %d %s",
                        len(batch),
                        status,
                        response.text[:500],
                    )
                    return
                reason, delay = f"HTTP {status}", _retry_after(response)
            attempt += 1
            backoff = min(10.0, self.retry_base_s * 2**attempt) * (0.5 + random.random())  # noqa: S311
            delay = backoff if delay is None else max(delay, self.retry_base_s)
            if time.monotonic() + delay > deadline or self._closing.is_set():
                self._finish("dropped", len(batch))
                self._drop(0, f"gave up after {attempt} attempt(s): {reason}")
                return
            with self._lock:
                self._counts["retried"] += len(batch)
            log.debug("spendledger: retrying %d event(s) in %.1fs (%s)", len(batch), delay, reason)
            self._closing.wait(delay)  # wakes early when closing

    def _show_warnings(self, response: httpx.Response) -> None:
        """Log each attribution problem the ledger reported (a tag it will not record, ...) once."""
        try:
            warnings = response.json().get("warnings") or []
        except (ValueError, AttributeError):
            return
        for warning in warnings:
            for problem in warning.get("problems", []):
                seen = (problem.get("reason"), problem.get("input"))
                if seen in self._warned or len(self._warned) >= MAX_WARNINGS_SHOWN:
                    continue
                self._warned.add(seen)
                log.warning("spendledger: %s: %s", problem.get("input"), problem.get("message"))

    def _finish(self, outcome: str, n: int) -> None:
        with self._lock:
            self._counts[outcome] += n
            self._outstanding -= n
            self._lock.notify_all()

    def _drop(self, n: int, why: str) -> None:
        if n:
            with self._lock:
                self._counts["dropped"] += n
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("spendledger: dropping events: %s (dropped so far: %d)", why, self.stats.dropped)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return min(30.0, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


class AsyncSpendClient:
    """`SpendClient` for async code: `emit` never blocks the loop; flushing and closing are awaitable."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        self.sync = SpendClient(url, api_key, **options)

    def emit(self, event: Mapping[str, Any]) -> bool:
        return self.sync.emit(event)

    def record(self, *, model: str | None, usage: Mapping[str, Any] | None, **details: Any) -> bool:
        return self.sync.record(model=model, usage=usage, **details)

    @property
    def stats(self) -> ClientStats:
        return self.sync.stats

    async def flush(self, timeout_s: float | None = None) -> bool:
        return await asyncio.to_thread(self.sync.flush, timeout_s)

    async def aclose(self, timeout_s: float | None = None) -> None:
        await asyncio.to_thread(self.sync.close, timeout_s)

    async def __aenter__(self) -> AsyncSpendClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class MemoryClient:
    """An in-memory `EventSink` for tests of code that emits events: `client.events` is what was emitted."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def emit(self, event: Mapping[str, Any]) -> bool:
        with self._lock:
            self.events.append(dict(event))
        return True

    def record(self, *, model: str | None, usage: Mapping[str, Any] | None, **details: Any) -> bool:
        return self.emit(completed_event(model=model, usage=usage, **details))


def _refuses_one_event(response: httpx.Response) -> bool:
    """A 403 naming one event of the batch (`details.index`), not the key itself."""
    if response.status_code != 403:
        return False
    try:
        details = response.json().get("error", {}).get("details")
    except ValueError:
        return False
    return isinstance(details, dict) and isinstance(details.get("index"), int)

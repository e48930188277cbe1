"""Budget alerts delivered to people: each alert on `spend.budget-alerts` goes to its destinations
(docs/budgets.md, "Alert delivery"), and each attempt's outcome to `spend.alert-deliveries`.

- Destinations come from `ALERT_DESTINATIONS`: the `default` ones get every alert, the others the
  alerts whose budget names them (`BudgetAlert.destinations`). A name that is not configured is a
  failed delivery with its reason (attempt 0), logged by name.
- The destinations of an alert, and the alerts of a batch, are delivered to at once: a destination
  that is down holds a batch up for at most `ALERT_DELIVERY_DEADLINE_S`, not once per alert.
- Connection errors, timeouts, 408, 429 and 5xx are retried after `ALERT_DELIVERY_BACKOFF_S`,
  doubling up to `ALERT_DELIVERY_BACKOFF_MAX_S` (a longer Retry-After is waited, up to that cap),
  for at most `ALERT_DELIVERY_ATTEMPTS` attempts and only while the next one would end within
  `ALERT_DELIVERY_DEADLINE_S` of the first start. Any other answer is final: 2xx delivered, the rest
  failed (redirects are not followed).
- At least once: a worker that stops mid-batch delivers the batch again, and receivers dedupe on
  the alert id. An alert older than `ALERT_DELIVERY_MAX_AGE_S` is recorded as not sent (attempt 0),
  so a worker reading the topic for the first time does not page anyone with last month's alerts.
- A destination's URL and secret stay in this process: logs and the delivery log name the
  destination, and error texts are scrubbed of the URL.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import faust
import httpx

from processors import metrics
from processors.deadletter import describe
from processors.outbox import Outbox
from schemas.alerts import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryAttempt,
    DeliveryStatus,
    json_body,
    sign,
    slack_body,
)
from schemas.budgets import BudgetAlert
from spendledger.platform.settings import AlertDestination, WorkerSettings

log = logging.getLogger(__name__)

ALERTS_PER_BATCH = 32  # alerts delivered at once, at most
Record = Callable[[DeliveryAttempt], None]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    timeout_s: float = 5.0
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    deadline_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> RetryPolicy:
        return cls(
            attempts=settings.alert_delivery_attempts,
            timeout_s=settings.alert_delivery_timeout_s,
            backoff_s=settings.alert_delivery_backoff_s,
            backoff_max_s=settings.alert_delivery_backoff_max_s,
            deadline_s=settings.alert_delivery_deadline_s,
        )


def retryable(http_status: int) -> bool:
    """An answer worth another attempt: the receiver may take the alert later."""
    return http_status in (408, 429) or http_status >= 500


def next_delay(
    policy: RetryPolicy, attempt: int, *, retryable: bool, retry_after_s: float | None, elapsed_s: float
) -> float | None:
    """Seconds to wait before the attempt after `attempt` (1-based), or None: `attempt` was the last.
    `elapsed_s`: since the first attempt started."""
    if not retryable or attempt >= policy.attempts:
        return None
    delay = min(policy.backoff_s * 2 ** (attempt - 1), policy.backoff_max_s)
    if retry_after_s is not None:
        delay = min(max(delay, retry_after_s), policy.backoff_max_s)
    if elapsed_s + delay + policy.timeout_s > policy.deadline_s:
        return None  # the next attempt could end past the deadline
    return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    text = (value or "").strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        at = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return max(0.0, at.timestamp() - now)


@dataclass(frozen=True)
class Outcome:
    """What one HTTP attempt came to."""

    delivered: bool
    retryable: bool
    http_status: int | None = None
    error: str = ""
    retry_after_s: float | None = None


def scrubbed(exc: BaseException, destination: AlertDestination) -> str:
    """An exception as one line, without the destination's URL, its path or query (a Slack webhook's
    key), or its secret."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    url = destination.url.get_secret_value()
    parts = urlsplit(url)
    hidden = {url, url.split("?")[0], parts.query, parts.password or ""}
    if len(parts.path) > 1:
        hidden.add(parts.path)
    try:
        hidden.add(str(httpx.URL(url)))  # as httpx writes it (normalized)
    except Exception:  # noqa: S110 - an unparsable URL cannot be written normalized either
        pass
    if destination.secret is not None:
        hidden.add(destination.secret.get_secret_value())
    for part in sorted(filter(None, hidden), key=len, reverse=True):
        text = text.replace(part, "<redacted>")
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


class AlertDelivery:
    """Delivers alerts to their destinations over `client`, recording every attempt with `record`.
    Never raises for a delivery: each failure is a recorded attempt."""

    def __init__(
        self,
        destinations: Mapping[str, AlertDestination],
        policy: RetryPolicy,
        client: httpx.AsyncClient,
        record: Record,
        *,
        max_age_s: float = 0.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.destinations = dict(destinations)
        self.policy = policy
        self.max_age_s = max_age_s
        self._client = client
        self._record = record
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        # Destinations whose last alert failed after all its retries: they get one attempt per alert
        # until one is delivered, so a dead receiver holds a batch for one timeout, not the deadline.
        self.down: set[str] = set()

    def targets(self, alert: BudgetAlert) -> list[str]:
        """The default destinations and those the alert's budget names."""
        wanted = {name for name, destination in self.destinations.items() if destination.default}
        return sorted(wanted | set(alert.destinations))

    async def deliver_all(self, alerts: Iterable[BudgetAlert]) -> list[DeliveryAttempt]:
        """Every alert at once; the last attempt of each alert and destination."""
        done = await asyncio.gather(*(self.deliver(alert) for alert in alerts), return_exceptions=True)
        out = []
        for attempts in done:
            if isinstance(attempts, BaseException):  # a bug: logged, and the other alerts go on
                if not isinstance(attempts, Exception):
                    raise attempts  # cancelled: the worker is stopping
                log.error("alert delivery failed unexpectedly", extra={"error": describe(attempts)})
                continue
            out += attempts
        return out

    async def deliver(self, alert: BudgetAlert) -> list[DeliveryAttempt]:
        """One alert to each of its destinations at once; the last attempt of each."""
        names = self.targets(alert)
        age_s = self._clock() - alert.at.timestamp()
        if self.max_age_s and age_s > self.max_age_s:
            reason = (
                f"not sent: the alert is {age_s:.0f} s old (ALERT_DELIVERY_MAX_AGE_S: {self.max_age_s:g})"
            )
            return [self._note(alert, name, 0, "failed", error=reason) for name in names]
        return list(await asyncio.gather(*(self._deliver_to(alert, name) for name in names)))

    async def _deliver_to(self, alert: BudgetAlert, name: str) -> DeliveryAttempt:
        destination = self.destinations.get(name)
        if destination is None:
            log.warning(
                "a budget alert names an unknown destination",
                extra={"destination": name[:64], "alert_id": alert.alert_id},
            )
            return self._note(
                alert, name, 0, "failed", error="unknown destination: not in ALERT_DESTINATIONS"
            )
        try:
            body = slack_body(alert) if destination.format == "slack" else json_body(alert)
        except Exception as exc:  # a value the message cannot show: this alert's failure alone
            return self._note(alert, name, 0, "failed", error=f"cannot build the message: {describe(exc)}")
        started = self._monotonic()
        attempt = 0
        while True:
            attempt += 1
            began = time.perf_counter()
            outcome = await self._post(destination, alert.alert_id, body)
            latency_ms = round((time.perf_counter() - began) * 1000)
            delay = None
            status: DeliveryStatus = "delivered"
            if not outcome.delivered:
                delay = next_delay(
                    self.policy,
                    attempt,
                    retryable=outcome.retryable and name not in self.down,
                    retry_after_s=outcome.retry_after_s,
                    elapsed_s=self._monotonic() - started,
                )
                status = "failed" if delay is None else "retrying"
                if status == "failed":
                    self.down.add(name)
            else:
                self.down.discard(name)
            note = self._note(
                alert,
                name,
                attempt,
                status,
                http_status=outcome.http_status,
                error=outcome.error,
                latency_ms=latency_ms,
            )
            if delay is None:
                if status == "failed":
                    log.warning(
                        "budget alert not delivered",
                        extra={
                            "destination": name,
                            "alert_id": alert.alert_id,
                            "attempts": attempt,
                            "http_status": outcome.http_status,
                            "error": outcome.error,
                        },
                    )
                return note
            await self._sleep(delay)

    async def _post(self, destination: AlertDestination, alert_id: str, body: bytes) -> Outcome:
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            ALERT_ID_HEADER: alert_id,
            TIMESTAMP_HEADER: str(timestamp),
        }
        if destination.secret is not None:
            headers[SIGNATURE_HEADER] = sign(destination.secret.get_secret_value(), timestamp, body)
        try:
            # httpx's timeout is per phase (connect, each read); this one bounds the whole attempt.
            async with asyncio.timeout(self.policy.timeout_s):
                response = await self._client.post(
                    destination.url.get_secret_value(), content=body, headers=headers
                )
        except (TimeoutError, httpx.TimeoutException):
            return Outcome(False, True, error=f"timed out after {self.policy.timeout_s:g} s")
        except httpx.TransportError as exc:  # refused, reset, DNS, TLS: the receiver may come back
            return Outcome(False, True, error=scrubbed(exc, destination))
        except Exception as exc:  # anything else is this alert's failure, never the agent's crash
            return Outcome(False, False, error=scrubbed(exc, destination))
        code = response.status_code
        if 200 <= code < 300:
            return Outcome(True, False, http_status=code)
        again = retryable(code)
        wait = parse_retry_after(response.headers.get("Retry-After"), self._clock()) if again else None
        return Outcome(False, again, http_status=code, error=f"HTTP {code}", retry_after_s=wait)

    def _note(
        self,
        alert: BudgetAlert,
        name: str,
        attempt: int,
        status: DeliveryStatus,
        *,
        http_status: int | None = None,
        error: str = "",
        latency_ms: int | None = None,
    ) -> DeliveryAttempt:
        note = DeliveryAttempt(
            attempt_id=uuid.uuid4().hex,
            alert_id=alert.alert_id,
            tag=alert.tag,
            destination=name[:64],
            attempt=attempt,
            status=status,
            http_status=http_status,
            error=error,
            latency_ms=latency_ms,
            at=datetime.fromtimestamp(self._clock(), UTC),
        )
        try:
            self._record(note)
        except Exception as exc:  # the log is lost, the delivery is not: never the agent's crash
            log.error(
                "cannot record an alert delivery attempt",
                extra={"destination": name[:64], "alert_id": alert.alert_id, "error": describe(exc)},
            )
        return note


def decode_alerts(values: Iterable[bytes | None]) -> list[BudgetAlert]:
    """The alerts of a batch; one that does not decode is skipped (the sink, which reads the same
    topic, lands it in `spend_rejects` with the reason)."""
    alerts = []
    for value in values:
        try:
            alerts.append(BudgetAlert.model_validate_json(value or b""))
        except Exception as exc:
            log.warning("undecodable budget alert not delivered", extra={"error": describe(exc)})
    return alerts


def http_client(policy: RetryPolicy) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=policy.timeout_s, follow_redirects=False, headers={"User-Agent": "spendledger-alerts"}
    )


def install_alert_delivery(app: faust.App, settings: WorkerSettings) -> None:
    """The alert-delivery agent (see the module docstring). It has its own outbox: its flush waits for
    its delivery log only, not for the ledger's or the budgets' outputs."""
    # httpx logs every request's URL at INFO, and a webhook's URL is its key.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
    topics = settings.topics
    outbox = Outbox(settings.kafka_config())
    policy = RetryPolicy.from_settings(settings)
    alerts_topic = app.topic(topics.budget_alerts, partitions=settings.topic_partitions)
    log.info("alert destinations: %s", ", ".join(sorted(settings.alert_destinations)) or "none")

    def record(attempt: DeliveryAttempt) -> None:
        metrics.ALERT_DELIVERIES.labels(attempt.status).inc()
        outbox.put(topics.alert_deliveries, attempt.alert_id.encode(), attempt.model_dump_json().encode())

    @app.agent(alerts_topic, concurrency=1)
    async def deliver_alerts(stream: Any) -> None:
        async with http_client(policy) as client:
            delivery = AlertDelivery(
                settings.alert_destinations,
                policy,
                client,
                record,
                max_age_s=settings.alert_delivery_max_age_s,
            )
            async for events in stream.take_events(ALERTS_PER_BATCH, within=settings.batch_within_s):
                await delivery.deliver_all(decode_alerts(event.message.value for event in events))
                await outbox.flush()

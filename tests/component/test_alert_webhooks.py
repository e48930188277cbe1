"""Alert delivery against a real HTTP receiver on 127.0.0.1 (aiohttp), over the worker's own HTTP
client: signed deliveries, retries until the receiver takes the alert, final refusals, a dead port,
a receiver that hangs, and Slack's format. The delivery is driven directly, not through Faust."""

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from processors.alerts import AlertDelivery, RetryPolicy, http_client
from schemas.alerts import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryAttempt,
    verify_signature,
)
from schemas.budgets import BudgetAlert
from spendledger.platform.settings import AlertDestination

SECRET = "whsec-component-key"
FAST = RetryPolicy(attempts=4, timeout_s=2.0, backoff_s=0.01, backoff_max_s=0.04, deadline_s=10.0)


def alert(alert_id: str = "a-95") -> BudgetAlert:
    return BudgetAlert.model_validate(
        {
            "alert_id": alert_id,
            "tag": "team:support",
            "kind": "threshold",
            "threshold_pct": 95,
            "spend_usd": "95.000000000001",
            "max_budget_usd": "100",
            "window_start": "2026-11-22T00:00:00Z",
            "window_end": "2026-11-23T00:00:00Z",
            "at": datetime.now(UTC),
        }
    )


class Receiver:
    """A webhook receiver: checks each delivery's signature as a receiver should (401 if it does not
    hold), then answers from `answers` in turn (200 once they run out). `hang` makes it never answer."""

    def __init__(self, answers: list[int], secret: str | None = SECRET, hang: bool = False) -> None:
        self.answers = list(answers)
        self.secret = secret
        self.hang = hang
        self.received: list[tuple[dict[str, str], bytes, bool]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = self.secret is None or verify_signature(
            self.secret,
            request.headers.get(TIMESTAMP_HEADER, ""),
            body,
            request.headers.get(SIGNATURE_HEADER, ""),
            now=time.time(),
        )
        self.received.append((dict(request.headers), body, signed))
        if self.hang:
            await asyncio.Event().wait()
        if not signed:
            return web.Response(status=401)
        return web.Response(status=self.answers.pop(0) if self.answers else 200)


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(receiver: Receiver) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks/{key}", receiver.handle)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        receiver.url = f"http://{host}:{port}/hooks/s3cretpath"
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


async def deliver(
    destinations: dict[str, AlertDestination], one: BudgetAlert, policy: RetryPolicy = FAST
) -> tuple[list[DeliveryAttempt], list[DeliveryAttempt]]:
    log: list[DeliveryAttempt] = []
    async with http_client(policy) as client:
        final = await AlertDelivery(destinations, policy, client, log.append, max_age_s=3600).deliver(one)
    return final, log


def to(url: str, **extra: Any) -> AlertDestination:
    return AlertDestination.model_validate({"url": url, "secret": SECRET, "default": True, **extra})


async def test_a_receiver_that_fails_twice_gets_the_alert_on_the_third_attempt(serve):
    receiver = await serve(Receiver([503, 503]))
    final, log = await deliver({"finance": to(receiver.url)}, alert())

    assert [(a.attempt, a.status, a.http_status) for a in log] == [
        (1, "retrying", 503),
        (2, "retrying", 503),
        (3, "delivered", 200),
    ]
    assert final == [log[-1]]
    assert all(a.latency_ms is not None and a.latency_ms >= 0 for a in log)
    assert len(receiver.received) == 3
    assert all(signed for _, _, signed in receiver.received)  # each attempt verified by the receiver
    bodies = {body for _, body, _ in receiver.received}
    assert len(bodies) == 1  # the same alert each time
    payload = json.loads(bodies.pop())
    assert payload["type"] == "budget.alert" and payload["alert_id"] == "a-95"
    assert payload["spend_usd"] == "95.000000000001" and payload["threshold_pct"] == 95
    assert {headers[ALERT_ID_HEADER] for headers, _, _ in receiver.received} == {"a-95"}


async def test_a_receiver_that_refuses_gets_one_attempt(serve):
    receiver = await serve(Receiver([400]))
    final, log = await deliver({"finance": to(receiver.url)}, alert())
    assert [(a.attempt, a.status, a.http_status, a.error) for a in log] == [(1, "failed", 400, "HTTP 400")]
    assert final == log and len(receiver.received) == 1


async def test_a_wrong_secret_is_refused_by_the_receiver(serve):
    receiver = await serve(Receiver([]))
    _, log = await deliver({"finance": to(receiver.url, secret="not-the-receivers")}, alert())
    assert [(a.status, a.http_status) for a in log] == [("failed", 401)]
    assert [signed for _, _, signed in receiver.received] == [False]


async def test_a_dead_port_gets_every_attempt_then_fails():
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hooks/s3cretpath"
    final, log = await deliver({"finance": to(url)}, alert())
    assert [(a.attempt, a.status) for a in log] == [
        (1, "retrying"),
        (2, "retrying"),
        (3, "retrying"),
        (4, "failed"),
    ]
    assert final == [log[-1]] and all(a.http_status is None for a in log)
    assert all(a.error.startswith("ConnectError") for a in log)
    assert not any("s3cretpath" in a.model_dump_json() for a in log)


async def test_a_receiver_that_hangs_is_given_up_on_within_the_deadline(serve):
    receiver = await serve(Receiver([], hang=True))
    policy = RetryPolicy(attempts=6, timeout_s=0.3, backoff_s=0.01, backoff_max_s=0.04, deadline_s=0.9)
    started = time.monotonic()
    _, log = await deliver({"finance": to(receiver.url)}, alert(), policy)
    # Attempt 1 ends at 0.3 s, so attempt 2 may start (0.3 + 0.01 + 0.3 <= 0.9); it ends at 0.61 s
    # or later, and a third could not end by 0.9 s (0.61 + 0.02 + 0.3).
    assert [(a.attempt, a.status, a.error) for a in log] == [
        (1, "retrying", "timed out after 0.3 s"),
        (2, "failed", "timed out after 0.3 s"),
    ]
    assert time.monotonic() - started < 1.5  # six attempts would take 1.8 s
    assert len(receiver.received) == 2


async def test_a_slack_destination_receives_a_slack_message(serve):
    receiver = await serve(Receiver([], secret=None))
    final, _ = await deliver({"oncall": to(receiver.url, format="slack", secret=None)}, alert())
    assert [(a.destination, a.status) for a in final] == [("oncall", "delivered")]
    [(headers, body, _)] = receiver.received
    message = json.loads(body)
    assert set(message) == {"text", "blocks"}
    assert message["text"].startswith(
        "Budget alert: team:support reached 95% of its budget: $95.00 spent of $100.00"
    )
    assert [block["type"] for block in message["blocks"]] == ["header", "section", "context"]
    assert headers["Content-Type"] == "application/json" and SIGNATURE_HEADER not in headers


async def test_each_destination_of_an_alert_is_delivered_at_once(serve):
    slow = await serve(Receiver([503] * FAST.attempts))
    fast = await serve(Receiver([]))
    final, log = await deliver({"slow": to(slow.url), "fast": to(fast.url)}, alert())
    assert {(a.destination, a.status) for a in final} == {("slow", "failed"), ("fast", "delivered")}
    # The fast one was delivered before the slow one's second attempt: not one after the other.
    order = [(a.destination, a.attempt) for a in log]
    assert order.index(("fast", 1)) < order.index(("slow", 2))


async def test_a_dead_destination_gets_one_attempt_per_alert_until_it_answers_again(serve):
    """A receiver that failed an alert after all its retries is tried once per alert after that, so it
    cannot hold every later batch for the whole retry deadline; once it takes one, retries resume."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log: list[DeliveryAttempt] = []
    async with http_client(FAST) as client:
        delivery = AlertDelivery(
            {"ops": to(f"http://127.0.0.1:{port}/hooks/x")}, FAST, client, log.append, max_age_s=3600
        )
        await delivery.deliver(alert())
        assert [a.status for a in log] == ["retrying"] * 3 + ["failed"] and delivery.down == {"ops"}
        log.clear()
        await delivery.deliver(alert())
        assert [(a.attempt, a.status) for a in log] == [(1, "failed")]
        receiver = await serve(Receiver([503]))
        delivery.destinations["ops"] = to(receiver.url)
        log.clear()
        await delivery.deliver(alert())  # still marked down: one attempt, refused with a 503
        await delivery.deliver(alert())  # delivered: the destination is up again
        assert [(a.attempt, a.status) for a in log] == [(1, "failed"), (1, "delivered")]
        assert delivery.down == set()

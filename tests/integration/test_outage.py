"""A broker outage: the API refuses with 503 and Retry-After, acknowledges nothing, and recovers.

The embedded broker keeps its log in memory, so the outage is made by freezing it
(SIGSTOP): every connection hangs, as with a partitioned or overloaded broker. Its
data survives, as a replicated Kafka cluster's does when one broker goes away.
"""

import os
import signal
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Ledger, running_system

EVENT_COST = Decimal("0.0045")  # gpt-4o, 1000 input + 200 output tokens
PUBLISH_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: Any) -> Any:
    with running_system(tmp_path_factory, publish_timeout_s=str(PUBLISH_TIMEOUT_S)) as running:
        yield running


def events(run: str, start: int, stop: int) -> list[dict[str, Any]]:
    return [
        {
            "kind": "completed",
            "request_id": f"{run}-{i}",
            "event_id": f"{run}-{i}",
            "model": "openai/gpt-4o",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
        }
        for i in range(start, stop)
    ]


def test_a_frozen_broker_gets_503_with_retry_after_and_nothing_acknowledged_is_lost(ledger: Ledger) -> None:
    run = f"out_{uuid.uuid4().hex[:10]}"
    before = events(run, 0, 600)
    for start in range(0, len(before), 200):
        assert ledger.send({"events": before[start : start + 200]}).status_code == 202

    broker = ledger.system.broker
    assert broker is not None
    os.kill(broker.pid, signal.SIGSTOP)
    during = events(run, 600, 900)
    try:
        started = time.monotonic()
        r = ledger.send({"events": during[:150]})
        waited = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["code"] and "Kafka" in error["message"], error
        assert waited < PUBLISH_TIMEOUT_S + 5, waited  # refused in bounded time, not hung
        ready = ledger.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["kafka"] is False, ready.text
    finally:
        os.kill(broker.pid, signal.SIGCONT)

    # The producer sends the refused batch again, with the same ids, until it is accepted.
    deadline = time.monotonic() + 60
    for start in range(0, len(during), 150):
        while True:
            try:
                r = ledger.send({"events": during[start : start + 150]})
            except httpx.TimeoutException:
                r = None
            if r is not None and r.status_code == 202:
                break
            assert r is None or r.status_code == 503, r.text
            assert time.monotonic() < deadline, "the API did not accept events again within 60 s"
            time.sleep(0.5)

    query = f"SELECT count(), uniqExact(event_id), sum(cost_usd) FROM spend_records WHERE startsWith(request_id, '{run}-')"
    ledger.wait_for(query, lambda rows: rows[0][1] >= 900, timeout=120)
    ledger.settle()  # everything read to its end: anything doubled has landed
    [[count, unique, total]] = ledger.sql(query)
    assert (count, unique, Decimal(total)) == (900, 900, 900 * EVENT_COST)
    assert ledger.http.get("/readyz").status_code == 200

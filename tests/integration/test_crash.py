"""Crash safety: kill -9 the worker, the API and the sink under load, several times.

A sender posts 20,000 events in batches, retrying each batch with the same
event ids until it is accepted, while a killer SIGKILLs a child at random
moments; `EmbeddedSystem`'s supervisor restarts it with backoff. Afterwards
`spend_records` holds exactly one row per event, the Decimal total is exact, and
the budget's spend equals ClickHouse.
"""

import os
import random
import signal
import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from spendledger.guard import BudgetGuard
from tests.integration.conftest import Ledger, running_system

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]  # its waits: up to 600 s + 240 s

EVENTS = 20_000
BATCH = 500
KILLS = 6
# (model, usage, cost of one call): 1000 input + 200 output tokens each.
MODELS = [
    ("openai/gpt-4o", {"prompt_tokens": 1000, "completion_tokens": 200}, Decimal("0.0045")),
    ("openai/gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 200}, Decimal("0.00027")),
    ("anthropic/claude-haiku-4-5", {"input_tokens": 1000, "output_tokens": 200}, Decimal("0.002")),
]


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: Any) -> Any:
    with running_system(tmp_path_factory, request_timeout_s="10") as ledger:
        ledger.system.start_supervisor(0.25)
        yield ledger


def test_kill_9_under_load_loses_nothing_and_counts_nothing_twice(supervised: Ledger) -> None:
    ledger = supervised
    run = f"crash{uuid.uuid4().hex[:8]}"
    seed = int(os.environ.get("CRASH_SEED") or random.randrange(10**6))  # printed below: replay with it
    rng = random.Random(seed)
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}
    r = ledger.http.post(
        "/tag/new", json={"name": f"team:{run}", "max_budget": 10**6, "budget_duration": "30d"}, headers=admin
    )
    assert r.status_code == 200, r.text

    events = [
        {
            "kind": "completed",
            "event_id": f"{run}-e{i}",
            "request_id": f"{run}-r{i}",
            "model": MODELS[i % 3][0],
            "usage": MODELS[i % 3][1],
            "headers": {"x-litellm-tags": f"team:{run}"},
        }
        for i in range(EVENTS)
    ]
    expected_total = sum((MODELS[i % 3][2] for i in range(EVENTS)), Decimal(0))
    done = threading.Event()
    retries = [0]

    def send() -> None:
        http = httpx.Client(base_url=ledger.system.api_url, timeout=30)
        headers = {"Authorization": f"Bearer {ledger.system.producer_key}"}
        for start in range(0, EVENTS, BATCH):
            while True:  # the same batch, the same event ids, until accepted
                try:
                    if (
                        http.post(
                            "/v1/events", json={"events": events[start : start + BATCH]}, headers=headers
                        ).status_code
                        == 202
                    ):
                        break
                except httpx.HTTPError:
                    pass
                retries[0] += 1
                time.sleep(0.5)
            time.sleep(0.3)
        done.set()

    kills: list[str] = []

    def kill() -> None:
        targets = ["worker", "api", "sink"]
        while not done.is_set() and len(kills) < KILLS:
            time.sleep(rng.uniform(1.5, 4.0))
            name = targets[len(kills) % len(targets)]
            child = ledger.system.children[name]
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                kills.append(name)

    sender, killer = threading.Thread(target=send), threading.Thread(target=kill)
    sender.start()
    killer.start()
    sender.join(timeout=600)
    killer.join(timeout=60)
    assert done.is_set(), "the sender never got every batch accepted"
    assert len(kills) >= 4, kills

    query = (
        "SELECT count(), uniqExact(event_id), sum(cost_usd) FROM spend_records "
        f"WHERE startsWith(event_id, '{run}-')"
    )
    deadline = time.monotonic() + 240
    while True:
        try:
            rows = ledger.sql(query)
        except (AssertionError, httpx.HTTPError):  # the API may be restarting
            rows = [[0, 0, "0"]]
        if rows[0][0] >= EVENTS or time.monotonic() > deadline:
            break
        time.sleep(1)
    ledger.settle()  # everything read to its end: anything late and doubled has landed
    [[count, unique, total]] = ledger.sql(query)
    print(
        f"\ncrash test (seed {seed}): {EVENTS} events, kills {kills}, {retries[0]} batch retries, "
        f"{count} rows, {EVENTS - unique} lost, {count - unique} doubled"
    )
    assert (count, unique) == (EVENTS, EVENTS)  # none lost, none doubled
    assert Decimal(total) == expected_total

    # The budget agent's own spend (its latest signal, as a gateway's guard holds it) equals ClickHouse's.
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    guard = BudgetGuard({"bootstrap.servers": ledger.bootstrap}, f"{prefix}spend.budget-blocks").start()
    try:
        deadline = time.monotonic() + 90
        signal_ = guard.view.get(f"team:{run}")
        while signal_ is None or signal_.spend_usd != expected_total:
            assert time.monotonic() < deadline, signal_
            time.sleep(0.5)
            signal_ = guard.view.get(f"team:{run}")
    finally:
        guard.stop()
    log = (ledger.system.log_dir / "supervisor.log").read_text()
    assert all(f"restarted the {name}" in log for name in ("worker", "api", "sink")), log


def test_a_pending_request_still_expires_after_its_worker_is_killed(supervised: Ledger) -> None:
    """The join timer only looks at indexed states; a restarted worker indexes the state it recovers."""
    ledger = supervised
    rid = f"pending-{uuid.uuid4().hex[:10]}"
    r = ledger.send(
        {
            "kind": "request",
            "request_id": rid,
            "model": "openai/gpt-4o",
            "headers": {"X-AnyAPI-App-ID": "kept"},
        }
    )
    assert r.status_code == 202, r.text
    # The worker processed it and committed past it, inside the 10 s request timeout: the pending
    # call now lives only in the join state's changelog.
    ledger.settle(timeout=8)
    worker = ledger.system.children["worker"]
    os.kill(worker.pid, signal.SIGKILL)
    rows = ledger.wait_for(
        f"SELECT status, join_kind, app_id FROM spend_records WHERE request_id = '{rid}'",
        lambda rows: len(rows) == 1,
        timeout=120,
    )
    assert rows == [["incomplete", "request_only", "kept"]]


def agent_spend(ledger: Ledger, tag: str, expected: Decimal, timeout_s: float = 60) -> Decimal | None:
    """The budget agent's spend for `tag` (its latest signal) once it equals `expected`, else the last seen."""
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    guard = BudgetGuard({"bootstrap.servers": ledger.bootstrap}, f"{prefix}spend.budget-blocks").start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            signal_ = guard.view.get(tag)
            spend = None if signal_ is None else signal_.spend_usd
            if spend == expected or time.monotonic() > deadline:
                return spend
            time.sleep(0.25)
    finally:
        guard.stop()


def test_a_worker_killed_right_after_a_batch_recovers_all_of_its_budget_state(supervised: Ledger) -> None:
    """The agent's changelog writes go out in batches of many records; Tansu lists a partition's
    end as its last batch's first offset + 1. A recovery that trusted that end lost the tail."""
    ledger = supervised
    run = f"tail{uuid.uuid4().hex[:8]}"
    tag = f"team:{run}"
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}
    r = ledger.http.post(
        "/tag/new", json={"name": tag, "max_budget": 10**6, "budget_duration": "1d"}, headers=admin
    )
    assert r.status_code == 200, r.text
    cost = MODELS[0][2]

    def batch(start: int, n: int) -> dict[str, Any]:
        events = [
            {
                "kind": "completed",
                "event_id": f"{run}-e{i}",
                "request_id": f"{run}-r{i}",
                "model": MODELS[0][0],
                "usage": MODELS[0][1],
                "headers": {"x-litellm-tags": tag},
            }
            for i in range(start, start + n)
        ]
        return {"events": events}

    # Two kills: before the fix the tail went missing from the second recovery on ($3.60 of $5.40).
    for round_ in range(2):
        assert ledger.send(batch(round_ * 400, 400)).status_code == 202
        sent = 400 * (round_ + 1)
        assert agent_spend(ledger, tag, cost * sent) == cost * sent
        worker = ledger.system.children["worker"]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        deadline = time.monotonic() + 60
        while (
            ledger.system.children["worker"] is worker or ledger.system.children["worker"].poll() is not None
        ):
            assert time.monotonic() < deadline, "the supervisor did not restart the worker"
            time.sleep(0.2)
    # One more call: the restarted worker's signal carries what it recovered plus this one.
    assert ledger.send(batch(800, 1)).status_code == 202
    assert agent_spend(ledger, tag, cost * 801) == cost * 801

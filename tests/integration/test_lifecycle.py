"""A stop, a restart and a crash of the whole embedded system on the same data dir (DESIGN §9.4-9.6).

`up`'s stop drains (new events refused, everything acknowledged landed), and a
restart on the same data dir starts an empty broker: budgets, their window spend,
blocks, app limits and pending joins come back from ClickHouse and the ingest
journal. A kill -9 of every process, broker included, loses nothing acknowledged.
"""

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from spendledger.embedded import EmbeddedSystem
from spendledger.guard import BudgetGuard
from tests.integration.conftest import Ledger, free_port

pytestmark = pytest.mark.integration

COST = Decimal("0.0045")  # openai/gpt-4o, 1000 input + 200 output tokens


def call(run: str, i: int, tags: str) -> dict[str, Any]:
    return {
        "kind": "completed",
        "event_id": f"{run}-e{i}",
        "request_id": f"{run}-r{i}",
        "model": "openai/gpt-4o",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
        "headers": {"x-litellm-tags": tags},
    }


class Lifecycle:
    """One data dir; start, stop or kill the system on it as often as a test likes."""

    def __init__(self, data_dir: Path, **settings: str) -> None:
        self.data_dir = data_dir
        self.settings = {f"SPENDLEDGER_{k.upper()}": v for k, v in settings.items()}
        self.prefix = f"lc{os.getpid()}.{data_dir.name}."
        self.system: EmbeddedSystem | None = None
        self.said: list[str] = []

    def start(self) -> Ledger:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDLEDGER_")}
        env.update(
            {
                "SPENDLEDGER_REQUEST_TIMEOUT_S": "600",
                "SPENDLEDGER_TOPIC_PREFIX": self.prefix,
                "SPENDLEDGER_LOG_LEVEL": "WARNING",
                **self.settings,
            }
        )
        self.system = EmbeddedSystem(
            data_dir=self.data_dir, port=free_port(), kafka_port=free_port(), env=env, say=self.said.append
        )
        self.system.start()
        self.system.start_supervisor()  # as `up` does
        return Ledger(self.system)

    def stop(self) -> tuple[int, float]:
        assert self.system is not None
        started = time.monotonic()
        left = self.system.stop(drain_timeout_s=120)
        return left, time.monotonic() - started

    def kill(self) -> None:
        """kill -9 of the broker and every child, as a power cut or an OOM kill would."""
        assert self.system is not None
        processes = [*self.system.children.values(), self.system.broker]
        self.system._stopping.set()  # no restarts: the supervisor dies with `up`
        for process in processes:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for process in processes:
            if process is not None:
                process.wait(10)
        self.system.release_data_dir()  # as the end of a killed `up` would
        self.system = None


@pytest.fixture
def lifecycle(tmp_path: Path) -> Iterator[Lifecycle]:
    cycle = Lifecycle(tmp_path / "data")
    try:
        yield cycle
    finally:
        if cycle.system is not None:
            cycle.system.stop()


def admin(ledger: Ledger, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return ledger.http.request(
        method, path, headers={"Authorization": f"Bearer {ledger.system.admin_key}"}, **kwargs
    )


def check(ledger: Ledger, tags: list[str]) -> dict[str, Any]:
    r = ledger.http.post(
        "/v1/check", json={"tags": tags}, headers={"Authorization": f"Bearer {ledger.system.producer_key}"}
    )
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def budgets_view(ledger: Ledger, tags: list[str]) -> dict[str, tuple[Any, ...]]:
    """Each budget as /tag/info tells it, and whether /v1/check lets its tag through."""
    info = admin(ledger, "GET", "/tag/info", params={"names": ",".join(tags)})
    assert info.status_code == 200, info.text
    return {
        tag: (
            Decimal(str(info.json()[tag]["max_budget"])),
            info.json()[tag]["budget_duration"],
            info.json()[tag]["blocked"],
            check(ledger, [tag])["allowed"],
        )
        for tag in tags
    }


def refused(ledger: Ledger, tags: list[str], blocked: list[str]) -> dict[str, tuple[Any, ...]] | None:
    """The budgets' view once /v1/check refuses every tag of `blocked`."""
    view = budgets_view(ledger, tags)
    return view if not any(view[tag][3] for tag in blocked) else None


def send_all(ledger: Ledger, events: list[dict[str, Any]], batch: int = 500) -> int:
    accepted = 0
    for start in range(0, len(events), batch):
        r = ledger.send({"events": events[start : start + batch]})
        assert r.status_code == 202, r.text
        accepted += r.json()["accepted"]
    return accepted


def totals(ledger: Ledger, run: str) -> tuple[int, Decimal]:
    rows = ledger.sql(
        f"SELECT count(), toString(sum(cost_usd)) FROM spend_records WHERE request_id LIKE '{run}-%'"
    )
    return int(rows[0][0]), Decimal(rows[0][1] or 0)


def test_a_stop_drains_and_a_restart_keeps_every_event_budget_block_and_pending_join(
    lifecycle: Lifecycle,
) -> None:
    run = f"stop{uuid.uuid4().hex[:6]}"
    events = 20_000
    ledger = lifecycle.start()
    team, app, roomy = f"team:{run}", f"app:{run}", f"project:{run}"
    for body in (
        {"name": team, "max_budget": "0.004", "budget_duration": "1d"},
        {"name": roomy, "max_budget": "1000000", "budget_duration": "1mo"},
    ):
        assert admin(ledger, "POST", "/tag/new", json=body).status_code == 200
    r = admin(
        ledger, "POST", "/v1/limits/app", json={"app_id": run, "limit_type": "daily", "limit_amount": 50}
    )
    assert r.status_code == 200, r.text
    wait_until(lambda: len(budgets_view_safe(ledger, [team, app, roomy])) == 3, "the budgets to show")

    calls = [call(run, i, f"{team},{roomy}" if i % 2 else f"app:{run},{roomy}") for i in range(events)]
    assert send_all(ledger, calls) == events
    # A request whose usage has not come yet: the join holds it across the restart.
    pending = {"kind": "request", "event_id": f"{run}-pq", "request_id": f"{run}-pending",
               "model": "openai/gpt-4o", "headers": {"x-litellm-tags": roomy}}  # fmt: skip
    assert ledger.send(pending).status_code == 202

    left, stop_s = lifecycle.stop()
    assert left == 0
    assert any("drained" in line or "draining" in line for line in lifecycle.said), lifecycle.said

    started = time.monotonic()
    ledger = lifecycle.start()
    restart_s = time.monotonic() - started
    total = COST * events
    assert totals(ledger, run) == (events, total)
    view = wait_until(lambda: refused(ledger, [team, app, roomy], [team, app]), "the blocks", timeout=30)
    assert view[team][2] is True and view[app][2] is True
    assert view[roomy][2] is False and view[roomy][3] is True
    # The pending request joins its usage, sent after the restart.
    usage = {"kind": "usage", "event_id": f"{run}-pu", "request_id": f"{run}-pending",
             "usage": {"prompt_tokens": 1000, "completion_tokens": 200}}  # fmt: skip
    assert ledger.send(usage).status_code == 202
    wait_for_worker(ledger)
    ledger.wait_for(
        f"SELECT join_kind, toString(cost_usd) FROM spend_records WHERE request_id = '{run}-pending'",
        lambda rows: rows == [["joined", "0.0045"]],
        timeout=120,
    )
    # The budget agent's spend is ClickHouse's, to the cent.
    assert agent_spend(ledger, roomy, total + COST) == total + COST
    print(
        f"\nstop: {events:,} acknowledged (+1 pending request), drain and stop {stop_s:.1f} s, restart "
        f"{restart_s:.1f} s; after the restart {totals(ledger, run)[0]:,} rows, total {total + COST}; "
        f"blocked before and after: {team}, {app}"
    )


def agent_spend(ledger: Ledger, tag: str, expected: Decimal) -> Decimal | None:
    """The budget agent's own spend for a tag (its latest signal, as a gateway's guard holds it),
    once it equals `expected` (or what it is after 60 s)."""
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    guard = BudgetGuard({"bootstrap.servers": ledger.bootstrap}, f"{prefix}spend.budget-blocks").start()
    try:
        deadline = time.monotonic() + 60
        while True:
            signal_ = guard.view.get(tag)
            if signal_ is not None and signal_.spend_usd == expected or time.monotonic() > deadline:
                return None if signal_ is None else signal_.spend_usd
            time.sleep(0.3)
    finally:
        guard.stop()


def wait_for_worker(ledger: Ledger, timeout: float = 120) -> None:
    """Until the worker has taken in an event since its start (its recovery is over), saying what it
    reports if it never does."""
    port = ledger.system.worker_ports["worker"]
    deadline = time.monotonic() + timeout
    while True:
        try:
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            metrics = ""
        if "spendledger_worker_events_total{" in metrics:
            return
        if time.monotonic() > deadline:
            lines = [
                line
                for line in metrics.splitlines()
                if line.startswith("spendledger_") and "_bucket" not in line and "_created" not in line
            ]
            from spendledger.platform.kafka import consumer_lag

            lines.append(
                f"lag: {consumer_lag(ledger.system.settings(), ledger.system.settings().topics.consumed())}"
            )
            log = (ledger.system.log_dir / "worker.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"the worker took in no event in {timeout:.0f} s: {lines}\n{log}")
        time.sleep(0.5)


def budgets_view_safe(ledger: Ledger, tags: list[str]) -> dict[str, Any]:
    info = admin(ledger, "GET", "/tag/info", params={"names": ",".join(tags)})
    return info.json() if info.status_code == 200 else {}


def test_kill_9_of_everything_loses_nothing_acknowledged_and_budgets_agree_with_the_ledger(
    lifecycle: Lifecycle,
) -> None:
    run = f"kill{uuid.uuid4().hex[:6]}"
    events = 5_000
    ledger = lifecycle.start()
    team = f"team:{run}"
    assert (
        admin(
            ledger, "POST", "/tag/new", json={"name": team, "max_budget": "5", "budget_duration": "1d"}
        ).status_code
        == 200
    )
    wait_until(lambda: budgets_view_safe(ledger, [team]), "the budget to show")
    assert send_all(ledger, [call(run, i, team) for i in range(events)]) == events
    landed_at_kill = totals(ledger, run)[0]
    lifecycle.kill()  # right after the last 202: much of it is still in flight

    started = time.monotonic()
    ledger = lifecycle.start()
    restart_s = time.monotonic() - started
    total = COST * events
    ledger.wait_for(
        f"SELECT count() FROM spend_records WHERE request_id LIKE '{run}-%'",
        lambda rows: rows[0][0] >= events,
        timeout=120,
    )
    assert totals(ledger, run) == (events, total)
    view = wait_until(lambda: refused(ledger, [team], [team]), "the block")
    assert view[team][2] is True
    assert agent_spend(ledger, team, total) == total
    print(
        f"\nkill -9: {events:,} acknowledged, {landed_at_kill:,} landed when killed; restart "
        f"{restart_s:.1f} s; after it {totals(ledger, run)[0]:,} rows, total {total}, {team} blocked"
    )


def test_the_journal_keeps_only_what_has_not_landed(tmp_path: Path) -> None:
    """The API prunes its journal once the events in a segment landed (and settled), whoever lands them:
    the sink runs in a process of its own. Before, nothing pruned it under `up` and it grew for ever."""
    cycle = Lifecycle(tmp_path / "data", journal_prune_interval_s="1", journal_settle_s="1")
    ledger = cycle.start()
    try:
        journal = cycle.data_dir / "journal"
        run = f"jr{uuid.uuid4().hex[:8]}"
        events = [{"kind": "completed", "request_id": f"{run}-{i}", "model": "openai/gpt-4o",
                   "usage": {"prompt_tokens": 1000, "completion_tokens": 200}} for i in range(300)]  # fmt: skip
        assert send_all(ledger, events, batch=100) == 300
        written = sum(p.stat().st_size for p in journal.glob("raw-*.log"))
        assert written > 0
        wait_until(lambda: totals(ledger, run)[0] == 300, "the events to land")
        # Landed and settled: every segment but the one being written is deleted.
        wait_until(
            lambda: sum(p.stat().st_size for p in journal.glob("raw-*.log")) == 0,
            "the journal to be pruned",
            30,
        )
    finally:
        cycle.stop()

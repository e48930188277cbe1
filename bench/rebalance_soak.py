"""Rebalance soak: two workers, one killed with -9 mid-stream, many times; counts rows lost and doubled.

Each run starts a fresh embedded system with two Faust workers, lands a warm-up
(a budgeted tag, request/usage pairs and a producer retry), then sends 2,000
events in batches and kills worker-2 halfway. The survivor takes every
partition. Prints per run: rows, lost, doubled, how long the last event took to
land, and the survivor's rebalance counters (records fetched before a seek and
dropped, messages skipped mid-rebalance, messages cleared from a stream's queue
on resume; each of the last two read again).

    .venv/bin/python bench/rebalance_soak.py [--runs 20] [--events 2000] [--set NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import time
import uuid
from typing import Any

import httpx
from common import embedded_system, machine

from spendledger.embedded import EmbeddedSystem


def metric(system: EmbeddedSystem, worker: str, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{system.worker_ports[worker]}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


class Client:
    def __init__(self, system: EmbeddedSystem) -> None:
        self.system = system
        self.http = httpx.Client(base_url=system.api_url, timeout=30)

    def send(self, events: list[dict[str, Any]]) -> None:
        r = self.http.post(
            "/v1/events",
            json={"events": events},
            headers={"Authorization": f"Bearer {self.system.producer_key}"},
        )
        r.raise_for_status()

    def count(self, prefix: str) -> tuple[int, int]:
        r = self.http.post(
            "/v1/sql",
            json={
                "query": f"SELECT count(), uniqExact(event_id) FROM spend_records WHERE startsWith(request_id, '{prefix}')"
            },
            headers={"Authorization": f"Bearer {self.system.admin_key}"},
        )
        r.raise_for_status()
        count, unique = r.json()["rows"][0]
        return int(count), int(unique)

    def wait(self, prefix: str, expected: int, timeout_s: float) -> tuple[int, int, float]:
        started = time.monotonic()
        while True:
            count, unique = self.count(prefix)
            waited = time.monotonic() - started
            if unique >= expected or waited > timeout_s:
                return count, unique, waited
            time.sleep(0.25)


def completed(run: str, i: int, tags: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "kind": "completed",
        "request_id": f"{run}-{i}",
        "model": "openai/gpt-4o",
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
    }
    if tags:
        event["headers"] = {"x-litellm-tags": tags}
    return event


def one_run(n_events: int, overrides: dict[str, str]) -> dict[str, Any]:
    settings = {"SPENDLEDGER_WORKER_PROCESSES": "2", "SPENDLEDGER_LOG_LEVEL": "WARNING", **overrides}
    with embedded_system(**settings) as system:
        client = Client(system)
        warm = f"warm_{uuid.uuid4().hex[:8]}"
        team = f"team:{warm}"
        r = client.http.post(
            "/tag/new",
            json={"name": team, "max_budget": 1000, "budget_duration": "1d"},
            headers={"Authorization": f"Bearer {system.admin_key}"},
        )
        r.raise_for_status()
        warmup = [completed(warm, i, team) for i in range(1000)]
        warmup += [
            {"kind": "request", "request_id": f"{warm}-{i}", "headers": {"x-litellm-tags": team}}
            for i in range(1000, 1200)
        ]
        warmup += [{**completed(warm, i, team), "kind": "usage"} for i in range(1000, 1200)]
        for start in range(0, len(warmup), 350):
            client.send(warmup[start : start + 350])
        client.send(warmup[:350])  # a producer retry
        client.wait(warm, 1200, 90)
        time.sleep(3)

        run = f"kill_{uuid.uuid4().hex[:8]}"
        events = [completed(run, i) for i in range(n_events)]
        half = n_events // 2
        for start in range(0, half, 250):
            client.send(events[start : min(start + 250, half)])
        victim = system.children["worker-2"]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        for start in range(half, n_events, 250):
            client.send(events[start : start + 250])
        count, unique, waited = client.wait(run, n_events, 60)
        time.sleep(2)  # anything doubled would land now
        count, unique = client.count(run)
        return {
            "rows": count,
            "lost": n_events - unique,
            "doubled": count - unique,
            "landed_s": waited,
            "stale_fetches": metric(system, "worker", "spendledger_worker_stale_fetches_total"),
            "skipped_unacked": metric(system, "worker", "spendledger_worker_skipped_unacked_total"),
            "cleared": metric(system, "worker", "spendledger_worker_cleared_on_resume_total"),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting, e.g. BATCH_WITHIN_S=0.02"
    )
    args = parser.parse_args()
    overrides = dict(f"SPENDLEDGER_{item}".split("=", 1) for item in args.set)
    results = []
    for k in range(args.runs):
        result = one_run(args.events, overrides)
        results.append(result)
        print(
            f"run {k + 1:>3} / {args.runs}: rows {result['rows']:,}, lost {result['lost']}, doubled {result['doubled']}, "
            f"landed in {result['landed_s']:.1f} s; stale fetches {result['stale_fetches']:.0f}, "
            f"skipped mid-rebalance {result['skipped_unacked']:.0f}, cleared on resume {result['cleared']:.0f}",
            flush=True,
        )
    print()
    print(machine())
    lost = sum(r["lost"] for r in results)
    doubled = sum(r["doubled"] for r in results)
    print(
        f"{len(results)} runs, {len(results) * args.events:,} events, {len(results)} kills: "
        f"{lost} lost, {doubled} doubled; runs with stale fetches: {sum(1 for r in results if r['stale_fetches'])}, "
        f"with skips: {sum(1 for r in results if r['skipped_unacked'])}, with clears: {sum(1 for r in results if r['cleared'])}"
    )


if __name__ == "__main__":
    main()

"""`/v1/check` latency while producers load ingest: p50/p99 idle, then under N batches/s of 1,000 events.

    .venv/bin/python bench/check_under_load.py [--rates 2,5,10] [--seconds 20] [--checker-nice -10]

Starts the embedded system, asks `/v1/check` every 20 ms from one client, and sends batches of
1,000 events at each rate from another thread pool. Prints one line per phase. On these two cores
the client itself competes for CPU with the load it measures; `--checker-nice -10` (root) gives it
the priority a gateway on its own host would have, so the figure is the ledger's path alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
from common import embedded_system, machine


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def measure_checks(url: str, key: str, stop: Any, out: Any, nice: int = 0) -> None:
    """In a process of its own: the senders' threads must not delay the measuring client."""
    if nice:
        os.nice(nice)
    body = orjson.dumps({"tags": ["team:search"], "headers": {"x-anyapi-app-id": "checkout"}})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    latencies = []
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        while not stop.is_set():
            started = time.perf_counter()
            response = http.post("/v1/check", content=body)
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
            time.sleep(0.02)
    out.put(latencies)


def batch(run: str, n: int) -> bytes:
    return orjson.dumps(
        {
            "events": [
                {
                    "kind": "completed",
                    "request_id": f"{run}-{n}-{i}",
                    "model": "openai/gpt-4o",
                    "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
                    "headers": {"x-litellm-tags": "team:load", "x-anyapi-app-id": "loadgen"},
                    "metadata": {"feature": "bulk", "customer": f"c{i % 50}"},
                }
                for i in range(1000)
            ]
        }
    )


def load(url: str, key: str, rate: float, seconds: float, sent: list[int]) -> None:
    run = uuid.uuid4().hex[:8]
    payloads = [batch(run, n) for n in range(int(rate * seconds))]
    clients = threading.local()

    def send(payload: bytes) -> None:
        if not hasattr(clients, "http"):
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            clients.http = httpx.Client(base_url=url, headers=headers, timeout=60)
        response = clients.http.post("/v1/events?warnings=false", content=payload)
        sent[0 if response.status_code == 202 else 1] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for n, payload in enumerate(payloads):
            due = started + n / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(send, payload)


def server_buckets(url: str) -> dict[float, float]:
    """`spendledger_check_seconds` cumulative buckets from the API's /metrics (upper bound -> count)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("spendledger_check_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def server_p99_ms(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the bucket holding the 99th percentile of the checks in between."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    for bound, count in zip(bounds, counts, strict=True):
        if total and count >= 0.99 * total:
            return bound * 1000
    return float("nan")


def phase(url: str, keys: tuple[str, str], rate: float, seconds: float, nice: int = 0) -> dict[str, float]:
    producer, checker = keys
    before = server_buckets(url)
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    process = context.Process(target=measure_checks, args=(url, checker, stop, out, nice))
    process.start()
    time.sleep(1)  # the checker's imports
    sent = [0, 0]
    if rate > 0:
        load(url, producer, rate, seconds, sent)
    else:
        time.sleep(seconds)
    stop.set()
    latencies: list[float] = out.get(timeout=60)
    process.join()
    server = server_p99_ms(before, server_buckets(url))
    label = "idle" if rate == 0 else f"{rate:g} batches/s of 1,000"
    print(
        f"{label:>24}: /v1/check p50 {statistics.median(latencies):6.1f} ms, p99 {percentile(latencies, 0.99):7.1f} ms, "
        f"max {max(latencies):7.1f} ms; in the API p99 <= {server:g} ms "
        f"({len(latencies)} checks; batches 202 {sent[0]}, other {sent[1]})",
        flush=True,
    )
    return {
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "server_p99_ms": server,
    }


def run(rates: list[float], seconds: float, nice: int = 0, **overrides: str) -> dict[str, float]:
    """Figures for bench/run.py: `/v1/check` p50 and p99 idle and at each rate."""
    figures: dict[str, float] = {}
    with embedded_system(**overrides) as system:
        keys = (system.producer_key, system.producer_key)
        for rate in [0.0, *rates]:
            result = phase(system.api_url, keys, rate, seconds if rate else 5, nice)
            label = "idle" if rate == 0 else f"at_{rate:g}_batches_per_s"
            figures[f"check_p50_ms_{label}"] = result["p50_ms"]
            figures[f"check_p99_ms_{label}"] = result["p99_ms"]
            figures[f"check_server_p99_ms_{label}"] = result["server_p99_ms"]
            time.sleep(5)  # let the pipeline catch up between phases
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2,5,10")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--set", action="append", default=[], help="a setting, e.g. --set WORKER_NICE=10")
    parser.add_argument(
        "--checker-nice", type=int, default=0, help="the measuring client's niceness (negative: root)"
    )
    args = parser.parse_args()
    print(machine())
    overrides = dict(f"SPENDLEDGER_{item}".split("=", 1) for item in args.set)
    run([float(r) for r in args.rates.split(",")], args.seconds, args.checker_nice, **overrides)


if __name__ == "__main__":
    main()

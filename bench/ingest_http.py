"""HTTP ingest throughput: batches of 500 from 4 clients, and single events from 32 concurrent clients.

    .venv/bin/python bench/ingest.py [--batch-events 100000] [--single-seconds 20]

Each request is answered 202 only after Kafka acknowledged its events, so these
are acknowledged events per second, with the whole system (worker, sink) running
on the same machine. The load generator is aiohttp (httpx's per-request CPU made
the client the bound on two cores).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import orjson
from common import embedded_system, machine, progress
from pipeline import event

from spendledger.embedded import EmbeddedSystem


async def send_batches(system: EmbeddedSystem, total: int, size: int = 500, clients: int = 4) -> float:
    import aiohttp

    run = f"ib-{uuid.uuid4().hex[:8]}"
    # Bodies are encoded before the clock starts: the figure is the server's, not the client's JSON.
    bodies = [
        orjson.dumps({"events": [event(i, run) for i in range(start, min(start + size, total))]})
        for start in range(0, total, size)
    ]
    sizes = [min(size, total - start) for start in range(0, total, size)]
    headers = {"Authorization": f"Bearer {system.producer_key}", "Content-Type": "application/json"}
    sent = 0

    async def client(http: Any, tick: Any) -> None:
        nonlocal sent
        while bodies:
            body, count = bodies.pop(), sizes.pop()
            while True:
                async with http.post("/v1/events", data=body) as response:
                    await response.read()
                    if response.status == 202:
                        break
                await asyncio.sleep(0.5)  # retried with the same event ids
            sent += count
            tick(sent)

    async with aiohttp.ClientSession(system.api_url, headers=headers) as http:
        with progress("batched events acknowledged", total) as tick:
            started = time.perf_counter()
            await asyncio.gather(*(client(http, tick) for _ in range(clients)))
            return total / (time.perf_counter() - started)


async def send_singles(system: EmbeddedSystem, seconds: float, clients: int = 32) -> float:
    import aiohttp

    run = f"is-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {system.producer_key}", "Content-Type": "application/json"}
    counter = iter(range(10**9))
    done = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(system.api_url, connector=connector, headers=headers) as http:
        stop_at = time.perf_counter() + seconds

        async def client(tick: Any) -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                body = orjson.dumps(event(next(counter), run))
                async with http.post("/v1/events", data=body) as response:
                    await response.read()
                    if response.status == 202:
                        done += 1
                        tick(done)

        with progress(f"single-event requests ({seconds:.0f} s)", 0) as tick:
            started = time.perf_counter()
            await asyncio.gather(*(client(tick) for _ in range(clients)))
            return done / (time.perf_counter() - started)


def run(batch_events: int, single_seconds: float) -> dict[str, Any]:
    with embedded_system() as system:
        batch = asyncio.run(send_batches(system, batch_events))
        single = asyncio.run(send_singles(system, single_seconds))
    return {"ingest_batch_events_per_s": round(batch), "ingest_single_requests_per_s": round(single)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-events", type=int, default=100_000)
    parser.add_argument("--single-seconds", type=float, default=20)
    args = parser.parse_args()
    result = run(args.batch_events, args.single_seconds)
    print()
    print(machine())
    for key, value in result.items():
        print(f"{key:<32}{value:>12,}")


if __name__ == "__main__":
    main()

"""End-to-end throughput: events over HTTP -> Kafka -> Faust -> rows in ClickHouse.

Starts the embedded system in a temporary directory, sends N `completed` events
in batches of 500 from several concurrent clients, and measures until every row
has landed. Prints progress and a result table.

    .venv/bin/python bench/http_to_clickhouse.py [--events 50000] [--batch 500] [--clients 4]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from common import embedded_system, machine
from pipeline import event

from spendledger.embedded import EmbeddedSystem


def batch(start: int, size: int, run: str) -> dict:
    return {"events": [event(i, run) for i in range(start, start + size)]}


async def send_all(system: EmbeddedSystem, total: int, size: int, clients: int, run: str) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, total, size):
        queue.put_nowait(start)
    headers = {"Authorization": f"Bearer {system.producer_key}"}
    sent = 0

    async def client() -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=system.api_url, timeout=60) as http:
            while not queue.empty():
                start = queue.get_nowait()
                body = batch(start, min(size, total - start), run)
                while (await http.post("/v1/events", json=body, headers=headers)).status_code != 202:
                    await asyncio.sleep(0.5)  # retried with the same event ids
                sent += len(body["events"])

    started = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1)
        print(f"  sent {sent:>8,} / {total:,}", flush=True)
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    run = f"bench{int(time.time())}"
    with embedded_system() as system:
        started = time.perf_counter()
        send_s = asyncio.run(send_all(system, args.events, args.batch, args.clients, run))
        admin = {"Authorization": f"Bearer {system.admin_key}"}
        query = {
            "query": f"SELECT count(), sum(cost_usd) FROM spend_records WHERE startsWith(request_id, '{run}-')"
        }
        while True:
            rows = httpx.post(f"{system.api_url}/v1/sql", json=query, headers=admin, timeout=60).json()[
                "rows"
            ]
            landed = rows[0][0]
            print(f"  landed {landed:>8,} / {args.events:,}", flush=True)
            if landed >= args.events:
                break
            time.sleep(1)
        total_s = time.perf_counter() - started
    print()
    print(machine())
    print(f"{'events':<34}{args.events:>12,}")
    print(f"{'HTTP ingest (202 after Kafka ack)':<34}{args.events / send_s:>12,.0f} events/s")
    print(f"{'HTTP -> ClickHouse rows':<34}{args.events / total_s:>12,.0f} events/s")
    print(f"{'total cost landed (USD)':<34}{rows[0][1]:>12}")


if __name__ == "__main__":
    main()

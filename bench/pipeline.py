"""Pipeline throughput: a pre-filled `spend.raw` -> Faust (join, attribute, budgets) -> rows in `spend_records`,
and the same events copied by a bare confluent-kafka consumer into chDB with no processing.

    .venv/bin/python bench/pipeline.py [--events 500000] [--workers 1] [--profile DIR]

The broker starts first and `spend.raw` is filled with sanitized `completed` events (the
bytes ingest would publish: requests of 100 events, packed in one bundle per partition). Then the worker(s), the API and the sink start, a budget is
set on every team tag (so the budget agent does its full work), and rows are counted
until all have landed. The sustained rate is taken between 10 % and 90 % landed, so
start-up (consumer group join, table recovery) is not in it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from common import clean_env, free_port, machine, progress

from ingest.events import sanitize
from schemas.bundles import raw_messages
from schemas.events import RawEvent
from spendledger.embedded import EmbeddedSystem
from spendledger.platform.kafka import ensure_topics, start_tansu
from spendledger.platform.settings import Settings

MODELS = [
    "openai/gpt-4o",
    "openai/gpt-4o-mini",
    "anthropic/claude-3-5-sonnet-20241022",
    "google/gemini-2.5-pro",
]
TEAMS = 5
EVENT_TIME_RATE = 10_000  # events per second of event time in the pre-filled topic


def event(i: int, run: str) -> dict[str, Any]:
    """A realistic completed call: app header, team/env tags, a feature in metadata, a user."""
    return {
        "kind": "completed",
        "request_id": f"{run}-{i}",
        "model": MODELS[i % len(MODELS)],
        "headers": {"X-AnyAPI-App-ID": f"app-{i % 7}", "x-litellm-tags": f"team:t{i % TEAMS},env:prod"},
        "metadata": {"tags": [f"feature:f{i % 11}"]},
        "user": f"user_{i % 1000}",
        "usage": {"input_tokens": 500 + i % 1000, "output_tokens": 50 + i % 200},
    }


def prefill(settings: Settings, total: int, run: str) -> tuple[float, int]:
    """Write `total` sanitized events to spend.raw; returns the producer's events/s and the messages written."""
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config(**{"linger.ms": 20, "batch.num.messages": 10_000}))
    # Event times as a gateway doing EVENT_TIME_RATE calls/s would stamp them, ending now.
    first = datetime.now(UTC) - timedelta(seconds=total / EVENT_TIME_RATE)
    started = time.perf_counter()
    messages = 0
    with progress("prefill spend.raw", total) as tick:
        # In requests of 100 events, packed per partition as ingest packs them.
        for start in range(0, total, 100):
            published = [
                sanitize(
                    RawEvent.model_validate(event(i, run)),
                    received_at=first + timedelta(seconds=i / EVENT_TIME_RATE),
                )
                for i in range(start, min(total, start + 100))
            ]
            for key, value in raw_messages(published, settings.topic_partitions):
                messages += 1
                while True:
                    try:
                        producer.produce(settings.topics.raw, key=key, value=value)
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
            tick(start + len(published))
        producer.flush(60)
        tick(total)
    return total / (time.perf_counter() - started), messages


@dataclass
class Landed:
    sustained_per_s: float
    overall_per_s: float
    seconds: float
    cost_usd: Decimal


def sql(system: EmbeddedSystem, query: str) -> list[list[Any]]:
    headers = {"Authorization": f"Bearer {system.admin_key}"}
    response = httpx.post(f"{system.api_url}/v1/sql", json={"query": query}, headers=headers, timeout=60)
    response.raise_for_status()
    rows: list[list[Any]] = response.json()["rows"]
    return rows


def set_budgets(system: EmbeddedSystem) -> None:
    """A budget on every team tag, high enough never to block: the budget agent does its full work."""
    headers = {"Authorization": f"Bearer {system.admin_key}"}
    for team in range(TEAMS):
        body = {"name": f"team:t{team}", "max_budget": 1_000_000, "budget_duration": "30d"}
        response = httpx.post(f"{system.api_url}/tag/new", json=body, headers=headers, timeout=30)
        if response.status_code not in (200, 409):
            raise RuntimeError(f"tag/new answered {response.status_code}: {response.text}")


def wait_landed(system: EmbeddedSystem, total: int, run: str, started: float) -> Landed:
    """Count rows every half second until all have landed; the rate between 10 % and 90 %."""
    marks: dict[float, float] = {}
    query = f"SELECT count(), sum(cost_usd) FROM spend_records WHERE startsWith(request_id, '{run}-')"
    with progress("rows in spend_records", total) as tick:
        while True:
            count, cost = sql(system, query)[0]
            now = time.perf_counter()
            for share in (0.1, 0.9):
                if count >= total * share and share not in marks:
                    marks[share] = now
            tick(count)
            if count >= total:
                break
            failed = system.exited_child()
            if failed:
                kept = Path(tempfile.mkdtemp(prefix="spendledger-bench-logs-"))
                shutil.copytree(system.log_dir, kept, dirs_exist_ok=True)
                raise RuntimeError(f"the {failed} exited; its log is kept in {kept}")
            time.sleep(0.5)
    sustained = total * 0.8 / max(marks[0.9] - marks[0.1], 1e-9)
    seconds = time.perf_counter() - started
    return Landed(sustained, total / seconds, seconds, Decimal(str(cost)))


def bare_copy(settings: Settings, total: int, messages: int, directory: Path) -> float:
    """The same events (`messages` bundles of them), copied spend.raw -> chDB by a plain consumer: no
    decoding, no processing. Returns events/s."""
    import clickhouse_connect
    from confluent_kafka import Consumer

    client = clickhouse_connect.get_client(dsn=f"chdb://{directory}")
    client.command(
        "CREATE TABLE IF NOT EXISTS bare_raw (key String, value String) ENGINE = MergeTree ORDER BY tuple()"
    )
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"bare-{time.time_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
    )
    consumer.subscribe([settings.topics.raw])
    copied = 0
    started = 0.0
    with progress("bare copy spend.raw -> chDB (messages)", messages) as tick:
        while copied < messages:
            batch = [m for m in consumer.consume(settings.sink_batch_max, timeout=1.0) if m.error() is None]
            if not batch:
                continue
            if not started:
                started = time.perf_counter()
            client.insert("bare_raw", [[m.key(), m.value()] for m in batch], column_names=["key", "value"])
            consumer.commit(asynchronous=True)
            copied += len(batch)
            tick(copied)
    seconds = time.perf_counter() - started
    consumer.close()
    client.close()
    return total / seconds


def profile_worker(system: EmbeddedSystem, directory: Path, seconds: int) -> subprocess.Popen[bytes]:
    """py-spy on the worker while it works (collapsed stacks, for flame graphs or a top list)."""
    pid = system.children["worker"].pid
    return subprocess.Popen(  # noqa: S603 - fixed arguments
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--output",
            str(directory / "worker.folded"),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(
    events: int, workers: int = 1, profile: Path | None = None, settings_env: dict[str, str] | None = None
) -> dict[str, Any]:
    tag = f"pipe{int(time.time())}"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        kafka_port = free_port()
        broker = start_tansu("127.0.0.1", kafka_port, directory / "broker.log", "bench")
        try:
            env = clean_env(
                SPENDLEDGER_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
                SPENDLEDGER_WORKER_PROCESSES=str(workers),
                **(settings_env or {}),
            )
            settings = Settings.model_validate({"kafka_bootstrap": env["SPENDLEDGER_KAFKA_BOOTSTRAP"]})
            ensure_topics(settings)
            produce_per_s, messages = prefill(settings, events, tag)
            system = EmbeddedSystem(directory / "system", port=free_port(), env=env, say=lambda _: None)
            print("starting the worker, the API and the sink…", flush=True)
            started = time.perf_counter()
            try:
                system.start()
                set_budgets(system)
                spy = profile_worker(system, profile, 30) if profile else None
                landed = wait_landed(system, events, tag, started)
                if spy is not None:
                    spy.wait(60)
            finally:
                system.stop()
            bare_per_s = bare_copy(settings, events, messages, directory / "bare")
        finally:
            broker.terminate()
            broker.wait(10)
    return {
        "events": events,
        "workers": workers,
        "prefill_events_per_s": round(produce_per_s),
        "pipeline_events_per_s": round(landed.sustained_per_s),
        "pipeline_overall_events_per_s": round(landed.overall_per_s),
        "pipeline_cost_usd": str(landed.cost_usd),
        "bare_events_per_s": round(bare_per_s),
        "pipeline_vs_bare_ratio": round(landed.sustained_per_s / bare_per_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--profile", type=Path, help="write a py-spy profile of the worker into this directory"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a setting, e.g. BATCH_WITHIN_S=0.2"
    )
    args = parser.parse_args()
    overrides = dict(f"SPENDLEDGER_{item}".split("=", 1) for item in args.set)
    result = run(args.events, args.workers, args.profile, overrides)
    print()
    print(machine())
    for key, value in result.items():
        print(f"{key:<32}{value:>16}")


if __name__ == "__main__":
    main()

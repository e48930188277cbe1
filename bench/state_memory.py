"""Worker memory with N distinct tags in budget state.

    .venv/bin/python bench/state_memory.py [--tags 1000000]

Imports the worker (Faust, the agents) and fills its budget store exactly as the
budget agent does, into a plain dict standing where Faust's memory table keeps
its bytes: every tag gets one priced event (second bucket with its event id, the
state a busy hour leaves), every tenth tag a daily budget; each batch of 2,000
tags is persisted as the agent persists it. Prints the process RSS before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from common import machine, progress

import processors.app  # noqa: F401 - the worker's imports count in its memory
from processors.budgets import BudgetStore
from schemas.budgets import BudgetDefinition
from spendledger.platform.settings import Settings

BATCH = 2_000


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run(tags: int) -> dict[str, Any]:
    gc.collect()
    before = rss_mb()
    table: dict[bytes, bytes] = {}
    store = BudgetStore(table, lambda *_: None, Settings().history_policy())
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    cost = Decimal("0.0045")
    with progress("tags in budget state", tags) as tick:
        for start in range(0, tags, BATCH):
            for n in range(start, min(start + BATCH, tags)):
                tag = f"user:u{n:07d}"
                account = store.account(tag, n % 4)
                if n % 10 == 0:
                    store.set_definition(
                        account,
                        BudgetDefinition(
                            tag=tag,
                            max_budget_usd=Decimal(10),
                            budget_duration="1d",
                            created_at=now,
                            updated_at=now,
                        ),
                    )
                account.add_spend([(f"evt_{n:024x}", now_ms - n % 60_000, cost)])
                account.evaluate(now_ms)
                store.persist(account, rule=n % 10 == 0)
            tick(min(start + BATCH, tags))
    gc.collect()
    after = rss_mb()
    return {"tags": tags, "rss_mb": round(after), "baseline_rss_mb": round(before), "table_keys": len(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tags", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = parser.parse_args()
    started = time.perf_counter()
    result = run(args.tags)
    if args.json:
        print(json.dumps(result))
        return
    print()
    print(machine())
    print(
        f"{result['tags']:,} tags in budget state: worker RSS {result['rss_mb']:,} MB "
        f"(imports alone {result['baseline_rss_mb']} MB; {result['table_keys']:,} table keys; "
        f"{time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()

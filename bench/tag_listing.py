"""The spend a budget listing reads (`/tag/list`): every budget's window summed from `spend_records`, in chDB.

    .venv/bin/python bench/tag_listing.py [--rows 200000] [--budgets 1000,10000]

Fills `spend_records` with N calls over one day, each tagged with one of the budgets' teams, then times
`ClickHouseSpendReader.spends` (grouped: one scan per slice of tags) for every budget's month, and, for
comparison, `spend` one budget at a time over 100 of them (extrapolated to all). Both give the same sums
(checked on those 100). Each grouped figure is the best of 3 runs after one warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime

from common import machine

from ingest.sql import ClickHouseSpendReader
from spendledger.platform.clickhouse import connect, migrate, quoted_slices
from spendledger.platform.settings import ClickHouseSettings

MONTH = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
FILL = """
INSERT INTO spend_records (event_id, request_id, occurred_at, received_at, tags, model, provider, cost_usd)
SELECT toString(number), toString(number), toDateTime64('2026-11-10 00:00:00', 3, 'UTC') + number % 86400,
    toDateTime64('2026-11-10 00:00:00', 3, 'UTC') + number % 86400,
    ['team:budget-' || toString(number % {budgets:UInt64}), 'env:production', 'feature:f' || toString(number % 7)],
    'gpt-4o', 'openai', toDecimal128('0.001', 12)
FROM numbers({rows:UInt64})
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--budgets", default="1000,10000")
    args = parser.parse_args()
    print(machine())
    path = tempfile.mkdtemp()  # chDB opens one directory per process: a database per run in it
    for budgets in [int(n) for n in args.budgets.split(",")]:
        client = connect(
            ClickHouseSettings(clickhouse_dsn=f"chdb://{path}", clickhouse_database=f"bench_{budgets}")
        )
        migrate(client)
        client.command(FILL, parameters={"rows": args.rows, "budgets": budgets})
        reader = ClickHouseSpendReader(client)
        windows = [(f"team:budget-{n}", *MONTH) for n in range(budgets)]
        reader.spends(windows)  # warm-up
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            grouped = reader.spends(windows)
            runs.append(time.perf_counter() - started)
        started = time.perf_counter()
        single = {window: reader.spend(*window) for window in windows[:100]}
        one_s = (time.perf_counter() - started) / 100
        assert all(grouped[window] == value for window, value in single.items())
        queries = len(quoted_slices([tag for tag, _start, _end in windows]))
        print(
            f"rows={args.rows:,} budgets={budgets:,}: grouped {min(runs):.3f} s in {queries} queries; "
            f"one by one {one_s * 1000:.1f} ms each, {one_s * budgets:.1f} s for all"
        )


if __name__ == "__main__":
    main()

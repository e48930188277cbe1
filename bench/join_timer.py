"""The join timer's tick with many done markers in the worker's join state.

    .venv/bin/python bench/join_timer.py [--calls 1200000]

Fills the worker's JoinState as the ledger agent does for `--calls` request + usage
pairs (a done marker each: 10 minutes of 2,000 calls/s with the default retention),
then times the join timer's tick as the worker runs it (`JoinState.due`) while
nothing is due and when a second's worth is, against a scan of every state (what
the timer did before the index). Prints the figures and the process RSS.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace
from typing import Any

from common import machine, progress
from state_memory import rss_mb

from ledger.join import JoinTimeouts, on_event, on_tick
from processors.ledger_step import JoinState, read_pending

RETENTION_MS = 600_000


def run(calls: int) -> dict[str, Any]:
    timeouts = JoinTimeouts(done_retention_ms=RETENTION_MS)
    state = JoinState(SimpleNamespace(data={}), lambda *_: None, timeouts)
    rss_before = rss_mb()
    per_ms = max(1, calls // RETENTION_MS)  # calls spread over one retention period
    with progress("request + usage pairs joined", calls) as tick_progress:
        for n in range(calls):
            now_ms = n // per_ms
            key = f"req-{n:09d}".encode()
            for kind in ("request", "usage"):
                event = {"kind": kind, "request_id": key.decode(), "event_id": f"{kind}-{n}"}
                state.apply(key, on_event(state.get(key), event, partition=0, now_ms=now_ms), 0)
            tick_progress(n + 1)
    filled_ms = calls // per_ms

    def tick(now_ms: int) -> tuple[float, int]:
        started = time.perf_counter()
        looked = 0
        for key, current in state.due(now_ms):
            looked += 1
            state.apply(key, on_tick(current, now_ms=now_ms, timeouts=timeouts), 0)
        return time.perf_counter() - started, looked

    quiet_s, _ = tick(filled_ms)  # nothing is due yet
    # The first second whose markers end: the calls of one second are forgotten.
    busy_s, busy_looked = tick(RETENTION_MS + 1_000)

    started = time.perf_counter()
    for raw in state.table.data.values():
        on_tick(read_pending(raw), now_ms=filled_ms, timeouts=timeouts)
    scan_s = time.perf_counter() - started
    return {
        "calls": calls,
        "tick_nothing_due_ms": quiet_s * 1000,
        "tick_one_second_due_ms": busy_s * 1000,
        "states_looked_at": busy_looked,
        "full_scan_ms": scan_s * 1000,
        "rss_mb": rss_mb() - rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1_200_000)
    args = parser.parse_args()
    r = run(args.calls)
    print()
    print(machine())
    print(f"join state: {r['calls']:,} done markers, {r['rss_mb']:.0f} MB (table and index)")
    print(f"  a tick, nothing due:            {r['tick_nothing_due_ms']:9.3f} ms")
    print(
        f"  a tick, one second's markers due: {r['tick_one_second_due_ms']:7.1f} ms ({r['states_looked_at']:,} states)"
    )
    print(f"  a scan of every state (before): {r['full_scan_ms']:9.1f} ms")


if __name__ == "__main__":
    main()

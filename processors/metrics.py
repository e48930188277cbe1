"""Prometheus metrics of the worker and the sink (default registry: one process each)."""

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram


@functools.lru_cache(maxsize=1024)
def child(metric: Any, label: str) -> Any:
    """`metric.labels(label)`, memoized: `labels()` takes a lock and builds a key on every call,
    more than the count itself, and the ledger agent counts several per event."""
    return metric.labels(label)


EVENTS_IN = Counter("spendledger_worker_events", "Raw events read by the ledger agent", ["kind"])
CALLS_JOINED = Counter("spendledger_worker_calls", "Calls joined by the ledger agent", ["join_kind"])
DUPLICATES = Counter("spendledger_worker_duplicates", "Raw events ignored as duplicates of a joined call")
RECORDS_OUT = Counter("spendledger_worker_records", "Attributed records produced", ["price_source"])
INVALID_TAGS = Counter("spendledger_worker_invalid_tags", "Invalid attribution inputs recorded", ["reason"])
DEAD_LETTERS = Counter("spendledger_dead_letters", "Messages sent to the dead-letter topic", ["stage"])
PENDING_CALLS = Gauge("spendledger_worker_pending_calls", "Calls waiting for their partner event")
BATCH_SECONDS = Histogram("spendledger_worker_batch_seconds", "Time to process one batch", ["agent"])
FLUSH_SECONDS = Histogram(
    "spendledger_worker_flush_seconds",
    "Time a batch waits for Kafka to acknowledge its outputs and then its state",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
STALE_FETCHES = Counter(
    "spendledger_worker_stale_fetches",
    "Partitions whose records, fetched before a seek, were dropped and fetched again",
)
SKIPPED_UNACKED = Counter(
    "spendledger_worker_skipped_unacked",
    "Messages skipped by a stream mid-rebalance, left uncommitted to be read again",
)
CLEARED_ON_RESUME = Counter(
    "spendledger_worker_cleared_on_resume",
    "Messages faust-streaming cleared from a stream's queue when flow resumed, read again",
)
BUDGET_ENTRIES = Counter("spendledger_budget_entries", "Spend entries counted by the budget agent")
BUDGET_DUPLICATES = Counter("spendledger_budget_duplicates", "Spend entries ignored as already counted")
BUDGET_SIGNALS = Counter("spendledger_budget_signals", "Block-state messages sent", ["change"])
BUDGET_ALERTS = Counter("spendledger_budget_alerts", "Budget alerts sent", ["kind"])
STATE_UNREADABLE = Counter(
    "spendledger_worker_state_unreadable", "Stored keys a worker could not read and left aside", ["table"]
)
BUDGET_TAGS = Gauge("spendledger_budget_tags", "Tags whose spend history the worker holds")
ALERT_DELIVERIES = Counter(
    "spendledger_alert_deliveries", "Attempts to deliver a budget alert to a destination", ["status"]
)

SINK_ROWS = Counter("spendledger_sink_rows", "Rows landed in ClickHouse", ["table"])
SINK_SKIPPED = Counter("spendledger_sink_skipped", "Messages skipped as already landed", ["why"])
SINK_FLUSH_SECONDS = Histogram("spendledger_sink_flush_seconds", "Time to land one batch")
SINK_FLUSH_ERRORS = Counter("spendledger_sink_flush_errors", "Failed flushes (retried)")

"""Wire contracts: events in, attributed records out, topic names, ClickHouse DDL."""

from schemas.events import MAX_BATCH_EVENTS, EventBatch, EventKind, RawEvent
from schemas.records import PRICE_SOURCES, AttributedRecord, Reject
from schemas.topics import Topics

__all__ = [
    "MAX_BATCH_EVENTS",
    "PRICE_SOURCES",
    "AttributedRecord",
    "EventBatch",
    "EventKind",
    "RawEvent",
    "Reject",
    "Topics",
]

"""The sink's flush plan: replays and duplicates land nothing; bad messages become rejects."""

from datetime import UTC, datetime
from decimal import Decimal

import orjson

from processors.sink import Landing, Message, plan_landing
from schemas.records import AttributedRecord
from schemas.topics import Topics

ATTR = "spend.attributed"
DLQ = "spend.dead-letter"


class MemoryStore:
    """In-memory twin of ClickHouseStore."""

    def __init__(self):
        self.records: dict[str, AttributedRecord] = {}
        self.rejects = []
        self.offsets = {}
        self.budgets = []
        self.budget_events = []

    def landed_offsets(self, group):
        return dict(self.offsets)

    def existing_event_ids(self, event_ids, start, end):
        # Like the ClickHouse query: only rows whose occurred_at is in [start, end].
        return {e for e in event_ids if e in self.records and start <= self.records[e].occurred_at <= end}

    def existing_alert_ids(self, alert_ids):
        return {e[8] for e in self.budget_events if e[8] in alert_ids}

    def ping(self):
        return True

    def land(self, landing: Landing, group):
        for r in landing.records:
            self.records[r.event_id] = r
        self.rejects += landing.rejects
        self.budgets += landing.budgets
        self.budget_events += landing.budget_events
        self.offsets.update(landing.next_offsets)


def rec(event_id, cost="0.1", t=datetime(2026, 11, 22, 10, tzinfo=UTC)):
    return AttributedRecord(
        event_id=event_id, request_id="r-" + event_id, occurred_at=t, received_at=t, cost_usd=Decimal(cost)
    )


def msg(offset, value, topic=ATTR, partition=0):
    return Message(topic, partition, offset, value)


def land(store, messages):
    landing = plan_landing(messages, topics=Topics(), landed=store.offsets, store=store)
    store.land(landing, "g")
    return landing


def test_lands_once_across_replays_and_reemits():
    store = MemoryStore()
    first = [msg(0, rec("e1").model_dump_json().encode()), msg(1, rec("e2").model_dump_json().encode())]
    land(store, first)
    # The same batch again (crash before the Kafka commit): skipped by offset.
    again = land(store, first)
    assert again.replayed == 2 and again.records == []
    # The worker re-emits e1 at a new offset, and e3 twice in one batch.
    later = land(
        store,
        [
            msg(2, rec("e1").model_dump_json().encode()),
            msg(3, rec("e3").model_dump_json().encode()),
            msg(4, rec("e3").model_dump_json().encode()),
        ],
    )
    assert [r.event_id for r in later.records] == ["e3"] and later.duplicates == 2
    assert sum(r.cost_usd for r in store.records.values()) == Decimal("0.3")
    assert store.offsets == {(ATTR, 0): 5}


def test_undecodable_messages_become_rejects():
    store = MemoryStore()
    dead = b'{"source_topic":"spend.raw","partition":1,"offset":7,"reason":"invalid raw event","payload":"xx","rejected_at":"2026-11-22T10:00:00Z"}'
    landing = land(store, [msg(0, b"\xff not json"), msg(1, None), msg(0, dead, topic=DLQ)])
    assert landing.records == []
    reasons = [r.reason for r in store.rejects]
    assert reasons[0].startswith("sink cannot decode") and reasons[1].startswith("sink cannot decode")
    assert reasons[2] == "invalid raw event"
    assert store.offsets == {(ATTR, 0): 2, (DLQ, 0): 1}


def test_landing_token_is_deterministic():
    a = Landing(next_offsets={("t", 0): 5, ("t", 1): 9})
    b = Landing(next_offsets={("t", 1): 9, ("t", 0): 5})
    assert a.token("g") == b.token("g") != Landing(next_offsets={("t", 0): 6}).token("g")


def test_budget_topics_land_definitions_transitions_and_each_alert_once():
    t = Topics()
    at = "2026-11-22T10:00:00Z"
    definition = orjson.dumps(
        {"tag": "team:a", "max_budget_usd": "10", "budget_duration": "1d", "created_at": at, "updated_at": at}
    )
    window = {
        "window_start": at,
        "window_end": at,
        "spend_usd": "10",
        "max_budget_usd": "10",
        "tag": "team:a",
    }

    def signal(blocked, change):
        return orjson.dumps({**window, "blocked": blocked, "updated_at": at, "change": change})

    alert = orjson.dumps(
        {**window, "alert_id": "a1", "kind": "threshold", "threshold_pct": 50, "spend_usd": "5", "at": at}
    )
    store = MemoryStore()
    land(
        store,
        [
            Message(t.budgets, 0, 0, definition, b"team:a"),
            Message(t.budgets, 0, 1, None, b"team:a"),
            Message(t.budget_blocks, 0, 0, signal(False, "update"), b"team:a"),
            Message(t.budget_blocks, 0, 1, signal(True, "blocked"), b"team:a"),
            Message(t.budget_blocks, 0, 2, None, b"team:a"),
            Message(t.budget_alerts, 0, 0, alert, b"team:a"),
            Message(t.budget_alerts, 0, 1, alert, b"team:a"),
        ],
    )
    again = land(store, [Message(t.budget_alerts, 0, 2, alert, b"team:a")])
    assert [(b[0], b[1], b[5]) for b in store.budgets] == [("team:a", Decimal("10"), 0), ("team:a", None, 1)]
    assert [(e[2], e[3]) for e in store.budget_events] == [("blocked", None), ("alert", 50)]
    assert again.duplicates == 1 and store.rejects == []


def test_a_retry_stamped_later_than_its_original_lands_once():
    """A producer retrying an event without occurred_at: each copy carries its own receive time."""
    from datetime import timedelta

    store = MemoryStore()
    first = rec("e1")
    land(store, [msg(0, first.model_dump_json().encode())])
    retry = rec("e1", t=first.occurred_at + timedelta(minutes=7))
    landing = land(store, [msg(1, retry.model_dump_json().encode())])
    assert landing.records == [] and landing.duplicates == 1
    assert store.records["e1"].occurred_at == first.occurred_at  # the first copy stays


def test_a_deletion_lands_with_the_time_it_was_sent_so_a_budget_created_again_after_it_wins():
    """The sink may land a deletion late: stamped with its own clock it would beat the definition sent
    right after it (`argMax(…, updated_at)`), and the budget would be gone at the next restore."""
    from datetime import UTC, datetime

    sent = datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=UTC)
    tombstone = Message("spend.budgets", 0, 7, None, b"team:x", int(sent.timestamp() * 1000))
    landing = plan_landing([tombstone], topics=Topics(), landed={}, store=MemoryStore())
    [row] = landing.budgets
    assert row[0] == "team:x" and row[5] == 1 and row[6] == sent

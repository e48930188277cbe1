"""The join state machine: request + usage -> one call; timeouts; duplicates change nothing."""

import pytest

from ledger.join import JoinTimeouts, PendingCall, next_tick_ms, on_event, on_tick

T = JoinTimeouts(request_timeout_ms=60_000, usage_wait_ms=5_000, done_retention_ms=600_000)


def ev(kind, rid="r1", eid=None):
    return {"kind": kind, "request_id": rid, "event_id": eid or f"{kind}-{rid}"}


def test_completed_needs_no_join():
    step = on_event(None, ev("completed"), partition=0, now_ms=0)
    assert [c.join_kind for c in step.emitted] == ["completed"] and step.state is None and not step.changed


@pytest.mark.parametrize("order", [("request", "usage"), ("usage", "request")])
def test_request_and_usage_join_in_either_order(order):
    first = on_event(None, ev(order[0]), partition=3, now_ms=0)
    assert first.emitted == [] and first.changed
    second = on_event(first.state, ev(order[1]), partition=3, now_ms=10)
    (call,) = second.emitted
    assert call.join_kind == "joined" and call.request == ev("request") and call.usage == ev("usage")
    assert second.state is not None and second.state.done_ms == 10 and second.state.request is None


def test_duplicates_after_join_change_nothing():
    state = on_event(
        on_event(None, ev("request"), partition=0, now_ms=0).state, ev("usage"), partition=0, now_ms=1
    ).state
    for kind in ("request", "usage"):
        step = on_event(state, ev(kind), partition=0, now_ms=2)
        assert step.duplicate and step.emitted == [] and not step.changed


def test_duplicate_request_while_pending():
    state = on_event(None, ev("request"), partition=0, now_ms=0).state
    assert on_event(state, ev("request"), partition=0, now_ms=1).duplicate


def test_request_without_usage_times_out_as_incomplete():
    state = on_event(None, ev("request"), partition=0, now_ms=0).state
    assert on_tick(state, now_ms=59_999, timeouts=T).emitted == []
    step = on_tick(state, now_ms=60_000, timeouts=T)
    assert [c.join_kind for c in step.emitted] == ["request_only"]


def test_usage_without_request_is_emitted_after_the_wait():
    state = on_event(None, ev("usage"), partition=0, now_ms=0).state
    assert on_tick(state, now_ms=4_999, timeouts=T).emitted == []
    assert [c.join_kind for c in on_tick(state, now_ms=5_000, timeouts=T).emitted] == ["usage_only"]


def test_done_marker_forgotten_after_retention():
    done = PendingCall(partition=0, first_seen_ms=0, done_ms=100)
    assert on_tick(done, now_ms=600_099, timeouts=T).state is done
    gone = on_tick(done, now_ms=600_100, timeouts=T)
    assert gone.state is None and gone.changed


@pytest.mark.parametrize(
    ("state", "due"),
    [
        (PendingCall(partition=0, first_seen_ms=1_000, request=ev("request")), 61_000),
        (PendingCall(partition=0, first_seen_ms=1_000, usage=ev("usage")), 6_000),
        (PendingCall(partition=0, first_seen_ms=1_000, done_ms=2_000), 602_000),
    ],
    ids=["pending request", "usage waiting for its request", "done marker"],
)
def test_next_tick_is_the_first_time_on_tick_changes_the_state(state, due):
    """The join timer only looks at a state from its next tick on, so that time must be exact."""
    assert next_tick_ms(state, T) == due
    assert not on_tick(state, now_ms=due - 1, timeouts=T).changed
    assert on_tick(state, now_ms=due, timeouts=T).changed


def test_state_round_trips():
    state = PendingCall(partition=2, first_seen_ms=5, request=ev("request"))
    from processors.ledger_step import read_pending
    from schemas.state import dump_state

    assert read_pending(dump_state(state.__dict__)) == state


def test_request_only_record_is_unpriced_with_split_model():
    from ledger.attribute import Attributor
    from ledger.join import JoinedCall
    from ledger.pricing import PriceBook
    from ledger.tags import AttributionPolicy

    request = {
        "kind": "request",
        "request_id": "r9",
        "event_id": "e9",
        "model": "openai/gpt-4o",
        "occurred_at": "2026-11-22T10:00:00+00:00",
    }
    record = Attributor(AttributionPolicy(), PriceBook()).record(
        JoinedCall("r9", "request_only", request=request)
    )
    assert (record.status, record.cost_usd, record.price_source, record.provider, record.model) == (
        "incomplete",
        None,
        "unpriced",
        "openai",
        "gpt-4o",
    )


@pytest.mark.parametrize(
    ("usage", "status", "cost", "source"),
    [
        (None, "incomplete", None, "unpriced"),  # a stream cut before any usage: unknown, not $0
        ({"input_tokens": 1000}, "incomplete", "0.002500000000", "catalog"),  # priced on what is known
        (None, "error", "0E-12", "catalog"),  # a failed call reports no tokens: $0
    ],
)
def test_completed_without_usage_is_unpriced_only_when_cut_short(usage, status, cost, source):
    from decimal import Decimal

    from ledger.attribute import Attributor
    from ledger.join import JoinedCall
    from ledger.pricing import PriceBook
    from ledger.tags import AttributionPolicy

    event = {
        "kind": "completed",
        "request_id": "r10",
        "event_id": "e10",
        "model": "openai/gpt-4o",
        "occurred_at": "2026-11-22T10:00:00+00:00",
        "status": status,
        "usage": usage,
    }
    record = Attributor(AttributionPolicy(), PriceBook()).record(JoinedCall("r10", "completed", usage=event))
    assert record.status == status
    assert record.price_source == source
    assert record.cost_usd == (None if cost is None else Decimal(cost))

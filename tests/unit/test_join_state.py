"""The worker's join state: the timer is given exactly the states that are due, however many there are."""

from types import SimpleNamespace
from typing import Any

from ledger.join import JoinStep, JoinTimeouts, PendingCall, on_event, on_tick
from processors.ledger_step import JoinState
from schemas.state import dump_state

T = JoinTimeouts(request_timeout_ms=60_000, usage_wait_ms=5_000, done_retention_ms=600_000)


def make_state() -> tuple[JoinState, list[Any]]:
    sent: list[Any] = []
    table = SimpleNamespace(data={})
    return JoinState(table, lambda p, k, v: sent.append((p, k, v)), T), sent


def event(kind: str, rid: str) -> dict[str, Any]:
    return {"kind": kind, "request_id": rid, "event_id": f"{kind}-{rid}"}


def feed(state: JoinState, kind: str, rid: str, now_ms: int, partition: int = 0) -> JoinStep:
    key = rid.encode()
    step = on_event(state.get(key), event(kind, rid), partition=partition, now_ms=now_ms)
    state.apply(key, step, partition)
    return step


def sweep(state: JoinState, now_ms: int) -> list[str]:
    """What the worker's timer does; returns the join kinds it emitted."""
    kinds = []
    for key, current in state.due(now_ms):
        step = on_tick(current, now_ms=now_ms, timeouts=T)
        state.apply(key, step, current.partition)
        kinds += [c.join_kind for c in step.emitted]
    return kinds


def test_the_timer_gets_only_due_states_and_each_expires_once() -> None:
    state, _ = make_state()
    feed(state, "request", "r1", now_ms=0)
    feed(state, "usage", "u1", now_ms=0)
    feed(state, "request", "j1", now_ms=0)
    feed(state, "usage", "j1", now_ms=10)  # joined: a done marker
    assert state.pending == {b"r1", b"u1"}
    assert list(state.due(4_999)) == []
    assert sweep(state, 5_000) == ["usage_only"]
    assert sweep(state, 5_001) == []
    assert sweep(state, 60_000) == ["request_only"]
    assert state.pending == set()
    assert set(state.table.data) == {b"r1", b"u1", b"j1"}  # done markers, kept for the retention
    assert sweep(state, 600_009) == []
    assert sweep(state, 600_010) == []  # j1 was done at 10: forgotten from 600,010 on
    assert set(state.table.data) == {b"r1", b"u1"}
    assert sweep(state, 665_000) == []
    assert state.table.data == {}


def test_a_state_that_changed_since_it_was_indexed_is_judged_as_it_is_now() -> None:
    state, _ = make_state()
    feed(state, "usage", "a", now_ms=0)  # due for usage_only at 5,000
    feed(state, "request", "a", now_ms=100)  # joined at 100: the 5,000 entry is outdated
    assert sweep(state, 5_000) == []
    assert b"a" in state.table.data
    assert sweep(state, 600_100) == []
    assert b"a" not in state.table.data


def test_a_rebuild_indexes_the_recovered_partitions_only() -> None:
    state, _ = make_state()
    for n, partition in enumerate([0, 1, 2, 1]):
        rid = f"r{n}"
        call = PendingCall(partition=partition, first_seen_ms=0, request=event("request", rid))
        state.table.data[rid.encode()] = dump_state(call.__dict__)
    state.rebuild({1})
    assert state.pending == {b"r1", b"r3"}
    assert sorted(k for k, _ in state.due(60_000)) == [b"r1", b"r3"]


def test_over_its_whole_life_the_timer_looks_at_a_joined_call_at_most_twice() -> None:
    """A full scan every tick looked at each done marker 600 times (a tick a second, kept 10 minutes)."""
    state, _ = make_state()
    for n in range(2_000):
        feed(state, "request", f"r{n}", now_ms=n)
        feed(state, "usage", f"r{n}", now_ms=n)
    looked_at = 0
    for now_ms in range(0, 700_000, 1_000):
        for key, current in state.due(now_ms):
            looked_at += 1
            state.apply(key, on_tick(current, now_ms=now_ms, timeouts=T), current.partition)
    assert state.table.data == {}
    assert looked_at <= 2 * 2_000  # its request's timeout (an outdated entry) and its marker's end


def test_an_unreadable_state_is_left_aside_and_the_others_still_time_out() -> None:
    state, _ = make_state()
    for n in range(3):
        call = PendingCall(partition=0, first_seen_ms=0, request=event("request", f"r{n}"))
        state.table.data[f"r{n}".encode()] = dump_state(call.__dict__)
    state.table.data[b"r1"] = b'{"partition":0,"first_seen_ms":0,"v":2}'
    state.rebuild({0})
    assert state.pending == {b"r0", b"r2"}
    assert sorted(k for k, _ in state.due(60_000)) == [b"r0", b"r2"]
    assert state.table.data[b"r1"] == b'{"partition":0,"first_seen_ms":0,"v":2}'

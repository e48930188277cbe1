"""Property: whatever values an event carries, every event the API answers 202 for ends up exactly once
in `spend_records`, or in `spend_rejects` with a reason, never both and never neither (DESIGN §9.7).

The API runs with the in-memory publisher; what it publishes goes through the worker's steps (the pure
functions its ledger agent calls, in its order, each event guarded as the agent guards it) and then the
real sink code into the real ClickHouse engine (chDB)."""

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher
from ledger.attribute import Attributor
from ledger.join import PendingCall, on_event, on_tick
from ledger.pricing import PriceBook
from processors.deadletter import dead_letter, describe
from processors.ledger_step import raw_events, tag_spend_entries
from processors.sink import ClickHouseStore, Message, Sink
from schemas.events import RawEvent, time_bounds
from spendledger.platform.settings import Settings

SETTINGS = Settings.model_validate({"producer_keys": "prod-key", "admin_keys": "admin-key"})
PUBLISHER = InMemoryPublisher(partitions=4)  # several events of a request travel as one bundle
CLIENT = TestClient(create_app(Services(settings=SETTINGS, publisher=PUBLISHER)))
ATTRIBUTOR = Attributor(SETTINGS.attribution_policy(), PriceBook())
TOPICS = SETTINGS.topics

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
EXTREME = st.sampled_from(
    [
        0, -1, 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, 10**10, 10**10 + 1, 10**12, 10**16, 1e308, -1e308, 1e-300,
        0.5, "", "0", "-0", "1e16", "1e-13", "1000000000", "1000000000.000000000001", "NaN", "Infinity",
        "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59-01:00", "1999-12-31T23:59:59Z",
        "2000-01-01T00:00:00Z", "2299-12-31T23:59:59Z", "2026-11-22T10:00:00", 1_764_000_000, -(2**63),
    ]
)  # fmt: skip
TIMES = st.datetimes(timezones=st.just(UTC) | st.timezones()).map(lambda d: d.isoformat())
ANY = EXTREME | JSON
COUNT = (
    st.integers(min_value=-1, max_value=2**64) | st.floats(allow_nan=False, allow_infinity=False) | EXTREME
)
VALUES: dict[str, Any] = {
    "occurred_at": TIMES | ANY,
    "model": st.sampled_from(["openai/gpt-4o", "gpt-4o-mini", "acme/unpriced", "anthropic/claude"]) | ANY,
    "provider": st.sampled_from(["openai", "acme"]) | ANY,
    "headers": st.dictionaries(st.sampled_from(["X-AnyAPI-App-ID", "x-litellm-tags"]), st.text(max_size=30))
    | ANY,
    "metadata": st.dictionaries(st.sampled_from(["tags", "team", "project", "x"]), ANY, max_size=3) | ANY,
    "user": ANY,
    "body": st.fixed_dictionaries({}, optional={"model": ANY, "user": ANY, "metadata": ANY}) | ANY,
    "usage": st.dictionaries(
        st.sampled_from(
            ["input_tokens", "output_tokens", "cache_read_tokens", "prompt_tokens", "completion_tokens",
             "cache_read_input_tokens", "cache_creation_input_tokens", "promptTokenCount"]
        ),
        COUNT,
        max_size=3,
    )
    | ANY,
    "latency_ms": COUNT | ANY,
    "status": st.sampled_from(["success", "incomplete", "error"]) | ANY,
    "http_status": COUNT | ANY,
    "reported_cost_usd": st.decimals(allow_nan=False, allow_infinity=False).map(str) | COUNT | ANY,
}  # fmt: skip
# A valid event with one to three of its fields set to anything (most events of a request then pass
# the door, and those are the ones the property is about).
EVENTS = st.builds(
    lambda kind, fields: {"kind": kind, "model": "openai/gpt-4o", "usage": {"input_tokens": 100}, **fields},
    st.sampled_from(["completed", "usage", "request"]),
    st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: VALUES[name] for name in names})
    ),
)


class Consumer:
    def commit(self, offsets: Any, asynchronous: bool) -> None:
        pass


def worker(raw: list[Message]) -> tuple[list[bytes], list[bytes]]:
    """The ledger agent's steps over these `spend.raw` messages, then the join timer's once every
    partner is overdue: (spend.attributed values, spend.dead-letter values)."""
    attributed: list[bytes] = []
    dead: list[bytes] = []

    def reject(stage: str, source: Any, reason: str) -> None:
        assert reason
        dead.append(
            dead_letter(
                source_topic=source.topic,
                partition=source.partition,
                offset=source.offset,
                reason=reason,
                payload=source.value,
            )
        )

    def attribute(calls: Any, source: Any) -> None:
        for call in calls:
            try:
                record = ATTRIBUTOR.record(call)
                value = record.model_dump_json().encode()
                tag_spend_entries([record])
            except Exception as exc:
                reject("attribute", source, f"cannot attribute: {describe(exc)}")
                continue
            attributed.append(value)

    now_ms = int(time.time() * 1000)
    bounds = time_bounds(datetime.fromtimestamp(now_ms / 1000, UTC), SETTINGS.max_future_skew_s)
    state: dict[bytes, PendingCall] = {}
    sources: dict[bytes, Any] = {}
    for source, data in raw_events(raw, reject):
        try:
            RawEvent.model_validate(data, context=bounds)
        except Exception as exc:
            reject("join", source, f"invalid raw event: {describe(exc)}")
            continue
        try:
            key = data["request_id"].encode()
            step = on_event(state.get(key), data, partition=source.partition, now_ms=now_ms)
        except Exception as exc:
            reject("join", source, f"cannot join: {describe(exc)}")
            continue
        if step.state is not None:
            state[key] = step.state
            sources[key] = source
        attribute(step.emitted, source)
    later = now_ms + SETTINGS.join_timeouts().request_timeout_ms + 1
    for key, pending in state.items():
        attribute(on_tick(pending, now_ms=later, timeouts=SETTINGS.join_timeouts()).emitted, sources[key])
    return attributed, dead


def sink(store: ClickHouseStore, attributed: list[bytes], dead: list[bytes], offset: list[int]) -> None:
    """The sink's flush of these messages: whole, and landed apart when ClickHouse refuses the batch."""
    messages = []
    for topic, values in ((TOPICS.attributed, attributed), (TOPICS.dead_letter, dead)):
        for value in values:
            messages.append(Message(topic, 0, offset[0], value))
            offset[0] += 1
    the_sink = Sink(SETTINGS, store)
    the_sink._landed = store.landed_offsets(the_sink.group)
    try:
        the_sink.flush(Consumer(), messages)
    except Exception:
        the_sink.flush(Consumer(), messages, apart=True)


def test_every_accepted_event_lands_once_or_is_rejected_with_a_reason(clickhouse: Any) -> None:
    """Each example's events go through the API and, unchecked, straight to spend.raw (as another
    producer may write them): every one the API accepts, and every one written straight, is then in
    spend_records once or in spend_rejects with a reason."""
    client = clickhouse()
    store = ClickHouseStore(client)
    offset = [0]
    tried = {"accepted": 0, "written": 0, "records": 0, "rejects": 0}

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(EVENTS, min_size=1, max_size=3))
    def events_land_or_are_rejected(events: list[dict[str, Any]]) -> None:
        run = uuid.uuid4().hex[:12]
        PUBLISHER.sent.clear()
        body = {"events": [{**e, "request_id": f"{run}-api-{i}"} for i, e in enumerate(events)]}
        r = CLIENT.post("/v1/events", json=body, headers={"Authorization": "Bearer prod-key"})
        assert r.status_code in (202, 422), r.text
        expected = [e["request_id"] for e in body["events"]] if r.status_code == 202 else []
        if r.status_code != 202:
            assert PUBLISHER.sent == []
        raw = [Message(topic, i, 0, value, key) for i, (topic, key, value) in enumerate(PUBLISHER.sent)]
        now = datetime.now(UTC).isoformat()
        for i, e in enumerate(events):
            rid = f"{run}-raw-{i}"
            fields = {"event_id": rid, "occurred_at": now, "received_at": now, **e, "request_id": rid}
            value = json.dumps(fields, separators=(",", ":")).encode()
            raw.append(Message(TOPICS.raw, 0, i, value, rid.encode()))
            expected.append(rid)
        attributed, dead = worker(raw)
        sink(store, attributed, dead, offset)

        landed = client.query(
            "SELECT request_id, count() FROM spend_records WHERE startsWith(request_id, %(run)s) "
            "GROUP BY request_id",
            parameters={"run": run},
        ).result_rows
        rejected = client.query(
            "SELECT reason, payload FROM spend_rejects WHERE position(payload, %(run)s) > 0",
            parameters={"run": run},
        ).result_rows
        counts = dict(landed)
        assert set(counts) <= set(expected)
        for rid in expected:
            reasons = [reason for reason, payload in rejected if f'"request_id":"{rid}"' in payload]
            assert counts.get(rid, 0) + len(reasons) == 1, (rid, counts, rejected)
            assert all(reasons)
        tried["accepted"] += len(expected) - len(events)
        tried["written"] += len(events)
        tried["records"] += sum(counts.values())
        tried["rejects"] += len(rejected)

    events_land_or_are_rejected()
    print(f"poison property: {tried}")
    assert tried["accepted"] > 0 and tried["records"] > 0 and tried["rejects"] > 0

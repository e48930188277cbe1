"""The demo's synthetic traffic: valid events, every attribution style, untagged calls and an unknown model."""

from collections import Counter
from datetime import UTC, datetime, timedelta

from ledger.tags import AttributionPolicy, normalize
from schemas.events import EventBatch
from spendledger.demo import events

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


def test_demo_events_are_valid_deterministic_and_inside_the_window():
    batch = list(events(2000, now=NOW, days=7, seed=1))
    assert batch == list(events(2000, now=NOW, days=7, seed=1))
    EventBatch.model_validate({"events": batch[:1000]})  # the API's own schema accepts them
    times = [datetime.fromisoformat(e["occurred_at"]) for e in batch]
    assert min(times) >= NOW - timedelta(days=7) and max(times) <= NOW
    assert len({e["event_id"] for e in batch}) == 2000


def test_demo_traffic_has_what_the_reports_need_to_show():
    batch = list(events(3000, now=NOW, seed=2))
    policy = AttributionPolicy()
    columns = [
        normalize(
            headers=e.get("headers"), metadata=[e.get("metadata")], users=[e.get("user")], policy=policy
        ).columns()
        for e in batch
    ]
    teams = Counter(c["team"] for c in columns)
    assert {"support", "search", "data", "platform"} <= set(teams) and teams[""] > 0  # an untagged bucket
    assert len({c["app_id"] for c in columns}) == 5 and "" in {c["environment"] for c in columns}
    assert any(e["model"] == "acme/llama-internal-70b" for e in batch)  # unpriced
    styles = Counter(
        "anyapi"
        if "X-AnyAPI-App-ID" in (e.get("headers") or {})
        else "litellm"
        if e.get("headers")
        else "metadata"
        for e in batch
    )
    assert set(styles) == {"anyapi", "litellm", "metadata"}

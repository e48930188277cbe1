"""SpendClient: batching, retries with the same event ids, splitting rejected batches, bounded queue.

The ingest API is replaced by an httpx MockTransport (the client's one I/O seam);
tests/integration/shared/test_sdk.py runs the same client against the real system.
"""

import json
import threading
from collections.abc import Callable

import httpx
import pytest

from spendledger.sdk import AsyncSpendClient, SpendClient, completed_event, track_context


class Ingest:
    """A scripted ingest API: `answers` are used in order, then 202 for ever."""

    def __init__(self, *answers: Callable[[list[dict]], httpx.Response] | int) -> None:
        self.answers = list(answers)
        self.batches: list[list[dict]] = []
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)["events"]
        assert request.headers["Authorization"] == "Bearer sl_prod_test"
        with self.lock:
            self.batches.append(events)
            answer = self.answers.pop(0) if self.answers else 202
        if callable(answer):
            return answer(events)
        return httpx.Response(answer, json={"accepted": len(events)})

    def accepted_ids(self) -> list[str]:
        return [e["event_id"] for batch in self.batches for e in batch]


def client(ingest: Ingest, **options) -> SpendClient:
    options = {"flush_interval_s": 0.05, "retry_base_s": 0.01, "flush_at_exit": False, **options}
    return SpendClient("http://ledger", "sl_prod_test", transport=httpx.MockTransport(ingest), **options)


def event(n: int) -> dict:
    return {"kind": "completed", "request_id": f"r{n}", "model": "gpt-4o", "usage": {"input_tokens": n}}


def test_events_are_batched_given_ids_and_flushed():
    ingest = Ingest()
    spend = client(ingest, batch_size=10)
    for n in range(25):
        assert spend.emit(event(n)) is True
    assert spend.flush(10)
    spend.close()
    sent = [e for batch in ingest.batches for e in batch]
    assert [e["request_id"] for e in sent] == [f"r{n}" for n in range(25)]
    assert all(e["event_id"].startswith("evt_") for e in sent)
    assert max(len(b) for b in ingest.batches) <= 10
    assert spend.stats.sent == 25 and spend.stats.queued == 0 and spend.stats.dropped == 0


def test_5xx_and_network_errors_are_retried_with_the_same_event_ids():
    def network_down(_: list[dict]) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    ingest = Ingest(503, network_down, 500)
    spend = client(ingest, batch_size=5)
    for n in range(5):
        spend.emit(event(n))
    assert spend.flush(30)
    spend.close()
    assert len(ingest.batches) == 4  # 503, connection refused, 500, 202
    ids = [[e["event_id"] for e in batch] for batch in ingest.batches]
    assert all(attempt == ids[0] for attempt in ids)
    assert spend.stats.sent == 5 and spend.stats.retried == 15 and spend.stats.dropped == 0


def test_a_rejected_batch_is_split_until_the_bad_event_is_alone():
    def refuse_bad(events: list[dict]) -> httpx.Response:
        if any(e["request_id"] == "bad" for e in events):
            return httpx.Response(422, json={"error": {"code": "invalid_event"}})
        return httpx.Response(202, json={"accepted": len(events)})

    ingest = Ingest(*[refuse_bad] * 20)
    spend = client(ingest, batch_size=8)
    for n in range(8):
        spend.emit({**event(n), "request_id": "bad"} if n == 5 else event(n))
    assert spend.flush(10)
    spend.close()
    assert spend.stats.sent == 7 and spend.stats.rejected == 1
    assert [len(b) for b in ingest.batches] == [8, 4, 4, 2, 1, 1, 2]


def test_a_403_naming_one_event_splits_but_a_403_for_the_key_does_not():
    def bound(events: list[dict]) -> httpx.Response:
        for index, e in enumerate(events):
            if e["request_id"] == "foreign":
                details = {"index": index, "field": "tags", "event_id": e["event_id"]}
                return httpx.Response(403, json={"error": {"code": "forbidden", "details": details}})
        return httpx.Response(202, json={"accepted": len(events)})

    ingest = Ingest(*[bound] * 20)
    spend = client(ingest, batch_size=4)
    for n in range(4):
        spend.emit({**event(n), "request_id": "foreign"} if n == 1 else event(n))
    assert spend.flush(10)
    assert spend.stats.sent == 3 and spend.stats.rejected == 1
    spend.close()

    scope = Ingest(403)  # the key's scope: every event of the batch is refused alike
    other = client(scope, batch_size=4)
    for n in range(4):
        other.emit(event(n))
    assert other.flush(10)
    other.close()
    assert len(scope.batches) == 1 and other.stats.rejected == 4


def test_when_the_ledger_stays_down_events_are_dropped_counted_and_logged_never_raised(caplog):
    ingest = Ingest(*[503] * 1000)
    spend = client(ingest, retry_for_s=0.3)
    assert spend.emit(event(1)) is True
    assert spend.flush(10)
    assert spend.stats.dropped == 1 and spend.stats.sent == 0
    assert len(ingest.batches) > 1  # it did retry before giving up
    assert "dropping events: gave up after" in caplog.text and "HTTP 503" in caplog.text
    spend.close()
    assert spend.emit(event(2)) is False  # closed: dropped, not raised
    assert spend.stats.dropped == 2


def test_a_full_queue_drops_instead_of_blocking():
    release = threading.Event()

    def stuck(events: list[dict]) -> httpx.Response:
        release.wait(10)
        return httpx.Response(202, json={"accepted": len(events)})

    ingest = Ingest(stuck)
    spend = client(ingest, batch_size=1, max_queue_events=3)
    results = [spend.emit(event(n)) for n in range(10)]
    release.set()
    assert spend.flush(10)
    spend.close()
    assert results.count(False) >= 6  # 1 in flight + 3 queued at most
    assert spend.stats.dropped == results.count(False)
    assert spend.stats.sent == results.count(True)


def test_a_4xx_that_is_not_about_the_events_is_rejected_without_retry():
    ingest = Ingest(401)
    spend = client(ingest)
    spend.emit(event(1))
    assert spend.flush(10)
    spend.close()
    assert len(ingest.batches) == 1 and spend.stats.rejected == 1


def test_record_builds_a_completed_event_with_the_current_attribution():
    ingest = Ingest()
    spend = client(ingest)
    with track_context(user_id="u1", team="support"):
        spend.record(model="openai/gpt-4o", usage={"input_tokens": 10}, latency_ms=12.5)
    spend.close()
    (sent,) = ingest.batches[0]
    assert sent["kind"] == "completed" and sent["status"] == "success"
    assert sent["metadata"] == {"user_id": "u1", "team": "support"}
    assert sent["occurred_at"].endswith("+00:00")


def test_constructor_errors_are_clear(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SPENDLEDGER_URL", raising=False)
    monkeypatch.delenv("SPENDLEDGER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="URL"):
        SpendClient()
    with pytest.raises(ValueError, match="producer key"):
        SpendClient("http://ledger")
    with pytest.raises(ValueError, match="batch_size"):
        SpendClient("http://ledger", "k", batch_size=5000)


async def test_async_client_emits_without_blocking_and_flushes_awaitably():
    ingest = Ingest()
    async with AsyncSpendClient(
        "http://ledger", "sl_prod_test", transport=httpx.MockTransport(ingest), flush_at_exit=False
    ) as spend:
        with track_context(tenant_id="t1"):
            spend.emit(completed_event(model="gpt-4o", usage={"input_tokens": 1}))
        assert await spend.flush(10)
        assert spend.stats.sent == 1
    assert ingest.batches[0][0]["metadata"] == {"tenant_id": "t1"}


def test_attribution_warnings_from_the_ledger_are_logged_once_each(caplog):
    problem = {
        "reason": "too_long",
        "input": "team:xxxx…",
        "message": "tag values are at most 128 characters",
    }

    def warn(events: list[dict]) -> httpx.Response:
        warnings = [{"index": 0, "event_id": "e", "problems": [problem]}]
        return httpx.Response(202, json={"accepted": len(events), "warnings": warnings})

    ingest = Ingest(*[warn] * 3)
    spend = client(ingest, batch_size=1)
    for n in range(3):
        spend.emit(event(n))
        assert spend.flush(10)
    spend.close()
    assert spend.stats.sent == 3
    assert caplog.text.count("team:xxxx…: tag values are at most 128 characters") == 1

"""Budgets through the real parts: API -> Tansu -> Faust budget agent -> block/alert topics -> sink -> chDB,
read back the way a gateway would (a plain confluent-kafka consumer, an embedded BudgetGuard, POST /v1/check)."""

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from spendledger.guard import BudgetGuard
from tests.integration.conftest import running_system

pytestmark = pytest.mark.integration

EVENT_COST = Decimal("0.0045")  # gpt-4o, 1000 input + 200 output tokens


class TopicReader:
    """Reads a topic from the beginning, as a gateway or alerting system would."""

    def __init__(self, bootstrap: str, topic: str):
        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"t-{uuid.uuid4().hex}",
                "enable.partition.eof": False,
            }
        )
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.seen: list[tuple[str, dict | None]] = []

    def poll(self, seconds: float = 0.3) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.consumer.poll(0.05)
            if message is None or message.error() is not None:
                assert message is None or message.error().code() == KafkaError._PARTITION_EOF
                continue
            value = orjson.loads(message.value()) if message.value() is not None else None
            self.seen.append((message.key().decode(), value))

    def for_tag(self, tag: str) -> list[dict | None]:
        return [v for k, v in self.seen if k == tag]

    def wait(self, tag: str, done, timeout: float = 30) -> list[dict | None]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            values = self.for_tag(tag)
            if done(values):
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {self.topic} for {tag}: {values}")

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    # An event dated tomorrow rolls a budget window here: the API refuses one more than
    # MAX_FUTURE_SKEW_S (300 s by default) ahead of its receipt.
    with running_system(tmp_path_factory, max_future_skew_s=str(2 * 86_400)) as running:
        yield running


@pytest.fixture(scope="module")
def topics(ledger):
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    readers = {
        "blocks": TopicReader(ledger.bootstrap, f"{prefix}spend.budget-blocks"),
        "alerts": TopicReader(ledger.bootstrap, f"{prefix}spend.budget-alerts"),
    }
    yield readers
    for reader in readers.values():
        reader.close()


@pytest.fixture(scope="module")
def guard(ledger):
    prefix = ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"]
    g = BudgetGuard({"bootstrap.servers": ledger.bootstrap}, f"{prefix}spend.budget-blocks").start()
    assert g.wait_ready(30)
    yield g
    g.stop()


def admin(ledger, method: str, path: str, **kw):
    return ledger.http.request(
        method, path, headers={"Authorization": f"Bearer {ledger.system.admin_key}"}, **kw
    )


def spend_event(
    team: str, *, at: datetime | None = None, event_id: str | None = None, app: str | None = None
) -> dict:
    request_id = f"b_{uuid.uuid4().hex[:16]}"
    headers = {"x-litellm-tags": f"team:{team},env:prod"}
    if app:
        headers["X-AnyAPI-App-ID"] = app
        headers["X-AnyAPI-App-Name"] = f"{app} (name)"
    event = {
        "kind": "completed",
        "request_id": request_id,
        "model": "openai/gpt-4o",
        "headers": headers,
        "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
    }
    if at is not None:
        event["occurred_at"] = at.isoformat()
    if event_id is not None:
        event["event_id"] = event_id
    return event


def send(ledger, events: list[dict]) -> None:
    r = ledger.send({"events": events})
    assert r.status_code == 202, r.text


def ledger_spend(ledger, tag: str, start: str, end: str) -> Decimal:
    rows = ledger.sql(
        f"SELECT toString(sum(cost_usd)) FROM spend_records WHERE has(tags, '{tag}') "
        f"AND occurred_at >= parseDateTime64BestEffort('{start}', 3) AND occurred_at < parseDateTime64BestEffort('{end}', 3)"
    )
    return Decimal(rows[0][0])


def check(ledger, tag: str) -> dict:
    r = ledger.http.post(
        "/v1/check", json={"tags": [tag]}, headers={"Authorization": f"Bearer {ledger.system.producer_key}"}
    )
    assert r.status_code == 200, r.text
    return r.json()


def wait_until(fn, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_alerts_once_then_block_then_raise_next_window_and_delete(ledger, topics, guard):
    team = f"bt{uuid.uuid4().hex[:8]}"
    tag = f"team:{team}"
    r = admin(
        ledger,
        "POST",
        "/tag/new",
        json={"name": f"Team:{team}", "max_budget": "0.045", "budget_duration": "1d"},
    )
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["name"] == tag and created["spend"] == 0 and created["blocked"] is False

    def alerts():
        return [a["threshold_pct"] for a in topics["alerts"].for_tag(tag)]

    # 5 events = 50 %, 8 = 80 %, 10 = 100 % (95 and 100 at once): each alert exactly once.
    send(ledger, [spend_event(team) for _ in range(5)])
    topics["alerts"].wait(tag, lambda v: len(v) >= 1)
    send(ledger, [spend_event(team) for _ in range(3)])
    topics["alerts"].wait(tag, lambda v: len(v) >= 2)
    assert not guard.check([tag]).blocked_by and check(ledger, tag)["allowed"] is True
    send(ledger, [spend_event(team) for _ in range(2)])
    blocks = topics["blocks"].wait(tag, lambda v: any(x and x["blocked"] for x in v))
    block = next(x for x in blocks if x and x["blocked"])
    assert Decimal(block["spend_usd"]) == 10 * EVENT_COST and Decimal(block["max_budget_usd"]) == Decimal(
        "0.045"
    )
    assert set(block) >= {
        "tag",
        "blocked",
        "spend_usd",
        "max_budget_usd",
        "window_start",
        "window_end",
        "updated_at",
    }
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert datetime.fromisoformat(block["window_start"]) == today
    assert datetime.fromisoformat(block["window_end"]) == today + timedelta(days=1)
    topics["alerts"].wait(tag, lambda v: len(v) >= 4)
    topics["alerts"].poll(1.0)
    assert alerts() == [50, 80, 95, 100]

    wait_until(lambda: not guard.check([tag]).allowed, what="the embedded guard to see the block")
    # The API's guard is a consumer of its own: it sees the signal about when the embedded one does.
    wait_until(lambda: not check(ledger, tag)["allowed"], what="POST /v1/check to see the block")
    decision = check(ledger, tag)
    assert decision["allowed"] is False and decision["blocked_by"][0]["tag"] == tag
    # /tag/info's spend is the ledger's (spend_records): the sink may land the last records a moment
    # after the budget agent, which counts them from Kafka, has blocked.
    info = wait_until(
        lambda: (
            Decimal(str((i := admin(ledger, "GET", "/tag/info", params={"names": tag}).json()[tag])["spend"]))
            >= 10 * EVENT_COST
            and i
        ),
        what="/tag/info to count the ten events",
    )
    assert info["blocked"] is True and Decimal(str(info["spend"])) == 10 * EVENT_COST
    assert Decimal(str(info["spend"])) == ledger_spend(
        ledger, tag, info["window_start"], info["budget_reset_at"]
    )
    # The sink lands the alerts and the block in budget_events.
    ledger.wait_for(
        f"SELECT event_type, threshold_pct FROM budget_events WHERE tag = '{tag}' ORDER BY at, event_type",
        lambda rows: len(rows) == 5,
    )

    # Raising the budget lifts the block.
    r = admin(ledger, "POST", "/tag/update", json={"name": tag, "max_budget": 1})
    assert r.status_code == 200 and Decimal(str(r.json()["max_budget"])) == 1
    wait_until(lambda: guard.check([tag]).allowed, what="the block to lift after the raise")
    wait_until(lambda: check(ledger, tag)["allowed"], what="POST /v1/check to see the lift")

    # Lower it again (blocked), then events stamped in the next window start it: spend starts again.
    admin(ledger, "POST", "/tag/update", json={"name": tag, "max_budget": "0.01"})
    wait_until(lambda: not guard.check([tag]).allowed, what="the block after lowering")
    tomorrow = today + timedelta(days=1, hours=1)
    send(ledger, [spend_event(team, at=tomorrow)])
    latest = topics["blocks"].wait(
        tag,
        lambda v: (
            v[-1] is not None and datetime.fromisoformat(v[-1]["window_start"]) == today + timedelta(days=1)
        ),
    )[-1]
    assert latest["blocked"] is False and Decimal(latest["spend_usd"]) == EVENT_COST
    wait_until(lambda: guard.check([tag]).allowed, what="the new window to unblock")

    # Delete: no block, and the budget is gone.
    assert admin(ledger, "POST", "/tag/delete", json={"name": tag}).json() == {"deleted": [tag]}
    topics["blocks"].wait(tag, lambda v: v[-1] is None or v[-1]["change"] == "deleted")
    assert guard.check([tag]).allowed and check(ledger, tag)["allowed"] is True
    assert admin(ledger, "GET", "/tag/info", params={"names": tag}).status_code == 404


def test_budget_set_mid_window_counts_earlier_spend_and_duplicates_count_once(ledger, guard):
    team = f"bm{uuid.uuid4().hex[:8]}"
    tag = f"team:{team}"
    events = [spend_event(team, event_id=f"dup-{team}-{i}") for i in range(4)]
    send(ledger, events)
    send(ledger, events[:2])  # retried by the producer: same event ids
    ledger.wait_for(
        f"SELECT count() FROM spend_records WHERE has(tags, '{tag}')", lambda rows: rows[0][0] == 4
    )

    r = admin(ledger, "POST", "/tag/new", json={"name": tag, "max_budget": "0.018", "budget_duration": "1d"})
    assert r.status_code == 200, r.text
    wait_until(lambda: not guard.check([tag]).allowed, what="the block from spend before the budget existed")
    signal = guard.view.get(tag)
    assert signal is not None and signal.spend_usd == 4 * EVENT_COST
    # The API's own view of spend.budget-blocks is another consumer: it may be a moment behind ours.
    info = wait_until(
        lambda: (i := admin(ledger, "GET", "/tag/info", params={"names": tag}).json()[tag])["blocked"] and i,
        what="the API to see the block",
    )
    assert Decimal(str(info["spend"])) == 4 * EVENT_COST == signal.spend_usd
    assert info["blocked"] is True and info["thresholds_fired"] == [50, 80, 95, 100]


def test_app_limit_and_current_usage_in_credits(ledger):
    app = f"app-{uuid.uuid4().hex[:8]}"
    r = admin(
        ledger, "POST", "/v1/limits/app",
        json={"app_id": app, "limit_type": "monthly", "limit_amount": 100, "alert_thresholds": [50, 80, 95]},
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    send(ledger, [spend_event("apps", app=app) for _ in range(3)])
    tag = f"app:{app}"
    ledger.wait_for(
        f"SELECT count() FROM spend_records WHERE has(tags, '{tag}')", lambda rows: rows[0][0] == 3
    )
    usage = admin(ledger, "GET", f"/v1/usage/app/{app}/current").json()
    assert usage["app_id"] == app and usage["app_name"] == f"{app} (name)"
    assert Decimal(str(usage["current_usage"])) == 3 * EVENT_COST * 100  # credits
    assert Decimal(str(usage["limit"])) == 100 and Decimal(str(usage["usage_percent"])) == Decimal("1.35")
    assert usage["limit_type"] == "monthly" and usage["blocked"] is False
    info = admin(ledger, "GET", "/tag/info", params={"names": tag}).json()[tag]
    assert info["source"] == "app_limit" and info["budget_duration"] == "1mo"

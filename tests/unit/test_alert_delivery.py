"""Alert delivery without a network: the webhook bodies, the signature and its check, the settings
(which never show a URL or secret), the retry schedule, and the delivery loop over httpx's
MockTransport with a fake clock (tests/component/test_alert_webhooks.py has the real receiver)."""

import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from processors.alerts import (
    AlertDelivery,
    RetryPolicy,
    decode_alerts,
    install_alert_delivery,
    next_delay,
    parse_retry_after,
    retryable,
)
from schemas.alerts import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryAttempt,
    json_body,
    sign,
    slack_body,
    verify_signature,
)
from schemas.budgets import BudgetAlert
from schemas.topics import Topics
from spendledger.platform.settings import AlertDestination, Settings

URL = "https://hooks.example.com/services/T0001/B0002/k3yPart"
SECRET = "whsec-test-signing-key"
AT = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
NOW = AT.timestamp() + 2  # the fake clock: two seconds after the alert


def alert(**extra: Any) -> BudgetAlert:
    fields = {
        "alert_id": "a-80",
        "tag": "team:support",
        "kind": "threshold",
        "threshold_pct": 80,
        "spend_usd": "80.123456789012",
        "max_budget_usd": "100",
        "soft_budget_usd": None,
        "window_start": "2026-11-22T00:00:00Z",
        "window_end": "2026-11-23T00:00:00Z",
        "at": AT,
    }
    return BudgetAlert.model_validate({**fields, **extra})


# -- bodies ---------------------------------------------------------------------------------------


def test_json_body_is_the_alert_with_exact_decimal_strings():
    body = json.loads(json_body(alert(max_budget_usd=Decimal("1E+2"), soft_budget_usd="50.5")))
    assert body == {
        "type": "budget.alert",
        "alert_id": "a-80",
        "tag": "team:support",
        "kind": "threshold",
        "threshold_pct": 80,
        "spend_usd": "80.123456789012",  # every digit, as a string
        "max_budget_usd": "100",  # 1E+2 written out
        "soft_budget_usd": "50.5",
        "window_start": "2026-11-22T00:00:00.000Z",
        "window_end": "2026-11-23T00:00:00.000Z",
        "at": "2026-11-22T10:30:00.000Z",
        "projected_spend_usd": None,
        "exhausted_at": None,
    }


def test_json_body_does_not_tell_a_receiver_the_other_destinations():
    assert b"finance" not in json_body(alert(destinations=["finance"]))


def test_slack_body_threshold():
    body = json.loads(slack_body(alert()))
    assert body["text"] == (
        "Budget alert: team:support reached 80% of its budget: $80.12 spent of $100.00 "
        "(window 2026-11-22 00:00 to 2026-11-23 00:00 UTC)."
    )
    header, section, context = body["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Budget alert: team:support reached 80% of its budget"},
    }
    assert section["text"] == {
        "type": "mrkdwn",
        "text": "$80.12 spent of $100.00\nWindow: 2026-11-22 00:00 to 2026-11-23 00:00 UTC",
    }
    assert context["elements"][0]["text"] == "alert a-80 at 2026-11-22T10:30:00.000Z"


def test_slack_body_soft_budget_and_escaping():
    body = json.loads(
        slack_body(
            alert(
                kind="soft_budget", threshold_pct=None, tag="x:<b>&", spend_usd="0.004", soft_budget_usd="0"
            )
        )
    )
    assert body["text"].startswith(
        "Budget alert: x:&lt;b&gt;&amp; passed its soft budget: under $0.01 spent;"
    )
    assert "soft budget $0.00" in body["text"]
    assert body["blocks"][0]["text"]["text"] == "Budget alert: x:<b>& passed its soft budget"  # plain_text


def test_projected_alerts_carry_the_projection():
    projected = alert(
        kind="projected", threshold_pct=None, projected_spend_usd="130.5", exhausted_at="2026-11-22T18:45:00Z"
    )
    body = json.loads(json_body(projected))
    assert (body["kind"], body["projected_spend_usd"], body["exhausted_at"]) == (
        "projected",
        "130.5",
        "2026-11-22T18:45:00.000Z",
    )
    assert json.loads(slack_body(projected))["text"] == (
        "Budget alert: team:support is on course to run out of budget: $80.12 spent of $100.00; "
        "$130.50 by the window's end at the current rate; runs out 2026-11-22 18:45 UTC "
        "(window 2026-11-22 00:00 to 2026-11-23 00:00 UTC)."
    )


# -- signature ------------------------------------------------------------------------------------

BODY = b'{"type":"budget.alert","alert_id":"a-80"}'
TS = 1_795_000_000


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    expected = hmac.new(SECRET.encode(), b"1795000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, TS, BODY) == f"v1={expected}"


@pytest.mark.parametrize(
    ("case", "secret", "timestamp", "body", "header", "now", "ok"),
    [
        ("as sent", SECRET, str(TS), BODY, None, TS + 1, True),
        ("bytes key, int timestamp", SECRET.encode(), TS, BODY, None, TS, True),
        ("5 min old: the edge", SECRET, str(TS), BODY, None, TS + 300, True),
        ("older than 5 min: a replay", SECRET, str(TS), BODY, None, TS + 301, False),
        ("5 min ahead", SECRET, str(TS), BODY, None, TS - 301, False),
        ("tampered body", SECRET, str(TS), BODY.replace(b"a-80", b"a-81"), None, TS, False),
        ("another timestamp than signed", SECRET, str(TS + 1), BODY, None, TS, False),
        ("wrong secret", "other", str(TS), BODY, None, TS, False),
        ("timestamp not a number", SECRET, "17950e5", BODY, None, TS, False),
        ("no v1 signature", SECRET, str(TS), BODY, "v0=abc", TS, False),
        ("empty header", SECRET, str(TS), BODY, "", TS, False),
        ("a key being rotated: one of two matches", SECRET, str(TS), BODY, "v1=00ff, {good}", TS, True),
    ],
)
def test_verify_signature(case, secret, timestamp, body, header, now, ok):
    good = sign(SECRET, TS, BODY)
    header = good if header is None else header.replace("{good}", good)
    assert verify_signature(secret, timestamp, body, header, now=now, tolerance_s=300) is ok, case


# -- settings -------------------------------------------------------------------------------------

CONFIG = json.dumps(
    {
        "finance": {"url": URL, "secret": SECRET, "default": True},
        "oncall": {"url": URL + "-slack", "format": "slack"},
    }
)


def test_destinations_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPENDLEDGER_ALERT_DESTINATIONS", CONFIG)
    destinations = Settings().alert_destinations
    assert set(destinations) == {"finance", "oncall"}
    finance, oncall = destinations["finance"], destinations["oncall"]
    assert (finance.format, finance.default, finance.secret.get_secret_value()) == ("json", True, SECRET)
    assert (oncall.format, oncall.default, oncall.secret) == ("slack", False, None)
    assert oncall.url.get_secret_value() == URL + "-slack"
    # The embedded system passes the environment's strings to model_validate.
    assert Settings.model_validate({"alert_destinations": CONFIG}).alert_destinations == destinations
    assert Settings().alert_delivery_attempts == 6 and Settings().alert_delivery_timeout_s == 5.0


def test_settings_never_show_a_url_or_secret(monkeypatch):
    monkeypatch.setenv("SPENDLEDGER_ALERT_DESTINATIONS", CONFIG)
    settings = Settings()
    destination = settings.alert_destinations["finance"]
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(destination),
        str(destination),
    ):
        assert "hooks.example.com" not in text and "k3yPart" not in text and SECRET not in text


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"finance": {"url": "' + URL + '", "secret": "' + SECRET, "not valid JSON"),
        (json.dumps([URL]), "valid dictionary"),
        (json.dumps({"finance": URL}), "valid dictionary or instance of AlertDestination"),
        (json.dumps({"finance": {"url": "ftp://hooks.example.com/k3yPart"}}), "http:// or https:// URL"),
        (json.dumps({"finance": {"url": "https:///k3yPart", "secret": SECRET}}), "URL with a host"),
        (json.dumps({"finance": {"url": URL, "format": "xml", "secret": SECRET}}), "'json' or 'slack'"),
        (json.dumps({"finance": {"url": URL, "secret": ""}}), "secret must not be empty"),
        (json.dumps({"finance": {"url": URL, "scret": SECRET}}), "unknown fields (not shown)"),
        (json.dumps({URL: {"url": URL, "secret": SECRET}}), "the name is not shown"),
        (json.dumps({"finance": {"secret": SECRET}}), "Field required"),
    ],
)
def test_invalid_destinations_are_refused_without_quoting_them(monkeypatch, value, says):
    monkeypatch.setenv("SPENDLEDGER_ALERT_DESTINATIONS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    text = str(refused.value) + repr(refused.value)
    assert says in text
    assert "alert_destinations" in text
    assert "hooks.example.com" not in text and "k3yPart" not in text and SECRET not in text


def test_a_destination_built_alone_does_not_quote_its_url():
    with pytest.raises(ValidationError) as refused:
        AlertDestination.model_validate({"url": "ftp://hooks.example.com/k3yPart"})
    assert "k3yPart" not in str(refused.value)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (
            {"alert_delivery_backoff_s": 2, "alert_delivery_backoff_max_s": 1},
            "BACKOFF_MAX_S must be at least",
        ),
        ({"alert_delivery_timeout_s": 10, "alert_delivery_deadline_s": 5}, "DEADLINE_S must be at least"),
        ({"alert_delivery_attempts": 0}, "greater than or equal to 1"),
    ],
)
def test_delivery_limits_are_checked(values, says):
    with pytest.raises(ValidationError, match=says):
        Settings(**values)


# -- retry schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "again"),
    [(200, False), (301, False), (400, False), (401, False), (404, False), (410, False), (408, True)]
    + [(429, True), (500, True), (502, True), (503, True), (504, True)],
)
def test_retryable(status, again):
    assert retryable(status) is again


POLICY = RetryPolicy()  # 6 attempts, 5 s each, 0.5 s doubling up to 8 s, 30 s in all


@pytest.mark.parametrize(
    ("attempt", "is_retryable", "retry_after_s", "elapsed_s", "delay"),
    [
        # Instant failures (a refused connection): waits of 0.5, 1, 2, 4, 8 s, so attempts start at
        # 0, 0.5, 1.5, 3.5, 7.5 and 15.5 s, and the sixth is the last.
        (1, True, None, 0.0, 0.5),
        (2, True, None, 0.5, 1.0),
        (3, True, None, 1.5, 2.0),
        (4, True, None, 3.5, 4.0),
        (5, True, None, 7.5, 8.0),
        (6, True, None, 15.5, None),
        (1, False, None, 0.0, None),  # a 400: final
        (1, True, 3.0, 0.0, 3.0),  # Retry-After: 3 is waited
        (3, True, 0.1, 1.5, 2.0),  # ... but never less than the schedule
        (1, True, 60.0, 0.0, 8.0),  # ... and never more than the cap
        # Each attempt timing out (5 s): the next starts only if it can end within 30 s of the first.
        (3, True, None, 16.5, 2.0),  # 16.5 + 2 + 5 = 23.5
        (4, True, None, 23.5, None),  # 23.5 + 4 + 5 = 32.5: past the deadline
        (5, True, None, 16.0, 8.0),  # 16 + 8 + 5 = 29
        (5, True, None, 17.1, None),  # 17.1 + 8 + 5 = 30.1
    ],
)
def test_next_delay(attempt, is_retryable, retry_after_s, elapsed_s, delay):
    got = next_delay(
        POLICY, attempt, retryable=is_retryable, retry_after_s=retry_after_s, elapsed_s=elapsed_s
    )
    assert got == delay


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("Sun, 22 Nov 2026 10:30:12 GMT", 10.0),  # NOW is 10:30:02
        ("Sun, 22 Nov 2026 10:00:00 GMT", 0.0),  # a date past: at once
        ("-1", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header, seconds):
    assert parse_retry_after(header, NOW) == seconds


# -- the delivery loop, over a mock transport -----------------------------------------------------


class FakeTime:
    """The clock and the sleeps of a delivery: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = NOW
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def delivery(
    handler: Any, destinations: dict[str, AlertDestination], time: FakeTime, **policy: Any
) -> tuple[AlertDelivery, list[DeliveryAttempt]]:
    log: list[DeliveryAttempt] = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    runner = AlertDelivery(
        destinations,
        RetryPolicy(**policy),
        client,
        log.append,
        max_age_s=3600,
        clock=time.clock,
        monotonic=time.clock,
        sleep=time.sleep,
    )
    return runner, log


def destination(**extra: Any) -> AlertDestination:
    return AlertDestination.model_validate({"url": URL, "secret": SECRET, **extra})


async def test_a_delivery_is_signed_and_retry_after_is_honoured():
    time = FakeTime()
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return (
            httpx.Response(429, headers={"Retry-After": "3"}) if len(requests) == 1 else httpx.Response(204)
        )

    runner, log = delivery(handler, {"finance": destination(default=True)}, time)
    final = await runner.deliver(alert())
    assert [(a.attempt, a.status, a.http_status, a.error) for a in log] == [
        (1, "retrying", 429, "HTTP 429"),
        (2, "delivered", 204, ""),
    ]
    assert final == [log[-1]] and time.slept == [3.0]
    second = requests[1]
    assert second.headers[ALERT_ID_HEADER] == "a-80"
    assert second.headers[TIMESTAMP_HEADER] == str(int(NOW + 3))  # signed afresh for each attempt
    assert verify_signature(
        SECRET,
        second.headers[TIMESTAMP_HEADER],
        second.content,
        second.headers[SIGNATURE_HEADER],
        now=NOW + 3,
    )
    assert second.content == json_body(alert())
    assert {a.destination for a in log} == {"finance"} and {a.alert_id for a in log} == {"a-80"}
    assert len({a.attempt_id for a in log}) == 2


async def test_destinations_are_the_defaults_and_those_named_and_unknown_ones_fail(caplog):
    time = FakeTime()
    hit: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hit.append(request.url.path)
        return httpx.Response(200)

    destinations = {
        "finance": destination(default=True),
        "oncall": destination(url=URL + "/oncall"),
        "quiet": destination(url=URL + "/quiet"),
    }
    runner, log = delivery(handler, destinations, time)
    with caplog.at_level(logging.INFO):
        final = await runner.deliver(alert(destinations=["oncall", "ghost"]))
    assert {(a.destination, a.attempt, a.status) for a in final} == {
        ("finance", 1, "delivered"),
        ("oncall", 1, "delivered"),
        ("ghost", 0, "failed"),
    }
    assert sorted(hit) == sorted([URL.split(".com")[1], URL.split(".com")[1] + "/oncall"])  # not "quiet"
    ghost = next(a for a in log if a.destination == "ghost")
    assert ghost.error == "unknown destination: not in ALERT_DESTINATIONS" and ghost.http_status is None
    warned = [r for r in caplog.records if r.getMessage() == "a budget alert names an unknown destination"]
    assert [r.destination for r in warned] == ["ghost"]
    assert await runner.deliver(alert(alert_id="nobody")) != []  # "finance" takes every alert
    runner.destinations = {"oncall": destinations["oncall"]}
    assert await runner.deliver(alert(alert_id="none")) == []  # no default, none named: nothing


async def test_an_alert_too_old_is_recorded_as_not_sent():
    time = FakeTime()
    time.now = AT.timestamp() + 3601
    runner, log = delivery(lambda r: pytest.fail("sent"), {"finance": destination(default=True)}, time)
    final = await runner.deliver(alert())
    assert [(a.attempt, a.status, a.error) for a in final] == [
        (0, "failed", "not sent: the alert is 3601 s old (ALERT_DELIVERY_MAX_AGE_S: 3600)")
    ]
    assert log == final


async def test_final_answers_and_errors_never_carry_the_url_or_secret(caplog):
    time = FakeTime()

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url} ({SECRET})", request=request)

    runner, log = delivery(refused, {"finance": destination(default=True)}, time, attempts=3)
    with caplog.at_level(logging.DEBUG):
        [final] = await runner.deliver(alert())
    assert [(a.attempt, a.status) for a in log] == [(1, "retrying"), (2, "retrying"), (3, "failed")]
    assert time.slept == [0.5, 1.0]
    assert final.error.startswith("ConnectError: cannot connect to <redacted>")
    logged = [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    assert any("budget alert not delivered" in line for line in logged)
    for text in [a.model_dump_json() for a in log] + logged:
        assert "hooks.example.com" not in text and "k3yPart" not in text and SECRET not in text

    answers = iter([httpx.Response(301, headers={"Location": URL + "/moved"})])
    runner, log = delivery(lambda r: next(answers), {"finance": destination(default=True)}, time)
    await runner.deliver(alert())
    assert [(a.attempt, a.status, a.http_status) for a in log] == [(1, "failed", 301)]  # not followed


async def test_a_failing_delivery_log_does_not_stop_the_delivery():
    time = FakeTime()
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    def broken(attempt: DeliveryAttempt) -> None:
        raise RuntimeError("kafka is gone")

    runner, _ = delivery(handler, {"finance": destination(default=True)}, time)
    runner._record = broken
    [final] = await runner.deliver_all([alert()])
    assert final.status == "delivered" and len(sent) == 1


# -- the agent's glue -----------------------------------------------------------------------------


def test_undecodable_alerts_are_skipped_with_a_warning(caplog):
    good = alert().model_dump_json().encode()
    with caplog.at_level(logging.WARNING):
        decoded = decode_alerts([b"not json", None, good])
    assert [a.alert_id for a in decoded] == ["a-80"]
    assert [r.getMessage() for r in caplog.records] == ["undecodable budget alert not delivered"] * 2


def test_the_worker_reads_the_alerts_and_the_sink_lands_the_delivery_log():
    import faust

    app = faust.App("test-alert-delivery", broker="kafka://127.0.0.1:1")
    install_alert_delivery(app, Settings())
    [agent] = app.agents.values()
    assert [t for t in agent.channel.topics] == ["spend.budget-alerts"]
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING  # it logs request URLs at INFO
    topics = Topics("p.")
    assert (
        topics.alert_deliveries == "p.spend.alert-deliveries"
        and topics.all()[topics.alert_deliveries] is False
    )
    consumed = topics.consumed()
    assert topics.budget_alerts in consumed[topics.faust_app_id]  # a stop waits for the deliveries
    assert topics.alert_deliveries in consumed[topics.sink_group]

"""spendledger.integrations.litellm without a proxy: the payloads are the shapes LiteLLM 1.108.7's proxy
passes (recorded from a real proxy, trimmed). The real proxy runs in tests/integration/test_litellm.py."""

import json
from typing import Any

import httpx
import pytest
from fastapi import HTTPException

from spendledger.integrations import litellm as plugin
from spendledger.sdk.client import MemoryClient
from spendledger.sdk.context import ATTRIBUTION_HEADER_PREFIXES

PROMPT = "SECRET-PROMPT: the quarterly numbers are"


def success_kwargs(call_id: str = "b25e6bd1-7274-46a3-b69d-b688109305c0", **slo: Any) -> dict[str, Any]:
    return {
        "litellm_call_id": call_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "litellm_params": {
            "proxy_server_request": {
                "headers": {
                    "user-agent": "curl/7.88.1",
                    "authorization": "Bearer sk-master-should-never-travel",
                    "x-litellm-tags": "team:search,env:prod",
                    "x-anyapi-app-id": "checkout",
                    "xproxy-user-id": "u-42",
                },
                "body": {"messages": [{"role": "user", "content": PROMPT}]},
            }
        },
        "standard_logging_object": {
            "id": "chatcmpl_0003",
            "model": "openai/gpt-4o",
            "model_group": "gpt-4o",
            "custom_llm_provider": "openai",
            "prompt_tokens": 1000,
            "completion_tokens": 200,
            "response_cost": 0.0045000000000000005,
            "request_tags": ["feature:summary", "team:search", "env:prod", "User-Agent: curl"],
            "end_user": "alice",
            "stream": None,
            "status": "success",
            "startTime": 1796196999.239032,
            "endTime": 1796196999.288975,
            "messages": [{"role": "user", "content": PROMPT}],
            "response": {"choices": [{"message": {"content": "SECRET-COMPLETION"}}]},
            "metadata": {
                "spend_logs_metadata": {"ticket": "T-1"},
                "requester_custom_headers": {
                    "x-litellm-tags": "team:search,env:prod",
                    "x-anyapi-app-id": "checkout",
                },
                "usage_object": {
                    "completion_tokens": 200,
                    "prompt_tokens": 1000,
                    "prompt_tokens_details": {"cached_tokens": 400},
                },
            },
            **slo,
        },
    }


def test_a_call_becomes_one_completed_event_with_its_attribution_and_no_content() -> None:
    event = plugin.call_event(success_kwargs(), "success")
    assert event is not None
    assert event["kind"] == "completed" and event["request_id"] == "b25e6bd1-7274-46a3-b69d-b688109305c0"
    assert (event["model"], event["provider"], event["status"]) == ("openai/gpt-4o", "openai", "success")
    assert event["usage"] == {
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_tokens": 400,
        "cache_write_tokens": 0,
    }
    assert event["reported_cost_usd"] == "0.0045"
    assert event["latency_ms"] == pytest.approx(49.943, abs=0.01)
    assert event["occurred_at"].startswith("2026-12-02T07:36:39.288")
    assert event["headers"] == {
        "x-litellm-tags": "team:search,env:prod",
        "x-anyapi-app-id": "checkout",
        "xproxy-user-id": "u-42",
    }
    assert event["metadata"] == {"ticket": "T-1", "tags": ["feature:summary", "team:search", "env:prod"]}
    assert event["user"] == "alice"
    sent = json.dumps(event)
    assert "SECRET" not in sent and "sk-master" not in sent and "User-Agent" not in sent


def test_anthropic_cache_writes_keep_their_own_count() -> None:
    usage = {"prompt_tokens": 1600, "completion_tokens": 200, "cache_creation_input_tokens": 100,
             "cache_read_input_tokens": 500, "prompt_tokens_details": {"cached_tokens": 500}}  # fmt: skip
    assert plugin.usage_of({}, usage) == {
        "input_tokens": 1600,
        "output_tokens": 200,
        "cache_read_tokens": 500,
        "cache_write_tokens": 100,
    }
    # Counts that cannot be (more cached than sent) are left out rather than guessed.
    assert plugin.usage_of({"prompt_tokens": 10}, {"prompt_tokens_details": {"cached_tokens": 99}}) == {
        "input_tokens": 10,
        "output_tokens": 0,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("response_cost", float("nan")), ("response_cost", -1), ("response_cost", "1e999"), ("endTime", "x")],
)
def test_absurd_values_are_left_out_not_sent(field: str, value: Any) -> None:
    event = plugin.call_event(success_kwargs(**{field: value}), "success")
    assert event is not None and "reported_cost_usd" not in event or field == "endTime"
    if field == "endTime":
        assert event is not None and "occurred_at" not in event and "latency_ms" not in event


class Blocked:
    def __init__(self, answer: dict[str, Any] | None) -> None:
        self.answer = answer
        self.asked: list[dict[str, Any]] = []

    async def check(self, request: dict[str, Any]) -> dict[str, Any] | None:
        self.asked.append(request)
        return self.answer


def pre_call_data(call_id: str = "d2de3807") -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "user": "bob",
        "messages": [{"role": "user", "content": PROMPT}],
        "metadata": {"tags": ["team:search", "User-Agent: curl"]},
        "proxy_server_request": {"headers": {"x-anyapi-app-id": "checkout", "host": "proxy"}},
        "litellm_call_id": call_id,
    }


BLOCK = {
    "allowed": False,
    "blocked_by": [{"tag": "team:search", "window_end": "2026-12-03T00:00:00+00:00"}],
    "retry_after_s": 42,
}


async def test_a_blocked_call_is_refused_with_429_and_its_failure_event_is_not_a_call() -> None:
    events = MemoryClient()
    checker = Blocked(BLOCK)
    handler = plugin.SpendLedgerHandler(events, checker)  # type: ignore[arg-type]
    with pytest.raises(HTTPException) as refused:
        await handler.async_pre_call_hook(None, None, pre_call_data(), "acompletion")
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "42"}
    assert (
        refused.value.detail["error"] == "budget_exceeded"
        and "team:search" in refused.value.detail["message"]
    )
    assert checker.asked == [
        {
            "headers": {"x-anyapi-app-id": "checkout"},
            "tags": ["team:search"],
            "user": "bob",
            "model": "gpt-4o",
        }
    ]
    failure = success_kwargs(call_id="d2de3807", status="failure", response_cost=0.0, prompt_tokens=0)
    await handler.async_log_failure_event(failure, None, None, None)
    assert events.events == []
    # A failure the upstream gave is a call: recorded, with its status.
    upstream = success_kwargs(call_id="other", error_information={"error_code": "500"})
    await handler.async_log_failure_event(upstream, None, None, None)
    [event] = events.events
    assert (event["status"], event["http_status"], event["request_id"]) == ("error", 500, "other")
    assert "reported_cost_usd" not in event


@pytest.mark.parametrize("answer", [None, {"allowed": True, "blocked_by": []}])
async def test_an_allowed_or_unanswered_call_goes_ahead(answer: dict[str, Any] | None) -> None:
    handler = plugin.SpendLedgerHandler(MemoryClient(), Blocked(answer))  # type: ignore[arg-type]
    data = pre_call_data()
    assert await handler.async_pre_call_hook(None, None, data, "acompletion") is data


async def test_a_ledger_that_is_down_is_asked_once_per_cooldown_and_never_fails_the_call() -> None:
    tries = []

    def down(request: httpx.Request) -> httpx.Response:
        tries.append(request.url.path)
        raise httpx.ConnectError("connection refused")

    now = [100.0]
    check = plugin.HttpCheck(
        "http://ledger", "key", transport=httpx.MockTransport(down), cooldown_s=5, clock=lambda: now[0]
    )
    handler = plugin.SpendLedgerHandler(MemoryClient(), check)
    for _ in range(20):
        data = pre_call_data()
        assert await handler.async_pre_call_hook(None, None, data, "acompletion") is data
    assert tries == ["/v1/check"]
    now[0] += 6
    await handler.async_pre_call_hook(None, None, pre_call_data(), "acompletion")
    assert tries == ["/v1/check", "/v1/check"]


async def test_one_answer_serves_the_same_attribution_for_a_second() -> None:
    asked = []

    def ledger(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content))
        return httpx.Response(200, json=BLOCK)

    now = [0.0]
    check = plugin.HttpCheck(
        "http://ledger", "key", transport=httpx.MockTransport(ledger), clock=lambda: now[0]
    )
    request = plugin.check_request(pre_call_data())
    assert await check.check(request) == BLOCK and await check.check(request) == BLOCK
    assert len(asked) == 1
    now[0] += 1.5
    await check.check(request)
    assert len(asked) == 2


def test_the_handler_needs_the_ledgers_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPENDLEDGER_URL", raising=False)
    with pytest.raises(RuntimeError, match="SPENDLEDGER_URL and SPENDLEDGER_API_KEY"):
        plugin.from_environment()


def test_the_sdk_reads_the_same_attribution_headers_as_the_ledger() -> None:
    from ledger.tags import ATTRIBUTION_HEADER_PREFIXES as LEDGER_PREFIXES

    assert ATTRIBUTION_HEADER_PREFIXES == LEDGER_PREFIXES


async def test_a_call_the_ledger_cannot_judge_does_not_switch_off_the_checks_of_others() -> None:
    """A caller could provoke a 4xx (101 tags, a 300-character model): that call goes ahead alone."""
    answers = iter([httpx.Response(422, json={"error": {}}), httpx.Response(200, json=BLOCK)])
    check = plugin.HttpCheck("http://ledger", "k", transport=httpx.MockTransport(lambda _: next(answers)))
    handler = plugin.SpendLedgerHandler(MemoryClient(), check)
    odd = pre_call_data()
    odd["metadata"]["tags"] = [f"t:{i}" for i in range(150)]
    assert await handler.async_pre_call_hook(None, None, odd, "acompletion") is odd
    with pytest.raises(HTTPException):  # the next call is still checked, and refused
        await handler.async_pre_call_hook(None, None, pre_call_data("other"), "acompletion")
    request = plugin.check_request({**odd, "model": "m" * 300, "user": "u" * 999})
    assert len(request["tags"]) == 100 and len(request["model"]) == 256 and len(request["user"]) == 256


@pytest.mark.parametrize(
    "body", [[], "ok", {"allowed": False, "blocked_by": "x"}, {"allowed": False, "blocked_by": [None]}, {}]
)
async def test_a_garbled_answer_lets_the_call_go_ahead(body: Any) -> None:
    check = plugin.HttpCheck(
        "http://ledger", "k", transport=httpx.MockTransport(lambda _: httpx.Response(200, json=body))
    )
    handler = plugin.SpendLedgerHandler(MemoryClient(), check)
    data = pre_call_data()
    assert await handler.async_pre_call_hook(None, None, data, "acompletion") is data


async def test_a_slow_ledger_costs_a_call_at_most_the_check_timeout() -> None:
    import asyncio
    import time

    async def slow(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=BLOCK)

    check = plugin.HttpCheck("http://ledger", "k", transport=httpx.MockTransport(slow), timeout_s=0.1)
    started = time.monotonic()
    assert await check.check(plugin.check_request(pre_call_data())) is None
    assert time.monotonic() - started < 2


def test_retry_after_stays_a_number_of_seconds_within_a_year() -> None:
    far = [{"window_end": "9999-12-31T00:00:00+00:00"}]
    assert plugin.retry_after({"retry_after_s": True, "blocked_by": far}) == 366 * 86_400
    assert plugin.retry_after({"retry_after_s": 10**12}) == 366 * 86_400
    assert plugin.retry_after({"blocked_by": [{"window_end": "not a time"}]}) == 60
    assert plugin.retry_after({"blocked_by": [{"window_end": "2000-01-01T00:00:00+00:00"}]}) == 1


def test_a_credential_header_never_travels_whatever_its_prefix() -> None:
    kwargs = success_kwargs()
    headers = kwargs["litellm_params"]["proxy_server_request"]["headers"]
    headers.update({"x-litellm-api-key": "sk-virtual-key", "X-AnyAPI-Auth-Token": "t", "xproxy-secret": "s"})
    kwargs["standard_logging_object"]["metadata"]["requester_custom_headers"]["x-litellm-api-key"] = "sk-v"
    event = plugin.call_event(kwargs, "success")
    assert event is not None and set(event["headers"]) == {
        "x-litellm-tags",
        "x-anyapi-app-id",
        "xproxy-user-id",
    }
    data = pre_call_data()
    data["proxy_server_request"]["headers"]["x-litellm-api-key"] = "sk-virtual-key"
    assert "sk-virtual-key" not in json.dumps(plugin.check_request(data))

"""Capture with the real `openai` and `anthropic` libraries, pointed at a local fake LLM server.

Each call must emit exactly one `completed` event with the model, the provider's
usage, latency, status and attribution, and no prompt or completion text; the
ledger must price what was captured exactly.
"""

import asyncio
import datetime as dt
import gc
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from ledger.attribute import Attributor
from ledger.join import JoinedCall
from ledger.pricing import PriceBook
from ledger.tags import AttributionPolicy
from schemas.budgets import BlockSignal
from spendledger.fakellm import ANTHROPIC_START_USAGE, CHAT_USAGE, PROMPT, FakeLLM
from spendledger.guard import BudgetGuard
from spendledger.sdk import BudgetExceededError, MemoryClient, SpendClient, instrument, track, track_context

MESSAGES = [{"role": "user", "content": PROMPT}]
CLAUDE = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture
def events() -> MemoryClient:
    return MemoryClient()


def openai_client(llm: FakeLLM, events: MemoryClient, cls: Any = openai.OpenAI, **defaults: Any) -> Any:
    return instrument(cls(base_url=llm.url, api_key="sk-test-secret", max_retries=0), events, **defaults)


def anthropic_client(llm: FakeLLM, events: MemoryClient, cls: Any = anthropic.Anthropic) -> Any:
    base = llm.url.removesuffix("/v1")
    return instrument(cls(base_url=base, api_key="sk-ant-test-secret", max_retries=0), events)


def cost(event: dict[str, Any]) -> Decimal | None:
    """What the ledger makes of a captured event."""
    record = Attributor(AttributionPolicy(), PriceBook()).record(
        JoinedCall(event["request_id"], "completed", usage=event)
    )
    return record.cost_usd


def only(events: MemoryClient) -> dict[str, Any]:
    assert len(events.events) == 1, events.events
    return events.events[0]


def test_chat_completion_is_captured_with_usage_attribution_and_no_text(llm, events):
    client = openai_client(llm, events, app_id="support-bot")
    with track_context(user_id="u1", team="support"):
        answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.choices[0].message.content.startswith("SECRET-COMPLETION")  # the caller's answer is intact
    event = only(events)
    assert event["kind"] == "completed" and event["status"] == "success" and event["http_status"] == 200
    assert (event["model"], event["provider"]) == ("gpt-4o", "openai")
    assert event["usage"]["prompt_tokens"] == 1000 and event["usage"]["completion_tokens"] == 200
    assert event["metadata"]["app_id"] == "support-bot"
    assert event["metadata"]["user_id"] == "u1" and event["metadata"]["team"] == "support"
    assert event["metadata"]["provider_response_id"].startswith("chatcmpl_")
    assert event["latency_ms"] > 0
    assert dt.datetime.fromisoformat(event["occurred_at"]).tzinfo is not None
    assert cost(event) == Decimal("0.0045")  # 1000 × $2.50/M + 200 × $10/M
    assert "SECRET" not in json.dumps(events.events) and "sk-test" not in json.dumps(events.events)


def test_stream_usage_comes_from_the_final_chunk_which_the_caller_does_not_see(llm, events):
    client = openai_client(llm, events)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert llm.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert all(chunk.choices for chunk in chunks)  # the injected usage-only chunk is hidden
    event = only(events)
    assert event["status"] == "success" and event["usage"] == events.events[0]["usage"]
    assert event["usage"]["prompt_tokens"] == CHAT_USAGE["prompt_tokens"]
    assert cost(event) == Decimal("0.0045")
    assert "SECRET" not in json.dumps(events.events)


def test_a_caller_who_asked_for_usage_still_sees_the_usage_chunk(llm, events):
    client = openai_client(llm, events)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    with stream:
        chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert only(events)["status"] == "success"


@pytest.mark.parametrize("how", ["close", "with", "garbage"])
def test_a_stream_left_early_is_recorded_once_as_incomplete_and_unpriced(llm, events, how):
    client = openai_client(llm, events)

    def read_three(stream: Any) -> None:
        for n, _ in enumerate(stream):
            if n == 2:
                break

    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    if how == "close":
        read_three(stream)
        stream.close()
        stream.close()
    elif how == "with":
        with stream:
            read_three(stream)
    else:
        read_three(stream)
        del stream
        gc.collect()
    event = only(events)
    assert event["status"] == "incomplete" and "usage" not in event
    assert cost(event) is None  # OpenAI reports usage only at the end: unknown, not $0


def test_responses_and_embeddings_are_captured_streamed_or_not(llm, events):
    client = openai_client(llm, events)
    client.responses.create(model="gpt-4o", input=PROMPT)
    list(client.responses.create(model="gpt-4o", input=PROMPT, stream=True))
    client.embeddings.create(model="text-embedding-3-small", input=PROMPT)
    plain, streamed, embedding = events.events
    for event in (plain, streamed):
        assert event["status"] == "success" and event["usage"]["input_tokens_details"]["cached_tokens"] == 400
        assert cost(event) == Decimal("0.004")  # 600 × $2.50/M + 400 cached × $1.25/M + 200 × $10/M
    assert embedding["model"] == "text-embedding-3-small"
    assert cost(embedding) == Decimal("0.00000016")  # 8 × $0.02/M


def test_anthropic_messages_create_and_stream_are_captured(llm, events):
    client = anthropic_client(llm, events)
    with track_context(feature="summarize"):
        client.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES)
        list(client.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES, stream=True))
        with client.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as stream:
            text = "".join(stream.text_stream)
    assert text.startswith("SECRET-COMPLETION")
    assert len(events.events) == 3
    for event in events.events:
        assert event["status"] == "success" and event["provider"] == "anthropic"
        assert event["metadata"]["feature"] == "summarize"
        assert event["usage"]["output_tokens"] == 200 and event["usage"]["cache_read_input_tokens"] == 500
        # input_tokens excludes Anthropic's cache tokens: 1000 + 500 read + 100 written.
        # 1000 × $1/M + 500 × $0.10/M + 100 × $1.25/M + 200 × $5/M
        assert cost(event) == Decimal("0.002175")
    assert "SECRET" not in json.dumps(events.events)


def test_an_anthropic_stream_left_early_is_priced_on_the_input_it_reported(llm, events):
    client = anthropic_client(llm, events)
    with client.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as stream:
        for n, _ in enumerate(stream):
            if n == 3:
                break
    event = only(events)
    assert event["status"] == "incomplete"
    assert event["usage"]["input_tokens"] == ANTHROPIC_START_USAGE["input_tokens"]
    # 1000 × $1/M + 500 × $0.10/M + 100 × $1.25/M + 1 × $5/M: what the provider had reported
    assert cost(event) == Decimal("0.00118")


def test_a_failed_call_is_recorded_as_error_and_the_error_reaches_the_caller(llm, events):
    client = openai_client(llm, events)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="fail-model", messages=MESSAGES)
    assert raised.value.status_code == 500
    event = only(events)
    assert (event["status"], event["http_status"], event["model"]) == ("error", 500, "fail-model")


def test_the_attribution_is_taken_when_the_call_starts(llm, events):
    client = openai_client(llm, events)

    @track(feature="report")
    def start_stream() -> Any:
        with track_context(user_id="u7"):
            return client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)

    stream = start_stream()
    list(stream)  # consumed outside both scopes
    assert {k: only(events)["metadata"][k] for k in ("feature", "user_id")} == {
        "feature": "report",
        "user_id": "u7",
    }


def test_instrumenting_twice_records_once_and_other_clients_are_refused(llm, events):
    client = openai_client(llm, events)
    instrument(client, events)
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(events.events) == 1
    with pytest.raises(TypeError, match="openai or anthropic"):
        instrument(object(), events)


def test_the_guard_refuses_a_blocked_call_before_it_is_sent(llm, events):
    guard = BudgetGuard({}, "unused")
    now = dt.datetime.now(dt.UTC)
    guard.view.put(
        "team:support",
        BlockSignal(
            tag="team:support",
            blocked=True,
            spend_usd=Decimal(10),
            max_budget_usd=Decimal(10),
            window_start=now - dt.timedelta(hours=1),
            window_end=now + dt.timedelta(hours=1),
            updated_at=now,
        ),
    )
    guard.view.mark_current()
    client = instrument(
        openai.OpenAI(base_url=llm.url, api_key="sk-test", max_retries=0), events, guard=guard
    )
    sent_before = len(llm.requests)
    with track_context(team="support"), pytest.raises(BudgetExceededError, match="team:support") as raised:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert raised.value.decision.retry_after_s > 3000
    assert len(llm.requests) == sent_before and events.events == []
    with track_context(team="search"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(events.events) == 1


async def test_async_clients_capture_streams_and_cancelled_tasks(llm, events):
    oai = openai_client(llm, events, openai.AsyncOpenAI)
    claude = anthropic_client(llm, events, anthropic.AsyncAnthropic)
    with track_context(user_id="async-user"):
        await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        stream = await oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        async with claude.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as message_stream:
            await message_stream.get_final_message()

        started = asyncio.Event()

        async def read_forever() -> None:
            stream = await claude.messages.create(
                model=CLAUDE, max_tokens=100, messages=MESSAGES, stream=True
            )
            async with stream:  # leaving it (here: by cancellation) closes the stream
                async for _ in stream:
                    started.set()
                    await asyncio.sleep(10)

        task = asyncio.create_task(read_forever())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert all(chunk.choices for chunk in chunks)
    statuses = [(e["provider"], e["status"]) for e in events.events]
    assert statuses == [
        ("openai", "success"),
        ("openai", "success"),
        ("anthropic", "success"),
        ("anthropic", "incomplete"),
    ]
    assert all(e["metadata"]["user_id"] == "async-user" for e in events.events)
    assert cost(events.events[1]) == Decimal("0.0045") and cost(events.events[2]) == Decimal("0.002175")


def test_the_llm_call_succeeds_when_the_ledger_is_down(llm):
    spend = SpendClient(
        "http://127.0.0.1:9", "sl_prod_x", retry_for_s=0.5, retry_base_s=0.05, flush_at_exit=False
    )
    client = instrument(openai.OpenAI(base_url=llm.url, api_key="sk-test", max_retries=0), spend)
    answer = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.choices[0].message.content.startswith("SECRET-COMPLETION")
    assert spend.flush(10)
    spend.close()
    assert (spend.stats.sent, spend.stats.dropped) == (0, 1)

"""SpendLedgerMiddleware in front of a small gateway app, through httpx's ASGITransport."""

import datetime as dt
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from schemas.budgets import BlockSignal
from spendledger.fakellm import CHAT_USAGE, PROMPT, FakeLLM
from spendledger.guard import BudgetGuard
from spendledger.sdk import MemoryClient, SpendLedgerMiddleware, instrument

HEADERS = {
    "Authorization": "Bearer sk-caller-secret",
    "X-AnyAPI-App-ID": "my-chatbot-v2",
    "x-litellm-tags": "team:support,env:prod",
    "xProxy-User-ID": "user_123",
    "Cookie": "session=secret",
}
BODY = {"model": "gpt-4o", "user": "customer_54321", "metadata": {"feature": "chat"}, "messages": [PROMPT]}


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def gateway(llm: FakeLLM, events: MemoryClient) -> FastAPI:
    """A gateway that answers itself (JSON or SSE), or calls the fake LLM through an instrumented client."""
    app = FastAPI()
    upstream = instrument(openai.AsyncOpenAI(base_url=llm.url, api_key="sk-up", max_retries=0), events)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        if body.get("model") == "broken":
            return JSONResponse({"error": {"message": "upstream down"}}, status_code=502)
        if body.get("via_sdk"):
            answer = await upstream.chat.completions.create(model=body["model"], messages=[])
            return JSONResponse(answer.model_dump())
        if body.get("stream"):

            async def sse() -> AsyncIterator[bytes]:
                chunk = {
                    "id": "chatcmpl-9",
                    "model": body["model"],
                    "choices": [{"delta": {"content": "hi"}}],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                usage_chunk = {"id": "chatcmpl-9", "model": body["model"], "choices": [], "usage": CHAT_USAGE}
                yield f"data: {json.dumps(usage_chunk)}\n\ndata: [DONE]\n\n".encode()

            return StreamingResponse(sse(), media_type="text/event-stream")
        return {"id": "chatcmpl-1", "model": body["model"], "choices": [], "usage": CHAT_USAGE}

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def blocking_guard(tag: str) -> BudgetGuard:
    guard = BudgetGuard({}, "unused")
    now = dt.datetime.now(dt.UTC)
    signal = BlockSignal(
        tag=tag,
        blocked=True,
        spend_usd=Decimal("10.5"),
        max_budget_usd=Decimal(10),
        window_start=now - dt.timedelta(hours=1),
        window_end=now + dt.timedelta(minutes=10),
        updated_at=now,
    )
    guard.view.put(tag, signal)
    guard.view.mark_current()
    return guard


async def call(app: Any, path: str = "/v1/chat/completions", **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        if path == "/healthz":
            return await http.get(path)
        return await http.post(path, headers=HEADERS, **kwargs)


async def test_a_json_answer_is_emitted_with_the_callers_attribution_and_no_secrets(llm):
    events = MemoryClient()
    app = SpendLedgerMiddleware(gateway(llm, events), events=events, provider="openai")
    response = await call(app, json=BODY)
    assert response.status_code == 200 and response.json()["usage"] == CHAT_USAGE
    (event,) = events.events
    assert event["status"] == "success" and event["http_status"] == 200
    assert (event["model"], event["provider"], event["usage"]) == ("gpt-4o", "openai", CHAT_USAGE)
    assert event["headers"] == {
        "x-anyapi-app-id": "my-chatbot-v2",
        "x-litellm-tags": "team:support,env:prod",
        "xproxy-user-id": "user_123",
    }
    assert event["metadata"]["feature"] == "chat" and event["user"] == "customer_54321"
    text = json.dumps(event)
    assert "secret" not in text and PROMPT not in text


async def test_a_streamed_answer_is_emitted_with_the_usage_of_its_last_chunk(llm):
    events = MemoryClient()
    app = SpendLedgerMiddleware(gateway(llm, events), events=events, provider="openai")
    response = await call(app, json={**BODY, "stream": True})
    assert response.status_code == 200 and "data: [DONE]" in response.text
    (event,) = events.events
    assert event["status"] == "success" and event["usage"] == CHAT_USAGE
    assert event["metadata"]["provider_response_id"] == "chatcmpl-9"


async def test_a_call_an_instrumented_client_captured_is_not_emitted_twice(llm):
    events = MemoryClient()
    app = SpendLedgerMiddleware(gateway(llm, events), events=events)
    response = await call(app, json={**BODY, "via_sdk": True})
    assert response.status_code == 200
    (event,) = events.events  # the capture's, carrying the gateway caller's attribution
    assert event["provider"] == "openai" and event["usage"]["prompt_tokens"] == 1000
    assert event["headers"]["x-anyapi-app-id"] == "my-chatbot-v2" and event["user"] == "customer_54321"


async def test_a_blocked_call_gets_429_and_never_reaches_the_app(llm):
    events = MemoryClient()
    middleware = SpendLedgerMiddleware(
        gateway(llm, events), events=events, guard=blocking_guard("team:support")
    )
    sent_before = len(llm.requests)
    response = await call(middleware, json={**BODY, "via_sdk": True})
    assert response.status_code == 429
    assert 500 <= int(response.headers["Retry-After"]) <= 600
    error = response.json()["error"]
    assert error["type"] == "budget_exceeded" and error["tags"] == ["team:support"]
    assert error["blocked_by"][0]["spend_usd"] == "10.5" and "team:support" in error["message"]
    assert events.events == [] and len(llm.requests) == sent_before and middleware.blocked == 1


async def test_body_metadata_alone_can_block(llm):
    events = MemoryClient()
    app = SpendLedgerMiddleware(gateway(llm, events), events=events, guard=blocking_guard("feature:chat"))
    assert (await call(app, json=BODY)).status_code == 429
    assert (await call(app, json={**BODY, "metadata": {"feature": "search"}})).status_code == 200


async def test_errors_are_emitted_with_their_status_and_other_paths_are_left_alone(llm):
    events = MemoryClient()
    app = SpendLedgerMiddleware(gateway(llm, events), events=events)
    assert (await call(app, json={**BODY, "model": "broken"})).status_code == 502
    assert (await call(app, "/healthz")).status_code == 200
    (event,) = events.events
    assert (event["status"], event["http_status"], event["model"]) == ("error", 502, "broken")

"""An app and a gateway using the SDK, against the real system: rows land in ClickHouse, attributed and priced.

The LLM is the only stand-in (tests/fakellm.py); the broker, the worker, the
API and ClickHouse (chDB) are the real ones, started by the project's code.
"""

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fastapi import FastAPI, Request

from spendledger.fakellm import PROMPT, FakeLLM
from spendledger.sdk import SpendClient, SpendLedgerMiddleware, budget_guard, instrument, track, track_context
from tests.integration.conftest import Ledger

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


def test_an_app_using_the_sdk_lands_attributed_priced_rows(ledger: Ledger, llm: FakeLLM) -> None:
    run = f"sdk{uuid.uuid4().hex[:10]}"
    spend = SpendClient(ledger.system.api_url, ledger.system.producer_key, flush_at_exit=False)
    oai = instrument(
        openai.OpenAI(base_url=llm.url, api_key="sk-live-secret", max_retries=0), spend, app_id=run
    )
    claude = instrument(
        anthropic.Anthropic(base_url=llm.url.removesuffix("/v1"), api_key="sk-ant-secret", max_retries=0),
        spend,
        app_id=run,
    )

    @track(feature="summarize")
    def summarize(user_id: str) -> None:
        with track_context(user_id=user_id, team="support", env="prod"):
            oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
            list(oai.chat.completions.create(model="gpt-4o", messages=[], stream=True))
            with claude.messages.stream(model="claude-haiku-4-5", max_tokens=50, messages=[]) as stream:
                stream.get_final_message()

    @track(feature="search")
    def search_abandoned() -> None:
        stream = oai.chat.completions.create(model="gpt-4o", messages=[], stream=True)
        next(iter(stream))
        stream.close()

    for n in range(3):
        summarize(f"user_{n}")
    search_abandoned()
    assert spend.flush(30)
    spend.close()
    assert (spend.stats.sent, spend.stats.dropped, spend.stats.rejected) == (10, 0, 0)

    query = (
        "SELECT user_id, team, environment, feature, provider, model, status, cost_usd, input_tokens, "
        f"cache_read_tokens, cache_write_tokens FROM spend_records WHERE app_id = '{run}' "
        "ORDER BY feature, user_id, provider, status"
    )
    rows = ledger.wait_for(query, lambda rows: len(rows) >= 10)
    assert len(rows) == 10
    summarized = [r for r in rows if r[3] == "summarize"]
    assert len(summarized) == 9
    assert {tuple(r[:4]) for r in summarized} == {
        (f"user_{n}", "support", "production", "summarize") for n in range(3)
    }
    costs = sorted(Decimal(r[7]) for r in summarized)
    assert costs == [Decimal("0.002175")] * 3 + [Decimal("0.0045")] * 6  # haiku with cache; gpt-4o 1000/200
    claude_row = next(r for r in summarized if r[4] == "anthropic")
    assert claude_row[8:] == [1600, 500, 100]  # Anthropic input + cache read + cache write
    (abandoned,) = [r for r in rows if r[3] == "search"]
    assert (abandoned[0], abandoned[6], abandoned[7]) == ("", "incomplete", None)  # unknown cost, not $0

    # No prompt, completion or provider key anywhere in the rows (every column, as text).
    leaked = ledger.sql(
        f"SELECT count() FROM spend_records WHERE app_id = '{run}' "
        "AND positionCaseInsensitive(formatRow('TSV', *), 'secret') > 0"
    )
    assert leaked == [[0]]
    control = ledger.sql(
        f"SELECT count() FROM spend_records WHERE app_id = '{run}' "
        "AND positionCaseInsensitive(formatRow('TSV', *), 'summarize') > 0"
    )
    assert control == [[9]]  # the same check does find what is there


def test_a_gateway_with_the_middleware_blocks_a_tag_once_its_budget_is_spent(
    ledger: Ledger, llm: FakeLLM
) -> None:
    run = f"gw{uuid.uuid4().hex[:10]}"
    r = ledger.new_budget(f"team:{run}", 0.001, "1d")
    assert r.status_code == 200, r.text

    spend = SpendClient(ledger.system.api_url, ledger.system.producer_key, flush_at_exit=False)
    guard = budget_guard(ledger.bootstrap, topic_prefix=ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"])
    upstream = instrument(openai.AsyncOpenAI(base_url=llm.url, api_key="sk-up", max_retries=0), spend)
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        answer = await upstream.chat.completions.create(model=body["model"], messages=body["messages"])
        return answer.model_dump()

    gateway = SpendLedgerMiddleware(app, events=spend, guard=guard)
    headers = {"X-AnyAPI-App-ID": run, "x-litellm-tags": f"team:{run}", "Authorization": "Bearer sk-caller"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}], "user": "caller_1"}

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gw"
        ) as http:
            return await http.post("/v1/chat/completions", json=body, headers=headers)

    try:
        assert asyncio.run(send()).status_code == 200  # under budget: goes through, costs $0.0045
        assert spend.flush(30)
        deadline = time.monotonic() + 60
        while guard.check([f"team:{run}"]).allowed:
            assert time.monotonic() < deadline, "the guard never saw the block"
            time.sleep(0.1)
        blocked = asyncio.run(send())
        assert blocked.status_code == 429, blocked.text
        assert blocked.json()["error"]["tags"] == [f"team:{run}"]
        assert int(blocked.headers["Retry-After"]) >= 1
    finally:
        guard.stop()
        spend.close()

    rows = ledger.wait_for(
        f"SELECT user_id, team, cost_usd FROM spend_records WHERE app_id = '{run}'",
        lambda rows: len(rows) >= 1,
    )
    assert rows == [
        ["caller_1", run, "0.004500000000"]
    ]  # the blocked call never reached the LLM or the ledger


def doc_examples() -> list[str]:
    text = (Path(__file__).parents[3] / "docs" / "sdk.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_every_example_in_docs_sdk_md_runs_and_lands(
    ledger: Ledger, llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/sdk.md's examples run unchanged: providers from OPENAI_/ANTHROPIC_BASE_URL, the ledger from SPENDLEDGER_*."""
    env = {
        "OPENAI_BASE_URL": llm.url,
        "OPENAI_API_KEY": "sk-docs-secret",
        "ANTHROPIC_BASE_URL": llm.url.removesuffix("/v1"),
        "ANTHROPIC_API_KEY": "sk-ant-docs-secret",
        "SPENDLEDGER_URL": ledger.system.api_url,
        "SPENDLEDGER_API_KEY": ledger.system.producer_key,
        "SPENDLEDGER_KAFKA_BOOTSTRAP": ledger.bootstrap,
        "SPENDLEDGER_TOPIC_PREFIX": ledger.system.child_env["SPENDLEDGER_TOPIC_PREFIX"],
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The examples' app id is fixed, and other modules of this system send calls for it too.
    started = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S")
    examples = doc_examples()
    assert len(examples) == 7
    for n, source in enumerate(examples):
        namespace: dict[str, Any] = {"__name__": f"docs_sdk_example_{n}"}
        exec(compile(source, f"docs/sdk.md example {n + 1}", "exec"), namespace)  # noqa: S102 - our own docs
        if "guard" in namespace:
            assert namespace["guard"].staleness_s is not None  # it read the real blocks topic
            namespace["guard"].stop()
        if "spend" in namespace:
            namespace["spend"].close()
            stats = namespace["spend"].stats
            assert (stats.queued, stats.rejected, stats.dropped) == (0, 0, 0), stats

    rows = ledger.wait_for(
        "SELECT user_id, team, environment, feature, tenant_id, model, status, cost_usd FROM spend_records "
        f"WHERE app_id = 'my-chatbot-v2' AND received_at >= toDateTime64('{started}', 3, 'UTC') ORDER BY user_id, model, status",
        lambda rows: len(rows) >= 11,
    )
    assert len(rows) == 11
    assert ["customer_54321", "support", "production", "", "", "gpt-4o", "success", "0.004500000000"] in rows
    assert ["acme:u_17", "", "", "summarize", "acme", "gpt-4o-mini", "success", "0.000270000000"] in rows
    assert ["customer_54321", "search", "", "", "", "gemini-2.5-flash", "success", "0.001110000000"] in rows
    assert sorted(r[0] for r in rows if r[0].startswith("user_")) == [f"user_{n}" for n in range(5)]
    assert [r[6:] for r in rows if r[6] == "incomplete"] == [["incomplete", None]]

"""`spendledger demo`: realistic synthetic traffic, so a new user sees populated reports and a dashboard.

Five apps owned by four teams, three environments, several features, five
priced models across OpenAI, Anthropic and Google, and one model the catalog
does not know. Attribution arrives the ways producers really send it
(`X-AnyAPI-*` headers, `x-litellm-tags`, body metadata), and part of the traffic
carries no team or no environment, so coverage has an untagged bucket to show.
Calls spread over the last `days` days, weighted towards working hours.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class App:
    app_id: str
    name: str
    team: str | None  # None: this app's callers do not tag a team (the untagged bucket)
    features: tuple[str, ...]
    models: tuple[str, ...]
    style: str  # how it sends attribution: "anyapi", "litellm" or "metadata"
    weight: int


APPS = (
    App("support-bot", "Support Chatbot", "support", ("chat", "escalation-summary"),
        ("openai/gpt-4o", "openai/gpt-4o-mini"), "anyapi", 40),
    App("search-api", "Search", "search", ("query-rewrite", "rerank"),
        ("openai/gpt-4o-mini", "google/gemini-2.5-flash"), "litellm", 25),
    App("analytics-copilot", "Analytics Copilot", "data", ("sql-assistant",),
        ("anthropic/claude-sonnet-4-5", "anthropic/claude-haiku-4-5"), "metadata", 15),
    App("batch-summarizer", "Batch Summarizer", "platform", ("nightly-digest",),
        ("anthropic/claude-haiku-4-5", "acme/llama-internal-70b"), "litellm", 12),
    App("internal-tools", "Internal Tools", None, ("",),
        ("openai/gpt-4o-mini", "acme/llama-internal-70b"), "metadata", 8),
)  # fmt: skip
ENVIRONMENTS = (("prod", 70), ("staging", 20), ("dev", 7), ("", 3))

# Budgets the demo creates, so the dashboard has progress bars (one of them is small enough to block).
BUDGETS = (
    {"name": "team:support", "max_budget": 50, "budget_duration": "30d"},
    {"name": "team:search", "max_budget": 0.05, "budget_duration": "1d"},
    {"name": "team:data", "max_budget": 20, "budget_duration": "7d"},
)


def events(count: int, *, now: datetime, days: int = 7, seed: int = 42) -> Iterator[dict[str, Any]]:
    """`count` completed-call events over the `days` days before `now` (deterministic for a seed)."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
    users = [f"user_{n:03d}" for n in range(200)]
    user_weights = [1 / (n + 1) for n in range(200)]  # a few heavy users, a long tail
    for i in range(count):
        app = rng.choices(APPS, weights=[a.weight for a in APPS])[0]
        model = rng.choice(app.models)
        env = rng.choices([e for e, _ in ENVIRONMENTS], weights=[w for _, w in ENVIRONMENTS])[0]
        if app.app_id == "batch-summarizer":
            env = "staging" if rng.random() < 0.5 else env
        feature = rng.choice(app.features)
        team = app.team if rng.random() > 0.04 else None  # a few callers forget the team
        user = rng.choices(users, weights=user_weights)[0]
        event: dict[str, Any] = {
            "kind": "completed",
            "event_id": f"evt_demo_{seed}_{i}",
            "request_id": f"req_demo_{uuid.UUID(int=rng.getrandbits(128)).hex}",
            "occurred_at": _moment(rng, now, days).isoformat(),
            "model": model,
            "usage": _usage(rng, model),
            "latency_ms": round(rng.lognormvariate(6.6, 0.5)),
            "status": "success" if rng.random() > 0.02 else "error",
        }
        event.update(_attribution(app, team, env, feature, user))
        yield event


def _moment(rng: random.Random, now: datetime, days: int) -> datetime:
    day = rng.randrange(days)
    hour = min(23, max(0, round(rng.gauss(14, 4))))  # busier in working hours (UTC)
    moment = (now - timedelta(days=day)).replace(
        hour=hour, minute=rng.randrange(60), second=rng.randrange(60)
    )
    return min(moment, now).astimezone(UTC)


def _usage(rng: random.Random, model: str) -> dict[str, Any]:
    prompt = round(rng.lognormvariate(7.0, 0.8))
    completion = round(rng.lognormvariate(5.3, 0.7))
    if model.startswith("anthropic/"):
        cached = prompt // 2 if rng.random() < 0.4 else 0
        return {"input_tokens": prompt, "output_tokens": completion, "cache_read_input_tokens": cached}
    if model.startswith("google/"):
        return {"promptTokenCount": prompt, "candidatesTokenCount": completion}
    cached = (prompt // 1024) * 1024 if rng.random() < 0.3 else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _attribution(app: App, team: str | None, env: str, feature: str, user: str) -> dict[str, Any]:
    if app.style == "anyapi":
        headers = {"X-AnyAPI-App-ID": app.app_id, "X-AnyAPI-App-Name": app.name, "X-AnyAPI-User-ID": user}
        tags = [
            t
            for t in (f"team:{team}" if team else "", f"env:{env}" if env else "", f"feature:{feature}")
            if t
        ]
        return {"headers": headers, "metadata": {"tags": tags}}
    if app.style == "litellm":
        tags = [f"app:{app.app_id}", f"feature:{feature}"]
        tags += [f"team:{team}"] if team else []
        tags += [f"env:{env}"] if env else []
        return {"headers": {"x-litellm-tags": ",".join(tags)}, "user": user}
    metadata = {"app_id": app.app_id, "app_name": app.name, "feature": feature or None, "user_id": user}
    if team:
        metadata["department"] = team  # an alias of team
    if env:
        metadata["environment"] = env
    return {"metadata": {k: v for k, v in metadata.items() if v}}
